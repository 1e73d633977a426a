// Kernel argument structs shared by the CUDA kernels and Rust. Every kernel
// takes exactly one of these by value; build.rs parses this file and writes
// the `#[repr(C)]` Rust mirror (src/backend/cuda/abi.rs includes it) with
// size and offset checks on both sides, so the two cannot drift.
//
// Restricted syntax (the generator rejects anything else): `struct Name {`,
// one field per line as `[const] type [*] name;`, `};`. Types: float,
// double, int32_t, uint32_t, int64_t, uint64_t, uint8_t, uint16_t, bf16, void
// (pointers only). A `//` comment above a struct or on a field's line becomes
// its Rust doc comment. Dimension names: M rows, B batch, S tokens per
// sample, T labelled tokens per sample, P puzzle positions, D hidden, H heads,
// d head dim, F SwiGLU width, V vocab, n element count. Pointers a kernel
// only reads are `const`; "or null" marks optional ones.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------------------
// cast.cu

// y[i] = bf16(x[i]) for i < n.
struct CastF32ToBf16Args {
    const float* x;
    bf16* y;
    int64_t n;
};

// y[i] = f32(x[i]) for i < n.
struct CastBf16ToF32Args {
    const bf16* x;
    float* y;
    int64_t n;
};

// y[i] = v for i < n.
struct FillF32Args {
    float* y;
    float v;
    int64_t n;
};

// y[i] = v for i < n (v is the bf16 bit pattern; the caller rounds).
struct FillBf16Args {
    bf16* y;
    bf16 v;
    int64_t n;
};

// ---------------------------------------------------------------------------
// rmsnorm.cu

// y = rmsnorm(x + r) per row of D; y may alias x or r.
struct RmsnormForwardArgs {
    bf16* y;          // [M, D] out
    float* rstd;      // [M] out: 1 / sqrt(mean(h^2) + eps), h = bf16(x + r)
    const bf16* x;    // [M, D]
    const bf16* r;    // [M, D] residual, or null for y = rmsnorm(x)
    int64_t M;
    int32_t D;
    float eps;
};

// dx = rstd * (dy - y * mean(dy * y)) per row; dx may alias dy.
struct RmsnormBackwardArgs {
    bf16* dx;            // [M, D] out: the gradient of x and of the residual r
    const bf16* dy;      // [M, D]
    const bf16* y;       // [M, D] forward output
    const float* rstd;   // [M] forward output
    int64_t M;
    int32_t D;
};

// ---------------------------------------------------------------------------
// swiglu.cu

// a[m, j] = silu(g[m, j]) * u[m, j], gu = [g | u].
struct SwigluForwardArgs {
    bf16* a;          // [M, F] out
    const bf16* gu;   // [M, 2F]
    int64_t M;
    int32_t F;
};

// dgu = [da * u * silu'(g) | da * silu(g)]; dgu may alias gu.
struct SwigluBackwardArgs {
    bf16* dgu;        // [M, 2F] out
    const bf16* da;   // [M, F]
    const bf16* gu;   // [M, 2F]
    int64_t M;
    int32_t F;
};

// ---------------------------------------------------------------------------
// rope.cu

// In-place rotation of the q and k heads of qkv (forward: by +angle,
// backward: the transpose, by -angle); v heads untouched.
struct RopeArgs {
    bf16* qkv;           // [B, S, 3 * H * d]: q heads, k heads, v heads
    const float* cos;    // [S, d]
    const float* sin;    // [S, d]
    int64_t tokens;      // B * S
    int32_t S;
    int32_t H;
    int32_t d;           // even
};

// ---------------------------------------------------------------------------
// stablemax_ce.cu

