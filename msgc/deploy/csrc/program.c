/* msgc_run: a whole sample in one call. The plan (msgc/deploy/native/program.py) lists the ops of the
 * deployed network after its stem; this file runs them over a per-sample arena of buffers and index
 * sets.
 *
 * A buffer remembers which channels it holds: all of them (FULL), the union of a set's heads (UNION),
 * or a one-head set's open channels in order (CONCAT). A convolution reading it through a set takes
 * the columns that match: the set's channel numbers (FULL), their places in the union (UNION), or the
 * columns in order (CONCAT). What a producer computes can depend on the sample (a one-head convolution
 * computes all its outputs where few are unread), so this is decided per sample, here.
 *
 * Batches: with at least as many samples as threads, every thread runs whole groups of samples (ops on
 * one thread each); otherwise samples run one after the other with every op on all threads. A group's
 * samples run one by one through the first ops (large feature maps, small weights), then op by op
 * from the program's group_from on, so that each layer's weights are read once per group.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

enum { TAG_FULL = 0, TAG_UNION = 1, TAG_CONCAT = 2 };

typedef struct {
  float *data;
  long ld;
  int h, w, cols;
  int tag, tag_set;
} bufrt;

typedef struct {
  int *counts, *idx, *pos, *uni, *gcounts, *gidx, *hcounts, *hidx, *hrow, *hpos;
  float *vals, *hvals;
  int n_idx, n_uni, masked;
} setrt;

typedef struct {
  const msgc_program *pg;
  float *fa;
  int *ia;
  bufrt *b;
  setrt *s;
  long executed;
  int nthreads;
} state;

/* one-head convolutions asked for some outputs: compute all of them instead when at most an eighth
   is unread, always below 100 output pixels (bound by reading weights, whose rows are read whole
   anyway) and elsewhere where a gather would copy >= 2^17 weights at a cost above the extra outputs'
   (a copied weight ~ 32 multiply-adds) */
static int computes_all(const msgc_conv_op *o, int npix, int read, int n_in) {
  const int unread = o->per_head - read;
  if (o->heads != 1 || 8 * unread > o->per_head) return 0;
  if (npix < 100) return 1;
  return (long)n_in * read * o->g.k * o->g.k >= (1 << 17) && (long)npix * unread < 32L * read;
}

static int run_sets(state *st, const msgc_sets_op *o) {
  const msgc_set *d = &((const msgc_set *)st->pg->sets)[o->set];
  setrt *s = &st->s[o->set];
  int *base = st->ia + d->ioff;
  const long hc = (long)d->heads * d->channels;
  s->counts = base;
  s->idx = s->counts + d->heads + 1;
  s->pos = s->idx + hc;
  s->uni = s->pos + hc;
  s->gcounts = s->uni + d->channels;
  s->gidx = s->gcounts + d->groups;
  s->hcounts = s->gidx + hc;
  s->hidx = s->hcounts + (long)d->heads * d->host_groups;
  s->hrow = s->hidx + hc;
  s->hpos = s->hrow + hc;
  s->vals = st->fa + d->foff;
  s->hvals = s->vals + hc;
  msgc_sets_args a = {0};
  a.logits = o->logits >= 0 ? st->fa + o->logits : o->ext;
  a.heads = d->heads;
  a.channels = d->channels;
  a.att = o->att >= 0 ? st->fa + o->att : 0;
  a.counts = s->counts;
  a.idx = s->idx;
  a.vals = s->vals;
  a.uni = s->uni;
  a.pos = s->pos;
  a.groups = d->groups;
  a.gcounts = s->gcounts;
  a.gidx = s->gidx;
  a.host_groups = d->host_groups;
  a.hcounts = s->hcounts;
  a.hidx = s->hidx;
  a.hrow = s->hrow;
  a.hpos = s->hpos;
  a.hvals = s->hvals;
  const int nu = msgc_head_sets(&a);
  if (nu < 0) return nu;
  s->n_uni = nu;
  s->n_idx = 0;
  for (int h = 0; h < d->heads; h++) s->n_idx += s->counts[h];
  s->masked = a.logits != 0;
  return MSGC_OK;
}

static void record_stats(const state *st, int *stats) {
  for (int i = 0; i < st->pg->n_sets; i++) {
    const msgc_set *d = &((const msgc_set *)st->pg->sets)[i];
    const setrt *s = &st->s[i];
    if (d->stats < 0) continue;
    int *out = stats + d->stats;
    for (int h = 0; h < d->heads; h++) out[h] = s->counts[h];
    out[d->heads] = s->n_uni;
    for (int g = 0; g < d->groups; g++) out[d->heads + 1 + g] = s->gcounts[g];
  }
}

