// attention: fused RoPE + non-causal softmax attention, forward and backward,
// on the tensor cores (mma.sync m16n8k16 bf16 -> f32 through arch.cuh).
// The CPU reference is src/backend/cpu/rope.rs + attention.rs.
//
// Layouts: qkv [B, S, 3 H d] as the qkv GEMM writes it (q heads, k heads, v
// heads; q and k NOT rotated), o and do [B, S, H d], lse and delta [B, H, S],
// dqkv in the qkv layout. RoPE tables cos, sin [S, d] (f32), position = token
// index in the sample. With c = scale = 1 / sqrt(d), per (sample, head):
//   forward   x = c q' k'^T (q' = rot(q), k' = rot(k)), P = softmax_rows(x),
//             o = P v, lse = log sum_j exp(x_ij)
//   backward  P = exp(x - lse) (recomputed, never stored), dV = P^T dO,
//             dP = dO V^T, dX = P (dP - delta) with delta_i = dO_i . o_i
//             (= sum_j P_ij dP_ij), dq' = c dX k', dk' = c dX^T q', and the
//             rotation's transpose: dq = rot^T(dq'), dk = rot^T(dk').
//
// RoPE is applied as tiles arrive: a tile of raw q or k rows is copied into
// shared memory (cp.async), then rotated there in f32 and rounded to bf16 once
// (as rope.cu does), so no rotated copy ever reaches global memory. In the
// forward and dQ loops the next K tile's table rows are copied along with it;
// the dK/dV loop reads them from global (L2), since its third block per
// multiprocessor is worth more than the staging (measured: 2.11 against 2.49
// ms at the ARC shape). The backward rotation of dq / dk happens in registers
// on the f32 accumulators: in the mma accumulator layout a lane holding column
// i of a tile also holds column i + d/2 (the same slot d/16 tiles later).
//
// Online softmax (forward) keeps the row max m in raw-score units and uses
// 2^((x - m) c log2 e) (ex2.approx), with per-lane partial row sums reduced
// across the 4 lanes of a row once, at the end.
//
// Tiles and why (H200, ARC shape B 96, H 8, S 916, d 64; figures from
// benches/kernels.rs and tools/profile-attention.sh, bench/results/): blocks
// of 4 warps; each warp owns 16 rows per m-tile. Key tiles are 64 rows,
// double-buffered in shared memory so the copies of tile j+1 fly while tile j
// is computed. The kernels are latency-bound (two warps per scheduler, the
// register limit): what paid was fewer instructions per mma, not fewer bytes.
// - forward: 32 query rows per warp (2 m-tiles: 128 per block) for d <= 64;
//   each K and V fragment read from shared memory serves both m-tiles (1.49 ->
//   1.29 ms), and the Q fragments, scores and output stay in registers (255).
//   16 rows per warp (3 blocks per multiprocessor) measured 1.52 ms. d 128: 16
//   rows per warp, where the accumulators double.
// - backward, key-tile kernel (dK, dV): each warp owns 16 keys of a 64-key
//   tile and walks all query tiles (64 queries; 16 for d 128, where the two
//   16 x d accumulators take 128 registers and 32 queries spilled), so dK and
//   dV stay in registers for the whole sweep and are written once. 32 keys
//   per warp (16-query tiles, to fit) gained 1%.
// - backward, query-tile kernel (dQ): each warp owns 32 queries (16 for d
//   128) of a tile and walks all key tiles, 32 keys at a time (a whole tile's
//   scores and dP would spill); a second pass over keys instead of atomics, so
//   the result does not depend on scheduling (bit-identical resume).
// - Shared rows are padded by 8 bf16 (16 bytes): the 8 row addresses of an
//   ldmatrix then fall in 8 different 4-bank groups (no conflicts), and every
//   row stays 16-byte aligned for cp.async and ldmatrix.
// Grids are 1-D: block = (sample * H + head) * tiles + tile, so the tiles of
// one head run next to each other and share its K/V (or Q/dO) in L2.
#include "common.cuh"
#include "rope.cuh"

namespace {

constexpr int ATT_WARPS = 4;
constexpr int ATT_THREADS = 32 * ATT_WARPS;
constexpr int ATT_BK = 64;  // key rows per tile (forward, dQ), keys per block (dK/dV)
constexpr float LOG2E = 1.4426950408889634f;

// Shared-memory row length (bf16) of a d-wide tile.
template <int HD>
struct Row {
    static constexpr int LD = HD + 8;
};

// Query rows per warp in the forward: 32 for d <= 64, 16 for d 128.
template <int HD>
struct ForwardTiles {
    static constexpr int MT = HD <= 64 ? 2 : 1;  // m-tiles per warp
};

// Query rows per warp in the dQ kernel: 32 for d <= 64, 16 for d 128.
template <int HD>
struct DqTiles {
    static constexpr int MT = HD <= 64 ? 2 : 1;  // m-tiles per warp
    static constexpr int BQ = ATT_WARPS * 16 * MT;
};

// Queries per inner tile of the dK/dV kernel.
template <int HD>
struct KeyTileBackward {
    static constexpr int BQ = HD <= 64 ? 64 : 16;
};

// What differs for sm_8x (the compute_80 PTX and the SASS built from it): at
// d 64 the forward's Q fragments, scores and output need more than 255
// registers there (ptxas spilled), so Q is re-read from shared memory per key
// tile (as the dQ kernel does); and sm_80's 164 KiB of shared memory hold two
// d-64 dK/dV blocks, not three, so that kernel gets the registers of two (168
// spilled). sm_90a (and the emulator) keep the measured H200 choices.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr bool FORWARD_Q_IN_REGISTERS = false;
#define ATT_DKDV_D64_MIN_BLOCKS 2
#else
constexpr bool FORWARD_Q_IN_REGISTERS = true;
#define ATT_DKDV_D64_MIN_BLOCKS 3
#endif

}  // namespace

