/* The pixel kernel, for narrow heads of stride-1 convolutions (MobileNetV2's projections, DenseNet's
 * growth-rate convolutions, ResNet-50 layer1 heads): vectorised over output positions instead of
 * output channels, which a head of few outputs would fill only partly.
 *
 * It reads planar, zero-padded copies of the input: the plane of a channel is (H + 2p + 2) x Wp floats
 * (Wp = W + 2p) and 64 more, and output pixel (oy, ox) sits at position q = oy * Wp + ox, so that a tap
 * is a constant shift of q. A tile holds RB output channels x PV vectors of positions; each (input
 * channel, tap) loads PV vectors and broadcasts one weight per output channel, so outputs can be any
 * rows of the plain weights (no gather). Lanes on the padding columns are computed and dropped.
 *
 * PV and RB per ISA: AVX-512 3 x {8, 6, 4, 2, 1}; AVX2 2 x {6, 4, 2, 1}; NEON 3 x {8, 6, 4, 2, 1};
 * other 2 x {6, 4, 2, 1}.
 */
#include "internal.h"

#if NREG >= 32
#define PV 3
#else
#define PV 2
#endif

const int msgc_pixel_positions = PV * VL;

#define PIXEL_TILE(RB)                                                                                 \
  static void pixel_##RB(const pixel_job *j, int q0, int j0) {                                         \
    const int k = j->k, kk = k * k, Wp = j->Wp;                                                        \
    vf acc[RB][PV];                                                                                    \
    const float *wj[RB];                                                                               \
    for (int r = 0; r < RB; r++) {                                                                     \
      const int o = j->ocols ? j->ocols[j0 + r] : j0 + r;                                              \
      wj[r] = j->w + (long)o * j->rows * kk;                                                           \
      const vf b = vset1(j->bias ? j->bias[o] : 0.0f);                                                 \
      for (int v = 0; v < PV; v++) acc[r][v] = b;                                                      \
    }                                                                                                  \
    for (int c = 0; c < j->n; c++) {                                                                   \
      const float *pl = j->planes + (long)(j->cols ? j->cols[c] : j->col0 + c) * j->plane_len + q0;    \
      const long wo = (long)(j->wrow ? j->wrow[c] : c) * kk;                                           \
      for (int t = 0; t < kk; t++) {                                                                   \
        const float *xp = pl + (t / k) * Wp + t % k;                                                   \
        vf xv[PV];                                                                                     \
        for (int v = 0; v < PV; v++) xv[v] = vload(xp + VL * v);                                       \
        for (int r = 0; r < RB; r++) {                                                                 \
          const float wv = wj[r][wo + t];                                                              \
          for (int v = 0; v < PV; v++) acc[r][v] += xv[v] * wv;                                        \
        }                                                                                              \
      }                                                                                                \
    }                                                                                                  \
    for (int v = 0; v < PV; v++)                                                                       \
      for (int l = 0; l < VL; l++) {                                                                   \
        const int q = q0 + VL * v + l, ox = q % Wp;                                                    \
        if (q >= j->npos || ox >= j->Wo) continue;                                                     \
        const long o = (long)(q / Wp) * j->Wo + ox;                                                    \
        float *yp = j->y + o * j->ldy + j0;                                                            \
        const float *rp = j->res ? j->res + o * j->ldres + j0 : 0;                                     \
        for (int r = 0; r < RB; r++) yp[r] = act1(rp ? acc[r][v][l] + rp[r] : acc[r][v][l], j->act);   \
      }                                                                                                \
  }

#if NREG >= 32
PIXEL_TILE(8)
#endif
PIXEL_TILE(6)
PIXEL_TILE(4)
PIXEL_TILE(2)
PIXEL_TILE(1)

int msgc_pixel_rows(int left) {
#if NREG >= 32
  if (left >= 8) return 8;
#endif
  return left >= 6 ? 6 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

pixel_tile_fn msgc_pixel_tile(int rows) {
  switch (rows) {
#if NREG >= 32
    case 8: return pixel_8;
#endif
    case 6: return pixel_6;
    case 4: return pixel_4;
    case 2: return pixel_2;
    default: return pixel_1;
  }
}

void msgc_make_plane(const float *x, long ldx, int h, int w, int p, long plane_len, float scale, float *plane) {
  const int Wp = w + 2 * p;
  memset(plane, 0, (size_t)plane_len * sizeof(float));
  for (int yy = 0; yy < h; yy++) {
    float *row = plane + (long)(yy + p) * Wp + p;
    const float *xr = x + (long)yy * w * ldx;
    for (int xx = 0; xx < w; xx++) row[xx] = xr[(long)xx * ldx] * scale;
  }
}
