// Architecture-specific instructions, one wrapper each, with a real-GPU branch
// (inline PTX for sm_90a) and an emulator branch (TRM_EMU, kernels/emu/), so
// every kernel source serves both. Kernels reach PTX only through this file.
#pragma once

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