static __device__ __forceinline__ float neg_inf() { return __int_as_float((int)0xff800000u); }

// This block's (sample, head) and tile (grids are 1-D: block = (sample * H +
// head) * tiles + tile), and that head's column slices of qkv and do: row s
// of q is at q + s * W, of do at dout + s * O.
template <int HD>
struct HeadTile {
    int tile, bh, b, h;
    long W, O;
    const bf16* q;
    const bf16* k;
    const bf16* v;
    const bf16* dout;  // null when the kernel has no do
    __device__ __forceinline__ HeadTile(const bf16* qkv, const bf16* dout_all, int S, int H, int tiles) {
        tile = blockIdx.x % tiles;
        bh = blockIdx.x / tiles;
        b = bh / H;
        h = bh % H;
        W = 3L * H * HD;
        O = (long)H * HD;
        const bf16* base = qkv + (long)b * S * W;
        q = base + (long)h * HD;
        k = base + (long)(H + h) * HD;
        v = base + (long)(2 * H + h) * HD;
        dout = dout_all ? dout_all + (long)b * S * O + (long)h * HD : nullptr;
    }
};

// ---------------------------------------------------------------------------
// Tiles in shared memory

// Issues cp.async copies of rows row0 .. row0 + ROWS - 1 of one head slice
// (row r at src + r * stride, d = HD contiguous bf16) into dst [ROWS][LD];
// rows at or past S are zero-filled.
template <int HD, int ROWS>
static __device__ __forceinline__ void tile_load_async(bf16* dst, const bf16* src, long stride, int row0, int S) {
    constexpr int CHUNKS = HD / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += ATT_THREADS) {
        const int r = c / CHUNKS;
        const int k = c % CHUNKS * 8;
        const bool valid = row0 + r < S;
        const bf16* p = valid ? src + (long)(row0 + r) * stride + k : src;
        cp_async_16(dst + r * Row<HD>::LD + k, p, valid);
    }
}

// Issues cp.async copies of ROWS floats v[row0 ..] into dst (zeros past S).
template <int ROWS>
static __device__ __forceinline__ void vector_load_async(float* dst, const float* src, int row0, int S) {
    for (int r = threadIdx.x; r < ROWS; r += ATT_THREADS) {
        const bool valid = row0 + r < S;
        cp_async_4(dst + r, valid ? src + row0 + r : src, valid);
    }
}

// Issues cp.async copies of the RoPE table rows of positions row0 ..
// row0 + ROWS - 1 into dst_cos, dst_sin [ROWS][HD] (rows past S skipped): the
// rotation pass in a tile loop then reads shared memory, not global, so its
// latency is not exposed between the loop's two barriers.
template <int HD, int ROWS>
static __device__ __forceinline__ void table_load_async(float* dst_cos, float* dst_sin, const float* cos,
                                                        const float* sin, int row0, int S) {
    constexpr int CHUNKS = HD / 4;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += ATT_THREADS) {
        const int r = c / CHUNKS;
        const int k = c % CHUNKS * 4;
        if (row0 + r >= S) continue;
        const long at = (long)(row0 + r) * HD + k;
        cp_async_16(dst_cos + r * HD + k, cos + at);
        cp_async_16(dst_sin + r * HD + k, sin + at);
    }
}

// Rotates the rows of a landed tile in place (rope.cu's forward formula, f32,
// one bf16 rounding); rows past S stay zero. `cos`, `sin` point at the table
// row of position row0 (rows HD apart: the global tables or a block's copy
// from table_load_async). Each step takes 8 consecutive pairs as 16-byte
// packs (shared rows are 16-byte aligned, d / 2 is a multiple of 8) and the
// tables as 16-byte f32 packs (the launcher checks every global pointer is
// 16-byte aligned).
template <int HD, int ROWS>
static __device__ __forceinline__ void tile_rotate(bf16* t, const float* cos, const float* sin, int row0, int S) {
    constexpr int HALF = HD / 2;
    constexpr int P = Pack128<bf16>::size;  // 8 pairs per step
    constexpr int GROUPS = HALF / P;        // steps per row
    static_assert(HALF % P == 0, "d / 2 must be a multiple of 8");
    for (int q = threadIdx.x; q < ROWS * GROUPS; q += ATT_THREADS) {
        const int r = q / GROUPS;
        const int i = q % GROUPS * P;
        const int pos = row0 + r;
        if (pos >= S) continue;
        bf16* x = t + r * Row<HD>::LD;
        rope_rotate_pack8(x, cos + (long)r * HD, sin + (long)r * HD, i, HALF, false);
    }
}