static int run_gates(state *st, const msgc_gates_op *o) {
  const bufrt *x = &st->b[o->src];
  msgc_gen_args a = {0};
  a.x = x->data;
  a.ldx = x->ld;
  a.hw = x->h * x->w;
  a.c = o->c;
  a.w1 = o->w1;
  a.b1 = o->b1;
  a.nh = o->nh;
  a.ngen = o->ngen;
  a.desc = o->desc;
  a.desc_fields = o->desc_fields;
  a.w2 = o->w2;
  a.b2 = o->b2;
  a.out = st->fa + o->out;
  a.nthreads = st->nthreads;
  st->executed += o->macs;
  return msgc_generators(&a);
}

/* the arguments of a convolution op for this sample (what it computes is decided here); its output's
   tags are set as running it leaves them */
static int conv_args(state *st, const msgc_conv_op *o, msgc_conv_args *out) {
  const bufrt *src = &st->b[o->src];
  bufrt *dst = &st->b[o->dst];
  msgc_conv_args a = {0};
  a.g = o->g;
  a.hd.heads = o->heads;
  a.hd.in_channels = o->in_channels;
  a.hd.per_head = o->per_head;
  a.hd.xstep = o->host_groups > 1 ? o->in_channels : 0; /* without index sets: each host group its slice */
  int n_in = o->in_channels;
  if (o->in_set >= 0) {
    const setrt *s = &st->s[o->in_set];
    const int split = o->host_groups > 1; /* the set's entries by host group, then head (all, unmasked) */
    if (s->masked || split) {
      a.hd.counts = split ? s->hcounts : s->counts;
      a.hd.wrow = split ? s->hrow : s->idx;
      n_in = a.hd.counts[0];
      if (src->tag == TAG_FULL) a.hd.cols = split ? s->hidx : s->idx;
      else if (!s->masked || src->tag_set != o->in_set || (split && src->tag != TAG_UNION)) return MSGC_EPLAN;
      else a.hd.cols = src->tag == TAG_UNION ? (split ? s->hpos : s->pos) : 0;
    } else if (src->tag != TAG_FULL) {
      return MSGC_EPLAN;
    }
    if (o->att) a.hd.scale = split ? s->hvals : s->vals;
  } else if (src->tag != TAG_FULL) {
    return MSGC_EPLAN;
  }
  int outputs = o->heads * o->per_head, tag = TAG_FULL;
  const int npix = out_size(o->g.h, o->g.k, o->g.s, o->g.p) * out_size(o->g.w, o->g.k, o->g.s, o->g.p);
  if (o->out_mode != MSGC_OUT_ALL) {
    const setrt *t = &st->s[o->out_set];
    const msgc_set *d = &((const msgc_set *)st->pg->sets)[o->out_set];
    if (!t->masked) {
    } else if (o->out_mode == MSGC_OUT_UNION) {
      if (t->n_uni < d->channels && !(o->all_rule && computes_all(o, npix, t->n_uni, n_in))) {
        a.hd.ocounts = &t->counts[d->heads];
        a.hd.ocols = t->uni;
        outputs = t->n_uni;
        tag = TAG_UNION;
      }
    } else { /* the groups of a one-head set over this convolution's heads */
      a.hd.ocounts = t->gcounts;
      a.hd.ocols = t->gidx;
      outputs = t->n_idx;
      tag = TAG_CONCAT;
    }
  }
  a.wt = o->wt;
  a.io.x = src->data;
  a.io.ldx = src->ld;
  a.io.xcols = src->cols;
  a.io.y = dst->data;
  a.io.ldy = dst->ld;
  if (o->res >= 0) {
    a.io.res = st->b[o->res].data;
    a.io.ldres = st->b[o->res].ld;
  }
  a.io.act = o->act;
  a.bn = o->bn;
  a.nthreads = st->nthreads;
  a.executed = (int64_t *)&st->executed;
  dst->cols = outputs;
  dst->tag = tag;
  dst->tag_set = o->out_set;
  *out = a;
  return MSGC_OK;
}

static int run_conv(state *st, const msgc_conv_op *o) {
  msgc_conv_args a;
  const int rc = conv_args(st, o, &a);
  return rc ? rc : msgc_conv(&a);
}

/* what a depthwise op reads for this sample: x (ldx), c channels, weights and biases (of the union's
   channels, selected into scratch, where it computes only those) */
typedef struct {
  const float *x, *w, *bias;
  long ldx;
  int c, tag, copy;
} dw_args;

/* a depthwise op's arguments for this sample, its output's tags set; copy: whether it reads a copy of
   some of its input's columns (made here unless `nocopy`: then d->copy tells the caller, nothing is
   copied and the tags are not set) */
