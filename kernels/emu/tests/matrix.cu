// Self-test kernels of the warp-level matrix wrappers (arch.cuh), run by
// tests/emu_harness.rs: mma on fragments the test lays out per the PTX ISA,
// every ldmatrix variant with per-lane row addresses, and a tiled GEMM that
// composes cp.async, ldmatrix and mma the way a real kernel does. build.rs
// also compiles this file with nvcc, which checks the wrappers' PTX.
#include "common.cuh"
#include "emu/tests/selftest_abi.h"

extern "C" __global__ void emu_mma_fragments(const MmaFragmentsArgs a) {
    const int t = threadIdx.x;
    const int lane = t % 32;
    uint32_t fa[4], fb[2];
    float fc[4], fd[4];
    for (int i = 0; i < 4; i++) fa[i] = a.a[t * 4 + i];
    for (int i = 0; i < 2; i++) fb[i] = a.b[t * 2 + i];
    for (int i = 0; i < 4; i++) fc[i] = a.c[t * 4 + i];
    if (a.mode == 1 && lane >= 16) return;
    if (a.mode == 2 && lane >= 16) {
        mma_m16n8k16_bf16_f32(fd, fa, fb, fc);
    } else {
        mma_m16n8k16_bf16_f32(fd, fa, fb, fc);
    }
    for (int i = 0; i < 4; i++) a.d[t * 4 + i] = fd[i];
}

extern "C" __global__ void __launch_bounds__(32) emu_ldmatrix(const LdmatrixArgs a) {
    __shared__ __align__(16) uint16_t rows[64 * 8];
    const int lane = threadIdx.x;
    for (int i = lane; i < 64; i += 32) cp_async_16(rows + i * 8, a.src + i * 8);
    cp_async_wait_all();
    __syncthreads();
    const unsigned char* p = reinterpret_cast<const unsigned char*>(rows + a.slot[lane] * 8);
    if (a.misuse == 1 && lane == 3) p += 2;
    if (a.misuse == 2 && lane == 5) p = reinterpret_cast<const unsigned char*>(a.src);
    uint32_t r[4] = {0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu};
    switch (a.variant) {
        case 0: ldmatrix_x1(r, p); break;
        case 1: ldmatrix_x2(r, p); break;
        case 2: ldmatrix_x4(r, p); break;
        case 3: ldmatrix_x1_trans(r, p); break;
        case 4: ldmatrix_x2_trans(r, p); break;
        default: ldmatrix_x4_trans(r, p); break;
    }
    for (int j = 0; j < 4; j++) a.out[lane * 4 + j] = r[j];
}

// GEMM tiles: 64x64 outputs per block of 4 warps (2x2, 32x32 each), K in
// steps of 32. Shared rows are padded by 8 bf16 so each stays 16-byte aligned.
#define GT_BM 64
#define GT_BN 64
#define GT_BK 32
#define GT_LD (GT_BK + 8)  // [row][k] tiles
#define GT_LDN (GT_BN + 8)  // [k][n] tiles
#define GT_THREADS 128

template <int V>
static __device__ __forceinline__ void gt_copy(bf16* dst, const bf16* src, bool valid) {
    if constexpr (V == 16) {
        cp_async_16(dst, src, valid);
    } else if constexpr (V == 8) {
        cp_async_8(dst, src, valid);
    } else {
        cp_async_4(dst, src, valid);
    }
}

// Issues the copies of the rows x cols tile at (row0, col0) of the row-major
// `src` (leading dimension ld, valid below row_end / col_end, col_end a
// multiple of the copy's elements) into `dst` (leading dimension dst_ld).
template <int V>
static __device__ void gt_load(bf16* dst, int dst_ld, const bf16* src, long ld, int rows, int cols, int row0,
                               int col0, int row_end, int col_end) {
    constexpr int E = V / 2;
    const int per_row = cols / E;
    for (int i = threadIdx.x; i < rows * per_row; i += GT_THREADS) {
        const int r = i / per_row, c = i % per_row * E;
        const bool valid = row0 + r < row_end && col0 + c < col_end;
        gt_copy<V>(dst + r * dst_ld + c, valid ? src + (long)(row0 + r) * ld + col0 + c : src, valid);
    }
}

