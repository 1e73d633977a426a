// Architecture-specific instructions, one wrapper each, with a real-GPU branch
// (inline PTX for sm_90a) and an emulator branch (TRM_EMU, kernels/emu/), so
// every kernel source serves both. Kernels reach PTX only through this file.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

// Dynamic shared memory of the launch (its `shared_bytes`), 16-byte aligned.
template <class T>
static __device__ __forceinline__ T* dynamic_shared() {
#ifdef TRM_EMU
    return reinterpret_cast<T*>(::trm_emu::dynamic_shared_base());
#else
    extern __shared__ __align__(16) unsigned char trm_dynamic_shared[];
    return reinterpret_cast<T*>(trm_dynamic_shared);
#endif
}

// This thread's lane in its warp (threads are numbered x fastest).
static __device__ __forceinline__ int lane_id() {
#ifdef TRM_EMU
    const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    return (int)(linear % 32);
#else
    unsigned lane;
    asm("mov.u32 %0, %%laneid;" : "=r"(lane));
    return (int)lane;
#endif
}

// 16-byte load through the read-only non-coherent path, not kept in L1: for
// data read exactly once by the kernel (optimiser state, gradients). The data
// must not be written by the same kernel.
static __device__ __forceinline__ int4 load_stream16(const void* p) {
#ifdef TRM_EMU
    int4 r;
    memcpy(&r, p, sizeof r);
    return r;
#else
    int4 r;
    asm("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
#endif
}

// 16-byte store with the streaming (evict-first) cache hint: for outputs the
// kernel will not read back.
static __device__ __forceinline__ void store_stream16(void* p, int4 v) {
#ifdef TRM_EMU
    memcpy(p, &v, sizeof v);
#else
    asm volatile("st.global.cs.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
#endif
}

// 2^x by the special-function unit (ex2.approx.ftz: about 2 ulp, results
// below 2^-126 flush to 0), without the extra scaling exp2f adds for
// subnormal results: softmax weights that small are 0 in bf16 anyway.
static __device__ __forceinline__ float fast_exp2(float x) {
#ifdef TRM_EMU
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// ---------------------------------------------------------------------------
// Warp-level matrix instructions and asynchronous copies
//
// mma and ldmatrix are `.sync.aligned`: every lane of the warp calls the same
// wrapper at the same place, with no lane exited; the emulator fails the
// launch otherwise (it records each call's source line for that check, hence
// TRM_CALL_SITE, which is empty on the GPU). Fragment layouts are the PTX
// ISA's, written out at mma_m16n8k16_bf16_f32 and ldmatrix_x1.

#ifdef TRM_EMU
#define TRM_CALL_SITE , const char *trm_site_file = __builtin_FILE(), int trm_site_line = __builtin_LINE()
#define TRM_SITE trm_site_file, trm_site_line
#else
#define TRM_CALL_SITE
#endif

// Two bf16 in one 32-bit register as the matrix instructions hold them: `lo`
// (the lower column or row index) in bits 0..15.
static __device__ __forceinline__ uint32_t pack_bf16x2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}
static __device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    return pack_bf16x2(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}

// D = A B + C, A 16x16 (row), B 16x8 (col), bf16 inputs, f32 accumulators; d
// may alias c. With g = lane / 4, t = lane % 4, and element i of a register
// pair in bits 16 * (i % 2) of register i / 2 (PTX ISA, mma.m16n8k16):
//   A: a_i (i < 8) at row g + 8 * (i / 2 % 2), column 2t + i % 2 + 8 * (i / 4)
//   B: b_i (i < 4) at row 2t + i % 2 + 8 * (i / 2), column g
//   C, D: c_i (i < 4) at row g + 8 * (i / 2), column 2t + i % 2
static __device__ __forceinline__ void mma_m16n8k16_bf16_f32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                             const float c[4] TRM_CALL_SITE) {
#ifdef TRM_EMU
    ::trm_emu::mma_m16n8k16_bf16(d, a, b, c, TRM_SITE);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

#ifndef TRM_EMU
// The 32-bit shared-window address the shared-memory instructions take.
static __device__ __forceinline__ uint32_t shared_address(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
#endif

// ldmatrix.m8n8.b16: loads 8x8 matrices of 16-bit elements from shared
// memory. `row` is this lane's row address (16 bytes, 16-byte aligned):
// lanes 8j..8j+7 give rows 0..7 of matrix j; the other lanes' are ignored.
// Lane l receives r[j] = elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1)
// of matrix j (low half first): the A layout of mma for one 8x8 quarter.
// The .trans variants receive the same of the transposed matrices, elements
// (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4): the B layout from a
// row-major K x N tile.
static __device__ __forceinline__ void ldmatrix_x1(uint32_t r[1], const void* row TRM_CALL_SITE) {
#ifdef TRM_EMU
    ::trm_emu::ldmatrix(::trm_emu::kLdmatrixX1, r, row, TRM_SITE);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(shared_address(row))
                 : "memory");
#endif
}
static __device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* row TRM_CALL_SITE) {
#ifdef TRM_EMU
    ::trm_emu::ldmatrix(::trm_emu::kLdmatrixX2, r, row, TRM_SITE);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(row))
                 : "memory");