static int dw_prepare(state *st, const msgc_dw_op *o, dw_args *d, int nocopy) {
  const bufrt *src = &st->b[o->src];
  bufrt *dst = &st->b[o->dst];
  const int k = o->g.k, kk = k * k;
  *d = (dw_args){src->data, o->weight, o->bias, src->ld, src->cols, TAG_FULL, 0};
  const setrt *s = o->set >= 0 ? &st->s[o->set] : 0;
  if (s && s->masked) {
    const int full = ((const msgc_set *)st->pg->sets)[o->set].channels;
    /* only the union's channels: their weights, and from a full input a copy of their columns; a
       copied column costs about twice a computed one, so from a full input only a union of under a
       third of the channels is taken (else every channel is computed) */
    if (s->n_uni < full && (src->tag != TAG_FULL || 3 * s->n_uni < full)) {
      const int c = s->n_uni;
      const long hw = (long)o->g.h * o->g.w;
      d->copy = src->tag == TAG_FULL;
      if (d->copy && nocopy) return MSGC_OK;
      float *mem = msgc_scratch(SCRATCH_SELECT, sizeof(float) * ((size_t)(kk + 1) * c + (d->copy ? hw * c : 0)));
      if (!mem) return MSGC_ENOMEM;
      float *wsel = mem, *bsel = mem + (long)kk * c;
      for (int t = 0; t < kk; t++)
        for (int j = 0; j < c; j++) wsel[(long)t * c + j] = o->weight[(long)t * full + s->uni[j]];
      for (int j = 0; j < c; j++) bsel[j] = o->bias ? o->bias[s->uni[j]] : 0.0f;
      d->c = c;
      d->w = wsel;
      d->bias = bsel;
      if (d->copy) {
        float *xs = bsel + c;
        for (long q = 0; q < hw; q++)
          for (int j = 0; j < c; j++) xs[q * c + j] = src->data[q * src->ld + s->uni[j]];
        d->x = xs;
        d->ldx = c;
      } else if (src->tag != TAG_UNION || src->tag_set != o->set) {
        return MSGC_EPLAN;
      }
      d->tag = TAG_UNION;
    }
  }
  dst->cols = d->c;
  dst->tag = d->tag;
  dst->tag_set = o->set;
  return MSGC_OK;
}

static long dw_macs(const msgc_dw_op *o, int c) {
  const int k = o->g.k, ho = out_size(o->g.h, k, o->g.s, o->g.p), wo = out_size(o->g.w, k, o->g.s, o->g.p);
  return (long)ho * wo * c * (k * k + (o->bn != 0));
}

static int run_dw(state *st, const msgc_dw_op *o) {
  dw_args d;
  const int rc = dw_prepare(st, o, &d, 0);
  if (rc) return rc;
  const bufrt *dst = &st->b[o->dst];
  msgc_dw_run(d.x, d.ldx, o->g.h, o->g.w, d.c, o->g.k, o->g.s, o->g.p, d.w, d.bias, dst->data, dst->ld, o->act,
              st->nthreads);
  st->executed += dw_macs(o, d.c);
  return MSGC_OK;
}

typedef struct {
  const msgc_affine_op *o;
  const bufrt *src, *dst;
  long hw;
} affine_task;

static void affine_rows(void *arg, long i) { /* rows 16 i .. 16 i + 15 */
  const affine_task *t = arg;
  const msgc_affine_op *o = t->o;
  const int c = t->src->cols;
  for (long q = 16 * i; q < 16 * i + 16 && q < t->hw; q++) {
    const float *xr = t->src->data + q * t->src->ld;
    float *yr = t->dst->data + q * t->dst->ld;
    int j = 0;
    for (; j + VL <= c; j += VL) vstore(yr + j, vact(vload(xr + j) * vload(o->scale + j) + vload(o->shift + j), o->act));
    for (; j < c; j++) yr[j] = act1(xr[j] * o->scale[j] + o->shift[j], o->act);
  }
}

static int run_affine(state *st, const msgc_affine_op *o) {
  const bufrt *src = &st->b[o->src];
  bufrt *dst = &st->b[o->dst];
  const long hw = (long)src->h * src->w;
  const int c = src->cols;
  if (src->tag != TAG_FULL) return MSGC_EPLAN;
  const int nt = st->nthreads > 1 && hw * c > 65536 ? st->nthreads : 1;
  affine_task t = {o, src, dst, hw};
  msgc_parallel(affine_rows, &t, (hw + 15) / 16, nt);
  dst->cols = c;
  dst->tag = TAG_FULL;
  st->executed += hw * c * o->macs;
  return MSGC_OK;
}

