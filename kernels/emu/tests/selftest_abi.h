// Argument structs of the emulator's self-test kernels (selftest.cu), which
// are compiled only into the emulator. Same restricted syntax as kernels/abi.h.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// One warp operation per launch: out[t] = the result in thread t, -1 for
// threads outside the mask. Thread t's own value is 1000 * blockIdx.x + 10 * t + 1.
struct WarpOpsArgs {
    int32_t* out;    // [grid * block]
    int32_t op;      // 0 shfl idx (src = lane * arg + 1), 1 up, 2 down, 3 xor, 4 ballot (value % arg == 0), 5 any (lane == arg), 6 all (lane != arg), 7 reduce_add, 8 syncwarp
    int32_t arg;
    int32_t width;
    uint32_t mask;
};

// Per block of 256 threads: out[block] = sum of x[256 * block ..][..256] by a
// shared-memory tree, with or without the barriers between its levels.
struct BlockSumArgs {
    const float* x;
    float* out;
    int32_t use_barrier;
    int32_t use_dynamic;   // 1: the tree lives in dynamic shared memory (1 KiB)
};

// Barrier and collective misuse, one case per mode (see selftest.cu).
struct MisuseArgs {
    int32_t* out;
    int32_t mode;
};

// Atomics from every thread of the grid over i < n.
struct AtomicsArgs {
    const float* x;       // [n]
    float* fsum;          // [1] += x[i]
    int32_t* isum;        // [1] += i
    uint32_t* usum;       // [1] += 1
    int32_t* imax;        // [1] max of (i * 7919) % 1000
    int32_t* cas_count;   // [1] incremented with an atomicCAS loop
    int32_t n;
};

// y = bf16(x) (round to nearest even), back = f32(y), n values.
struct Bf16ConvertArgs {
    const float* x;
    bf16* y;
    float* back;
    int64_t n;
};
