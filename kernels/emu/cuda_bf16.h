// The CPU emulator's stand-in for CUDA's <cuda_bf16.h> (found first because
// the emulator build puts kernels/emu on the include path; nvcc never sees it).
//
// Design rule: conversions are bit-exact with the GPU's. f32 -> bf16 rounds to
// nearest even on the 16 dropped bits; a NaN becomes the canonical NaN 0x7fff
// (what cvt.rn.bf16.f32 and CUDA's own host fallback produce); infinities and
// overflow to infinity follow from the rounding. bf16 -> f32 is exact. There
// are deliberately no arithmetic operators: kernels convert with to_f32 /
// to_bf16 (common.cuh) and compute in f32, and the emulator build enforces it.
#pragma once

#include <stdint.h>
#include <string.h>

struct __nv_bfloat16 {
    unsigned short __x;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __nv_bfloat16 __nv_bfloat16_raw;

static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
    __nv_bfloat16 r;
    r.__x = bits;
    return r;
}
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }

static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __ushort_as_bfloat16(0x7fffu);
    const uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;  // ties go to the even result
    return __ushort_as_bfloat16((unsigned short)(u >> 16));
}
static inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

static inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = (uint32_t)h.__x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    __nv_bfloat162 r;
    r.x = __float2bfloat16_rn(a);
    r.y = __float2bfloat16_rn(b);
    return r;
}
static inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) {
    __nv_bfloat162 r;
    r.x = a;
    r.y = b;
    return r;
}
static inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
static inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
