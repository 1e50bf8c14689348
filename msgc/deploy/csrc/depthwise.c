/* Depthwise k x k convolution (k <= 3) of the columns of a channels-last matrix: VL neighbouring
 * channels are one vector (weights tap-major, k*k x C), the taps' weight vectors stay in registers
 * while four output pixels at a time accumulate. MobileNetV2 runs it on the hidden channels some
 * projection head reads: a new channel count for every sample, which costs oneDNN a new kernel each
 * time; this kernel has no per-shape setup. */
#include "internal.h"

/* one output row oy, channels c0 .. c0 + m - 1 (m <= VL) */
static inline __attribute__((always_inline)) void dw_row(const float *x, long ldx, int H, int W, int C,
                                                         const int k, const int s, int p, const float *w,
                                                         const float *bias, float *y, long ldy, int Wo, int oy,
                                                         int c0, int m, int act) {
  vf wv[9], b = vzero();
  for (int t = 0; t < k * k; t++) wv[t] = m == VL ? vload(w + (long)t * C + c0) : vload_part(w + (long)t * C + c0, m);
  if (bias) b = m == VL ? vload(bias + c0) : vload_part(bias + c0, m);
  for (int ox0 = 0; ox0 < Wo; ox0 += 4) {
    const int nr = Wo - ox0 < 4 ? Wo - ox0 : 4;
    vf acc[4] = {b, b, b, b};
    if (m == VL && nr == 4 && ox0 * s - p >= 0 && (ox0 + 3) * s - p + k <= W) { /* inside: no checks */
      for (int ky = 0; ky < k; ky++) {
        const int iy = oy * s - p + ky;
        if (iy < 0 || iy >= H) continue;
        const float *xp = x + ((long)iy * W + ox0 * s - p) * ldx + c0;
        for (int kx = 0; kx < k; kx++)
          for (int r = 0; r < 4; r++) acc[r] += vload(xp + (long)(r * s + kx) * ldx) * wv[ky * k + kx];
      }
      for (int r = 0; r < 4; r++) vstore(y + ((long)oy * Wo + ox0 + r) * ldy + c0, vact(acc[r], act));
      continue;
    }
    for (int ky = 0; ky < k; ky++) {
      const int iy = oy * s - p + ky;
      if (iy < 0 || iy >= H) continue;
      const float *row = x + (long)iy * W * ldx + c0;
      for (int kx = 0; kx < k; kx++) {
        const vf wk = wv[ky * k + kx];
        for (int r = 0; r < 4; r++) {
          const int ix = (ox0 + r) * s - p + kx;
          if (r < nr && ix >= 0 && ix < W)
            acc[r] += (m == VL ? vload(row + (long)ix * ldx) : vload_part(row + (long)ix * ldx, m)) * wk;
        }
      }
    }
    for (int r = 0; r < nr; r++) {
      float *yp = y + ((long)oy * Wo + ox0 + r) * ldy + c0;
      if (m == VL) vstore(yp, vact(acc[r], act));
      else vstore_part(yp, vact(acc[r], act), m);
    }
  }
}

void msgc_dw_run(const float *x, long ldx, int H, int W, int C, int k, int s, int p, const float *w,
                 const float *bias, float *y, long ldy, int act, int nthreads) {
  const int Ho = out_size(H, k, s, p), Wo = out_size(W, k, s, p);
  if (Ho <= 0 || Wo <= 0 || C <= 0) return;
  const int nb = (C + VL - 1) / VL;
  const int nt = nthreads > 1 && (long)Ho * Wo * C > 16384 ? nthreads : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int it = 0; it < Ho * nb; it++) {
    /* the last block of a partial vector overlaps its neighbour (the same values written twice):
       whole vectors are much faster than partial ones */
    const int oy = it / nb, c0 = C >= VL && VL * (it % nb) > C - VL ? C - VL : VL * (it % nb);
    const int m = C - c0 < VL ? C - c0 : VL;
    if (k == 3 && s == 1) /* constants: the tap loops unroll */
      dw_row(x, ldx, H, W, C, 3, 1, p, w, bias, y, ldy, Wo, oy, c0, m, act);
    else if (k == 3 && s == 2)
      dw_row(x, ldx, H, W, C, 3, 2, p, w, bias, y, ldy, Wo, oy, c0, m, act);
    else
      dw_row(x, ldx, H, W, C, k, s, p, w, bias, y, ldy, Wo, oy, c0, m, act);
  }
}

i32 msgc_dwconv(const msgc_dw_args *a) {
  if (a->g.k > 3) return MSGC_ETOOLARGE;
  msgc_dw_run(a->x, a->ldx, a->g.h, a->g.w, a->c, a->g.k, a->g.s, a->g.p, a->weight, a->bias, a->y, a->ldy, a->act,
              a->nthreads);
  return MSGC_OK;
}