static int run_pool(state *st, const msgc_pool_op *o) {
  const bufrt *src = &st->b[o->src];
  bufrt *dst = &st->b[o->dst];
  const int k = o->k, s = o->s, p = o->p, c = src->cols;
  const int ho = out_size(src->h, k, s, p), wo = out_size(src->w, k, s, p);
  if (src->tag != TAG_FULL) return MSGC_EPLAN;
  const float inv = 1.0f / (k * k);
  for (int oy = 0; oy < ho; oy++)
    for (int ox = 0; ox < wo; ox++) {
      float *yr = dst->data + ((long)oy * wo + ox) * dst->ld;
      for (int j = 0; j < c; j++) yr[j] = o->kind == MSGC_POOL_MAX ? -INFINITY : 0.0f;
      for (int dy = 0; dy < k; dy++)
        for (int dx = 0; dx < k; dx++) {
          const int iy = oy * s - p + dy, ix = ox * s - p + dx;
          if (iy < 0 || iy >= src->h || ix < 0 || ix >= src->w) continue;
          const float *xr = src->data + ((long)iy * src->w + ix) * src->ld;
          if (o->kind == MSGC_POOL_MAX)
            for (int j = 0; j < c; j++) yr[j] = xr[j] > yr[j] ? xr[j] : yr[j];
          else
            for (int j = 0; j < c; j++) yr[j] += xr[j];
        }
      if (o->kind != MSGC_POOL_MAX)
        for (int j = 0; j < c; j++) yr[j] *= inv;
    }
  dst->cols = c;
  dst->tag = TAG_FULL;
  st->executed += (long)o->macs * ho * wo * c;
  return MSGC_OK;
}

typedef struct {
  const msgc_head_op *o;
  const float *pooled;
  float *out;
  int c;
} head_task;

static void head_rows(void *arg, long i) { /* classes 16 i .. 16 i + 15 */
  const head_task *t = arg;
  for (long j = 16 * i; j < 16 * i + 16 && j < t->o->classes; j++) {
    const float *w = t->o->weight + j * t->c;
    vf acc = vzero();
    int l = 0;
    for (; l + VL <= t->c; l += VL) acc += vload(w + l) * vload(t->pooled + l);
    float v = vsum(acc);
    for (; l < t->c; l++) v += w[l] * t->pooled[l];
    t->out[j] = t->o->bias[j] + v;
  }
}

static int run_head(state *st, const msgc_head_op *o, float *out) {
  const bufrt *src = &st->b[o->src];
  const long hw = (long)src->h * src->w;
  const int c = src->cols;
  float *pooled = msgc_scratch(SCRATCH_SELECT, sizeof(float) * (size_t)c);
  if (!pooled || src->tag != TAG_FULL) return pooled ? MSGC_EPLAN : MSGC_ENOMEM;
  double *sum = (double *)msgc_scratch(SCRATCH_PARTIAL, sizeof(double) * (size_t)c);
  if (!sum) return MSGC_ENOMEM;
  for (int j = 0; j < c; j++) sum[j] = 0.0;
  for (long q = 0; q < hw; q++) {
    const float *xr = src->data + q * src->ld;
    for (int j = 0; j < c; j++) sum[j] += xr[j];
  }
  for (int j = 0; j < c; j++) pooled[j] = (float)(sum[j] / hw);
  head_task t = {o, pooled, out, c};
  const int nt = st->nthreads > 1 && (long)o->classes * c > 65536 ? st->nthreads : 1;
  msgc_parallel(head_rows, &t, (o->classes + 15) / 16, nt);
  st->executed += hw * c + (long)o->classes * c;
  return MSGC_OK;
}

/* ---- an inverted residual, fused ------------------------------------------------------------------
 * Band by band of output rows (a thread each), stripe by stripe of `rows` output rows within a band:
 * the expansion computes the stripe's new expanded rows into the thread's window (the rows its
 * depthwise taps read; rows the previous stripe read too are kept), the depthwise computes the stripe's
 * rows from the window, the projection the stripe's outputs from those. Expanded rows that the
 * depthwise of two bands reads (k - s rows at each boundary) are computed first, once, into a shared
 * buffer: every expanded row is computed exactly once, so the executed MACs are the unfused ops'. A
 * block without expansion (expand -1: its depthwise and projection) reads the block's input in place. */

/* the window and the stripe are sized for about this many bytes (the L2 cache of one core, with room
   for the stripe's inputs, weights and outputs) */
#ifndef FUSED_BYTES
#define FUSED_BYTES (256 * 1024)
#endif

typedef struct {
  const msgc_conv_args *ea, *pa; /* the expansion's and the projection's arguments on their whole maps */
  const dw_args *d;
  const msgc_dw_op *dw;
  int H, W, Ho, Wo, k, s, p, c, R, nbands;
  const int *band;   /* band i: output rows band[i] .. band[i + 1] - 1 */
  float *edge;       /* boundary i + 1: its k - s expanded rows at edge + i * edge_floats */
  long edge_floats;
  long *exec;        /* executed MACs per band, then per boundary */
  volatile int rc;
} fused_task;

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