// Per-token stablemax cross-entropy, argmax, and per-sample reductions. One
// block per sample. Labels -100 (and any outside 0..V) are ignored.
struct StablemaxCeForwardArgs {
    const bf16* logits;       // [B, T, V]
    const int32_t* labels;    // [B, T], or null: every token ignored (predictions only)
    float* loss;              // [B, T] out: -log p(label), 0 where ignored; or null
    int32_t* preds;           // [B, T] out: argmax (first maximum); or null
    float* sample_loss;       // [B] out: sum_t loss / max(1, count); or null
    int32_t* count;           // [B] out: labelled tokens; or null
    int32_t* correct;         // [B] out: labelled tokens with argmax == label; or null
    int32_t* seq_correct;     // [B] out: 1 if correct == count; or null
    int32_t B;
    int32_t T;
    int32_t V;                // <= 32
};

// dlogits = grad_scale / max(1, count[b]) * d(-log p(label)) / dlogits; 0 where ignored.
struct StablemaxCeBackwardArgs {
    bf16* dlogits;            // [B, T, V] out
    const bf16* logits;       // [B, T, V]
    const int32_t* labels;    // [B, T]
    const int32_t* count;     // [B] from the forward
    float grad_scale;
    int32_t B;
    int32_t T;
    int32_t V;                // <= 32
};

// Q-head BCE with logits: q_halt against seq_correct, q_continue against an
// optional target. Forward writes loss, backward writes dq.
struct QHeadBceArgs {
    const float* q;                   // [B, 2]: q_halt, q_continue logits
    const int32_t* seq_correct;       // [B] target of q_halt (0 or 1)
    const float* q_continue_target;   // [B], or null: no q_continue loss
    float* loss;                      // [B, 2] out (forward): BCE, 0 without a target
    float* dq;                        // [B, 2] out (backward): grad_scale * (sigmoid(q) - target), 0 without
    float grad_scale;
    int32_t B;
};

// ---------------------------------------------------------------------------
// embedding.cu

// x[b] = scale * [puzzle row (P * D values: puzzle_emb[id] then zeros) ;
// embed[tokens[b, t]] for t < T]. Ids out of range give zero rows.
struct InputEmbeddingForwardArgs {
    bf16* x;                      // [B, P + T, D] out
    const bf16* embed;            // [V, D] token table
    const int32_t* tokens;        // [B, T]
    const float* puzzle_emb;      // [num_puzzle_ids, ndim], or null when ndim == 0
    const int32_t* puzzle_ids;    // [B], or null when ndim == 0
    float scale;                  // sqrt(D)
    int32_t B;
    int32_t T;
    int32_t P;
    int32_t D;
    int32_t V;
    int32_t ndim;                 // <= P * D
    int32_t num_puzzle_ids;
};

// Stage 1 of the deterministic backward: the B * T token rows cut into
// nblocks contiguous slices, slice k summed per (id, column) in row order:
// partial[k, v] = sum of scale * dx[b, P + t] over its rows with tokens[b, t]
// == v (every element written); dpuzzle[b, k] = scale * dx[b] flattened at k
// < ndim. Any grid gives the same bits.
struct InputEmbeddingBackwardArgs {
    float* partial;               // [nblocks, V, D] out: scratch
    float* dpuzzle;               // [B, ndim] out, or null
    const bf16* dx;               // [B, P + T, D]
    const int32_t* tokens;        // [B, T]
    float scale;
    int32_t B;
    int32_t T;
    int32_t P;
    int32_t D;
    int32_t V;
    int32_t ndim;
    int32_t nblocks;              // slices of the token rows, >= 1; fixes the summation order
    int32_t shared_accumulate;    // 1: sum each slice in V * D floats of dynamic shared memory first
};

// Stage 2: dembed[i] += sum over k < nblocks, in order, of partial[k, i].
struct InputEmbeddingReduceArgs {
    float* dembed;                // [n] accumulated
    const float* partial;         // [nblocks, n]
    int64_t n;                    // V * D
    int32_t nblocks;
};

// ---------------------------------------------------------------------------
// optim.cu

// One AdamATan2 step (docs/optimizer.md) over n f32 weights; the host
// computes the scalars from lr, betas, weight decay and the step t in f64.
struct AdamAtan2Args {
    float* w;               // [n] master weights
    float* m;               // [n] first moment
    float* v;               // [n] second moment
    const float* g;         // [n] gradient
    bf16* w_bf16;           // [n] out: bf16 copy of the updated w, or null
    int64_t n;
    float decay;            // 1 - lr * weight_decay
    float one_minus_beta1;
    float one_minus_beta2;
    float step_size;        // lr / (1 - beta1^t)
    float sqrt_bc2;         // sqrt(1 - beta2^t)
};

