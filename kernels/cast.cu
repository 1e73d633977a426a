// Casts and fills: f32 <-> bf16 conversion and constant fills over flat
// buffers of n elements.
//
// Design rule (every kernels/*.cu): one op family per file, `extern "C"`
// kernels named `<op>_<dtype...>` taking one argument struct of abi.h by
// value, flat element counts as 64-bit `n`, f32
// arithmetic, bf16 rounding only through common.cuh. Kernels are grid-stride
// loops, so any grid size is correct; the host picks the grid for occupancy.
// They are correct for every n (0, odd, huge) and every pointer alignment:
// when all pointers are 16-byte aligned the body moves 16-byte packs and a
// scalar loop finishes the last n % pack elements; otherwise the whole range
// takes the scalar loop.
#include "common.cuh"

// y[i] = bf16(x[i]), round to nearest even (as torch's .to(torch.bfloat16)).
extern "C" __global__ void cast_f32_to_bf16(const CastF32ToBf16Args a) {
    const float* __restrict__ x = a.x;
    bf16* __restrict__ y = a.y;
    const long n = a.n;
    constexpr int P = Pack128<bf16>::size;  // 8 elements: two f32 packs in, one bf16 pack out
    long done = 0;
    if (is_aligned16(x) && is_aligned16(y)) {
        const long n_pack = n / P;
        for (long p = thread_index(); p < n_pack; p += thread_count()) {
            const Pack128<float> a = load128(x + p * P);
            const Pack128<float> b = load128(x + p * P + P / 2);
            Pack128<bf16> out;
#pragma unroll
            for (int k = 0; k < P / 2; k++) {
                out.v[k] = to_bf16(a.v[k]);
                out.v[k + P / 2] = to_bf16(b.v[k]);
            }
            store128(y + p * P, out);
        }
        done = n_pack * P;
    }
    for (long i = done + thread_index(); i < n; i += thread_count()) y[i] = to_bf16(x[i]);
}

// y[i] = f32(x[i]) (exact).
extern "C" __global__ void cast_bf16_to_f32(const CastBf16ToF32Args a) {
    const bf16* __restrict__ x = a.x;
    float* __restrict__ y = a.y;
    const long n = a.n;
    constexpr int P = Pack128<bf16>::size;  // 8 elements: one bf16 pack in, two f32 packs out
    long done = 0;
    if (is_aligned16(x) && is_aligned16(y)) {
        const long n_pack = n / P;
        for (long p = thread_index(); p < n_pack; p += thread_count()) {
            const Pack128<bf16> in = load128(x + p * P);
            Pack128<float> a, b;
#pragma unroll
            for (int k = 0; k < P / 2; k++) {
                a.v[k] = to_f32(in.v[k]);
                b.v[k] = to_f32(in.v[k + P / 2]);
            }
            store128(y + p * P, a);
            store128(y + p * P + P / 2, b);
        }
        done = n_pack * P;
    }
    for (long i = done + thread_index(); i < n; i += thread_count()) y[i] = to_f32(x[i]);
}

// Fills y[0..n) with v. Shared by the f32 and bf16 fills.
template <class T>
static __device__ __forceinline__ void fill(T* __restrict__ y, T v, long n) {
    constexpr int P = Pack128<T>::size;
    long done = 0;
    if (is_aligned16(y)) {
        const Pack128<T> pack = splat128(v);
        const long n_pack = n / P;
        for (long p = thread_index(); p < n_pack; p += thread_count()) store128(y + p * P, pack);
        done = n_pack * P;
    }
    for (long i = done + thread_index(); i < n; i += thread_count()) y[i] = v;
}

// y[i] = v.
extern "C" __global__ void fill_f32(const FillF32Args a) { fill(a.y, a.v, a.n); }

// y[i] = v. `v` is passed as the 2-byte bf16 bit pattern (a u16 on the host),
// so the caller decides the rounding.
extern "C" __global__ void fill_bf16(const FillBf16Args a) { fill(a.y, a.v, a.n); }