/* expanded rows r0 .. r1 - 1 into y (c columns) */
static int expand_rows(const fused_task *t, int r0, int r1, float *y, long *exec) {
  if (r1 <= r0) return MSGC_OK;
  msgc_conv_args a = *t->ea;
  a.g.h = r1 - r0;
  a.io.x += (long)r0 * t->W * a.io.ldx;
  a.io.y = y;
  a.io.ldy = t->c;
  a.nthreads = 1;
  a.executed = (int64_t *)exec;
  return msgc_conv_part(&a, (long)t->H * t->W, r0 == 0);
}

/* the projection of output rows a0 .. a1 - 1 from their depthwise rows x (c columns) */
static int project_rows(const fused_task *t, int a0, int a1, const float *x, long *exec) {
  msgc_conv_args a = *t->pa;
  a.g.h = a1 - a0;
  a.io.x = x;
  a.io.ldx = t->c;
  a.io.y += (long)a0 * t->Wo * a.io.ldy;
  if (a.io.res) a.io.res += (long)a0 * t->Wo * a.io.ldres;
  a.nthreads = 1;
  a.executed = (int64_t *)exec;
  return msgc_conv_part(&a, (long)t->Ho * t->Wo, a0 == 0);
}

static void fused_edge(void *arg, long i) { /* the expanded rows of boundary i + 1 */
  fused_task *t = arg;
  const int B = t->band[i + 1], r0 = B * t->s - t->p, r1 = imin(t->H, (B - 1) * t->s - t->p + t->k);
  const int rc = expand_rows(t, r0, r1, t->edge + i * t->edge_floats, &t->exec[t->nbands + i]);
  if (rc) t->rc = rc;
}

/* a block without expansion: the depthwise reads the block's input in place */
static void fused_band_dw(fused_task *t, int A, int B, long *exec) {
  float *D = msgc_scratch(SCRATCH_STRIPE, sizeof(float) * (size_t)t->R * t->Wo * t->c);
  if (!D) {
    t->rc = MSGC_ENOMEM;
    return;
  }
  for (int a = A; a < B; a += t->R) {
    const int b = imin(B, a + t->R);
    msgc_dw_rows(t->d->x, t->d->ldx, 0, t->H, t->W, t->c, t->k, t->s, t->p, t->d->w, t->d->bias, D, t->c, a, b,
                 t->dw->act);
    const int rc = project_rows(t, a, b, D, exec);
    if (rc) {
      t->rc = rc;
      return;
    }
  }
}

static void fused_band(void *arg, long bi) {
  fused_task *t = arg;
  const int A = t->band[bi], B = t->band[bi + 1], W = t->W, c = t->c, k = t->k, s = t->s, p = t->p;
  if (!t->ea) {
    fused_band_dw(t, A, B, &t->exec[bi]);
    return;
  }
  const long row = (long)W * c;
  const int win = (t->R - 1) * s + k;
  float *E = msgc_scratch(SCRATCH_STRIPE, sizeof(float) * ((size_t)win * row + (size_t)t->R * t->Wo * c));
  if (!E) {
    t->rc = MSGC_ENOMEM;
    return;
  }
  float *D = E + win * row;
  long *exec = &t->exec[bi];
  /* rows below lo_end come from the boundary at A, rows from hi_start on from the one at B */
  const int lo_end = A > 0 ? imin(t->H, (A - 1) * s - p + k) : 0, hi_start = B < t->Ho ? B * s - p : t->H;
  const float *lo_edge = A > 0 ? t->edge + (bi - 1) * t->edge_floats : 0, *hi_edge = t->edge + bi * t->edge_floats;
  int e0 = 0, e1 = 0; /* the window holds expanded rows e0 .. e1 - 1 */
  for (int a = A; a < B; a += t->R) {
    const int b = imin(B, a + t->R);
    const int wa = imax(0, a * s - p), wb = imin(t->H, (b - 1) * s - p + k);
    if (e1 > wa) { /* keep the rows this stripe reads too */
      if (wa > e0) memmove(E, E + (wa - e0) * row, sizeof(float) * (size_t)((e1 - wa) * row));
    } else {
      e1 = wa;
    }
    e0 = wa;
    int r = e1;
    for (; r < wb && r < lo_end; r++)
      memcpy(E + (r - e0) * row, lo_edge + (r - (A * s - p)) * row, sizeof(float) * (size_t)row);
    const int ce = imin(wb, hi_start);
    if (r < ce) {
      const int rc = expand_rows(t, r, ce, E + (r - e0) * row, exec);
      if (rc) {
        t->rc = rc;
        return;
      }
      r = ce;
    }
    for (; r < wb; r++)
      memcpy(E + (r - e0) * row, hi_edge + (r - (B * s - p)) * row, sizeof(float) * (size_t)row);
    e1 = wb;
    msgc_dw_rows(E, c, e0, t->H, W, c, k, s, p, t->d->w, t->d->bias, D, c, a, b, t->dw->act);
    const int rc = project_rows(t, a, b, D, exec);
    if (rc) {
      t->rc = rc;
      return;
    }
  }
}

