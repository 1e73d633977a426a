// optim: the optimiser updates of docs/optimizer.md -- AdamATan2 over flat f32
// master weights (also writing their bf16 copy), sparse sign-SGD on the
// puzzle-embedding rows of a batch, and the EMA of the weights.
//
// Design rule: elementwise updates are grid-stride loops over n, as 4-element
// f32 packs when every pointer is 16-byte aligned, else one element at a
// time. Inputs the kernel only reads (gradient; weights for the EMA) take the
// streaming non-coherent load, the optimiser state goes back with streaming
// stores. f32 math; the host computes the per-step scalars (bias corrections,
// decay factors) in f64 and passes them rounded to f32, so a kernel does
// exactly the operations of the spec, in its order.
//
// Sign-SGD deduplicates by itself: ids need not be distinct. One block per
// batch row (grid-stride over rows): the block of an id's first occurrence
// sums the gradient rows of every occurrence in ascending row order (a fixed
// order, so the result is deterministic) and alone updates that table row;
// the blocks of later occurrences do nothing.
#include "common.cuh"

// One AdamATan2 step of one weight, in the spec's order.
static __device__ __forceinline__ void adam_atan2(const AdamAtan2Args& a, float g, float& w, float& m, float& v) {
    w *= a.decay;
    m += a.one_minus_beta1 * (g - m);
    v += a.one_minus_beta2 * (g * g - v);
    w -= a.step_size * atan2f(m, sqrtf(v) / a.sqrt_bc2);
}

extern "C" __global__ void adam_atan2_f32(const AdamAtan2Args a) {
    long done = 0;
    if (is_aligned16(a.w) && is_aligned16(a.m) && is_aligned16(a.v) && is_aligned16(a.g) &&
        (a.w_bf16 == nullptr || (uintptr_t)a.w_bf16 % 8 == 0)) {
        const long n_pack = a.n / 4;
        for (long p = thread_index(); p < n_pack; p += thread_count()) {
            const long i = p * 4;
            float4 w = *reinterpret_cast<const float4*>(a.w + i);
            float4 m = *reinterpret_cast<const float4*>(a.m + i);
            float4 v = *reinterpret_cast<const float4*>(a.v + i);
            const int4 gi = load_stream16(a.g + i);
            float4 g;
            memcpy(&g, &gi, 16);
            adam_atan2(a, g.x, w.x, m.x, v.x);
            adam_atan2(a, g.y, w.y, m.y, v.y);
            adam_atan2(a, g.z, w.z, m.z, v.z);
            adam_atan2(a, g.w, w.w, m.w, v.w);
            *reinterpret_cast<float4*>(a.w + i) = w;
            int4 mo, vo;
            memcpy(&mo, &m, 16);
            memcpy(&vo, &v, 16);
            store_stream16(a.m + i, mo);
            store_stream16(a.v + i, vo);
            if (a.w_bf16 != nullptr) {
                __nv_bfloat162 lo = __floats2bfloat162_rn(w.x, w.y), hi = __floats2bfloat162_rn(w.z, w.w);
                uint2 packed;
                memcpy(&packed.x, &lo, 4);
                memcpy(&packed.y, &hi, 4);
                *reinterpret_cast<uint2*>(a.w_bf16 + i) = packed;
            }
        }
        done = n_pack * 4;
    }
    for (long i = done + thread_index(); i < a.n; i += thread_count()) {
        float w = a.w[i], m = a.m[i], v = a.v[i];
        adam_atan2(a, a.g[i], w, m, v);
        a.w[i] = w;
        a.m[i] = m;
        a.v[i] = v;
        if (a.w_bf16 != nullptr) a.w_bf16[i] = to_bf16(w);
    }
}

// sign(0) = 0, as torch.sign.
static __device__ __forceinline__ float sign(float g) { return g > 0.0f ? 1.0f : (g < 0.0f ? -1.0f : 0.0f); }

// Columns of the table row a thread updates per pass: c = threadIdx.x + k * blockDim.x, k < SGD_COLS.
static constexpr int SGD_COLS = 4;

extern "C" __global__ void __launch_bounds__(256) puzzle_sign_sgd_f32(const PuzzleSignSgdArgs a) {
    for (long i = blockIdx.x; i < a.N; i += gridDim.x) {
        const int id = a.ids[i];
        if (id < 0 || id >= a.num_ids) continue;  // uniform over the block
        // An earlier row with the same id does this id's update.
        int earlier = 0;
        for (long j = threadIdx.x; j < i; j += blockDim.x) earlier |= a.ids[j] == id;
        if (__syncthreads_or(earlier)) continue;
        for (long c0 = 0; c0 < a.D; c0 += (long)SGD_COLS * blockDim.x) {
            float g[SGD_COLS];
#pragma unroll
            for (int k = 0; k < SGD_COLS; k++) g[k] = 0.0f;
            for (long j = i; j < a.N; j++) {
                if (a.ids[j] != id) continue;
#pragma unroll
                for (int k = 0; k < SGD_COLS; k++) {
                    const long c = c0 + threadIdx.x + (long)k * blockDim.x;
                    if (c < a.D) g[k] += a.grad[j * a.D + c];
                }
            }
#pragma unroll
            for (int k = 0; k < SGD_COLS; k++) {
                const long c = c0 + threadIdx.x + (long)k * blockDim.x;
                if (c < a.D) {
                    float* w = a.table + (long)id * a.D + c;
                    *w = *w * a.decay - a.lr * sign(g[k]);
                }
            }
        }
    }
}

extern "C" __global__ void ema_f32(const EmaArgs a) {
    long done = 0;
    if (is_aligned16(a.shadow) && is_aligned16(a.w)) {
        const long n_pack = a.n / 4;
        for (long p = thread_index(); p < n_pack; p += thread_count()) {
            float4 s = *reinterpret_cast<const float4*>(a.shadow + p * 4);
            const int4 wi = load_stream16(a.w + p * 4);
            float4 w;
            memcpy(&w, &wi, 16);
            s.x = a.one_minus_rate * w.x + a.rate * s.x;
            s.y = a.one_minus_rate * w.y + a.rate * s.y;
            s.z = a.one_minus_rate * w.z + a.rate * s.z;
            s.w = a.one_minus_rate * w.w + a.rate * s.w;
            *reinterpret_cast<float4*>(a.shadow + p * 4) = s;
        }
        done = n_pack * 4;
    }
    for (long i = done + thread_index(); i < a.n; i += thread_count())
        a.shadow[i] = a.one_minus_rate * a.w[i] + a.rate * a.shadow[i];
}
