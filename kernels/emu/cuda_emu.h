// CPU emulation of the CUDA language subset the trm kernels use, so the same
// kernels/*.cu sources compile with the host C++ compiler (build.rs, feature
// `emu`: g++ -x c++ -DTRM_EMU -include kernels/emu/cuda_emu.h) and run on the
// CPU at small sizes in tests. Never seen by nvcc.
//
// How it runs (kernels/emu/runtime.cpp): every CUDA thread is a fiber (64 KiB
// stack; a hand-written context switch on x86-64, ucontext elsewhere). Blocks
// run one after another; a block runs its threads round-robin, each until it
// blocks in a barrier or warp collective or returns. `__syncthreads` waits
// until every thread of the block is there (at the same call site); a warp
// collective waits until every lane named in its mask has called the same
// collective with the same mask, then all lanes get their results. A barrier
// or collective that can never complete (threads that returned early,
// mismatched masks, divergent barriers) fails the launch with an error
// instead of hanging. Shared memory (static and dynamic) is filled
// with 0xff bytes (f32/bf16 NaN, int -1) before every block, so reads of
// never-written shared memory, as in a missing barrier, show up as NaN.
//
// Rules for kernel code this emulation relies on:
// - Device functions that declare `__shared__` variables have internal
//   linkage (`static`), as common.cuh requires of every helper: static shared
//   variables live in one linker section, which cannot mix with the COMDAT
//   copies of `inline`/template functions with external linkage.
// - Dynamic shared memory is reached through `dynamic_shared<T>()` (arch.cuh),
//   not `extern __shared__` (which has no host equivalent).
// - Architecture-specific instructions go through arch.cuh wrappers. Its
//   matrix instructions (mma, ldmatrix) are collectives of all 32 lanes from
//   one source line; its cp.async copies land only at the cp_async_wait that
//   covers them (reads before it see the poison).
// - One emulated launch runs at a time in a process (a mutex in the runtime),
//   so atomics are plain read-modify-writes.
#pragma once

#ifndef TRM_EMU
#error "cuda_emu.h is the CPU emulation of CUDA; compile with -DTRM_EMU"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "emu_abi.h"

// ---------------------------------------------------------------------------
// Keywords

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static __attribute__((section("trm_emu_shared")))
#define __constant__

// ---------------------------------------------------------------------------
// Built-in variables and vector types

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace trm_emu {
extern uint3 g_thread_idx;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;
}  // namespace trm_emu

#define threadIdx (static_cast<const uint3&>(::trm_emu::g_thread_idx))
#define blockIdx (static_cast<const uint3&>(::trm_emu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::trm_emu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::trm_emu::g_grid_dim))
static constexpr int warpSize = 32;

struct __attribute__((aligned(8))) int2 { int x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };

static inline int2 make_int2(int x, int y) { return int2{x, y}; }
static inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ---------------------------------------------------------------------------
// The runtime (kernels/emu/runtime.cpp)

namespace trm_emu {

// Warp collectives, as one operation code each.
enum WarpOp : int {
    kSyncwarp,
    kShflIdx,
    kShflUp,
    kShflDown,
    kShflXor,
    kBallot,
    kAny,
    kAll,
    kReduceAdd,
    kReduceMinU,
    kReduceMaxU,
    kReduceMinI,
    kReduceMaxI,
    // Warp-level matrix instructions (arch.cuh): the whole warp, one call site.
    kMmaM16n8k16Bf16,
    kLdmatrixX1,
    kLdmatrixX2,
    kLdmatrixX4,
    kLdmatrixX1Trans,
    kLdmatrixX2Trans,
    kLdmatrixX4Trans,
};
// __syncthreads variants.
enum BarrierOp : int { kBarrier, kBarrierCount, kBarrierAnd, kBarrierOr };

int barrier(int op, int predicate, const char* file, int line);
uint64_t warp_collective(int op, unsigned mask, uint64_t value, int arg, int width, const char* name);
[[noreturn]] void trap(const char* file, int line);
unsigned char* dynamic_shared_base();

// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 and ldmatrix (op: kLdmatrix*)
// with PTX's fragment layouts, as collectives of all 32 lanes of the warp
// that also check every lane calls from the same source line (the `.aligned`
// rule). `file`/`line`: the wrapper's call site.
void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], const char* file,
                       int line);
void ldmatrix(int op, uint32_t* regs, const void* row, const char* file, int line);
// cp.async of `bytes` (4, 8 or 16) from global `src` to shared `dst`, zeros
// instead when !valid. The copy is deferred until a cp_async_wait completes
// its group, so shared memory read before the wait still holds what it held
// (the 0xff poison at first), as a missing wait would show on the GPU.
void cp_async(void* dst, const void* src, int bytes, bool valid, const char* file, int line);
void cp_async_commit();
// Completes every committed group but the `pending` most recent ones.
void cp_async_wait(int pending);

