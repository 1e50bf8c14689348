/* The wide kernel: a tile of RB output pixels x NV vectors of output channels stays in registers while
 * the kernel walks the taps (outer) and the open input channels (inner), broadcasting each pixel's input
 * value against the NV weight vectors. Inputs are read by column index, in place; weights are the
 * blocked layout (an open channel's weights for a tap are one contiguous run of 16 outputs).
 *
 * On small maps a chunk's weights outlive the L1 cache between its few pixel tiles; there the channels
 * are taken in blocks (cb .. ce), every pixel tile of the chunk runs on one block before the next, and
 * the tiles keep their partial sums in `part` between blocks, so each weight is loaded once per tile
 * from L1 instead of from L2.
 *
 * A head with few input channels per tap (a stem's 3) walks its taps by kernel rows: in a channels-last
 * map a row's k taps of n channels lie side by side, one run of k * n entries at fixed offsets from
 * each pixel's first tap, which saves the per-tap bookkeeping that would otherwise cost as much as the
 * n products of a tap. A whole tile within one output row, inside the map at every tap, reads its
 * pixels a fixed stride apart through one pointer: RB pixel pointers outnumber the integer registers
 * for the tiles of many pixels (1x16, 2x12), which then cost a move per product.
 *
 * Tiles per ISA (accumulators + weight vectors + one broadcast within NREG), and the row family of 7
 * pixels where 32 registers hold it:
 *   AVX-512: 4x6, 3x8, 2x12, 1x16 (64, 48, 32, 16 outputs); rows 3x7, 2x7, 1x7
 *   AVX2:    3x4, 2x6, 1x12       (24, 16, 8 outputs)
 *   NEON:    4x6, 3x8, 2x12, 1x16 (16, 12, 8, 4 outputs); rows 3x7, 2x7, 1x7
 *   other:   4x2, 2x6, 1x12       (16, 8, 4 outputs; no FMA assumed: a product needs a register)
 */
#include "internal.h"

const float msgc_zeros[ZERO_FLOATS];

/* acc += the input at column (offset) XO of every pixel's row times the NV weight vectors at WO */
#define WIDE_FMA(NV, RB, XO, WO)                                                                         \
  do {                                                                                                 \
    const long xo_ = (XO), wo_ = (WO);                                                                 \
    vf wv[NV];                                                                                         \
    for (int v = 0; v < NV; v++) wv[v] = vload(wv0[v] + wo_);                                          \
    for (int r = 0; r < RB; r++) {                                                                     \
      const float xv = px[r][xo_];                                                                     \
      for (int v = 0; v < NV; v++) acc[r][v] += xv * wv[v];                                            \
    }                                                                                                  \
  } while (0)