/* a one-head 1x1 convolution that computes chosen outputs as one that computes all of its own: the
   chosen outputs' weights (both layouts) and biases copied once into scratch, so that the stripes do not
   gather them each */
static int choose_outputs(msgc_conv_args *a) {
  if (!a->hd.ocounts) return MSGC_OK;
  const int m = a->hd.ocounts[0], rows = (int)a->wt.rows, nb = (m + MSGC_BLOCK - 1) / MSGC_BLOCK;
  const long bfloats = (long)nb * MSGC_BLOCK * rows, pfloats = (long)m * rows;
  float *mem = msgc_scratch(SCRATCH_CHOSEN, sizeof(float) * (size_t)(bfloats + pfloats + m));
  if (!mem) return MSGC_ENOMEM;
  float *blk = mem, *plain = mem + bfloats, *bias = plain + pfloats;
  const int *oc = a->hd.ocols;
  for (int b = 0; b < nb; b++)
    for (int r = 0; r < rows; r++)
      for (int l = 0; l < MSGC_BLOCK; l++) {
        const int j = b * MSGC_BLOCK + l;
        blk[((long)b * rows + r) * MSGC_BLOCK + l] =
            j < m ? a->wt.blocked[((long)(oc[j] / MSGC_BLOCK) * rows + r) * MSGC_BLOCK + oc[j] % MSGC_BLOCK] : 0.0f;
      }
  for (int j = 0; a->wt.plain && j < m; j++)
    memcpy(plain + (long)j * rows, a->wt.plain + (long)oc[j] * rows, sizeof(float) * (size_t)rows);
  for (int j = 0; a->wt.bias && j < m; j++) bias[j] = a->wt.bias[oc[j]];
  a->hd.per_head = m;
  a->hd.ocounts = 0;
  a->hd.ocols = 0;
  a->wt.blocked = blk;
  a->wt.plain = a->wt.plain ? plain : 0;
  a->wt.bias = a->wt.bias ? bias : 0;
  return MSGC_OK;
}

static int run_fused(state *st, const msgc_fused_op *f) {
  const msgc_program *pg = st->pg;
  const int expands = f->expand >= 0;
  const msgc_conv_op *eo = expands ? &((const msgc_conv_op *)pg->convs)[f->expand] : 0;
  const msgc_conv_op *po = &((const msgc_conv_op *)pg->convs)[f->project];
  const msgc_dw_op *dw = &((const msgc_dw_op *)pg->dws)[f->dw];
  msgc_conv_args ea, pa;
  dw_args d;
  int rc = expands ? conv_args(st, eo, &ea) : MSGC_OK;
  if (!rc) rc = dw_prepare(st, dw, &d, 1);
  if (rc) return rc;
  const int k = dw->g.k, s = dw->g.s, p = dw->g.p, H = dw->g.h, W = dw->g.w;
  const int Ho = out_size(H, k, s, p), Wo = out_size(W, k, s, p);
  /* the ops one after the other where the stripes do not apply: a depthwise on a copy of some of its
     input's columns, a geometry other than 1x1, k x k (k <= 3, k - s rows shared by two stripes), 1x1 */
  if (d.copy || (expands && (st->b[eo->dst].cols != d.c || eo->g.k != 1 || eo->g.s != 1 || eo->g.p != 0 ||
                             eo->g.h != H || eo->g.w != W)) ||
      po->g.k != 1 || po->g.s != 1 || po->g.p != 0 || po->g.h != Ho || po->g.w != Wo || k - s <= 0 || k > 3 ||
      p > k - 1 || Ho < 1 || Wo < 1) {
    rc = expands ? msgc_conv(&ea) : MSGC_OK;
    if (!rc) rc = run_dw(st, dw);
    return rc ? rc : run_conv(st, po);
  }
  rc = conv_args(st, po, &pa);
  if (!rc && expands && (ea.hd.heads != 1 || ea.hd.scale || ea.hd.counts)) rc = MSGC_EPLAN;
  if (!rc && expands) rc = choose_outputs(&ea);
  if (rc) return rc;
  const int c = d.c;
  int R = f->rows;
  if (R <= 0) { /* the most rows whose window and stripe fit FUSED_BYTES */
    const long in_row = expands ? sizeof(float) * (long)W * c : 0, out_row = sizeof(float) * (long)Wo * c;
    for (R = 1; R < Ho && ((long)R * s + k) * in_row + (R + 1) * out_row <= FUSED_BYTES;) R++;
  }
  R = imin(R, Ho);
  /* a band per thread, at least 2 output rows each (so that no expanded row is shared by three bands) */
  int nb = st->nthreads > 1 ? st->nthreads : 1;
  nb = imax(1, imin(nb, Ho / 2));
  const long edge_floats = expands ? (long)(k - s) * W * c : 0;
  const size_t head = sizeof(long) * (size_t)(2 * nb) + sizeof(int) * (size_t)(nb + 2);
  const size_t at = (head + 63) / 64 * 64;
  char *mem = msgc_scratch(SCRATCH_EDGE, at + sizeof(float) * (size_t)((nb - 1) * edge_floats));
  if (!mem) return MSGC_ENOMEM;
  long *exec = (long *)mem;
  int *band = (int *)(exec + 2 * nb);
  for (int i = 0; i < 2 * nb; i++) exec[i] = 0;
  for (int i = 0; i <= nb; i++) band[i] = (int)((long)i * Ho / nb);
  fused_task t = {expands ? &ea : 0, &pa, &d, dw, H, W, Ho, Wo, k, s, p, c, R, nb, band, (float *)(mem + at),
                  edge_floats, exec, MSGC_OK};
  if (expands && nb > 1) msgc_parallel(fused_edge, &t, nb - 1, st->nthreads);
  if (!t.rc) msgc_parallel(fused_band, &t, nb, st->nthreads);
  if (t.rc) return t.rc;
  for (int i = 0; i < 2 * nb - 1; i++) st->executed += exec[i];
  st->executed += dw_macs(dw, c);
  return MSGC_OK;
}

