/* The vector type of the ISA the library is built for, and the register budget the tiles are sized by.
 *
 * GCC/Clang vector extensions: `vf` is VL floats; arithmetic on it compiles to the ISA's instructions
 * (FMA where the build allows contraction, which GNU C does by default). Register tiles are chosen so
 * that accumulators + operands fit in NREG vector registers:
 *   AVX-512 (x86-64-v4): 16 floats, 32 registers;
 *   AVX2 + FMA (x86-64-v3): 8 floats, 16 registers;
 *   AArch64 NEON: 4 floats, 32 registers;
 *   anything else (SSE2 on x86-64, ...): 4 floats, 16 registers.
 * A vector wider than the ISA's registers would be split by the compiler into halves that do not fit
 * (the cause of the AVX2 slowdown of msgc's first kernels, which used 16-float vectors everywhere).
 */
#ifndef MSGC_SIMD_H
#define MSGC_SIMD_H
#include <string.h>

#if defined(__AVX512F__)
#define VL 16
#define NREG 32
#define MSGC_ISA_NAME "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
#define NREG 16
#define MSGC_ISA_NAME "avx2"
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define VL 4
#define NREG 32
#define MSGC_ISA_NAME "neon"
#else
#define VL 4
#define NREG 16
#define MSGC_ISA_NAME "portable"
#endif

typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));  /* unaligned loads and stores */
typedef int vi __attribute__((vector_size(VL * 4), aligned(4)));

static inline vf vzero(void) {
  const vf z = {0};
  return z;
}

static inline vf vset1(float a) { return vzero() + a; }

static inline vf vload(const float *p) { return *(const vf *)p; }

static inline void vstore(float *p, vf a) { *(vf *)p = a; }

/* the first m (< VL) floats of p, the other lanes 0 */
static inline vf vload_part(const float *p, int m) {
  vf v = vzero();
  memcpy(&v, p, (size_t)m * sizeof(float));
  return v;
}

static inline void vstore_part(float *p, vf a, int m) { memcpy(p, &a, (size_t)m * sizeof(float)); }

/* ReLU / ReLU6 with lane masks (a loop over lanes would not vectorise) */
static inline vf vact(vf a, int act) {
  if (act) {
    const vf zero = vzero();
    a = (vf)((vi)a & (a > zero));
  }
  if (act == 2) {
    const vf six = vset1(6.0f);
    const vi low = a < six;
    a = (vf)(((vi)a & low) | ((vi)six & ~low));
  }
  return a;
}

static inline float act1(float a, int act) {
  if (act) a = a > 0 ? a : 0;
  if (act == 2) a = a < 6 ? a : 6;
  return a;
}

static inline float vsum(vf a) {
  float s = 0.0f;
  for (int l = 0; l < VL; l++) s += a[l];
  return s;
}

#endif
