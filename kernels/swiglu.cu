// swiglu: the gated activation between gate_up_proj and down_proj.
// gu [M, 2F] holds [g | u] (gate = first F columns); a = silu(g) * u [M, F];
// backward dgu = [da * u * s (1 + g (1 - s)) | da * silu(g)], s = sigmoid(g)
// (src/backend/cpu/swiglu.rs).
//
// Design rule: elementwise, grid-stride over the M * F outputs, as 8-element
// packs along F when F % 8 == 0 and every pointer is 16-byte aligned, else
// one element at a time. f32 math; bf16 rounding where the bf16 reference
// rounds (silu(g) is a bf16 tensor there before the product, and so is
// da * u before silu's backward). The backward may write dgu over gu: each
// element is read and written by the same thread.
#include "common.cuh"

static __device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static __device__ __forceinline__ float round_bf16(float x) { return to_f32(to_bf16(x)); }

static __device__ __forceinline__ float swiglu(float g, float u) { return round_bf16(g * sigmoid(g)) * u; }

// d/dg and d/du of silu(g) * u scaled by da.
static __device__ __forceinline__ void swiglu_grad(float da, float g, float u, float* dg, float* du) {
    const float s = sigmoid(g);
    *dg = round_bf16(da * u) * (s * (1.0f + g * (1.0f - s)));
    *du = da * round_bf16(g * s);
}

extern "C" __global__ void swiglu_forward_bf16(const SwigluForwardArgs a) {
    const long F = a.F;
    constexpr int P = Pack128<bf16>::size;
    if (F % P == 0 && is_aligned16(a.a) && is_aligned16(a.gu)) {
        const long packs_per_row = F / P;
        for (long p = thread_index(); p < a.M * packs_per_row; p += thread_count()) {
            const long m = p / packs_per_row, j = (p % packs_per_row) * P;
            const Pack128<bf16> g = load128(a.gu + m * 2 * F + j);
            const Pack128<bf16> u = load128(a.gu + m * 2 * F + F + j);
            Pack128<bf16> out;
#pragma unroll
            for (int k = 0; k < P; k++) out.v[k] = to_bf16(swiglu(to_f32(g.v[k]), to_f32(u.v[k])));
            store128(a.a + m * F + j, out);
        }
    } else {
        for (long i = thread_index(); i < a.M * F; i += thread_count()) {
            const long m = i / F, j = i % F;
            a.a[i] = to_bf16(swiglu(to_f32(a.gu[m * 2 * F + j]), to_f32(a.gu[m * 2 * F + F + j])));
        }
    }
}

extern "C" __global__ void swiglu_backward_bf16(const SwigluBackwardArgs a) {
    const long F = a.F;
    constexpr int P = Pack128<bf16>::size;
    if (F % P == 0 && is_aligned16(a.dgu) && is_aligned16(a.da) && is_aligned16(a.gu)) {
        const long packs_per_row = F / P;
        for (long p = thread_index(); p < a.M * packs_per_row; p += thread_count()) {
            const long m = p / packs_per_row, j = (p % packs_per_row) * P;
            const Pack128<bf16> g = load128(a.gu + m * 2 * F + j);
            const Pack128<bf16> u = load128(a.gu + m * 2 * F + F + j);
            const Pack128<bf16> da = load128(a.da + m * F + j);
            Pack128<bf16> dg, du;
#pragma unroll
            for (int k = 0; k < P; k++) {
                float dgk, duk;
                swiglu_grad(to_f32(da.v[k]), to_f32(g.v[k]), to_f32(u.v[k]), &dgk, &duk);
                dg.v[k] = to_bf16(dgk);
                du.v[k] = to_bf16(duk);
            }
            store128(a.dgu + m * 2 * F + j, dg);
            store128(a.dgu + m * 2 * F + F + j, du);
        }
    } else {
        for (long i = thread_index(); i < a.M * F; i += thread_count()) {
            const long m = i / F, j = i % F;
            float dg, du;
            swiglu_grad(to_f32(a.da[i]), to_f32(a.gu[m * 2 * F + j]), to_f32(a.gu[m * 2 * F + F + j]), &dg, &du);
            a.dgu[m * 2 * F + j] = to_bf16(dg);
            a.dgu[m * 2 * F + F + j] = to_bf16(du);
        }
    }
}