/* how many program ops op i stands for */
static int op_span(const msgc_program *pg, int i) {
  const msgc_op *op = &((const msgc_op *)pg->ops)[i];
  if (op->kind != MSGC_OP_FUSED) return 1;
  return ((const msgc_fused_op *)pg->fused)[op->index].expand >= 0 ? 3 : 2;
}

static int run_op(state *st, int i, float *feats) {
  const msgc_program *pg = st->pg;
  const msgc_op *op = &((const msgc_op *)pg->ops)[i];
  switch (op->kind) {
    case MSGC_OP_GATES: return run_gates(st, &((const msgc_gates_op *)pg->gates)[op->index]);
    case MSGC_OP_SETS: return run_sets(st, &((const msgc_sets_op *)pg->sets_ops)[op->index]);
    case MSGC_OP_CONV: return run_conv(st, &((const msgc_conv_op *)pg->convs)[op->index]);
    case MSGC_OP_DW: return run_dw(st, &((const msgc_dw_op *)pg->dws)[op->index]);
    case MSGC_OP_AFFINE: return run_affine(st, &((const msgc_affine_op *)pg->affines)[op->index]);
    case MSGC_OP_POOL: return run_pool(st, &((const msgc_pool_op *)pg->pools)[op->index]);
    case MSGC_OP_HEAD: return run_head(st, &((const msgc_head_op *)pg->heads)[op->index], feats);
    case MSGC_OP_FUSED: return run_fused(st, &((const msgc_fused_op *)pg->fused)[op->index]);
    default: return MSGC_EPLAN;
  }
}

static size_t state_bytes(const msgc_program *pg) {
  const size_t bytes = sizeof(float) * (size_t)pg->farena + sizeof(int) * (size_t)pg->iarena +
                       sizeof(bufrt) * (size_t)pg->n_bufs + sizeof(setrt) * (size_t)pg->n_sets;
  return (bytes + 63) / 64 * 64;
}

/* the state of the calling thread's k-th sample of a group (its arena, laid out for the program: floats,
   ints, buffer and set states), in the thread's scratch of `group` states (group 0: keep its size) */
static int open_state(state *st, const msgc_program *pg, int k, int group, int fresh) {
  const size_t bytes = state_bytes(pg);
  char *mem = msgc_scratch(SCRATCH_ARENA, bytes * (size_t)(group > 0 ? group : 1));
  if (!mem) return MSGC_ENOMEM;
  mem += bytes * (size_t)k;
  st->pg = pg;
  st->b = (bufrt *)mem;
  st->s = (setrt *)(st->b + pg->n_bufs);
  st->fa = (float *)(st->s + pg->n_sets);
  st->ia = (int *)(st->fa + pg->farena);
  st->executed = 0;
  if (!fresh) return MSGC_OK;
  const msgc_buf *d = (const msgc_buf *)pg->bufs;
  for (int i = 0; i < pg->n_bufs; i++) {
    bufrt *b = &st->b[i];
    b->h = d[i].h;
    b->w = d[i].w;
    b->cols = d[i].cols;
    b->tag = TAG_FULL;
    b->tag_set = -1;
    if (d[i].parent >= 0) {
      b->data = st->b[d[i].parent].data + d[i].col0;
      b->ld = st->b[d[i].parent].ld;
    } else {
      b->data = st->fa + d[i].offset;
      b->ld = d[i].cols;
    }
  }
  for (int i = 0; i < pg->n_sets; i++) st->s[i].masked = 0;
  return MSGC_OK;
}

