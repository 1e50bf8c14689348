/* The CPU's multiply-add peak for this build's vector type: a register-resident loop of FMAs.
 *
 * PEAK_ACC independent accumulators hide the FMA latency (4 cycles on current x86 cores) behind the
 * throughput of up to two FMA pipes: 2 pipes x 4 cycles = 8 FMAs in flight, 12 leave a margin and fit
 * the 16 registers of AVX2 beside the two operands. Nothing is loaded or stored inside the loop, so the
 * rate is the one thread's arithmetic bound that a convolution kernel can at best approach. On the
 * portable build of x86-64 (SSE2, no FMA) a multiply-add is a multiply and an add. */
#include <time.h>

#include "internal.h"

#define PEAK_ACC 12

static long peak_now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long)t.tv_sec * 1000000000L + t.tv_nsec;
}

/* iters rounds of PEAK_ACC vector multiply-adds; returns a value that depends on every accumulator */
static float fma_loop(long iters, float m, float c) {
  const vf vm = vset1(m), vc = vset1(c);
  vf a0 = vset1(0.0f), a1 = vset1(0.1f), a2 = vset1(0.2f), a3 = vset1(0.3f), a4 = vset1(0.4f), a5 = vset1(0.5f),
     a6 = vset1(0.6f), a7 = vset1(0.7f), a8 = vset1(0.8f), a9 = vset1(0.9f), a10 = vset1(1.0f), a11 = vset1(1.1f);
  for (long i = 0; i < iters; i++) {
    a0 = a0 * vm + vc; a1 = a1 * vm + vc; a2 = a2 * vm + vc; a3 = a3 * vm + vc;
    a4 = a4 * vm + vc; a5 = a5 * vm + vc; a6 = a6 * vm + vc; a7 = a7 * vm + vc;
    a8 = a8 * vm + vc; a9 = a9 * vm + vc; a10 = a10 * vm + vc; a11 = a11 * vm + vc;
  }
  return vsum(((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((a8 + a9) + (a10 + a11)));
}

i32 msgc_fma_peak(const msgc_peak_args *a) {
  if (a->iters <= 0 || a->reps <= 0) return MSGC_EPLAN;
  volatile float m = 0.9999999f, c = 1e-7f;  /* unknown to the compiler: the loop cannot be folded */
  float sink = 0.0f;
  for (int r = 0; r < a->reps; r++) {
    const long t0 = peak_now_ns();
    sink += fma_loop(a->iters, m, c);
    a->times[r] = peak_now_ns() - t0;
  }
  a->macs[0] = a->iters * PEAK_ACC * VL;
  if (a->sink) a->sink[0] = sink;
  return MSGC_OK;
}