// The first tiles of a query-tile kernel (forward, dQ), landed and rotated:
// its BQ rows of q (and of do when sdO is given) from q0, key and value tile 0.
template <int HD, int BQ>
static __device__ __forceinline__ void query_tile_prologue(bf16* sQ, bf16* sdO, bf16* sK, bf16* sV,
                                                           const HeadTile<HD>& ht, const float* cos,
                                                           const float* sin, int q0, int S) {
    tile_load_async<HD, BQ>(sQ, ht.q, ht.W, q0, S);
    if (sdO) tile_load_async<HD, BQ>(sdO, ht.dout, ht.O, q0, S);
    tile_load_async<HD, ATT_BK>(sK, ht.k, ht.W, 0, S);
    tile_load_async<HD, ATT_BK>(sV, ht.v, ht.W, 0, S);
    cp_async_wait_all();
    __syncthreads();
    tile_rotate<HD, BQ>(sQ, cos + (long)q0 * HD, sin + (long)q0 * HD, q0, S);
    tile_rotate<HD, ATT_BK>(sK, cos, sin, 0, S);
    __syncthreads();
}

// Rotates the next K tile (positions k0..) of a query-tile kernel (forward,
// dQ) with its table rows: staged in shared memory by table_load_async when
// the launcher gave room for them (args.stage_tables), else from global (L2).
// Two calls, not a pointer select, so each reads its own memory space and the
// flag stays in the parameter bank rather than a register.
template <int HD, typename Args>
static __device__ __forceinline__ void rotate_next_k_tile(bf16* tile, const Args& args, const float* sCos,
                                                          const float* sSin, int k0, int S) {
    if (args.stage_tables) {
        tile_rotate<HD, ATT_BK>(tile, sCos, sSin, k0, S);
    } else {
        tile_rotate<HD, ATT_BK>(tile, args.cos + (long)k0 * HD, args.sin + (long)k0 * HD, k0, S);
    }
}

// ---------------------------------------------------------------------------
// Fragments (PTX layouts, see arch.cuh; g = lane / 4, t = lane % 4)

// A (16 x 16) at rows row0.., columns col0.. of a row-major tile: the four
// 8 x 8 quarters in the order of the A registers.
template <int LD>
static __device__ __forceinline__ void frag_a(uint32_t r[4], const bf16* tile, int row0, int col0, int lane) {
    ldmatrix_x4(r, tile + (row0 + lane % 16) * LD + col0 + lane / 16 * 8);
}

// B of two n8 tiles (n0.., n0 + 8..) for the k16 step k0.., from a tile whose
// rows are the n index (the "col" B layout: q or k rows for scores):
// r[0..1] for n0, r[2..3] for n0 + 8.
template <int LD>
static __device__ __forceinline__ void frag_b_nrows(uint32_t r[4], const bf16* tile, int n0, int k0, int lane) {
    ldmatrix_x4(r, tile + (n0 + lane % 8 + lane / 16 * 8) * LD + k0 + lane / 8 % 2 * 8);
}

// B of two n8 tiles (columns n0.., n0 + 8..) for the k16 step k0.., from a
// tile whose rows are the k index (row-major K x N: v, dO, q or k rows as the
// right factor of a product over rows), through the transposing ldmatrix.
template <int LD>
static __device__ __forceinline__ void frag_b_krows(uint32_t r[4], const bf16* tile, int k0, int n0, int lane) {
    ldmatrix_x4_trans(r, tile + (k0 + lane % 8 + lane / 8 % 2 * 8) * LD + n0 + lane / 16 * 8);
}

// The A fragment for k16 step kk made of two f32 accumulator tiles (columns
// 16 kk.. and 16 kk + 8..): a score tile reused as the left factor.
static __device__ __forceinline__ void acc_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = pack_bf16x2(c0[0], c0[1]);
    a[1] = pack_bf16x2(c0[2], c0[3]);
    a[2] = pack_bf16x2(c1[0], c1[1]);
    a[3] = pack_bf16x2(c1[2], c1[3]);
}