#define WIDE_TILE(NV, RB)                                                                              \
  static void wide_##NV##x##RB(const wide_job *j, int o0, int npix, int j0, int cb, int ce, float *part) { \
    const int k = j->k, kk = k * k, s = j->s, Wo = j->Wo, n = j->n;                                    \
    const int *cols = j->cols;                                                                         \
    const long *woff = j->woff;                                                                        \
    vf acc[RB][NV];                                                                                    \
    const float *wv0[NV];                                                                              \
    for (int v = 0; v < NV; v++) {                                                                     \
      const int c0 = j0 + v * VL, left = j->m - c0;                                                    \
      wv0[v] = j->w + (long)(c0 / MSGC_BLOCK) * j->wblk + c0 % MSGC_BLOCK;                             \
      vf b = vzero();                                                                                  \
      if (j->bias && left > 0) b = left >= VL ? vload(j->bias + c0) : vload_part(j->bias + c0, left);  \
      for (int r = 0; r < RB; r++) acc[r][v] = part && cb > 0 ? vload(part + (r * NV + v) * VL) : b;   \
    }                                                                                                  \
    /* each pixel's input position at tap (0, 0) (no division in the tap loop) */                      \
    int iy0[RB], ix0[RB];                                                                              \
    {                                                                                                  \
      int oy = o0 / Wo, ox = o0 % Wo;                                                                  \
      for (int r = 0; r < RB; r++) {                                                                   \
        iy0[r] = oy * s - j->p;                                                                        \
        ix0[r] = ox * s - j->p;                                                                        \
        if (++ox == Wo) ox = 0, oy++;                                                                  \
      }                                                                                                \
    }                                                                                                  \
    /* rows of taps (j->rx): a kernel row's k taps x n channels as one run of entries, where every     \
       pixel's row of taps lies inside the map */                                                      \
    int fused = j->rx != 0 && cb == 0 && ce == n;                                                    \
    for (int r = 0; r < RB && fused; r++) fused = r >= npix || (ix0[r] >= 0 && ix0[r] + k <= j->W);    \
    /* a full tile within one output row whose taps all lie inside the map: its inputs are a fixed       \
       stride apart, one pointer for all pixels instead of RB (which outnumber the integer registers) */ \
    const int inrow = !fused && npix == RB && iy0[RB - 1] == iy0[0] && ix0[0] >= 0 && ix0[RB - 1] + k <= j->W; \
    for (int t = 0; inrow && t < kk; t++) {                                                            \
      const int iy = iy0[0] + t / k;                                                                   \
      if (iy < 0 || iy >= j->H) continue;                                                              \
      const float *row = j->x + ((long)iy * j->W + ix0[0] + t % k) * j->ldx;                           \
      const long S = (long)s * j->ldx, toff = (long)t * MSGC_BLOCK;                                    \
      for (int c = cb; c < ce; c++) {                                                                  \
        const long wo = woff[c] + toff;                                                                \
        vf wv[NV];                                                                                     \
        for (int v = 0; v < NV; v++) wv[v] = vload(wv0[v] + wo);                                       \
        const float *q = row + cols[c];                                                                \
        for (int r = 0; r < RB; r++, q += S) {                                                         \
          const float xv = *q;                                                                         \
          for (int v = 0; v < NV; v++) acc[r][v] += xv * wv[v];                                        \
        }                                                                                              \
      }                                                                                                \
    }                                                                                                  \
    for (int t = 0; !inrow && t < kk; t += fused ? k : 1) {                                            \
      const int dy = t / k, dx = fused ? 0 : t % k;                                                    \
      const float *px[RB];                                                                             \
      int any = 0;                                                                                     \
      for (int r = 0; r < RB; r++) {                                                                   \
        const int iy = iy0[r] + dy, ix = ix0[r] + dx;                                                  \
        const int inside = r < npix && iy >= 0 && iy < j->H && ix >= 0 && ix < j->W;                   \
        px[r] = inside ? j->x + ((long)iy * j->W + ix) * j->ldx : msgc_zeros;                          \
        any |= inside;                                                                                 \
      }                                                                                                \
      if (!any) continue;                                                                              \
      const long toff = (long)t * MSGC_BLOCK;                                                          \
      if (fused) {                                                                                     \
        for (int e = 0; e < j->rn; e++) WIDE_FMA(NV, RB, j->rx[e], j->rw[e] + toff);                     \
      } else {                                                                                         \
        for (int c = cb; c < ce; c++) WIDE_FMA(NV, RB, cols[c], woff[c] + toff);                         \
      }                                                                                                \
    }                                                                                                  \
    if (part && ce < n) { /* a block of the input channels: keep the partial sums */                   \
      for (int r = 0; r < RB; r++)                                                                     \
        for (int v = 0; v < NV; v++) vstore(part + (r * NV + v) * VL, acc[r][v]);                      \
      return;                                                                                          \
    }                                                                                                  \
    for (int r = 0; r < npix; r++) {                                                                   \
      float *yp = j->y + (long)(o0 + r) * j->ldy + j0;                                                 \
      const float *rp = j->res ? j->res + (long)(o0 + r) * j->ldres + j0 : 0;                          \
      for (int v = 0; v < NV; v++) {                                                                   \
        const int m = j->m - j0 - v * VL;                                                              \
        if (m <= 0) break;                                                                             \
        vf a = acc[r][v];                                                                              \
        if (m >= VL) {                                                                                 \
          if (rp) a += vload(rp + v * VL);                                                             \
          vstore(yp + v * VL, vact(a, j->act));                                                        \
        } else {                                                                                       \
          if (rp) a += vload_part(rp + v * VL, m);                                                     \
          vstore_part(yp + v * VL, vact(a, j->act), m);                                                \
        }                                                                                              \
      }                                                                                                \
    }                                                                                                  \
  }

/* The regular tiles, widest first, then (where 32 registers hold them) the tiles of 7 pixels, the row
   family: ImageNet's maps are 7 x 2^i wide, so these tiles cover whole output rows, a 7x7 map's 49
   pixels in 7 tiles instead of 9 tiles of 6 with 5 pixels computed for nothing. */
#if VL == 16 || (NREG >= 32 && VL == 4)
WIDE_TILE(4, 6)
WIDE_TILE(3, 8)
WIDE_TILE(2, 12)
WIDE_TILE(1, 16)
WIDE_TILE(3, 7)
WIDE_TILE(2, 7)
WIDE_TILE(1, 7)
const wide_tile msgc_wide_tiles[] = {{4, 6, wide_4x6}, {3, 8, wide_3x8}, {2, 12, wide_2x12}, {1, 16, wide_1x16},
                                     {3, 7, wide_3x7}, {2, 7, wide_2x7}, {1, 7, wide_1x7}};
#define REGULAR 4
#elif VL == 8 /* a row tile of 2 vectors needs 17 registers, 1 vector loads as often as it multiplies */
WIDE_TILE(3, 4)
WIDE_TILE(2, 6)
WIDE_TILE(1, 12)
const wide_tile msgc_wide_tiles[] = {{3, 4, wide_3x4}, {2, 6, wide_2x6}, {1, 12, wide_1x12}};
#define REGULAR 3
#else
WIDE_TILE(4, 2)
WIDE_TILE(2, 6)
WIDE_TILE(1, 12)
const wide_tile msgc_wide_tiles[] = {{4, 2, wide_4x2}, {2, 6, wide_2x6}, {1, 12, wide_1x12}};
#define REGULAR 3
#endif
const int msgc_n_wide_tiles = sizeof(msgc_wide_tiles) / sizeof(msgc_wide_tiles[0]);
const int msgc_wide_families = REGULAR + (msgc_n_wide_tiles > REGULAR);

/* The tile for `left` outputs still to cover: the widest of the family that does not exceed them
 * (rounded up to whole vectors); family f < REGULAR leaves out the f widest regular tiles (never the
 * last), family REGULAR takes the tiles of 7 pixels. */
const wide_tile *msgc_wide_pick(int family, int left) {
  const int want = (left + VL - 1) / VL;
  int first = family < REGULAR ? family : REGULAR;
  if (first < 0) first = 0;
  const int end = first < REGULAR ? REGULAR : msgc_n_wide_tiles;
  for (int i = first; i < end; i++)
    if (msgc_wide_tiles[i].nv <= want) return &msgc_wide_tiles[i];
  return &msgc_wide_tiles[end - 1];
}
