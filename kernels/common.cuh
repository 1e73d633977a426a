// Shared device helpers for the trm kernels (included by every kernels/*.cu).
//
// Rules that hold in every kernel file:
// - Storage is bf16 (`__nv_bfloat16`) or f32; arithmetic is f32. Convert with
//   `to_f32` / `to_bf16` (round to nearest even, NaN kept), never by hand.
// - Element counts and offsets are `long` (64-bit): tensors can exceed 2^31.
// - Dimensions are named the same everywhere: n = element count, B = batch,
//   L = sequence length, D = hidden size, H = heads, hd = head dim, V = vocab.
// - Kernels are `extern "C"` so their names are stable for the runtime and
//   the ptxas report; helpers here are `static __device__ inline`.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------------------
// bf16 <-> f32

static __device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
static __device__ __forceinline__ bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------
// Launch geometry

// This thread's index over the whole grid, and the number of threads in it;
// a grid-stride loop is `for (long i = thread_index(); i < n; i += thread_count())`.
static __device__ __forceinline__ long thread_index() {
    return (long)blockIdx.x * blockDim.x + threadIdx.x;
}
static __device__ __forceinline__ long thread_count() {
    return (long)gridDim.x * blockDim.x;
}

static __host__ __device__ __forceinline__ long ceil_div(long a, long b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// 128-bit packs: one 16-byte load or store moves `Pack128<T>::size` elements.
// Only for pointers that `is_aligned16`; callers finish with a scalar tail.

template <class T>
struct alignas(16) Pack128 {
    static constexpr int size = 16 / sizeof(T);
    T v[size];
};

static __device__ __forceinline__ bool is_aligned16(const void* p) {
    return ((uintptr_t)p & 15) == 0;
}

template <class T>
static __device__ __forceinline__ Pack128<T> load128(const T* p) {
    Pack128<T> r;
    *reinterpret_cast<int4*>(&r) = *reinterpret_cast<const int4*>(p);
    return r;
}

template <class T>
static __device__ __forceinline__ void store128(T* p, const Pack128<T>& r) {
    *reinterpret_cast<int4*>(p) = *reinterpret_cast<const int4*>(&r);
}

template <class T>
static __device__ __forceinline__ Pack128<T> splat128(T v) {
    Pack128<T> r;
#pragma unroll
    for (int k = 0; k < Pack128<T>::size; k++) r.v[k] = v;
    return r;
}
