/* The packed kernel: every head of a gated convolution as one head over the union of the columns the
 * heads read, its weights zero where a head does not read a column.
 *
 * Heads of few outputs (MobileNetV2's projections have 4 heads of 4 to 24) fill a fraction of the
 * wide kernel's vectors each, and the pixel kernel first copies the input into planes. Packed, the
 * heads' outputs lie side by side in whole vectors, and the input is read in place, once for all
 * heads: more multiply-adds (each output runs over the union, counted as executed) in fewer, fuller
 * vector operations. The packed weights and biases are gathered per call, in the blocked layout
 * (blocks of 16 outputs: one task per block); the convolution then runs as one head on the wide
 * kernel with the tile family and work order asked for.
 */
#include <string.h>

#include "internal.h"

typedef struct {
  const msgc_conv_args *a;
  int U, M, kk;
  const int *upos;     /* each input entry's place in the union */
  const int *hin0;     /* head h's input entries: hin0[h] .. hin0[h + 1] - 1 */
  const int *ohead;    /* each packed output's head, and its output within the head */
  const int *osrc;
  float *w;            /* packed blocked weights: blocks of U x kk x 16 */
} pack_task;

static long blocks16(long m) { return (m + MSGC_BLOCK - 1) / MSGC_BLOCK; }

/* block b of the packed weights: the rows each of its outputs' head reads, zero elsewhere */
static void pack_block(void *arg, long b) {
  const pack_task *t = arg;
  const msgc_conv_args *a = t->a;
  const msgc_heads *hd = &a->hd;
  const int kk = t->kk;
  const long head_w = blocks16(hd->per_head) * a->wt.rows * kk * MSGC_BLOCK;
  float *wb = t->w + b * t->U * kk * MSGC_BLOCK;
  memset(wb, 0, sizeof(float) * (size_t)t->U * kk * MSGC_BLOCK);
  for (int l = 0; l < MSGC_BLOCK && b * MSGC_BLOCK + l < t->M; l++) {
    const long o = b * MSGC_BLOCK + l;
    const int h = t->ohead[o], src = t->osrc[o];
    const float *hw = a->wt.blocked + h * head_w + (long)(src / MSGC_BLOCK) * a->wt.rows * kk * MSGC_BLOCK +
                      src % MSGC_BLOCK;
    for (int e = t->hin0[h]; e < t->hin0[h + 1]; e++) {
      const long r = hd->wrow ? hd->wrow[e] : e - t->hin0[h];
      const float sc = hd->scale ? hd->scale[e] : 1.0f;
      float *d = wb + (long)t->upos[e] * kk * MSGC_BLOCK + l;
      for (int q = 0; q < kk; q++) d[q * MSGC_BLOCK] = hw[(r * kk + q) * MSGC_BLOCK] * sc;
    }
  }
}

i32 msgc_conv_packed(const msgc_conv_args *a, long whole_hw, int fixed) {
  const msgc_heads *hd = &a->hd;
  const int heads = hd->heads, kk = a->g.k * a->g.k, xcols = a->io.xcols;
  int n_in = 0, M = 0;
  for (int h = 0; h < heads; h++) {
    n_in += hd->counts ? hd->counts[h] : hd->in_channels;
    M += hd->ocounts ? hd->ocounts[h] : hd->per_head;
  }
  /* ints: column -> union place (xcols), the union's columns, per entry its place, per head its first
     entry, per output its head and source; then floats: the packed weights and biases */
  const long ints = 2L * xcols + n_in + heads + 1 + 2L * M, align = (ints + 15) / 16 * 16;
  const long wfloats = blocks16(M) * xcols * kk * MSGC_BLOCK;
  int *mem = msgc_scratch(SCRATCH_PACKED, sizeof(int) * (size_t)align + sizeof(float) * (size_t)(wfloats + M));
  if (!mem) return MSGC_ENOMEM;
  int *where = mem, *ucols = where + xcols, *upos = ucols + xcols, *hin0 = upos + n_in, *ohead = hin0 + heads + 1;
  int *osrc = ohead + M;
  for (int c = 0; c < xcols; c++) where[c] = -1;
  int U = 0;
  hin0[0] = 0;
  for (int h = 0, e = 0, o = 0; h < heads; h++) {
    const int n = hd->counts ? hd->counts[h] : hd->in_channels, m = hd->ocounts ? hd->ocounts[h] : hd->per_head;
    for (int c = 0; c < n; c++, e++) {
      const int col = hd->cols ? hd->cols[e] : c + h * hd->xstep;
      if (col < 0 || col >= xcols) return MSGC_EPLAN;
      if (where[col] < 0) where[col] = U, ucols[U++] = col;
      upos[e] = where[col];
    }
    hin0[h + 1] = e;
    for (int j = 0; j < m; j++, o++) {
      ohead[o] = h;
      osrc[o] = hd->ocols ? hd->ocols[o] : j;
    }
  }
  float *w = (float *)(mem + align), *bias = a->wt.bias ? w + wfloats : 0;
  for (int o = 0; bias && o < M; o++) bias[o] = a->wt.bias[(long)ohead[o] * hd->per_head + osrc[o]];
  pack_task t = {a, U, M, kk, upos, hin0, ohead, osrc, w};
  const int nt = a->nthreads > 1 && (long)M * U * kk > (1 << 14) ? a->nthreads : 1;
  msgc_parallel(pack_block, &t, blocks16(M), nt);
  msgc_conv_args b = *a;
  b.hd = (msgc_heads){1, U, M, 0, ucols, 0, 0, 0, 0, 0};
  b.wt.blocked = w;
  b.wt.plain = 0;
  b.wt.rows = U;
  b.wt.bias = bias;
  b.wt.kernel = MSGC_KERNEL_WIDE;
  for (int h = 0; fixed && a->executed && hd->scale && h < heads; h++) /* attention folded into the packed weights */
    *a->executed += (long)(hin0[h + 1] - hin0[h]) * kk * (hd->ocounts ? hd->ocounts[h] : hd->per_head);
  return msgc_conv_part(&b, whole_hw, fixed);
}
