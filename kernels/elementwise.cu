// Elementwise ops the engine's step needs between the bigger kernels: the
// bf16 sum of two activations (`z + inj`, gradient sums), the f32 scale of a
// gradient buffer, and the carry reset of halted samples.
//
// Design rule: grid-stride over flat elements, 16-byte packs when every
// pointer is 16-byte aligned, a scalar loop otherwise and for the tail
// (see cast.cu). f32 arithmetic, one bf16 rounding per output, as the bf16
// reference rounds each tensor op's result.
#include "common.cuh"

// y = bf16(a + b); y may alias a or b (each element is read, then written,
// by one thread).
extern "C" __global__ void add_bf16(const AddBf16Args a) {
    const long n = a.n;
    constexpr int P = Pack128<bf16>::size;
    long done = 0;
    if (is_aligned16(a.y) && is_aligned16(a.a) && is_aligned16(a.b)) {
        const long n_pack = n / P;
        for (long p = thread_index(); p < n_pack; p += thread_count()) {
            const Pack128<bf16> x = load128(a.a + p * P);
            const Pack128<bf16> y = load128(a.b + p * P);
            Pack128<bf16> out;
#pragma unroll
            for (int k = 0; k < P; k++) out.v[k] = to_bf16(to_f32(x.v[k]) + to_f32(y.v[k]));
            store128(a.y + p * P, out);
        }
        done = n_pack * P;
    }
    for (long i = done + thread_index(); i < n; i += thread_count())
        a.y[i] = to_bf16(to_f32(a.a[i]) + to_f32(a.b[i]));
}

// y *= s in place.
extern "C" __global__ void scale_f32(const ScaleF32Args a) {
    const long n = a.n;
    constexpr int P = Pack128<float>::size;
    long done = 0;
    if (is_aligned16(a.y)) {
        const long n_pack = n / P;
        for (long p = thread_index(); p < n_pack; p += thread_count()) {
            Pack128<float> v = load128(a.y + p * P);
#pragma unroll
            for (int k = 0; k < P; k++) v.v[k] *= a.s;
            store128(a.y + p * P, v);
        }
        done = n_pack * P;
    }
    for (long i = done + thread_index(); i < n; i += thread_count()) a.y[i] *= a.s;
}

// Every row of every sample b with halted[b] != 0 set to init: z[b, s, :] = init.
// Grid-stride over the B * S * D elements; samples not halted are skipped.
extern "C" __global__ void carry_reset_bf16(const CarryResetArgs a) {
    const long row = (long)a.S * a.D;
    const long n = (long)a.B * row;
    for (long i = thread_index(); i < n; i += thread_count()) {
        const long b = i / row;
        if (a.halted[b] != 0) a.z[i] = a.init[i % a.D];
    }
}
