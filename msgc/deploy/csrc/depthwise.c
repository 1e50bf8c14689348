/* Depthwise k x k convolution (k <= 3) of the columns of a channels-last matrix: VL neighbouring
 * channels are one vector (weights tap-major, k*k x C), the taps' weight vectors stay in registers
 * while four output pixels at a time accumulate. MobileNetV2 runs it on the hidden channels some
 * projection head reads: a new channel count for every sample, which costs oneDNN a new kernel each
 * time; this kernel has no per-shape setup. */
#include "internal.h"

/* one output row oy, channels c0 .. c0 + m - 1 (m <= VL); x holds the map's rows from xr0 on, y its
   output rows from yr0 on */
static inline __attribute__((always_inline)) void dw_row(const float *x, long ldx, int xr0, int H, int W, int C,
                                                         const int k, const int s, int p, const float *w,
                                                         const float *bias, float *y, long ldy, int yr0, int Wo,
                                                         int oy, int c0, int m, int act) {
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
        const float *xp = x + ((long)(iy - xr0) * W + ox0 * s - p) * ldx + c0;
        for (int kx = 0; kx < k; kx++)
          for (int r = 0; r < 4; r++) acc[r] += vload(xp + (long)(r * s + kx) * ldx) * wv[ky * k + kx];
      }
      for (int r = 0; r < 4; r++) vstore(y + ((long)(oy - yr0) * Wo + ox0 + r) * ldy + c0, vact(acc[r], act));
      continue;
    }
    for (int ky = 0; ky < k; ky++) {
      const int iy = oy * s - p + ky;
      if (iy < 0 || iy >= H) continue;
      const float *row = x + (long)(iy - xr0) * W * ldx + c0;
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
      float *yp = y + ((long)(oy - yr0) * Wo + ox0 + r) * ldy + c0;
      if (m == VL) vstore(yp, vact(acc[r], act));
      else vstore_part(yp, vact(acc[r], act), m);
    }
  }
}

typedef struct {
  const float *x, *w, *bias;
  float *y;
  long ldx, ldy;
  int H, W, C, k, s, p, Wo, nb, act;
} dw_task;

/* output row oy, the vector of channels b */
static inline void dw_one(const float *x, long ldx, int xr0, int H, int W, int C, int k, int s, int p,
                          const float *w, const float *bias, float *y, long ldy, int yr0, int Wo, int oy, int b,
                          int act) {
  /* the last block of a partial vector overlaps its neighbour (the same values written twice):
     whole vectors are much faster than partial ones */
  const int c0 = C >= VL && VL * b > C - VL ? C - VL : VL * b, m = C - c0 < VL ? C - c0 : VL;
  if (k == 3 && s == 1) /* constants: the tap loops unroll */
    dw_row(x, ldx, xr0, H, W, C, 3, 1, p, w, bias, y, ldy, yr0, Wo, oy, c0, m, act);
  else if (k == 3 && s == 2)
    dw_row(x, ldx, xr0, H, W, C, 3, 2, p, w, bias, y, ldy, yr0, Wo, oy, c0, m, act);
  else
    dw_row(x, ldx, xr0, H, W, C, k, s, p, w, bias, y, ldy, yr0, Wo, oy, c0, m, act);
}

static void dw_item(void *arg, long it) {
  const dw_task *d = arg;
  dw_one(d->x, d->ldx, 0, d->H, d->W, d->C, d->k, d->s, d->p, d->w, d->bias, d->y, d->ldy, 0, d->Wo,
         (int)(it / d->nb), (int)(it % d->nb), d->act);
}

void msgc_dw_rows(const float *x, long ldx, int xr0, int H, int W, int C, int k, int s, int p, const float *w,
                  const float *bias, float *y, long ldy, int oy0, int oy1, int act) {
  const int Wo = out_size(W, k, s, p), nb = (C + VL - 1) / VL;
  if (Wo <= 0 || C <= 0) return;
  for (int oy = oy0; oy < oy1; oy++)
    for (int b = 0; b < nb; b++) dw_one(x, ldx, xr0, H, W, C, k, s, p, w, bias, y, ldy, oy0, Wo, oy, b, act);
}

void msgc_dw_run(const float *x, long ldx, int H, int W, int C, int k, int s, int p, const float *w,
                 const float *bias, float *y, long ldy, int act, int nthreads) {
  const int Ho = out_size(H, k, s, p), Wo = out_size(W, k, s, p);
  if (Ho <= 0 || Wo <= 0 || C <= 0) return;
  dw_task d = {x, w, bias, y, ldx, ldy, H, W, C, k, s, p, Wo, (C + VL - 1) / VL, act};
  const int nt = nthreads > 1 && (long)Ho * Wo * C > 16384 ? nthreads : 1;
  msgc_parallel(dw_item, &d, (long)Ho * d.nb, nt);
}

i32 msgc_dwconv(const msgc_dw_args *a) {
  if (a->g.k > 3) return MSGC_ETOOLARGE;
  msgc_dw_run(a->x, a->ldx, a->g.h, a->g.w, a->c, a->g.k, a->g.s, a->g.p, a->weight, a->bias, a->y, a->ldy, a->act,
              a->nthreads);
  return MSGC_OK;
}
