// Probe kernels for the `ptxas -v` parser tests in tests/kernels_build.rs; not
// part of the engine (build.rs only compiles kernels/*.cu). They cover what the
// parser must read: extern "C" and C++-mangled entries, a template in the trm
// namespace, static and dynamic shared memory, a stack frame, a non-inlined
// device function, and spills (forced by -maxrregcount=32). Regenerate the
// sample with:
//
//   nvcc -cubin -arch=sm_90a -O3 -Xptxas -v -maxrregcount=32 -o /dev/null \
//     tests/data/ptxas_probe.cu 2> tests/data/ptxas_v_sm90a.txt
#include <cuda_bf16.h>

namespace trm {
// Static shared memory plus a local array indexed at run time (a stack frame).
template <int D>
__global__ void row_gather_probe(const float* x, float* y, int k) {
    __shared__ float row[D];
    row[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    float picked[64];
    for (int i = 0; i < 64; i++) picked[i] = row[(i * k) % D];
    y[threadIdx.x] = picked[k & 63];
}
template __global__ void row_gather_probe<256>(const float*, float*, int);
}  // namespace trm

// C++ linkage with dynamic shared memory.
__global__ void dynamic_smem_probe(float* y, long n) {
    extern __shared__ float buf[];
    buf[threadIdx.x] = 1.0f;
    __syncthreads();
    y[0] = buf[n % 32];
}

// 48 live accumulators under a 32-register cap: spills.
extern "C" __global__ void spill_probe(const float* x, float* y, int n) {
    float acc[48];
#pragma unroll
    for (int i = 0; i < 48; i++) acc[i] = x[i * n + threadIdx.x];
    for (int j = 0; j < n; j++) {
#pragma unroll
        for (int i = 0; i < 48; i++) acc[i] = acc[i] * acc[(i + 1) % 48] + x[j];
    }
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 48; i++) s += acc[i];
    y[threadIdx.x] = s;
}

// A device function that stays a separate function in the cubin.
__device__ __noinline__ float gather_probe(const float* p, int k) {
    float a[32];
    for (int i = 0; i < 32; i++) a[i] = p[i * k];
    return a[k & 31] + a[(k + 3) & 31];
}

extern "C" __global__ void calls_gather_probe(float* y, int k) { y[threadIdx.x] = gather_probe(y, k); }

// bf16 in a C++-mangled signature.
__global__ void bf16_probe(const __nv_bfloat16* x, __nv_bfloat16* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2bfloat16_rn(__bfloat162float(x[i]) * 2.0f);
}
