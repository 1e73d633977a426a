// embedding: the input embedding x [B, S = P + T, D] of one batch and its
// backward (src/backend/cpu/embedding.rs and input_embedding_* in
// src/model/trm.rs). Per sample b: the P puzzle positions, flattened to P * D
// values, hold the puzzle-embedding row puzzle_emb[puzzle_ids[b]] (ndim
// values) then zeros; position P + t holds the token row embed[tokens[b, t]];
// everything is scaled by `scale` = sqrt(D).
//
// Design rule: the forward is a grid-stride gather over the B * S * D outputs
// (8-element packs when D % 8 == 0 and x and embed are 16-byte aligned), with
// the reference's bf16 rounding: token rows are bf16 tables, puzzle rows are
// f32 and cast to bf16 before the scale, and the scaled value is rounded once
// more. Ids out of range give zero rows (the model validates ids before).
// The backward is deterministic: no float atomics, and a summation order
// fixed by the shapes alone, so the same data gives the same bits on every
// run and whatever grid the launch has. The B * T token rows are cut into
// `nblocks` contiguous slices (the launcher picks nblocks from the shapes);
// slice k is summed per (id, column) in row order into its own V * D floats
// of `partial` -- in dynamic shared memory first when `shared_accumulate` (V
// * D * 4 bytes), else straight in the scratch, which no other slice touches
// -- each thread owning fixed columns, so no barrier is needed. A second
// kernel then adds the nblocks partials per (id, column) in slice order and
// adds the sum to dembed. The puzzle rows' gradient is written, not
// accumulated.
#include "common.cuh"

// The scaled puzzle value at flat position f < P * D of a sample.
static __device__ __forceinline__ float puzzle_value(const InputEmbeddingForwardArgs& a, long b, long f) {
    if (f >= a.ndim || a.puzzle_emb == nullptr) return 0.0f;
    const int id = a.puzzle_ids[b];
    if (id < 0 || id >= a.num_puzzle_ids) return 0.0f;
    return to_f32(to_bf16(a.puzzle_emb[(long)id * a.ndim + f])) * a.scale;
}

extern "C" __global__ void input_embedding_forward_bf16(const InputEmbeddingForwardArgs a) {
    const long D = a.D, S = (long)a.P + a.T;
    constexpr int P8 = Pack128<bf16>::size;
    const bool packed = D % P8 == 0 && is_aligned16(a.x) && is_aligned16(a.embed);
    const long step = packed ? P8 : 1;
    const long per_row = D / step;  // packs (or elements) per row
    for (long q = thread_index(); q < a.B * S * per_row; q += thread_count()) {
        const long row = q / per_row, col = (q % per_row) * step;
        const long b = row / S, s = row % S;
        bf16* out = a.x + row * D + col;
        if (s < a.P) {
            const long f = s * D + col;
            if (packed) {
                Pack128<bf16> v;
#pragma unroll
                for (int k = 0; k < P8; k++) v.v[k] = to_bf16(puzzle_value(a, b, f + k));
                store128(out, v);
            } else {
                *out = to_bf16(puzzle_value(a, b, f));
            }
            continue;
        }
        const int token = a.tokens[b * a.T + (s - a.P)];
        const bool valid = token >= 0 && token < a.V;
        const bf16* src = a.embed + (long)(valid ? token : 0) * D + col;
        if (packed) {
            const Pack128<bf16> e = load128(src);
            Pack128<bf16> v;
#pragma unroll
            for (int k = 0; k < P8; k++) v.v[k] = to_bf16(valid ? to_f32(e.v[k]) * a.scale : 0.0f);
            store128(out, v);
        } else {
            *out = to_bf16(valid ? to_f32(*src) * a.scale : 0.0f);
        }
    }
}

extern "C" __global__ void input_embedding_backward_bf16(const InputEmbeddingBackwardArgs a) {
    const long D = a.D, S = (long)a.P + a.T, table = (long)a.V * a.D;
    // Puzzle rows: dpuzzle[b, k] = scale * dx[b] flattened at k.
    if (a.dpuzzle != nullptr) {
        for (long q = thread_index(); q < (long)a.B * a.ndim; q += thread_count()) {
            const long b = q / a.ndim, k = q % a.ndim;
            a.dpuzzle[q] = a.scale * to_f32(a.dx[b * S * D + k]);
        }
    }
    // Token rows: slice k of nblocks, whichever block runs it, so the sums
    // do not depend on the grid.
    const long rows = (long)a.B * a.T;
    const long per_slice = ceil_div(rows, a.nblocks);
    float* smem = a.shared_accumulate ? dynamic_shared<float>() : nullptr;
    for (long k = blockIdx.x; k < a.nblocks; k += gridDim.x) {
        const long first = k * per_slice;
        const long last = first + per_slice < rows ? first + per_slice : rows;
        float* out = a.partial + k * table;
        float* acc = smem != nullptr ? smem : out;
        // Each thread owns the columns c = threadIdx.x + j * blockDim.x of
        // every id: it alone clears, sums and flushes them, so no barrier is
        // needed (not even between slices sharing the shared memory).
        for (long c = threadIdx.x; c < D; c += blockDim.x) {
            for (long v = 0; v < a.V; v++) acc[v * D + c] = 0.0f;
            for (long r = first; r < last; r++) {
                const int token = a.tokens[r];
                if (token < 0 || token >= a.V) continue;
                const long b = r / a.T, t = r % a.T;
                acc[token * D + c] += a.scale * to_f32(a.dx[(b * S + a.P + t) * D + c]);
            }
            if (smem != nullptr) {
                for (long v = 0; v < a.V; v++) out[v * D + c] = acc[v * D + c];
            }
        }
    }
}

extern "C" __global__ void input_embedding_backward_reduce(const InputEmbeddingReduceArgs a) {
    for (long i = thread_index(); i < a.n; i += thread_count()) {
        // Slice order, the same for every grid.
        float sum = 0.0f;
        for (long k = 0; k < a.nblocks; k++) sum += a.partial[k * a.n + i];
        a.dembed[i] += sum;
    }
}
