// Self-test kernels of the CPU emulator (tests/emu_harness.rs): warp
// shuffles and votes, a shared-memory block reduction with and without its
// barriers (a planted race), barrier and collective misuse, atomics across
// blocks, and bf16 conversions. Built into the emulator; build.rs also
// compiles this folder with nvcc (checked, not embedded).
//
// Design rule: each kernel exercises one mechanism and writes what every
// thread observed, so the Rust side checks it against the definition.
#include "common.cuh"
#include "emu/tests/selftest_abi.h"

extern "C" __global__ void emu_warp_ops(const WarpOpsArgs a) {
    const int t = threadIdx.x;
    const int lane = t % 32;
    const int out_index = blockIdx.x * blockDim.x + t;
    const int v = 1000 * blockIdx.x + 10 * t + 1;
    if (!(a.mask >> lane & 1u)) {
        a.out[out_index] = -1;
        return;
    }
    int r = 0;
    switch (a.op) {
        case 0: r = __shfl_sync(a.mask, v, lane * a.arg + 1, a.width); break;
        case 1: r = __shfl_up_sync(a.mask, v, a.arg, a.width); break;
        case 2: r = __shfl_down_sync(a.mask, v, a.arg, a.width); break;
        case 3: r = __shfl_xor_sync(a.mask, v, a.arg, a.width); break;
        case 4: r = (int)__ballot_sync(a.mask, v % a.arg == 0); break;
        case 5: r = __any_sync(a.mask, lane == a.arg); break;
        case 6: r = __all_sync(a.mask, lane != a.arg); break;
        case 7: r = (int)__reduce_add_sync(a.mask, (unsigned)v); break;
        default: __syncwarp(a.mask); r = v; break;
    }
    a.out[out_index] = r;
}

extern "C" __global__ void emu_block_sum(const BlockSumArgs a) {
    __shared__ float tree[256];
    float* s = a.use_dynamic ? dynamic_shared<float>() : tree;
    const int t = threadIdx.x;
    s[t] = a.x[blockIdx.x * 256 + t];
    if (a.use_barrier) __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (t < stride) s[t] += s[t + stride];
        if (a.use_barrier) __syncthreads();
    }
    if (t == 0) a.out[blockIdx.x] = s[0];
}

// Modes: 0 threads >= 100 return before a __syncthreads; 1 even and odd
// threads wait at different __syncthreads; 2 a full-mask shuffle after lane 5
// returned; 3 lanes disagree on the mask; 4 __trap() in thread 3;
// 5 out[0] = __syncthreads_count(t even) (valid); 6 a shuffle reading a lane
// outside its mask; 7 a mask naming lanes a 40-thread block lacks in warp 1.
extern "C" __global__ void emu_misuse(const MisuseArgs a) {
    const int t = threadIdx.x;
    switch (a.mode) {
        case 0:
            if (t >= 100) return;
            __syncthreads();
            break;
        case 1:
            if (t % 2 == 0) {
                __syncthreads();
            } else {
                __syncthreads();
            }
            break;
        case 2: {
            if (t % 32 == 5) return;
            const int v = __shfl_xor_sync(FULL_MASK, t, 1);
            a.out[t] = v;
            break;
        }
        case 3: {
            const unsigned mask = t % 32 < 16 ? FULL_MASK : 0xffff0000u;
            a.out[t] = __shfl_sync(mask, t, 16);
            break;
        }
        case 4:
            if (t == 3) __trap();
            break;
        case 5: {
            const int n = __syncthreads_count(t % 2 == 0);
            if (t == 0) a.out[0] = n;
            break;
        }
        case 6:
            if (t % 32 < 16) a.out[t] = __shfl_down_sync(0x0000ffffu, t, 1);
            break;
        default:
            a.out[t] = __shfl_xor_sync(FULL_MASK, t, 1);
            break;
    }
}

extern "C" __global__ void emu_atomics(const AtomicsArgs a) {
    for (long i = thread_index(); i < a.n; i += thread_count()) {
        atomicAdd(a.fsum, a.x[i]);
        atomicAdd(a.isum, (int)i);
        atomicAdd(a.usum, 1u);
        atomicMax(a.imax, (int)(i * 7919 % 1000));
        int seen = *a.cas_count;
        for (;;) {
            const int prev = atomicCAS(a.cas_count, seen, seen + 1);
            if (prev == seen) break;
            seen = prev;
        }
    }
}

extern "C" __global__ void emu_bf16_convert(const Bf16ConvertArgs a) {
    for (long i = thread_index(); i < a.n; i += thread_count()) {
        const bf16 y = to_bf16(a.x[i]);
        a.y[i] = y;
        a.back[i] = to_f32(y);
    }
}