// Sparse sign-SGD on puzzle-embedding rows: for every distinct id among
// ids[0..N), g = sum of the grad rows with that id (ascending row order), then
// table[id] = table[id] * decay - lr * sign(g). Ids out of range are skipped.
struct PuzzleSignSgdArgs {
    float* table;           // [num_ids, D]
    const float* grad;      // [N, D] one row per batch sample (ids need not be distinct)
    const int32_t* ids;     // [N]
    int32_t N;
    int32_t D;
    int32_t num_ids;
    float lr;
    float decay;            // 1 - lr * weight_decay
};

// shadow = one_minus_rate * w + rate * shadow over n f32 values.
struct EmaArgs {
    float* shadow;          // [n]
    const float* w;         // [n]
    int64_t n;
    float rate;
    float one_minus_rate;
};

// ---------------------------------------------------------------------------
// attention.cu

// Fused RoPE + non-causal softmax attention over the qkv GEMM's output, q and
// k not yet rotated (the kernel rotates its tiles in shared memory):
// o = softmax(scale * rot(q) rot(k)^T) v per (sample, head), lse the row
// log-sum-exp of the scaled scores (natural log). The kernel is picked by d.
struct AttentionForwardArgs {
    bf16* o;                // [B, S, H * d] out
    float* lse;             // [B, H, S] out
    const bf16* qkv;        // [B, S, 3 * H * d]: q heads, k heads, v heads
    const float* cos;       // [S, d] RoPE table
    const float* sin;       // [S, d]
    int32_t B;
    int32_t S;
    int32_t H;
    int32_t d;              // 32, 64 or 128: must match the kernel's
    float scale;            // 1 / sqrt(d)
    int32_t stage_tables;   // 1: the next K tile's RoPE rows staged in shared memory; 0: read from global
};

// delta[b, h, s] = sum_i do[b, s, h * d + i] * o[b, s, h * d + i], in f32.
struct AttentionDeltaArgs {
    float* delta;           // [B, H, S] out
    const bf16* o;          // [B, S, H * d]
    const bf16* dout;       // [B, S, H * d]
    int32_t B;
    int32_t S;
    int32_t H;
    int32_t d;
};

// The backward of the fused attention: dqkv in the qkv layout with the RoPE
// backward applied to dq and dk. Two kernels share these arguments: the
// key-tile one writes the dk and dv parts, the query-tile one the dq part,
// every element exactly once (no atomics: the result is deterministic).
struct AttentionBackwardArgs {
    bf16* dqkv;             // [B, S, 3 * H * d] out
    const bf16* qkv;        // [B, S, 3 * H * d], q and k not yet rotated
    const float* cos;       // [S, d]
    const float* sin;       // [S, d]
    const bf16* dout;       // [B, S, H * d]
    const float* lse;       // [B, H, S] from the forward
    const float* delta;     // [B, H, S] from attention_delta
    int32_t B;
    int32_t S;
    int32_t H;
    int32_t d;              // 32, 64 or 128: must match the kernel's
    float scale;            // 1 / sqrt(d)
    int32_t stage_tables;   // dQ kernel: as in AttentionForwardArgs
};

// ---------------------------------------------------------------------------
// elementwise.cu

// y = bf16(a + b) for i < n; y may alias a or b.
struct AddBf16Args {
    bf16* y;
    const bf16* a;
    const bf16* b;
    int64_t n;
};

// y[i] *= s for i < n.
struct ScaleF32Args {
    float* y;
    float s;
    int64_t n;
};

// z[b, s, :] = init for every sample b with halted[b] != 0.
struct CarryResetArgs {
    bf16* z;              // [B, S, D]
    const bf16* init;     // [D]
    const int32_t* halted; // [B] 0 or 1
    int32_t B;
    int32_t S;
    int32_t D;
};