/* buffer 0 is sample i's input: copied into the arena (planar images), or pointed at, with its views */
static void load_input(state *st, const msgc_run_args *a, int i) {
  const msgc_program *pg = a->program;
  const float *x = a->x + (long)i * a->x_stride;
  if (pg->input_nchw) { /* planar image -> buffer 0 (in the arena), channels-last */
    bufrt *b = &st->b[0];
    const long hw = (long)b->h * b->w;
    for (long q = 0; q < hw; q++)
      for (int c = 0; c < b->cols; c++) b->data[q * b->ld + c] = x[c * hw + q];
  } else {
    st->b[0].data = (float *)x;
    st->b[0].ld = a->x_ld;
    const msgc_buf *d = (const msgc_buf *)pg->bufs;
    for (int j = 1; j < pg->n_bufs; j++)
      if (d[j].parent == 0) st->b[j].data = st->b[0].data + d[j].col0, st->b[j].ld = a->x_ld;
  }
}

/* samples first .. first + count - 1 on nthreads threads: each sample alone through the ops before
   group_from, then op by op over the group (a layer's weights, read for the first sample, are still in
   cache for the others, where they outweigh the layer's feature maps) */
static int run_group(const msgc_run_args *a, int first, int count, int nthreads) {
  const msgc_program *pg = a->program;
  state st[MSGC_MAX_GROUP];
  int rc = MSGC_OK;
  for (int k = 0; k < count && !rc; k++) {
    rc = open_state(&st[k], pg, k, count, 1);
    if (rc) break;
    st[k].nthreads = nthreads;
    load_input(&st[k], a, first + k);
  }
  int split = count > 1 && pg->group_from < pg->n_ops ? pg->group_from : pg->n_ops;
  for (int op = 0; op < split; op += op_span(pg, op)) /* not inside a fused block: at its start */
    if (op + op_span(pg, op) > split) split = op;
  for (int k = 0; k < count && !rc; k++)
    for (int op = 0; op < split && !rc; op += op_span(pg, op))
      rc = run_op(&st[k], op, a->out + (long)(first + k) * pg->nout);
  for (int op = split; op < pg->n_ops && !rc; op += op_span(pg, op))
    for (int k = 0; k < count && !rc; k++) rc = run_op(&st[k], op, a->out + (long)(first + k) * pg->nout);
  for (int k = 0; k < count && !rc; k++) {
    if (a->stats) record_stats(&st[k], a->stats + (long)(first + k) * pg->nstats);
    if (a->executed) a->executed[first + k] = st[k].executed;
  }
  return rc;
}

typedef struct {
  const msgc_run_args *a;
  int group;
  volatile int rc;
} batch_task;

static void group_task(void *arg, long g) { /* a group of samples on one thread */
  batch_task *t = arg;
  const int first = (int)g * t->group, count = t->a->n - first < t->group ? t->a->n - first : t->group;
  const int r = run_group(t->a, first, count, 1);
  if (r) t->rc = r;
}

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long)t.tv_sec * 1000000000L + t.tv_nsec;
}

i32 msgc_run(const msgc_run_args *a) {
  const msgc_program *pg = a->program;
  if (a->op >= 0) { /* replay one op on the state the last run of this thread left */
    state st;
    int rc = open_state(&st, pg, 0, 0, 0);
    st.nthreads = a->nthreads;
    float *feats = a->out;
    for (int r = 0; r < a->reps && !rc; r++) {
      const long t0 = now_ns();
      rc = run_op(&st, a->op, feats);
      if (a->times) a->times[r] = now_ns() - t0;
    }
    if (a->executed && a->reps > 0) a->executed[0] = st.executed / a->reps;
    return rc;
  }
  /* groups of samples: each thread its own (ops on one thread each), or one after the other with every
     op on all threads where there are fewer samples than threads */
  const int threads = a->nthreads > 1 && a->n >= a->nthreads && !a->keep ? a->nthreads : 1;
  int group = a->keep ? 1 : (a->n + threads - 1) / threads;
  group = group < pg->group ? group : pg->group;
  group = group < 1 ? 1 : group > MSGC_MAX_GROUP ? MSGC_MAX_GROUP : group;
  const long groups = (a->n + group - 1) / group;
  if (threads > 1) {
    batch_task t = {a, group, MSGC_OK};
    msgc_parallel(group_task, &t, groups, threads);
    return t.rc;
  }
  int rc = MSGC_OK;
  for (long g = 0; g < groups && !rc; g++) {
    const int first = (int)g * group;
    rc = run_group(a, first, a->n - first < group ? a->n - first : group, a->nthreads);
  }
  return rc;
}