#endif
}
static __device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row TRM_CALL_SITE) {
#ifdef TRM_EMU
    ::trm_emu::ldmatrix(::trm_emu::kLdmatrixX4, r, row, TRM_SITE);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
#endif
}
static __device__ __forceinline__ void ldmatrix_x1_trans(uint32_t r[1], const void* row TRM_CALL_SITE) {
#ifdef TRM_EMU
    ::trm_emu::ldmatrix(::trm_emu::kLdmatrixX1Trans, r, row, TRM_SITE);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(shared_address(row))
                 : "memory");
#endif
}
static __device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* row TRM_CALL_SITE) {
#ifdef TRM_EMU
    ::trm_emu::ldmatrix(::trm_emu::kLdmatrixX2Trans, r, row, TRM_SITE);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(row))
                 : "memory");
#endif
}
static __device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row TRM_CALL_SITE) {
#ifdef TRM_EMU
    ::trm_emu::ldmatrix(::trm_emu::kLdmatrixX4Trans, r, row, TRM_SITE);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
#endif
}

// cp.async: copies 16, 8 or 4 bytes from global `src` to shared `dst`, both
// aligned to the size, without passing through registers; with valid ==
// false it writes zeros and reads nothing (src may then be any pointer), for
// tile edges. Copies land only once a cp_async_wait covers their group:
// issue, cp_async_commit, ..., cp_async_wait<N>, then a barrier before other
// threads read. 16-byte copies skip L1 (.cg); the smaller ones cannot (.ca).
static __device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid = true TRM_CALL_SITE) {
#ifdef TRM_EMU
    ::trm_emu::cp_async(dst, src, 16, valid, TRM_SITE);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(dst)),
                 "l"(__cvta_generic_to_global(src)), "r"(valid ? 16 : 0)
                 : "memory");
#endif
}
static __device__ __forceinline__ void cp_async_8(void* dst, const void* src, bool valid = true TRM_CALL_SITE) {
#ifdef TRM_EMU
    ::trm_emu::cp_async(dst, src, 8, valid, TRM_SITE);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(shared_address(dst)),
                 "l"(__cvta_generic_to_global(src)), "r"(valid ? 8 : 0)
                 : "memory");
#endif
}
static __device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid = true TRM_CALL_SITE) {
#ifdef TRM_EMU
    ::trm_emu::cp_async(dst, src, 4, valid, TRM_SITE);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(shared_address(dst)),
                 "l"(__cvta_generic_to_global(src)), "r"(valid ? 4 : 0)
                 : "memory");
#endif
}

// Closes this thread's group of cp.async issued since the last commit.
static __device__ __forceinline__ void cp_async_commit() {
#ifdef TRM_EMU
    ::trm_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most `Pending` of this thread's committed groups are still
// in flight (the most recent ones); other threads' copies need a barrier too.
template <int Pending>
static __device__ __forceinline__ void cp_async_wait() {
    static_assert(Pending >= 0, "a count of groups");
#ifdef TRM_EMU
    ::trm_emu::cp_async_wait(Pending);
#else
    asm volatile("cp.async.wait_group %0;" ::"n"(Pending) : "memory");
#endif
}

// Commits the open group and waits for every group of this thread.
static __device__ __forceinline__ void cp_async_wait_all() {
#ifdef TRM_EMU
    ::trm_emu::cp_async_commit();
    ::trm_emu::cp_async_wait(0);
#else
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}