// acc[m][16 x N] += A_tile[rows row0 + 16 m.., all K columns] * B for MT
// m-tiles, where B's rows are the n index (scores: q k^T, k q^T, dO v^T,
// v dO^T). K = HD. Each B fragment serves all MT m-tiles.
template <int HD, int NT, int MT>
static __device__ __forceinline__ void mma_rows_nrows(float acc[MT][NT][4], const bf16* a_tile, int row0,
                                                      const bf16* b_tile, int lane) {
    constexpr int LD = Row<HD>::LD;
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++) {
        uint32_t a[MT][4];
#pragma unroll
        for (int m = 0; m < MT; m++) frag_a<LD>(a[m], a_tile, row0 + 16 * m, ks * 16, lane);
#pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
            uint32_t b[4];
            frag_b_nrows<LD>(b, b_tile, nt * 8, ks * 16, lane);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                mma_m16n8k16_bf16_f32(acc[m][nt], a[m], b, acc[m][nt]);
                mma_m16n8k16_bf16_f32(acc[m][nt + 1], a[m], b + 2, acc[m][nt + 1]);
            }
        }
    }
}

// acc[m][16 x HD] += P[m][16 x KN] * T for MT m-tiles, where P is in
// accumulator tiles p[m][KN / 8] and T [KN][HD] is a tile whose rows are the k
// index (P v, P^T dO, dS k, dS^T q). Each B fragment serves all MT m-tiles
// (shared-memory reads, not the mma, bound an mma.sync kernel).
template <int HD, int KN, int MT>
static __device__ __forceinline__ void mma_acc_krows(float acc[MT][HD / 8][4], const float p[MT][KN / 8][4],
                                                     const bf16* b_tile, int lane) {
    constexpr int LD = Row<HD>::LD;
#pragma unroll
    for (int kk = 0; kk < KN / 16; kk++) {
        uint32_t a[MT][4];
#pragma unroll
        for (int m = 0; m < MT; m++) acc_to_a(a[m], p[m][2 * kk], p[m][2 * kk + 1]);
#pragma unroll
        for (int ot = 0; ot < HD / 8; ot += 2) {
            uint32_t b[4];
            frag_b_krows<LD>(b, b_tile, kk * 16, ot * 8, lane);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                mma_m16n8k16_bf16_f32(acc[m][ot], a[m], b, acc[m][ot]);
                mma_m16n8k16_bf16_f32(acc[m][ot + 1], a[m], b + 2, acc[m][ot + 1]);
            }
        }
    }
}

template <int NT>
static __device__ __forceinline__ void zero_acc(float acc[NT][4]) {
#pragma unroll
    for (int i = 0; i < NT; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
}

// The RoPE backward (rotation by -angle) of a 16 x HD accumulator whose rows
// are positions row0 + g and row0 + g + 8, scaled by `scale`, then stored as
// bf16 at out + position * stride (rows at or past S skipped).
template <int HD>
static __device__ __forceinline__ void store_rotated_grad(float acc[HD / 8][4], float scale, const float* cos,
                                                          const float* sin, int row0, int S, bf16* out, long stride,
                                                          int lane) {
    constexpr int HALF_T = HD / 16;  // tiles per half of the head
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int pos = row0 + g + 8 * half;
        if (pos >= S) continue;
        const float* c = cos + (long)pos * HD;
        const float* s = sin + (long)pos * HD;
        bf16* row = out + (long)pos * stride;
#pragma unroll
        for (int ot = 0; ot < HALF_T; ot++) {
            float r1[2], r2[2];
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int i = ot * 8 + 2 * t + e;  // column in the first half; partner i + HD / 2
                const float g1 = acc[ot][2 * half + e] * scale;
                const float g2 = acc[ot + HALF_T][2 * half + e] * scale;
                rope_rotate(g1, g2, c[i], c[i + HD / 2], s[i], s[i + HD / 2], true, &r1[e], &r2[e]);
            }
            const int i0 = ot * 8 + 2 * t;
            *reinterpret_cast<uint32_t*>(row + i0) = pack_bf16x2(r1[0], r1[1]);
            *reinterpret_cast<uint32_t*>(row + i0 + HD / 2) = pack_bf16x2(r2[0], r2[1]);
        }
    }
}

// ---------------------------------------------------------------------------
// Forward

template <int HD>
static __device__ void attention_forward_impl(const AttentionForwardArgs& a) {
    constexpr int MT = ForwardTiles<HD>::MT;
    constexpr int BQ = ATT_WARPS * 16 * MT;
    constexpr int LD = Row<HD>::LD;
    constexpr int KS = HD / 16;      // k16 steps over the head dim
    constexpr int NT = ATT_BK / 8;   // n8 tiles over a key tile
    constexpr int OT = HD / 8;       // n8 tiles over the head dim
    const int S = a.S, H = a.H;
    const HeadTile<HD> ht(a.qkv, nullptr, S, H, (int)ceil_div(S, BQ));
    const int bh = ht.bh, b = ht.b, h = ht.h;
    const int q0 = ht.tile * BQ;
    const long W = ht.W;
    const bf16 *kg = ht.k, *vg = ht.v;
    const int lane = lane_id();
    const int warp = threadIdx.x / 32;
    const int t = lane % 4;
    const int k_tiles = (int)ceil_div(S, ATT_BK);
    const float sl2 = a.scale * LOG2E;

    bf16* sQ = dynamic_shared<bf16>();
    bf16* sK = sQ + BQ * LD;          // two buffers
    bf16* sV = sK + 2 * ATT_BK * LD;  // two buffers
    // The next K tile's table rows, when the launcher gave room for them.
    float* sCos = reinterpret_cast<float*>(sV + 2 * ATT_BK * LD);
    float* sSin = sCos + ATT_BK * HD;

    query_tile_prologue<HD, BQ>(sQ, nullptr, sK, sV, ht, a.cos, a.sin, q0, S);

    // This warp's query rows stay in registers for the whole sweep (sm_90a).
    uint32_t qf[FORWARD_Q_IN_REGISTERS ? MT : 1][FORWARD_Q_IN_REGISTERS ? KS : 1][4];
    if (FORWARD_Q_IN_REGISTERS) {
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int ks = 0; ks < KS; ks++) frag_a<LD>(qf[m][ks], sQ, (warp * MT + m) * 16, ks * 16, lane);
    }

    float o[MT][OT][4];
    float row_max[MT][2], row_sum[MT][2];
