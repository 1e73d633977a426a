// rope: rotary position embedding, in place on the q and k heads of a fused
// qkv buffer [B, S, 3 * H * d] (per token: H q heads, H k heads, H v heads).
// With h = d / 2 and the tables cos, sin [S, d] built as the CPU reference
// builds them (src/backend/cpu/rope.rs, f32):
//   forward   out_i = x_i c_i - x_{i+h} s_i,   out_{i+h} = x_{i+h} c_{i+h} + x_i s_{i+h}
//   backward  (the transpose, a rotation by -angle)
//             dx_i = g_i c_i + g_{i+h} s_{i+h},  dx_{i+h} = g_{i+h} c_{i+h} - g_i s_i
//
// Design rule: grid-stride over rotation pairs (i, i+h) of the 2 H rotated
// heads of every token, 8 consecutive pairs per step as 16-byte packs when
// h % 8 == 0 and qkv is 16-byte aligned (the tables are then read as 16-byte
// f32 packs too), else one pair per step. f32 math, one bf16 rounding per
// output (the reference rotates in f32 and casts back). Each pair is read and
// written by one thread, so in place is safe; v heads are never touched.
#include "rope.cuh"

static __device__ void rope_apply(const RopeArgs& a, bool transpose) {
    const long h = a.d / 2;
    const long heads = 2L * a.H;           // rotated heads per token
    const long width = 3L * a.H * a.d;     // qkv row
    constexpr int P = Pack128<bf16>::size;
    if (h % P == 0 && is_aligned16(a.qkv) && is_aligned16(a.cos) && is_aligned16(a.sin)) {
        const long groups = h / P;         // pair groups per head
        const long total = a.tokens * heads * groups;
        for (long q = thread_index(); q < total; q += thread_count()) {
            const long i = (q % groups) * P;
            const long head = q / groups % heads;
            const long token = q / (groups * heads);
            const long pos = token % a.S;
            bf16* x = a.qkv + token * width + head * a.d;
            const float* c = a.cos + pos * a.d;
            const float* s = a.sin + pos * a.d;
            rope_rotate_pack8(x, c, s, i, h, transpose);
        }
    } else {
        const long total = a.tokens * heads * h;
        for (long q = thread_index(); q < total; q += thread_count()) {
            const long i = q % h;
            const long head = q / h % heads;
            const long token = q / (h * heads);
            const long pos = token % a.S;
            bf16* x = a.qkv + token * width + head * a.d;
            const float* c = a.cos + pos * a.d;
            const float* s = a.sin + pos * a.d;
            float r1, r2;
            rope_rotate(to_f32(x[i]), to_f32(x[i + h]), c[i], c[i + h], s[i], s[i + h], transpose, &r1, &r2);
            x[i] = to_bf16(r1);
            x[i + h] = to_bf16(r2);
        }
    }
}

extern "C" __global__ void rope_forward_bf16(const RopeArgs a) { rope_apply(a, false); }

extern "C" __global__ void rope_backward_bf16(const RopeArgs a) { rope_apply(a, true); }
