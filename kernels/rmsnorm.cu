// rmsnorm: the post-norm residual `y = rmsnorm(x + r)` over rows of D, no
// learnable scale, eps inside the root: y = h * rstd, rstd = 1 / sqrt(mean(h^2)
// + eps), and its backward dx = rstd * (dy - y * mean(dy * y)), which is the
// gradient of both x and the residual r (src/backend/cpu/rmsnorm.rs).
//
// Design rule: one warp per row, grid-stride over rows (blockDim.x a multiple
// of 32; rows per block = blockDim.x / 32). Each lane owns the columns
// lane + 32 k (as 8-element packs when D % 8 == 0, D <= 1024 and every pointer
// is 16-byte aligned: the row stays in registers, as bf16 packs, between the
// reduction and the write; otherwise a scalar path reads the row twice). The row sum is a
// warp shuffle reduction, so there is no shared memory and no __syncthreads.
// Output may alias input: every element is read and written by the same lane,
// and the reduction separates a row's reads from its writes.
//
// Rounding follows the bf16 reference: h = bf16(x + r) (the residual add is a
// bf16 op there), the norm in f32, y rounded once.
#include "common.cuh"

// Packs of 8 a lane keeps in registers: D <= 32 lanes * 4 packs * 8 = 1024.
static constexpr int RMS_PACKS = 4;
static constexpr int RMS_PACK = Pack128<bf16>::size;

static __device__ __forceinline__ float residual(const bf16* x, const bf16* r, long i) {
    return r != nullptr ? to_f32(to_bf16(to_f32(x[i]) + to_f32(r[i]))) : to_f32(x[i]);
}

extern "C" __global__ void __launch_bounds__(256) rmsnorm_forward_bf16(const RmsnormForwardArgs a) {
    const int lane = threadIdx.x % 32;
    const long warps = blockDim.x / 32;
    const int D = a.D;
    const bool packed = D % RMS_PACK == 0 && D <= 32 * RMS_PACKS * RMS_PACK && is_aligned16(a.x) &&
                        is_aligned16(a.y) && (a.r == nullptr || is_aligned16(a.r));
    for (long row = blockIdx.x * warps + threadIdx.x / 32; row < a.M; row += gridDim.x * warps) {
        const long base = row * D;
        float inv;
        if (packed) {
            const int n_pack = D / RMS_PACK;
            Pack128<bf16> h[RMS_PACKS];  // bf16(x + r) is exact in bf16: keep the packs
            float ss = 0.0f;
#pragma unroll
            for (int k = 0; k < RMS_PACKS; k++) {
                const int p = lane + 32 * k;
                if (p < n_pack) {
                    h[k] = load128(a.x + base + p * RMS_PACK);
                    if (a.r != nullptr) {
                        const Pack128<bf16> rv = load128(a.r + base + p * RMS_PACK);
#pragma unroll
                        for (int j = 0; j < RMS_PACK; j++) h[k].v[j] = to_bf16(to_f32(h[k].v[j]) + to_f32(rv.v[j]));
                    }
#pragma unroll
                    for (int j = 0; j < RMS_PACK; j++) ss += to_f32(h[k].v[j]) * to_f32(h[k].v[j]);
                }
            }
            inv = rsqrtf(warp_sum(ss) / (float)D + a.eps);
#pragma unroll
            for (int k = 0; k < RMS_PACKS; k++) {
                const int p = lane + 32 * k;
                if (p < n_pack) {
                    Pack128<bf16> out;
#pragma unroll
                    for (int j = 0; j < RMS_PACK; j++) out.v[j] = to_bf16(to_f32(h[k].v[j]) * inv);
                    store128(a.y + base + p * RMS_PACK, out);
                }
            }
        } else {
            float ss = 0.0f;
            for (int c = lane; c < D; c += 32) {
                const float v = residual(a.x, a.r, base + c);
                ss += v * v;
            }
            inv = rsqrtf(warp_sum(ss) / (float)D + a.eps);
            for (int c = lane; c < D; c += 32) a.y[base + c] = to_bf16(residual(a.x, a.r, base + c) * inv);
        }
        if (lane == 0) a.rstd[row] = inv;
    }
}

extern "C" __global__ void __launch_bounds__(256) rmsnorm_backward_bf16(const RmsnormBackwardArgs a) {
    const int lane = threadIdx.x % 32;
    const long warps = blockDim.x / 32;
    const int D = a.D;
    const bool packed = D % RMS_PACK == 0 && D <= 32 * RMS_PACKS * RMS_PACK && is_aligned16(a.dx) &&
                        is_aligned16(a.dy) && is_aligned16(a.y);
    for (long row = blockIdx.x * warps + threadIdx.x / 32; row < a.M; row += gridDim.x * warps) {
        const long base = row * D;
        const float s = a.rstd[row];
        if (packed) {
            const int n_pack = D / RMS_PACK;
            // dy stays in registers; y is read again for the write (an L1 hit),
            // which keeps the kernel at half the registers of caching both.
            Pack128<bf16> g[RMS_PACKS];
            float dot = 0.0f;
#pragma unroll
            for (int k = 0; k < RMS_PACKS; k++) {
                const int p = lane + 32 * k;
                if (p < n_pack) {
                    g[k] = load128(a.dy + base + p * RMS_PACK);
                    const Pack128<bf16> y = load128(a.y + base + p * RMS_PACK);
#pragma unroll
                    for (int j = 0; j < RMS_PACK; j++) dot += to_f32(g[k].v[j]) * to_f32(y.v[j]);
                }
            }
            const float c = warp_sum(dot) / (float)D;
#pragma unroll
            for (int k = 0; k < RMS_PACKS; k++) {
                const int p = lane + 32 * k;
                if (p < n_pack) {
                    const Pack128<bf16> y = load128(a.y + base + p * RMS_PACK);
                    Pack128<bf16> out;
#pragma unroll
                    for (int j = 0; j < RMS_PACK; j++)
                        out.v[j] = to_bf16(s * (to_f32(g[k].v[j]) - to_f32(y.v[j]) * c));
                    store128(a.dx + base + p * RMS_PACK, out);
                }
            }
        } else {
            float dot = 0.0f;
            for (int i = lane; i < D; i += 32) dot += to_f32(a.dy[base + i]) * to_f32(a.y[base + i]);
            const float c = warp_sum(dot) / (float)D;
            for (int i = lane; i < D; i += 32)
                a.dx[base + i] = to_bf16(s * (to_f32(a.dy[base + i]) - to_f32(a.y[base + i]) * c));
        }
    }
}
