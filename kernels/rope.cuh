// The RoPE rotation shared by rope.cu (in place on qkv) and attention.cu (on
// tiles in shared memory, and transposed on the gradient accumulators).
// With h = d / 2 and table rows c, s of the token's position:
//   forward   out_i = x_i c_i - x_{i+h} s_i,   out_{i+h} = x_{i+h} c_{i+h} + x_i s_{i+h}
//   backward  (the transpose, a rotation by -angle)
//             dx_i = g_i c_i + g_{i+h} s_{i+h},  dx_{i+h} = g_{i+h} c_{i+h} - g_i s_i
#pragma once

#include "common.cuh"

// Rotates one pair; `transpose` selects the backward.
static __device__ __forceinline__ void rope_rotate(float x1, float x2, float c1, float c2, float s1, float s2,
                                                   bool transpose, float* o1, float* o2) {
    if (transpose) {
        *o1 = x1 * c1 + x2 * s2;
        *o2 = x2 * c2 - x1 * s1;
    } else {
        *o1 = x1 * c1 - x2 * s1;
        *o2 = x2 * c2 + x1 * s2;
    }
}

// Rotates the 8 pairs (x[i + k], x[i + h + k]), k < 8, in place: f32 math,
// one bf16 rounding per output. x, c + i, s + i and their + h halves must be
// 16-byte aligned (one 16-byte pack of bf16, two of f32 per half).
static __device__ __forceinline__ void rope_rotate_pack8(bf16* x, const float* c, const float* s, long i, long h,
                                                         bool transpose) {
    const Pack128<bf16> x1 = load128(x + i), x2 = load128(x + i + h);
    Pack128<bf16> o1, o2;
#pragma unroll
    for (int part = 0; part < 2; part++) {
        const int k0 = part * 4;
        const Pack128<float> c1 = load128(c + i + k0), c2 = load128(c + i + h + k0);
        const Pack128<float> s1 = load128(s + i + k0), s2 = load128(s + i + h + k0);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float r1, r2;
            rope_rotate(to_f32(x1.v[k0 + k]), to_f32(x2.v[k0 + k]), c1.v[k], c2.v[k], s1.v[k], s2.v[k], transpose,
                        &r1, &r2);
            o1.v[k0 + k] = to_bf16(r1);
            o2.v[k0 + k] = to_bf16(r2);
        }
    }
    store128(x + i, o1);
    store128(x + i + h, o2);
}
