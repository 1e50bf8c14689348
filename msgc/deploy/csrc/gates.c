/* Gates of one sample: a block's generators on its context, and the index sets of a gate matrix.
 *
 * The generators are matrix-vector products bound by reading their weights (ResNet-50 reads 43 MB of
 * them per image): parallel over rows, one pass over each weight row. */
#include "internal.h"

static float dot(const float *a, const float *b, int n) {
  vf s0 = vzero(), s1 = vzero();
  int i = 0;
  for (; i + 2 * VL <= n; i += 2 * VL) {
    s0 += vload(a + i) * vload(b + i);
    s1 += vload(a + i + VL) * vload(b + i + VL);
  }
  for (; i + VL <= n; i += VL) s0 += vload(a + i) * vload(b + i);
  float s = vsum(s0 + s1);
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* ctx[c] = mean over the hw rows of column c (partial sums of 64 rows in float, added up in double);
 * hidden[r] = relu(b1[r] + w1[r, :] . ctx); out[o + j] = b2[o + j] + w2[...] . hidden[h0 : h0 + units] */
i32 msgc_generators(const msgc_gen_args *a) {
  const int C = a->c, hw = a->hw, nh = a->nh;
  float *ctx = msgc_scratch(SCRATCH_SELECT, sizeof(float) * ((size_t)C + nh));
  if (!ctx) return MSGC_ENOMEM;
  float *hidden = ctx + C;
  long work = (long)hw * C + (long)nh * C;
  for (int g = 0; g < a->ngen; g++) work += a->desc[5 * g] * a->desc[5 * g + 2];
  const int nblk = (C + VL - 1) / VL;
  const int nt = a->nthreads > 1 && work > 65536 ? a->nthreads : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#pragma omp for schedule(static)
    for (int b = 0; b < nblk; b++) {
      const int c0 = VL * b, m = C - c0 < VL ? C - c0 : VL;
      double total[VL] = {0};
      for (int r0 = 0; r0 < hw; r0 += 64) {
        const int r1 = r0 + 64 < hw ? r0 + 64 : hw;
        vf part = vzero();
        if (m == VL)
          for (int r = r0; r < r1; r++) part += vload(a->x + (long)r * a->ldx + c0);
        else
          for (int r = r0; r < r1; r++) part += vload_part(a->x + (long)r * a->ldx + c0, m);
        for (int l = 0; l < m; l++) total[l] += part[l];
      }
      for (int l = 0; l < m; l++) ctx[c0 + l] = (float)(total[l] / hw);
    }
#pragma omp for schedule(static)
    for (int r = 0; r < nh; r++) {
      const float v = a->b1[r] + dot(a->w1 + (long)r * C, ctx, C);
      hidden[r] = v > 0.0f ? v : 0.0f;
    }
    for (int g = 0; g < a->ngen; g++) {
      const i64 *d = a->desc + 5 * g;
      const int rows = (int)d[0], units = (int)d[2];
      const float *hg = hidden + d[1], *wg = a->w2 + d[4], *bg = a->b2 + d[3];
      float *og = a->out + d[3];
#pragma omp for schedule(static) nowait
      for (int j = 0; j < rows; j++) og[j] = bg[j] + dot(wg + (long)j * units, hg, units);
    }
  }
  return MSGC_OK;
}

/* Returns the size of the union (also in counts[heads]). A channel is open where its logit is >= 0,
 * as Gate.forward decides in eval mode. */
i32 msgc_head_sets(const msgc_sets_args *a) {
  const int heads = a->heads, C = a->channels;
  int *where = msgc_scratch(SCRATCH_SELECT, sizeof(int) * (size_t)C);
  if (!where) return MSGC_ENOMEM;
  for (int c = 0; c < C; c++) where[c] = -1;
  int n = 0;
  for (int h = 0; h < heads; h++) {
    const float *lh = a->logits ? a->logits + (long)h * C : 0;
    const int start = n;
    for (int c = 0; c < C; c++)
      if (!lh || lh[c] >= 0.0f) {
        if (a->att) a->vals[n] = a->att[(long)h * C + c];
        a->idx[n++] = c;
        where[c] = 0;
      }
    a->counts[h] = n - start;
  }
  int nu = 0;
  for (int c = 0; c < C; c++)
    if (where[c] == 0) {
      where[c] = nu;
      a->uni[nu++] = c;
    }
  if (a->pos)
    for (int i = 0; i < n; i++) a->pos[i] = where[a->idx[i]];
  a->counts[heads] = nu;
  if (a->groups > 0) { /* one head over groups x per: open outputs of each group, numbered within it */
    const int per = C / a->groups;
    for (int g = 0; g < a->groups; g++) a->gcounts[g] = 0;
    for (int i = 0; i < n; i++) {
      const int g = a->idx[i] / per;
      a->gcounts[g]++;
      a->gidx[i] = a->idx[i] - g * per;
    }
  }
  return nu;
}