#pragma unroll
    for (int m = 0; m < MT; m++) {
        zero_acc<OT>(o[m]);
        row_max[m][0] = row_max[m][1] = neg_inf();
        row_sum[m][0] = row_sum[m][1] = 0.0f;
    }

    for (int j = 0; j < k_tiles; j++) {
        const int buf = j & 1;
        if (j + 1 < k_tiles) {
            tile_load_async<HD, ATT_BK>(sK + (buf ^ 1) * ATT_BK * LD, kg, W, (j + 1) * ATT_BK, S);
            tile_load_async<HD, ATT_BK>(sV + (buf ^ 1) * ATT_BK * LD, vg, W, (j + 1) * ATT_BK, S);
            if (a.stage_tables) table_load_async<HD, ATT_BK>(sCos, sSin, a.cos, a.sin, (j + 1) * ATT_BK, S);
            cp_async_commit();
        }
        const bf16* k_tile = sK + buf * ATT_BK * LD;
        const bf16* v_tile = sV + buf * ATT_BK * LD;
        const int k0 = j * ATT_BK;
        // Scores of all MT m-tiles, each K fragment loaded once for them.
        float s[MT][NT][4];
#pragma unroll
        for (int m = 0; m < MT; m++) zero_acc<NT>(s[m]);
        if (FORWARD_Q_IN_REGISTERS) {
#pragma unroll
            for (int ks = 0; ks < KS; ks++)
#pragma unroll
                for (int nt = 0; nt < NT; nt += 2) {
                    uint32_t kb[4];
                    frag_b_nrows<LD>(kb, k_tile, nt * 8, ks * 16, lane);
#pragma unroll
                    for (int m = 0; m < MT; m++) {
                        mma_m16n8k16_bf16_f32(s[m][nt], qf[m][ks], kb, s[m][nt]);
                        mma_m16n8k16_bf16_f32(s[m][nt + 1], qf[m][ks], kb + 2, s[m][nt + 1]);
                    }
                }
        } else {
            mma_rows_nrows<HD, NT, MT>(s, sQ, warp * MT * 16, k_tile, lane);
        }
#pragma unroll
        for (int m = 0; m < MT; m++) {
            // Keys past S (the tail tile) get no weight.
            if (k0 + ATT_BK > S) {
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        if (k0 + nt * 8 + 2 * t + i % 2 >= S) s[m][nt][i] = neg_inf();
            }
#pragma unroll
            for (int half = 0; half < 2; half++) {
                // Pairwise trees for the row max and sum: short dependency
                // chains, as two warps per scheduler hide little latency.
                float part[NT];
#pragma unroll
                for (int nt = 0; nt < NT; nt++) part[nt] = fmaxf(s[m][nt][2 * half], s[m][nt][2 * half + 1]);
#pragma unroll
                for (int w = NT / 2; w > 0; w /= 2)
#pragma unroll
                    for (int nt = 0; nt < w; nt++) part[nt] = fmaxf(part[nt], part[nt + w]);
                float mx = fmaxf(row_max[m][half], part[0]);
                mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
                // The first key tile always holds a valid key, so mx is finite.
                const float corr = fast_exp2((row_max[m][half] - mx) * sl2);
                row_max[m][half] = mx;
                const float shift = mx * sl2;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) s[m][nt][2 * half + e] = fast_exp2(fmaf(s[m][nt][2 * half + e], sl2, -shift));
                    part[nt] = s[m][nt][2 * half] + s[m][nt][2 * half + 1];
                }
#pragma unroll
                for (int w = NT / 2; w > 0; w /= 2)
#pragma unroll
                    for (int nt = 0; nt < w; nt++) part[nt] += part[nt + w];
                row_sum[m][half] = fmaf(row_sum[m][half], corr, part[0]);
#pragma unroll
                for (int ot = 0; ot < OT; ot++) {
                    o[m][ot][2 * half] *= corr;
                    o[m][ot][2 * half + 1] *= corr;
                }
            }
        }
        mma_acc_krows<HD, ATT_BK, MT>(o, s, v_tile, lane);
        if (j + 1 < k_tiles) {
            cp_async_wait<0>();
            __syncthreads();  // barrier: next K/V tile landed (forward)
            rotate_next_k_tile<HD>(sK + (buf ^ 1) * ATT_BK * LD, a, sCos, sSin, (j + 1) * ATT_BK, S);
            __syncthreads();  // barrier: rotated K tile (forward)
        }
    }

    // o / l, and lse = c m + log l.
    const long o_stride = (long)H * HD;
    bf16* og = a.o + (long)b * S * o_stride + (long)h * HD;
    float* lse = a.lse + (long)bh * S;
    const int g = lane / 4;
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float l = row_sum[m][half];
            l += __shfl_xor_sync(FULL_MASK, l, 1);
            l += __shfl_xor_sync(FULL_MASK, l, 2);
            const int q = q0 + (warp * MT + m) * 16 + g + 8 * half;
            if (q >= S) continue;
            const float inv = 1.0f / l;
            bf16* row = og + (long)q * o_stride;
