// Shared device helpers for the trm kernels (included by every kernels/*.cu).
//
// Rules that hold in every kernel file:
// - Storage is bf16 (`__nv_bfloat16`) or f32; arithmetic is f32. Convert with
//   `to_f32` / `to_bf16` (round to nearest even, NaN kept), never by hand.
// - Element counts and offsets are `long` (64-bit): tensors can exceed 2^31.
// - Dimensions are named the same everywhere (and in src/backend/cpu): n =
//   element count, M = rows, B = batch, S = tokens per sample, D = hidden
//   size, H = heads, d = head dim, F = SwiGLU width, V = vocab.
// - Kernels are `extern "C"` and take exactly one argument struct from
//   abi.h by value, so their names are stable for the runtime and the ptxas
//   report and Rust passes arguments through one generated mirror. Helpers
//   here are `static __device__ inline` (internal linkage, which the CPU
//   emulator also needs for `__shared__` variables in helpers).
// - PTX and other sm_90-only instructions only through arch.cuh wrappers, so
//   the same source also builds for the CPU emulator (kernels/emu/).
#pragma once

#include <stdint.h>

#include "abi.h"
#include "arch.cuh"

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

// ---------------------------------------------------------------------------
// Warp and block reductions. Every thread of the warp (block) must call them;
// the result is in every thread.

static constexpr unsigned FULL_MASK = 0xffffffffu;

template <class T>
static __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

static __device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over a 1-D block whose size is a multiple of 32 (at most 1024). Safe to
// call repeatedly: the first barrier keeps a new call from overwriting the
// partial sums an earlier call is still reading.
template <class T>
static __device__ T block_sum(T v) {
    __shared__ T partial[32];
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : T(0);
    return warp_sum(v);
}