// One kernel body: calls the kernel with its argument struct.
typedef void (*KernelBody)(const void* args);
// Runs `body` over the launch's grid; 0 on success, else an error code
// (TRM_EMU_ERR_*) with a message in err[0..err_len). `max_threads` is the
// kernel's __launch_bounds__ (0: none), which the GPU enforces too.
int launch(const char* kernel, KernelBody body, const void* args, const TrmEmuLaunch* cfg, uint32_t max_threads,
           char* err, size_t err_len);

template <class T>
static inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp collectives move at most 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
static inline T from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace trm_emu

// Error codes of trm_emu::launch (mirrored by src/backend/cuda/emu.rs).
#define TRM_EMU_OK 0
#define TRM_EMU_ERR_CONFIG 1    // invalid grid, block or shared memory size
#define TRM_EMU_ERR_DEADLOCK 2  // a barrier or collective some threads never reach
#define TRM_EMU_ERR_WARP 3      // a warp collective used against its rules
#define TRM_EMU_ERR_TRAP 4      // __trap() in a kernel
#define TRM_EMU_ERR_HOST 5      // the emulator itself failed (out of memory)
#define TRM_EMU_ERR_ADDRESS 6   // an address the instruction cannot use (misaligned, wrong memory)

// Registers an emulator entry point for `extern "C" __global__ void kernel(Args)`
// declared with `__launch_bounds__(max_threads)` (0: without):
// `int trm_emu_entry_<kernel>(const TrmEmuLaunch*, const Args*, char* err, size_t err_len)`.
// build.rs writes one line per kernel it finds in kernels/*.cu.
#define TRM_EMU_ENTRY(kernel, Args, max_threads)                                                       \
    static void trm_emu_body_##kernel(const void* args) { kernel(*static_cast<const Args*>(args)); }  \
    extern "C" int trm_emu_entry_##kernel(const TrmEmuLaunch* cfg, const Args* args, char* err,       \
                                          size_t err_len) {                                          \
        return ::trm_emu::launch(#kernel, trm_emu_body_##kernel, args, cfg, max_threads, err, err_len); \
    }

// ---------------------------------------------------------------------------
// Synchronisation

#define __syncthreads() ((void)::trm_emu::barrier(::trm_emu::kBarrier, 1, __FILE__, __LINE__))
#define __syncthreads_count(p) ::trm_emu::barrier(::trm_emu::kBarrierCount, (p), __FILE__, __LINE__)
#define __syncthreads_and(p) ::trm_emu::barrier(::trm_emu::kBarrierAnd, (p), __FILE__, __LINE__)
#define __syncthreads_or(p) ::trm_emu::barrier(::trm_emu::kBarrierOr, (p), __FILE__, __LINE__)
#define __trap() ::trm_emu::trap(__FILE__, __LINE__)

static inline void __syncwarp(unsigned mask = 0xffffffffu) {
    (void)trm_emu::warp_collective(trm_emu::kSyncwarp, mask, 0, 0, 32, "__syncwarp");
}
static inline void __threadfence() {}
static inline void __threadfence_block() {}

// ---------------------------------------------------------------------------
// Warp shuffles and votes (any type of at most 8 bytes, like the GPU's overloads)

template <class T>
static inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
    return trm_emu::from_bits<T>(
        trm_emu::warp_collective(trm_emu::kShflIdx, mask, trm_emu::to_bits(var), src_lane, width, "__shfl_sync"));
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return trm_emu::from_bits<T>(trm_emu::warp_collective(trm_emu::kShflUp, mask, trm_emu::to_bits(var), (int)delta,
                                                          width, "__shfl_up_sync"));
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return trm_emu::from_bits<T>(trm_emu::warp_collective(trm_emu::kShflDown, mask, trm_emu::to_bits(var),
                                                          (int)delta, width, "__shfl_down_sync"));
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    return trm_emu::from_bits<T>(trm_emu::warp_collective(trm_emu::kShflXor, mask, trm_emu::to_bits(var), lane_mask,
                                                          width, "__shfl_xor_sync"));
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)trm_emu::warp_collective(trm_emu::kBallot, mask, pred != 0, 0, 32, "__ballot_sync");
}
static inline int __any_sync(unsigned mask, int pred) {
    return (int)trm_emu::warp_collective(trm_emu::kAny, mask, pred != 0, 0, 32, "__any_sync");
}
static inline int __all_sync(unsigned mask, int pred) {
    return (int)trm_emu::warp_collective(trm_emu::kAll, mask, pred != 0, 0, 32, "__all_sync");
}
static inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
    return (unsigned)trm_emu::warp_collective(trm_emu::kReduceAdd, mask, v, 0, 32, "__reduce_add_sync");
}
static inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
    return (unsigned)trm_emu::warp_collective(trm_emu::kReduceMinU, mask, v, 0, 32, "__reduce_min_sync");
}
static inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
    return (unsigned)trm_emu::warp_collective(trm_emu::kReduceMaxU, mask, v, 0, 32, "__reduce_max_sync");
}
static inline int __reduce_min_sync(unsigned mask, int v) {
    return (int)trm_emu::warp_collective(trm_emu::kReduceMinI, mask, (uint32_t)v, 0, 32, "__reduce_min_sync");
}
static inline int __reduce_max_sync(unsigned mask, int v) {
    return (int)trm_emu::warp_collective(trm_emu::kReduceMaxI, mask, (uint32_t)v, 0, 32, "__reduce_max_sync");
}