#pragma unroll
            for (int ot = 0; ot < OT; ot++)
                *reinterpret_cast<uint32_t*>(row + ot * 8 + 2 * t) =
                    pack_bf16x2(o[m][ot][2 * half] * inv, o[m][ot][2 * half + 1] * inv);
            if (t == 0) lse[q] = row_max[m][half] * a.scale + logf(l);
        }
}

extern "C" __global__ void __launch_bounds__(128) attention_forward_d32(const AttentionForwardArgs a) {
    attention_forward_impl<32>(a);
}
extern "C" __global__ void __launch_bounds__(128) attention_forward_d64(const AttentionForwardArgs a) {
    attention_forward_impl<64>(a);
}
extern "C" __global__ void __launch_bounds__(128) attention_forward_d128(const AttentionForwardArgs a) {
    attention_forward_impl<128>(a);
}

// ---------------------------------------------------------------------------
// Backward: delta

// One thread per (token, head) row of d values.
extern "C" __global__ void __launch_bounds__(256) attention_delta(const AttentionDeltaArgs a) {
    const long rows = (long)a.B * a.S * a.H;
    const int d = a.d;
    const bool packed = d % 8 == 0 && is_aligned16(a.o) && is_aligned16(a.dout);
    for (long r = thread_index(); r < rows; r += thread_count()) {
        const long token = r / a.H;
        const int h = (int)(r % a.H);
        const long at = token * (long)a.H * d + (long)h * d;
        float acc = 0.0f;
        if (packed) {
            for (int i = 0; i < d; i += 8) {
                const Pack128<bf16> x = load128(a.o + at + i), y = load128(a.dout + at + i);
#pragma unroll
                for (int k = 0; k < 8; k++) acc += to_f32(x.v[k]) * to_f32(y.v[k]);
            }
        } else {
            for (int i = 0; i < d; i++) acc += to_f32(a.o[at + i]) * to_f32(a.dout[at + i]);
        }
        const long b = token / a.S, s = token % a.S;
        a.delta[(b * a.H + h) * a.S + s] = acc;
    }
}

// ---------------------------------------------------------------------------
// Backward: dK and dV (key tiles; each warp owns 16 keys, all query tiles)

