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

// ---------------------------------------------------------------------------
// matrix.cu: the warp-level matrix wrappers of arch.cuh

// One mma_m16n8k16_bf16_f32 per warp on fragments given per lane: lane l of
// warp w reads a[(32 w + l) * 4 ..][..4], b[.. * 2], c[.. * 4] and writes d
// likewise. Modes: 0 every lane; 1 lanes 16..31 return before the mma;
// 2 lanes 16..31 call it from another source line.
struct MmaFragmentsArgs {
    const uint32_t* a;   // [threads, 4] packed bf16 pairs
    const uint32_t* b;   // [threads, 2] packed bf16 pairs
    const float* c;      // [threads, 4]
    float* d;            // [threads, 4] out
    int32_t mode;
};

// One ldmatrix per warp of 32 threads: src (64 rows of 8 u16, 16-byte
// aligned) is copied to shared memory by cp.async; lane l's row address is shared row slot[l]; out[l * 4 + j]
// = register j (0xdeadbeef where the variant has none). Variants: 0 x1, 1 x2,
// 2 x4, 3 x1.trans, 4 x2.trans, 5 x4.trans. Misuse: 1 lane 3's address is 2
// bytes past its row; 2 lane 5's address is src itself (global memory).
struct LdmatrixArgs {
    const uint16_t* src;  // [64, 8]
    const int32_t* slot;  // [32] in 0..64
    uint32_t* out;        // [32, 4]
    int32_t variant;
    int32_t misuse;
};

// c = a b^T (b_kn == 0, b is [n, k]) or c = a b (b_kn == 1, b is [k, n]) by
// 64x64 tiles of 4 warps: cp.async into double-buffered shared tiles,
// ldmatrix, mma. vec_bytes (16, 8 or 4) is the cp.async size, so the
// contiguous dimensions (k; n too when b_kn) must be multiples of vec_bytes / 2;
// tile edges are zero-filled. skip_wait: no cp_async_wait (a planted bug).
struct GemmTileArgs {
    const bf16* a;    // [m, k]
    const bf16* b;    // [n, k] or [k, n]
    float* c;         // [m, n] out
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t b_kn;
    int32_t vec_bytes;
    int32_t skip_wait;
};
