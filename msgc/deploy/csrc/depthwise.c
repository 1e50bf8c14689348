/* Depthwise k x k convolution (k <= 3) of the columns of a channels-last matrix: VL neighbouring
 * channels are one vector (weights tap-major, k*k x C), the taps' weight vectors stay in registers
 * while four output pixels accumulate, every vector of channels of the four before the next four. MobileNetV2 runs it on the hidden channels some
 * projection head reads: a new channel count for every sample, which costs oneDNN a new kernel each
 * time; this kernel has no per-shape setup. */
#include "internal.h"

/* output pixels ox0 .. ox0 + 3 of row oy, channels c0 .. c0 + m - 1 (m <= VL), with the taps' weight
   vectors wv and the biases b; x holds the map's rows from xr0 on, y its output rows from yr0 on */
static inline __attribute__((always_inline)) void dw_tile(const float *x, long ldx, int xr0, int H, int W,
                                                          const int k, const int s, int p, const vf *wv, vf b,
                                                          float *y, long ldy, int yr0, int Wo, int oy, int ox0,
                                                          int c0, int m, int act) {
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
    return;
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

/* the taps' weight vectors and the biases of channels c0 .. c0 + m - 1 */
static inline __attribute__((always_inline)) vf dw_weights(const float *w, const float *bias, int C, int kk, int c0,
                                                           int m, vf *wv) {
  for (int t = 0; t < kk; t++) wv[t] = m == VL ? vload(w + (long)t * C + c0) : vload_part(w + (long)t * C + c0, m);
  return !bias ? vzero() : m == VL ? vload(bias + c0) : vload_part(bias + c0, m);
}

/* the last block of a partial vector overlaps its neighbour (the same values written twice): whole
   vectors are much faster than partial ones */
static inline int dw_c0(int C, int b) { return C >= VL && VL * b > C - VL ? C - VL : VL * b; }

/* one output row oy, the vectors of channels b0 .. b1 - 1: four pixels at a time, all their channels
   before the next four (the pixels' inputs stay in L1 over the channels; the weights, 9 x C floats, are
   reloaded from it): up to a third faster than a row per vector of channels, which walks the row's
   inputs once per vector */
static inline __attribute__((always_inline)) void dw_row_all(const float *x, long ldx, int xr0, int H, int W,
                                                             int C, const int k, const int s, int p,
                                                             const float *w, const float *bias, float *y, long ldy,
                                                             int yr0, int Wo, int oy, int b0, int b1, int act) {
  for (int ox0 = 0; ox0 < Wo; ox0 += 4)
    for (int bi = b0; bi < b1; bi++) {
      const int c0 = dw_c0(C, bi), m = C - c0 < VL ? C - c0 : VL;
      vf wv[9];
      const vf b = dw_weights(w, bias, C, k * k, c0, m, wv);
      dw_tile(x, ldx, xr0, H, W, k, s, p, wv, b, y, ldy, yr0, Wo, oy, ox0, c0, m, act);
    }
}

typedef struct {
  const float *x, *w, *bias;
  float *y;
  long ldx, ldy;
  int H, W, C, k, s, p, Wo, nb, ng, act;
} dw_task;

/* the vectors of channels of an item of msgc_dw_run: groups of DW_GROUP (a row's work split over the
   threads where the map has few rows) */
#define DW_GROUP 8

/* output rows oy0 .. oy1 - 1, vectors of channels b0 .. b1 - 1 */
static void dw_rows_part(const float *x, long ldx, int xr0, int H, int W, int C, int k, int s, int p, const float *w,
                         const float *bias, float *y, long ldy, int yr0, int Wo, int oy0, int oy1, int b0, int b1,
                         int act) {
  for (int oy = oy0; oy < oy1; oy++) {
    if (k == 3 && s == 1) /* constants: the tap loops unroll */
      dw_row_all(x, ldx, xr0, H, W, C, 3, 1, p, w, bias, y, ldy, yr0, Wo, oy, b0, b1, act);
    else if (k == 3 && s == 2)
      dw_row_all(x, ldx, xr0, H, W, C, 3, 2, p, w, bias, y, ldy, yr0, Wo, oy, b0, b1, act);
    else
      dw_row_all(x, ldx, xr0, H, W, C, k, s, p, w, bias, y, ldy, yr0, Wo, oy, b0, b1, act);
  }
}

static void dw_item(void *arg, long it) { /* a row, a group of vectors of channels */
  const dw_task *d = arg;
  const int oy = (int)(it / d->ng), g = (int)(it % d->ng), b0 = g * DW_GROUP;
  const int b1 = b0 + DW_GROUP < d->nb ? b0 + DW_GROUP : d->nb;
  dw_rows_part(d->x, d->ldx, 0, d->H, d->W, d->C, d->k, d->s, d->p, d->w, d->bias, d->y, d->ldy, 0, d->Wo, oy, oy + 1,
               b0, b1, d->act);
}

void msgc_dw_rows(const float *x, long ldx, int xr0, int H, int W, int C, int k, int s, int p, const float *w,
                  const float *bias, float *y, long ldy, int oy0, int oy1, int act) {
  const int Wo = out_size(W, k, s, p);
  if (Wo <= 0 || C <= 0) return;
  dw_rows_part(x, ldx, xr0, H, W, C, k, s, p, w, bias, y, ldy, oy0, Wo, oy0, oy1, 0, (C + VL - 1) / VL, act);
}

void msgc_dw_run(const float *x, long ldx, int H, int W, int C, int k, int s, int p, const float *w,
                 const float *bias, float *y, long ldy, int act, int nthreads) {
  const int Ho = out_size(H, k, s, p), Wo = out_size(W, k, s, p);
  if (Ho <= 0 || Wo <= 0 || C <= 0) return;
  const int nb = (C + VL - 1) / VL;
  dw_task d = {x, w, bias, y, ldx, ldy, H, W, C, k, s, p, Wo, nb, (nb + DW_GROUP - 1) / DW_GROUP, act};
  const int nt = nthreads > 1 && (long)Ho * Wo * C > 16384 ? nthreads : 1;
  msgc_parallel(dw_item, &d, (long)Ho * d.ng, nt);
}

i32 msgc_dwconv(const msgc_dw_args *a) {
  if (a->g.k > 3) return MSGC_ETOOLARGE;
  msgc_dw_run(a->x, a->ldx, a->g.h, a->g.w, a->c, a->g.k, a->g.s, a->g.p, a->weight, a->bias, a->y, a->ldy, a->act,
              a->nthreads);
  return MSGC_OK;
}