// ---------------------------------------------------------------------------
// Atomics. One emulated launch runs at a time and its threads are fibers of
// one OS thread, so a plain read-modify-write is atomic.

template <class T>
static inline T __emu_atomic_add(T* p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}
static inline float atomicAdd(float* p, float v) { return __emu_atomic_add(p, v); }
static inline double atomicAdd(double* p, double v) { return __emu_atomic_add(p, v); }
static inline int atomicAdd(int* p, int v) { return (int)__emu_atomic_add((unsigned*)p, (unsigned)v); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return __emu_atomic_add(p, v); }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __emu_atomic_add(p, v);
}
template <class T>
static inline T __emu_atomic_max(T* p, T v) {
    const T old = *p;
    if (v > old) *p = v;
    return old;
}
template <class T>
static inline T __emu_atomic_min(T* p, T v) {
    const T old = *p;
    if (v < old) *p = v;
    return old;
}
static inline int atomicMax(int* p, int v) { return __emu_atomic_max(p, v); }
static inline unsigned atomicMax(unsigned* p, unsigned v) { return __emu_atomic_max(p, v); }
static inline int atomicMin(int* p, int v) { return __emu_atomic_min(p, v); }
static inline unsigned atomicMin(unsigned* p, unsigned v) { return __emu_atomic_min(p, v); }
template <class T>
static inline T __emu_atomic_cas(T* p, T compare, T v) {
    const T old = *p;
    if (old == compare) *p = v;
    return old;
}
static inline int atomicCAS(int* p, int compare, int v) { return __emu_atomic_cas(p, compare, v); }
static inline unsigned atomicCAS(unsigned* p, unsigned compare, unsigned v) { return __emu_atomic_cas(p, compare, v); }
static inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long compare, unsigned long long v) {
    return __emu_atomic_cas(p, compare, v);
}
template <class T>
static inline T __emu_atomic_exch(T* p, T v) {
    const T old = *p;
    *p = v;
    return old;
}
static inline int atomicExch(int* p, int v) { return __emu_atomic_exch(p, v); }
static inline unsigned atomicExch(unsigned* p, unsigned v) { return __emu_atomic_exch(p, v); }
static inline float atomicExch(float* p, float v) { return __emu_atomic_exch(p, v); }

// ---------------------------------------------------------------------------
// Math and bit intrinsics. The GPU's fast approximations (__expf, rsqrtf,
// __fdividef, ...) are emulated with the correctly rounded host functions, so
// results can differ from the GPU's in the last bits: compare with tolerances.

// glibc declares some of these names itself, so they are macros here.
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __log2f(x) log2f(x)
#define __exp10f(x) powf(10.0f, (x))
#define __powf(x, y) powf((x), (y))
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
#define __sincosf(x, s, c) (*(s) = sinf(x), *(c) = cosf(x), (void)0)
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline float __int_as_float(int v) { return trm_emu::from_bits<float>((uint32_t)v); }
static inline int __float_as_int(float v) { return (int)(uint32_t)trm_emu::to_bits(v); }
static inline float __uint_as_float(unsigned v) { return trm_emu::from_bits<float>(v); }
static inline unsigned __float_as_uint(float v) { return (uint32_t)trm_emu::to_bits(v); }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
template <class T>
static inline T __ldg(const T* p) {
    return *p;
}

// CUDA's integer min/max overloads (device code calls them unqualified).
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long min(long a, long b) { return a < b ? a : b; }
static inline long max(long a, long b) { return a > b ? a : b; }