template <int HD>
static __device__ void attention_backward_dkdv_impl(const AttentionBackwardArgs& a) {
    constexpr int BQ = KeyTileBackward<HD>::BQ;
    constexpr int LD = Row<HD>::LD;
    constexpr int QT = BQ / 8;  // n8 tiles over a query tile
    constexpr int OT = HD / 8;
    const int S = a.S, H = a.H;
    const HeadTile<HD> ht(a.qkv, a.dout, S, H, (int)ceil_div(S, ATT_BK));
    const int bh = ht.bh, b = ht.b, h = ht.h;
    const int k0 = ht.tile * ATT_BK;
    const long W = ht.W, O = ht.O;
    const bf16 *qg = ht.q, *kg = ht.k, *vg = ht.v, *dog = ht.dout;
    const float* lse_g = a.lse + (long)bh * S;
    const float* delta_g = a.delta + (long)bh * S;
    const int lane = lane_id();
    const int warp = threadIdx.x / 32;
    const int t = lane % 4;
    const int q_tiles = (int)ceil_div(S, BQ);
    const float sl2 = a.scale * LOG2E;

    bf16* sK = dynamic_shared<bf16>();
    bf16* sV = sK + ATT_BK * LD;
    bf16* sQ = sV + ATT_BK * LD;   // two buffers
    bf16* sdO = sQ + 2 * BQ * LD;  // two buffers
    float* sLse = reinterpret_cast<float*>(sdO + 2 * BQ * LD);  // two buffers
    float* sDelta = sLse + 2 * BQ;                              // two buffers

    tile_load_async<HD, ATT_BK>(sK, kg, W, k0, S);
    tile_load_async<HD, ATT_BK>(sV, vg, W, k0, S);
    tile_load_async<HD, BQ>(sQ, qg, W, 0, S);
    tile_load_async<HD, BQ>(sdO, dog, O, 0, S);
    vector_load_async<BQ>(sLse, lse_g, 0, S);
    vector_load_async<BQ>(sDelta, delta_g, 0, S);
    cp_async_wait_all();
    __syncthreads();
    tile_rotate<HD, ATT_BK>(sK, a.cos + (long)k0 * HD, a.sin + (long)k0 * HD, k0, S);
    tile_rotate<HD, BQ>(sQ, a.cos, a.sin, 0, S);
    __syncthreads();

    float dk[OT][4], dv[OT][4];
    zero_acc<OT>(dk);
    zero_acc<OT>(dv);
    const int kw = warp * 16;  // this warp's keys in the tile

    for (int i = 0; i < q_tiles; i++) {
        const int buf = i & 1;
        const int q0 = i * BQ;
        if (i + 1 < q_tiles) {
            const int n = buf ^ 1;
            tile_load_async<HD, BQ>(sQ + n * BQ * LD, qg, W, q0 + BQ, S);
            tile_load_async<HD, BQ>(sdO + n * BQ * LD, dog, O, q0 + BQ, S);
            vector_load_async<BQ>(sLse + n * BQ, lse_g, q0 + BQ, S);
            vector_load_async<BQ>(sDelta + n * BQ, delta_g, q0 + BQ, S);
            cp_async_commit();
        }
        const bf16* q_tile = sQ + buf * BQ * LD;
        const bf16* do_tile = sdO + buf * BQ * LD;
        const float* lse = sLse + buf * BQ;
        const float* delta = sDelta + buf * BQ;

        // Transposed scores and dP: rows are this warp's keys, columns queries.
        float pt[QT][4], dpt[QT][4];
        zero_acc<QT>(pt);
        zero_acc<QT>(dpt);
        mma_rows_nrows<HD, QT, 1>(&pt, sK, kw, q_tile, lane);
        mma_rows_nrows<HD, QT, 1>(&dpt, sV, kw, do_tile, lane);
#pragma unroll
        for (int nt = 0; nt < QT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int c = nt * 8 + 2 * t + e % 2;  // query in the tile
                const float p = q0 + c < S ? fast_exp2(fmaf(pt[nt][e], sl2, -lse[c] * LOG2E)) : 0.0f;
                pt[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - delta[c]);  // dS^T
            }
        mma_acc_krows<HD, BQ, 1>(&dv, &pt, do_tile, lane);
        mma_acc_krows<HD, BQ, 1>(&dk, &dpt, q_tile, lane);

        if (i + 1 < q_tiles) {
            cp_async_wait<0>();
            __syncthreads();  // barrier: next Q/dO tile landed (dK/dV)
            // Table rows from global (L2): staging them in shared memory
            // costs a third block per multiprocessor (15% slower, measured;
            // the kernel's launch bounds hold it at 168 registers for it).
            const long next = (long)(q0 + BQ) * HD;
            tile_rotate<HD, BQ>(sQ + (buf ^ 1) * BQ * LD, a.cos + next, a.sin + next, q0 + BQ, S);
            __syncthreads();  // barrier: rotated Q tile (dK/dV)
        }
    }

    // dv as is, dk scaled and rotated back, into the k and v parts of dqkv.
    bf16* out = a.dqkv + (long)b * S * W;
    const int g = lane / 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int key = k0 + kw + g + 8 * half;
        if (key >= S) continue;
        bf16* row = out + (long)key * W + (long)(2 * H + h) * HD;
#pragma unroll
        for (int ot = 0; ot < OT; ot++)
            *reinterpret_cast<uint32_t*>(row + ot * 8 + 2 * t) =
                pack_bf16x2(dv[ot][2 * half], dv[ot][2 * half + 1]);
    }
    store_rotated_grad<HD>(dk, a.scale, a.cos, a.sin, k0 + kw, S, out + (long)(H + h) * HD, W, lane);
}

// ---------------------------------------------------------------------------
// Backward: dQ (query tiles; each warp owns 16 queries, all key tiles)

