/* Gates of one sample: a block's generators on its context, and the index sets of a gate matrix.
 *
 * The generators are matrix-vector products bound by reading their weights (ResNet-50 reads 43 MB of
 * them per image): parallel over rows, one pass over each weight row. */
#include <math.h>

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

typedef struct {
  const msgc_gen_args *a;
  float *ctx, *hidden;
  long first[65];  /* generator g's rows are second-layer rows first[g] .. first[g + 1] - 1 */
} gen_task;

/* ctx[c0 .. c0 + VL) = the mean over the hw rows (partial sums of 64 rows in float, added up in double) */
static void context_block(void *arg, long b) {
  const gen_task *t = arg;
  const msgc_gen_args *a = t->a;
  const int c0 = VL * (int)b, m = a->c - c0 < VL ? a->c - c0 : VL;
  double total[VL] = {0};
  for (int r0 = 0; r0 < a->hw; r0 += 64) {
    const int r1 = r0 + 64 < a->hw ? r0 + 64 : a->hw;
    vf part = vzero();
    if (m == VL)
      for (int r = r0; r < r1; r++) part += vload(a->x + (long)r * a->ldx + c0);
    else
      for (int r = r0; r < r1; r++) part += vload_part(a->x + (long)r * a->ldx + c0, m);
    for (int l = 0; l < m; l++) total[l] += part[l];
  }
  for (int l = 0; l < m; l++) t->ctx[c0 + l] = (float)(total[l] / a->hw);
}

/* hidden[r] = relu(b1[r] + w1[r, :] . ctx) */
static void hidden_row(void *arg, long r) {
  const gen_task *t = arg;
  const float v = t->a->b1[r] + dot(t->a->w1 + r * t->a->c, t->ctx, t->a->c);
  t->hidden[r] = v > 0.0f ? v : 0.0f;
}

/* one output row of a generator's second layer: b2[o + j] + w2[..] . hidden[h0 : h0 + units] */
static void output_row(void *arg, long i) {
  const gen_task *t = arg;
  const msgc_gen_args *a = t->a;
  int g = 0;
  while (t->first[g + 1] <= i) g++;
  const i64 *d = a->desc + (long)a->desc_fields * g;
  const long j = i - t->first[g];
  const int units = (int)d[2];
  const float v = a->b2[d[3] + j] + dot(a->w2 + d[4] + j * units, t->hidden + d[1], units);
  a->out[d[3] + j] = d[5] == 1 ? 1.0f / (1.0f + expf(-v)) : v;
}

/* the context, the stacked first layers, then every generator's second layer (one parallel loop
 * each; the second layers of all generators in one) */
i32 msgc_generators(const msgc_gen_args *a) {
  const int C = a->c, nh = a->nh;
  if (a->ngen > 64 || a->desc_fields != 6) return MSGC_ETOOLARGE;
  float *ctx = msgc_scratch(SCRATCH_SELECT, sizeof(float) * ((size_t)C + nh));
  if (!ctx) return MSGC_ENOMEM;
  gen_task t = {a, ctx, ctx + C, {0}};
  long work = (long)a->hw * C + (long)nh * C;
  for (int g = 0; g < a->ngen; g++) {
    const i64 *d = a->desc + (long)a->desc_fields * g;
    t.first[g + 1] = t.first[g] + d[0];
    work += d[0] * d[2];
  }
  const int nt = a->nthreads > 1 && work > 65536 ? a->nthreads : 1;
  msgc_parallel(context_block, &t, (C + VL - 1) / VL, nt);
  msgc_parallel(hidden_row, &t, nh, nt);
  msgc_parallel(output_row, &t, t.first[a->ngen], nt);
  return MSGC_OK;
}

/* Returns the size of the union (also in counts[heads]). A channel is open where its logit is >= 0,
 * as Gate.forward decides in eval mode. */
i32 msgc_head_sets(const msgc_sets_args *a) {
  const int heads = a->heads, C = a->channels;
  int *where = msgc_scratch(SCRATCH_SELECT, sizeof(int) * ((size_t)C + (size_t)heads * (a->host_groups + 1)));
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
  if (a->host_groups > 1) { /* each head's entries split by host group (ascending within a head) */
    const int G = a->host_groups, cg = C / G;
    int *bound = where + C; /* bound[h * (G + 1) + g]: head h's first entry at or after host group g */
    for (int h = 0, e = 0; h < heads; e += a->counts[h], h++)
      for (int g = 0, i = e; g <= G; g++) {
        while (i < e + a->counts[h] && (g == G || a->idx[i] < g * cg)) i++;
        bound[h * (G + 1) + g] = i;
      }
    for (int g = 0, k = 0; g < G; g++)
      for (int h = 0; h < heads; h++) {
        const int lo = bound[h * (G + 1) + g], hi = bound[h * (G + 1) + g + 1];
        a->hcounts[g * heads + h] = hi - lo;
        for (int i = lo; i < hi; i++, k++) {
          a->hidx[k] = a->idx[i];
          a->hrow[k] = a->idx[i] - g * cg;
          a->hpos[k] = a->pos[i];
          if (a->att) a->hvals[k] = a->vals[i];
        }
      }
  }
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
