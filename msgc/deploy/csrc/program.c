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

static int run_conv(state *st, const msgc_conv_op *o) {
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
  return msgc_conv(&a);
}

static int run_dw(state *st, const msgc_dw_op *o) {
  const bufrt *src = &st->b[o->src];
  bufrt *dst = &st->b[o->dst];
  const int k = o->g.k, kk = k * k, ho = out_size(o->g.h, k, o->g.s, o->g.p), wo = out_size(o->g.w, k, o->g.s, o->g.p);
  const float *x = src->data, *w = o->weight, *bias = o->bias;
  long ldx = src->ld;
  int c = src->cols, tag = TAG_FULL;
  const setrt *s = o->set >= 0 ? &st->s[o->set] : 0;
  if (s && s->masked) {
    const int full = ((const msgc_set *)st->pg->sets)[o->set].channels;
    /* only the union's channels: their weights, and from a full input a copy of their columns; a
       copied column costs about twice a computed one, so from a full input only a union of under a
       third of the channels is taken (else every channel is computed) */
    if (s->n_uni < full && (src->tag != TAG_FULL || 3 * s->n_uni < full)) {
      c = s->n_uni;
      const long hw = (long)o->g.h * o->g.w;
      float *mem = msgc_scratch(SCRATCH_SELECT, sizeof(float) * ((size_t)(kk + 1) * c + (src->tag == TAG_FULL ? hw * c : 0)));
      if (!mem) return MSGC_ENOMEM;
      float *wsel = mem, *bsel = mem + (long)kk * c;
      for (int t = 0; t < kk; t++)
        for (int j = 0; j < c; j++) wsel[(long)t * c + j] = o->weight[(long)t * full + s->uni[j]];
      for (int j = 0; j < c; j++) bsel[j] = bias ? bias[s->uni[j]] : 0.0f;
      w = wsel;
      bias = bsel;
      if (src->tag == TAG_FULL) {
        float *xs = bsel + c;
        for (long q = 0; q < hw; q++)
          for (int j = 0; j < c; j++) xs[q * c + j] = src->data[q * ldx + s->uni[j]];
        x = xs;
        ldx = c;
      } else if (src->tag != TAG_UNION || src->tag_set != o->set) {
        return MSGC_EPLAN;
      }
      tag = TAG_UNION;
    }
  }
  msgc_dw_run(x, ldx, o->g.h, o->g.w, c, k, o->g.s, o->g.p, w, bias, dst->data, dst->ld, o->act, st->nthreads);
  dst->cols = c;
  dst->tag = tag;
  dst->tag_set = o->set;
  st->executed += (long)ho * wo * c * (kk + (o->bn != 0));
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
  const int split = count > 1 && pg->group_from < pg->n_ops ? pg->group_from : pg->n_ops;
  for (int k = 0; k < count && !rc; k++)
    for (int op = 0; op < split && !rc; op++) rc = run_op(&st[k], op, a->out + (long)(first + k) * pg->nout);
  for (int op = split; op < pg->n_ops && !rc; op++)
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