template <int HD>
static __device__ void attention_backward_dq_impl(const AttentionBackwardArgs& a) {
    constexpr int MT = DqTiles<HD>::MT;
    constexpr int BQ = DqTiles<HD>::BQ;
    constexpr int LD = Row<HD>::LD;
    constexpr int DQ_KEYS = 32;       // keys per step within a tile
    constexpr int NT = DQ_KEYS / 8;
    constexpr int OT = HD / 8;
    const int S = a.S, H = a.H;
    const HeadTile<HD> ht(a.qkv, a.dout, S, H, (int)ceil_div(S, BQ));
    const int bh = ht.bh, b = ht.b, h = ht.h;
    const int q0 = ht.tile * BQ;
    const long W = ht.W;
    const bf16 *kg = ht.k, *vg = ht.v;
    const int lane = lane_id();
    const int warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int k_tiles = (int)ceil_div(S, ATT_BK);
    const float sl2 = a.scale * LOG2E;
    const int qw = warp * 16 * MT;  // this warp's queries in the tile

    // lse (in log2 units) and delta of this lane's rows.
    float lse2[MT][2], delta[MT][2];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int q = q0 + qw + 16 * m + g + 8 * half;
            const bool valid = q < S;
            lse2[m][half] = valid ? a.lse[(long)bh * S + q] * LOG2E : 0.0f;
            delta[m][half] = valid ? a.delta[(long)bh * S + q] : 0.0f;
        }

    bf16* sQ = dynamic_shared<bf16>();
    bf16* sdO = sQ + BQ * LD;
    bf16* sK = sdO + BQ * LD;         // two buffers
    bf16* sV = sK + 2 * ATT_BK * LD;  // two buffers
    // The next K tile's table rows, when the launcher gave room for them.
    float* sCos = reinterpret_cast<float*>(sV + 2 * ATT_BK * LD);
    float* sSin = sCos + ATT_BK * HD;

    query_tile_prologue<HD, BQ>(sQ, sdO, sK, sV, ht, a.cos, a.sin, q0, S);

    float dq[MT][OT][4];
#pragma unroll
    for (int m = 0; m < MT; m++) zero_acc<OT>(dq[m]);
    for (int j = 0; j < k_tiles; j++) {
        const int buf = j & 1;
        const int k0 = j * ATT_BK;
        if (j + 1 < k_tiles) {
            tile_load_async<HD, ATT_BK>(sK + (buf ^ 1) * ATT_BK * LD, kg, W, k0 + ATT_BK, S);
            tile_load_async<HD, ATT_BK>(sV + (buf ^ 1) * ATT_BK * LD, vg, W, k0 + ATT_BK, S);
            if (a.stage_tables) table_load_async<HD, ATT_BK>(sCos, sSin, a.cos, a.sin, k0 + ATT_BK, S);
            cp_async_commit();
        }
        const bf16* k_tile = sK + buf * ATT_BK * LD;
        const bf16* v_tile = sV + buf * ATT_BK * LD;

        // Half a key tile (32 keys) at a time: the scores and dP of 32
        // queries per warp for a whole tile would not fit in registers.
#pragma unroll 1
        for (int kh = 0; kh < ATT_BK; kh += DQ_KEYS) {
            const bf16* k_part = k_tile + kh * LD;
            float p[MT][NT][4], ds[MT][NT][4];
#pragma unroll
            for (int m = 0; m < MT; m++) {
                zero_acc<NT>(p[m]);
                zero_acc<NT>(ds[m]);
            }
            mma_rows_nrows<HD, NT, MT>(p, sQ, qw, k_part, lane);
            mma_rows_nrows<HD, NT, MT>(ds, sdO, qw, v_tile + kh * LD, lane);
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int key = k0 + kh + nt * 8 + 2 * t + e % 2;
                        const float pe = key < S ? fast_exp2(fmaf(p[m][nt][e], sl2, -lse2[m][e / 2])) : 0.0f;
                        ds[m][nt][e] = pe * (ds[m][nt][e] - delta[m][e / 2]);
                    }
            mma_acc_krows<HD, DQ_KEYS, MT>(dq, ds, k_part, lane);
        }

        if (j + 1 < k_tiles) {
            cp_async_wait<0>();
            __syncthreads();  // barrier: next K/V tile landed (dQ)
            rotate_next_k_tile<HD>(sK + (buf ^ 1) * ATT_BK * LD, a, sCos, sSin, k0 + ATT_BK, S);
            __syncthreads();  // barrier: rotated K tile (dQ)
        }
    }
    bf16* out = a.dqkv + (long)b * S * W + (long)h * HD;
#pragma unroll
    for (int m = 0; m < MT; m++)
        store_rotated_grad<HD>(dq[m], a.scale, a.cos, a.sin, q0 + qw + 16 * m, S, out, W, lane);
}

extern "C" __global__ void __launch_bounds__(128, 3) attention_backward_dkdv_d32(const AttentionBackwardArgs a) {
    attention_backward_dkdv_impl<32>(a);
}
extern "C" __global__ void __launch_bounds__(128, 2) attention_backward_dq_d32(const AttentionBackwardArgs a) {
    attention_backward_dq_impl<32>(a);
}
extern "C" __global__ void __launch_bounds__(128, ATT_DKDV_D64_MIN_BLOCKS) attention_backward_dkdv_d64(const AttentionBackwardArgs a) {
    attention_backward_dkdv_impl<64>(a);
}
extern "C" __global__ void __launch_bounds__(128, 2) attention_backward_dq_d64(const AttentionBackwardArgs a) {
    attention_backward_dq_impl<64>(a);
}
extern "C" __global__ void __launch_bounds__(128) attention_backward_dkdv_d128(const AttentionBackwardArgs a) {
    attention_backward_dkdv_impl<128>(a);
}
extern "C" __global__ void __launch_bounds__(128, 2) attention_backward_dq_d128(const AttentionBackwardArgs a) {
    attention_backward_dq_impl<128>(a);
}