template <int V>
static __device__ void gt_load_stage(const GemmTileArgs& a, bf16* sa, bf16* sb, int m0, int n0, int k0) {
    gt_load<V>(sa, GT_LD, a.a, a.k, GT_BM, GT_BK, m0, k0, a.m, a.k);
    if (a.b_kn) {
        gt_load<V>(sb, GT_LDN, a.b, a.n, GT_BK, GT_BN, k0, n0, a.k, a.n);
    } else {
        gt_load<V>(sb, GT_LD, a.b, a.k, GT_BN, GT_BK, n0, k0, a.n, a.k);
    }
}

static __device__ void gt_issue(const GemmTileArgs& a, bf16* sa, bf16* sb, int m0, int n0, int k0) {
    switch (a.vec_bytes) {
        case 16: gt_load_stage<16>(a, sa, sb, m0, n0, k0); break;
        case 8: gt_load_stage<8>(a, sa, sb, m0, n0, k0); break;
        default: gt_load_stage<4>(a, sa, sb, m0, n0, k0); break;
    }
}

extern "C" __global__ void __launch_bounds__(GT_THREADS) emu_gemm_tile(const GemmTileArgs a) {
    __shared__ __align__(16) bf16 sa[2][GT_BM * GT_LD];
    __shared__ __align__(16) bf16 sb[2][GT_BN * GT_LD];  // also holds GT_BK x GT_LDN
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int m0 = blockIdx.y * GT_BM, n0 = blockIdx.x * GT_BN;
    const int wm = warp / 2 * 32, wn = warp % 2 * 32;
    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int nj = 0; nj < 4; nj++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[mi][nj][i] = 0.0f;

    const int tiles = (int)ceil_div(a.k, GT_BK);
    gt_issue(a, sa[0], sb[0], m0, n0, 0);
    cp_async_commit();
    for (int kt = 0; kt < tiles; kt++) {
        const int s = kt % 2;
        if (kt + 1 < tiles) gt_issue(a, sa[1 - s], sb[1 - s], m0, n0, (kt + 1) * GT_BK);
        // Always commit, so "all but the newest group" is this tile's group.
        cp_async_commit();
        if (!a.skip_wait) cp_async_wait<1>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GT_BK; kk += 16) {
            uint32_t fa[2][4], fb[4][2];
            // A quarters: lanes 0-7 rows 0-7 / k 0-7, 8-15 rows 8-15, 16-23
            // rows 0-7 / k 8-15, 24-31 rows 8-15 / k 8-15 = registers a0..a3.
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
                ldmatrix_x4(fa[mi], &sa[s][(wm + mi * 16 + lane % 16) * GT_LD + kk + lane / 16 * 8]);
            if (a.b_kn) {
                // [k][n] tile: transposed 8x8 loads give b0 (k 0-7) and b1
                // (k 8-15) of two n8 tiles per ldmatrix.
#pragma unroll
                for (int p = 0; p < 2; p++) {
                    uint32_t r[4];
                    ldmatrix_x4_trans(r, &sb[s][(kk + lane % 16) * GT_LDN + wn + p * 16 + lane / 16 * 8]);
                    fb[2 * p][0] = r[0];
                    fb[2 * p][1] = r[1];
                    fb[2 * p + 1][0] = r[2];
                    fb[2 * p + 1][1] = r[3];
                }
            } else {
                // [n][k] tile: plain loads of rows n, k 0-7 and k 8-15.
#pragma unroll
                for (int nj = 0; nj < 4; nj++)
                    ldmatrix_x2(fb[nj], &sb[s][(wn + nj * 8 + lane % 8) * GT_LD + kk + lane / 8 % 2 * 8]);
            }
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int nj = 0; nj < 4; nj++) mma_m16n8k16_bf16_f32(acc[mi][nj], fa[mi], fb[nj], acc[mi][nj]);
        }
        // The next iteration's copies overwrite the stage just read.
        __syncthreads();
    }

    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int nj = 0; nj < 4; nj++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int row = m0 + wm + mi * 16 + g + 8 * (i / 2);
                const int col = n0 + wn + nj * 8 + 2 * t + i % 2;
                if (row < a.m && col < a.n) a.c[(long)row * a.n + col] = acc[mi][nj][i];
            }
}
