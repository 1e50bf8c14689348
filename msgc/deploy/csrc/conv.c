/* msgc_conv: every head of a gated convolution in one call, in three steps:
 *
 *   plan    where each head's inputs, outputs and copies go, and the work items (tiles) of all heads;
 *   gather  the copies some heads need: weights of chosen outputs (or scaled by attention) in the
 *           blocked layout, scaled input columns (attention folded into the inputs), input planes
 *           (pixel kernel);
 *   tiles   one parallel loop over every head's tiles.
 *
 * A head's attention is folded into the smaller operand: its inputs (where k*k * outputs > H * W) or
 * its gathered weights. Copies live in per-thread scratch that is kept between calls.
 */
#include <stdlib.h>

#include "internal.h"

typedef struct {
  long in0, out0;          /* first input entry, first output column */
  int n, m;                /* input entries, outputs */
  int infold, gathered;    /* attention into the inputs; weights gathered */
  long g0;                 /* the head's copies in the gather buffer: weights, then biases, then inputs */
  int ch0, nch;            /* wide: its chunks */
  int by_rows;             /* wide: its taps walked by kernel rows (few entries per tap) */
  long it0;                /* wide, pixel-major: its first work item */
} head_plan;

typedef struct {
  int head, j0, size;      /* wide: index of the tile; pixel: output rows */
  int kb;                  /* wide: input entries per block (0: all at once, one work item per tile) */
  long first;              /* its first work item */
} chunk;

/* wide kernel, pixel-major order: a work item is a block of this many output pixels of one head (a
   multiple of every tile's pixels), all its chunks one after the other on the same inputs */
#define PIXEL_BLOCK 48

/* wide kernel: blocks of input entries where a chunk's weights (entries x taps x 16 outputs) exceed
   this many floats and the map has few pixel tiles (14x14 and smaller) */
#ifndef KBLOCK_FLOATS
#define KBLOCK_FLOATS 4096
#endif
#define KBLOCK_PIXELS 256

/* wide kernel: a head whose taps read at most this many entries each walks its taps by kernel rows */
#define ROW_ENTRIES 8

typedef struct {
  int Ho, Wo, npix, kk, heads, nch, pixel_major, fixed;
  long whole_hw;           /* the whole map's pixels (attention into the inputs or the weights) */
  long items, copies;      /* work items; floats of copies */
  head_plan *hp;
  chunk *ch;
  long *off;               /* wide, chosen outputs: offset of each in its head's blocked weights */
  int *coff;               /* wide: the column each input entry reads (of x or of its scaled copy) */
  long *woff;              /* wide: the offset of each input entry's weight row in a block */
  long *rx, *rw;           /* wide, by rows of taps: k entries per input entry (see wide_job) */
  float *buf;
  long plane_len;          /* pixel kernel */
  int Wp, npos, nq;
} conv_plan;

static long blocks16(long m) { return (m + MSGC_BLOCK - 1) / MSGC_BLOCK; }

/* per head counts and offsets; returns the total number of output entries */
static int plan_heads(const msgc_conv_args *a, conv_plan *pl) {
  const msgc_heads *hd = &a->hd;
  long in0 = 0, out0 = 0;
  for (int h = 0; h < hd->heads; h++) {
    head_plan *p = &pl->hp[h];
    p->n = hd->counts ? hd->counts[h] : hd->in_channels;
    p->m = hd->ocounts ? hd->ocounts[h] : hd->per_head;
    p->in0 = in0;
    p->out0 = out0;
    in0 += p->n;
    out0 += p->m;
  }
  return (int)out0;
}

static int find_chunk(const conv_plan *pl, long it) {
  int lo = 0, hi = pl->nch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (pl->ch[mid].first <= it) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

static int head_of_entry(const conv_plan *pl, long e) {
  int h = 0;
  while (h + 1 < pl->heads && pl->hp[h + 1].in0 <= e) h++;
  return h;
}

/* ---- the wide kernel ---------------------------------------------------------------------------- */

static int plan_wide(const msgc_conv_args *a, conv_plan *pl) {
  const msgc_heads *hd = &a->hd;
  const long hw = (long)a->g.h * a->g.w;
  long g0 = 0, items = 0;
  int nch = 0;
  for (int h = 0; h < hd->heads; h++) {
    head_plan *p = &pl->hp[h];
    /* the gather kernel copies every head's inputs (contiguous columns for the tiles) */
    p->infold = p->n > 0 &&
                ((hd->scale && (long)pl->kk * p->m > pl->whole_hw) || a->wt.kernel == MSGC_KERNEL_GATHER);
    p->gathered = hd->ocounts || (hd->scale && !p->infold);
    p->g0 = g0;
    g0 += (p->gathered ? blocks16(p->m) * MSGC_BLOCK * p->n * pl->kk + p->m : 0) + (p->infold ? hw * p->n : 0);
    for (long c = 0; c < p->n; c++) {
      const long e = p->in0 + c;
      pl->coff[e] = p->infold ? (int)c : hd->cols ? hd->cols[e] : (int)c + h * hd->xstep;
      pl->woff[e] = (long)(p->gathered || !hd->wrow ? c : hd->wrow[e]) * pl->kk * MSGC_BLOCK;
    }
    const long ldx = p->infold ? p->n : a->io.ldx;
    int maxcol = 0;
    for (long e = p->in0; e < p->in0 + p->n; e++) maxcol = pl->coff[e] > maxcol ? pl->coff[e] : maxcol;
    p->by_rows = a->g.k > 1 && p->n > 0 && p->n <= ROW_ENTRIES && (long)(a->g.k - 1) * ldx + maxcol < ZERO_FLOATS;
    for (int dx = 0; p->by_rows && dx < a->g.k; dx++)
      for (int c = 0; c < p->n; c++) {
        const long e = p->in0 + c, f = p->in0 * a->g.k + (long)dx * p->n + c;
        pl->rx[f] = dx * ldx + pl->coff[e];
        pl->rw[f] = pl->woff[e] + (long)dx * MSGC_BLOCK;
      }
    const long row_floats = (long)pl->kk * MSGC_BLOCK;
    const int kb = !pl->pixel_major && pl->npix <= KBLOCK_PIXELS && p->n * row_floats > KBLOCK_FLOATS
                       ? (int)(KBLOCK_FLOATS / row_floats) : 0;
    p->ch0 = nch;
    p->it0 = items;
    for (int j = 0; j < p->m;) {
      const wide_tile *t = msgc_wide_pick(a->wt.tiles & MSGC_TILES_FAMILY, p->m - j);
      pl->ch[nch] = (chunk){h, j, (int)(t - msgc_wide_tiles), kb > 0 ? kb : 0, items};
      if (!pl->pixel_major) items += kb > 0 ? 1 : (pl->npix + t->rb - 1) / t->rb;
      j += t->nv * VL;
      nch++;
    }
    p->nch = nch - p->ch0;
    if (pl->pixel_major && p->m > 0) items += (pl->npix + PIXEL_BLOCK - 1) / PIXEL_BLOCK;
  }
  pl->nch = nch;
  pl->items = items;
  pl->copies = g0;
  return MSGC_OK;
}

/* input entry e's rows of its head's gathered weights (chosen outputs, or scaled by attention) */
static void gather_weights(const msgc_conv_args *a, const conv_plan *pl, long e) {
  const msgc_heads *hd = &a->hd;
  const int h = head_of_entry(pl, e), kk = pl->kk;
  const head_plan *p = &pl->hp[h];
  if (!p->gathered) return;
  const int c = (int)(e - p->in0), n = p->n, m = p->m;
  float *dst = pl->buf + p->g0;
  const float wsc = hd->scale && !p->infold ? hd->scale[e] : 1.0f;
  const long head_w = blocks16(hd->per_head) * a->wt.rows * kk * MSGC_BLOCK;
  const float *src = a->wt.blocked + h * head_w + (long)(hd->wrow ? hd->wrow[e] : c) * kk * MSGC_BLOCK;
  for (long b = 0; b < blocks16(m); b++)
    for (int t = 0; t < kk; t++) {
      float *d = dst + ((b * n + c) * kk + t) * MSGC_BLOCK;
      const float *st = src + t * MSGC_BLOCK;
      if (hd->ocounts) {
        const long *o = pl->off + p->out0 + MSGC_BLOCK * b;
        for (int l = 0; l < MSGC_BLOCK; l++) d[l] = MSGC_BLOCK * b + l < m ? st[o[l]] * wsc : 0.0f;
      } else { /* every output, attention into the weights: whole blocks, scaled */
        const float *sb = st + b * a->wt.rows * kk * MSGC_BLOCK;
        for (int l = 0; l < MSGC_BLOCK; l++) d[l] = sb[l] * wsc;
      }
    }
}

/* pixels 64 i .. 64 i + 63 of the heads' copied inputs: their columns side by side, times attention */
static void copy_inputs(const msgc_conv_args *a, const conv_plan *pl, long i) {
  const msgc_heads *hd = &a->hd;
  const long hw = (long)a->g.h * a->g.w, ldx = a->io.ldx;
  for (int h = 0; h < pl->heads; h++) {
    const head_plan *p = &pl->hp[h];
    if (!p->infold) continue;
    const long gsize = p->gathered ? blocks16(p->m) * MSGC_BLOCK * p->n * pl->kk + p->m : 0;
    float *dst = pl->buf + p->g0 + gsize;
    const int *cols = hd->cols ? hd->cols + p->in0 : 0;
    const float *sc = hd->scale ? hd->scale + p->in0 : 0;
    const int first = h * hd->xstep;
    for (long q = 64 * i; q < 64 * i + 64 && q < hw; q++) {
      const float *xr = a->io.x + q * ldx;
      float *d = dst + q * p->n;
      for (int c = 0; c < p->n; c++) d[c] = xr[cols ? cols[c] : first + c] * (sc ? sc[c] : 1.0f);
    }
  }
}

/* the tile job of head h (its inputs, weights, bias and outputs) */
static void head_job(const msgc_conv_args *a, const conv_plan *pl, int h, wide_job *j) {
  const msgc_heads *hd = &a->hd;
  const head_plan *p = &pl->hp[h];
  const int kk = pl->kk;
  const long gsize = p->gathered ? blocks16(p->m) * MSGC_BLOCK * p->n * kk : 0;
  const long head_w = blocks16(hd->per_head) * a->wt.rows * kk * MSGC_BLOCK;
  j->x = p->infold ? pl->buf + p->g0 + gsize + (p->gathered ? p->m : 0) : a->io.x;
  j->ldx = p->infold ? p->n : a->io.ldx;
  j->H = a->g.h, j->W = a->g.w, j->Wo = pl->Wo, j->k = a->g.k, j->s = a->g.s, j->p = a->g.p;
  j->cols = pl->coff + p->in0;
  j->woff = pl->woff + p->in0;
  j->n = p->n;
  j->rx = p->by_rows ? pl->rx + p->in0 * a->g.k : 0;
  j->rw = p->by_rows ? pl->rw + p->in0 * a->g.k : 0;
  j->rn = a->g.k * p->n;
  j->w = p->gathered ? pl->buf + p->g0 : a->wt.blocked + h * head_w;
  j->wblk = (p->gathered ? p->n : a->wt.rows) * kk * MSGC_BLOCK;
  j->bias = !a->wt.bias ? 0 : hd->ocounts ? pl->buf + p->g0 + gsize : a->wt.bias + (long)h * hd->per_head;
  j->y = a->io.y + p->out0;
  j->ldy = a->io.ldy;
  j->res = a->io.res ? a->io.res + p->out0 : 0;
  j->ldres = a->io.ldres;
  j->m = p->m;
  j->act = a->io.act;
}

static int head_of_item(const conv_plan *pl, long it) {
  int lo = 0, hi = pl->heads - 1;
  while (lo < hi) { /* the last head whose first item is <= it (heads without items share the next's) */
    const int mid = (lo + hi + 1) / 2;
    if (pl->hp[mid].it0 <= it) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

static void tile_wide(const msgc_conv_args *a, const conv_plan *pl, long it) {
  wide_job j;
  if (pl->pixel_major) { /* a block of pixels of one head: every chunk on the same inputs */
    const int h = head_of_item(pl, it);
    const head_plan *p = &pl->hp[h];
    head_job(a, pl, h, &j);
    const int b0 = (int)(it - p->it0) * PIXEL_BLOCK, b1 = b0 + PIXEL_BLOCK < pl->npix ? b0 + PIXEL_BLOCK : pl->npix;
    for (int c = p->ch0; c < p->ch0 + p->nch; c++) {
      const chunk *ch = &pl->ch[c];
      const wide_tile *t = &msgc_wide_tiles[ch->size];
      for (int o0 = b0; o0 < b1; o0 += t->rb) t->fn(&j, o0, b1 - o0 < t->rb ? b1 - o0 : t->rb, ch->j0, 0, p->n, 0);
    }
    return;
  }
  const chunk *ch = &pl->ch[find_chunk(pl, it)];
  const wide_tile *t = &msgc_wide_tiles[ch->size];
  const head_plan *p = &pl->hp[ch->head];
  head_job(a, pl, ch->head, &j);
  if (!ch->kb) { /* one pixel tile, every input entry */
    const long o0 = (it - ch->first) * t->rb;
    t->fn(&j, (int)o0, (int)(pl->npix - o0 < t->rb ? pl->npix - o0 : t->rb), ch->j0, 0, p->n, 0);
    return;
  }
  /* the whole chunk: entries block by block, every pixel tile on a block before the next */
  const int tiles = (pl->npix + t->rb - 1) / t->rb, per = t->rb * t->nv * VL;
  float *part = msgc_scratch(SCRATCH_PARTIAL, sizeof(float) * (size_t)tiles * per);
  const int kb = part ? ch->kb : p->n;  /* without the (small) buffer: every entry at once */
  for (int cb = 0; cb < p->n || cb == 0; cb += kb) {
    const int ce = cb + kb < p->n ? cb + kb : p->n;
    for (int i = 0; i < tiles; i++) {
      const int o0 = i * t->rb;
      t->fn(&j, o0, pl->npix - o0 < t->rb ? pl->npix - o0 : t->rb, ch->j0, cb, ce, part ? part + (long)i * per : 0);
    }
    if (kb <= 0) break;
  }
}

/* ---- the pixel kernel ----------------------------------------------------------------------------- */

static int plan_pixel(const msgc_conv_args *a, conv_plan *pl) {
  const int p = a->g.p;
  pl->Wp = a->g.w + 2 * p;
  pl->plane_len = (long)(a->g.h + 2 * p + 2) * pl->Wp + 64;
  pl->npos = (pl->Ho - 1) * pl->Wp + pl->Wo;
  pl->nq = (pl->npos + msgc_pixel_positions - 1) / msgc_pixel_positions;
  int nch = 0;
  for (int h = 0; h < a->hd.heads; h++)
    for (int j = 0, m = pl->hp[h].m; j < m;) {
      const int rows = msgc_pixel_rows(m - j);
      pl->ch[nch++] = (chunk){h, j, rows, 0, 0};
      j += rows;
    }
  pl->nch = nch;
  pl->items = (long)pl->nq * nch;
  const long nplanes = a->hd.scale ? pl->hp[a->hd.heads - 1].in0 + pl->hp[a->hd.heads - 1].n : a->io.xcols;
  pl->copies = nplanes * pl->plane_len;
  return MSGC_OK;
}

/* plane e: column e of x, or (with attention) input entry e of its head, scaled */
static void gather_pixel(const msgc_conv_args *a, const conv_plan *pl, long e) {
  const float *xc = a->io.x + e;
  float sc = 1.0f;
  if (a->hd.scale) {
    const int h = head_of_entry(pl, e);
    const head_plan *p = &pl->hp[h];
    xc = a->io.x + (a->hd.cols ? a->hd.cols[e] : e - p->in0 + h * a->hd.xstep);
    sc = a->hd.scale[e];
  }
  msgc_make_plane(xc, a->io.ldx, a->g.h, a->g.w, a->g.p, pl->plane_len, sc, pl->buf + e * pl->plane_len);
}

static void tile_pixel(const msgc_conv_args *a, const conv_plan *pl, long it) {
  const msgc_heads *hd = &a->hd;
  const chunk *ch = &pl->ch[it % pl->nch];
  const head_plan *p = &pl->hp[ch->head];
  const int h = ch->head, kk = pl->kk;
  pixel_job j;
  j.planes = hd->scale ? pl->buf + p->in0 * pl->plane_len : pl->buf;
  j.plane_len = pl->plane_len;
  j.Wp = pl->Wp, j.Wo = pl->Wo, j.npos = pl->npos, j.k = a->g.k;
  j.cols = hd->scale ? 0 : hd->cols ? hd->cols + p->in0 : 0;
  j.col0 = hd->scale || hd->cols ? 0 : h * hd->xstep;
  j.wrow = hd->wrow ? hd->wrow + p->in0 : 0;
  j.n = p->n;
  j.w = a->wt.plain + (long)h * hd->per_head * a->wt.rows * kk;
  j.rows = a->wt.rows;
  j.ocols = hd->ocols ? hd->ocols + p->out0 : 0;
  j.bias = a->wt.bias ? a->wt.bias + (long)h * hd->per_head : 0;
  j.y = a->io.y + p->out0;
  j.ldy = a->io.ldy;
  j.res = a->io.res ? a->io.res + p->out0 : 0;
  j.ldres = a->io.ldres;
  j.act = a->io.act;
  msgc_pixel_tile(ch->size)(&j, (int)(it / pl->nch) * msgc_pixel_positions, ch->j0);
}

/* ---- the entry point --------------------------------------------------------------------------------- */

typedef struct {
  const msgc_conv_args *a;
  const conv_plan *pl;
} conv_task;

static void gather_weights_task(void *t, long e) { gather_weights(((conv_task *)t)->a, ((conv_task *)t)->pl, e); }
static void copy_inputs_task(void *t, long i) { copy_inputs(((conv_task *)t)->a, ((conv_task *)t)->pl, i); }
static void gather_pixel_task(void *t, long e) { gather_pixel(((conv_task *)t)->a, ((conv_task *)t)->pl, e); }
static void tile_wide_task(void *t, long it) { tile_wide(((conv_task *)t)->a, ((conv_task *)t)->pl, it); }
static void tile_pixel_task(void *t, long it) { tile_pixel(((conv_task *)t)->a, ((conv_task *)t)->pl, it); }

static long executed_macs(const msgc_conv_args *a, const conv_plan *pl, int pixel) {
  const long hw = (long)a->g.h * a->g.w;
  long macs = 0;
  for (int h = 0; h < pl->heads; h++) {
    const head_plan *p = &pl->hp[h];
    macs += (long)pl->npix * p->m * ((long)p->n * pl->kk + (a->bn != 0));
    if (a->hd.scale && (pixel || p->infold)) macs += hw * p->n;
    else if (a->hd.scale && pl->fixed) macs += (long)p->n * pl->kk * p->m;
  }
  return macs;
}

i32 msgc_conv(const msgc_conv_args *a) { return msgc_conv_part(a, (long)a->g.h * a->g.w, 1); }

i32 msgc_conv_part(const msgc_conv_args *a, long whole_hw, int fixed) {
  const msgc_geom *g = &a->g;
  const msgc_heads *hd = &a->hd;
  if (a->wt.kernel == MSGC_KERNEL_PACKED && hd->heads > 1) return msgc_conv_packed(a, whole_hw, fixed);
  const int pixel = a->wt.kernel == MSGC_KERNEL_PIXEL;  /* else wide (MSGC_KERNEL_GATHER: on copied inputs) */
  conv_plan pl = {0};
  pl.Ho = out_size(g->h, g->k, g->s, g->p);
  pl.Wo = out_size(g->w, g->k, g->s, g->p);
  pl.npix = pl.Ho * pl.Wo;
  pl.kk = g->k * g->k;
  pl.heads = hd->heads;
  pl.whole_hw = whole_hw;
  pl.fixed = fixed;
  pl.pixel_major = !pixel && (a->wt.tiles & MSGC_TILES_PIXEL_MAJOR) != 0;
  if (pl.Ho <= 0 || pl.Wo <= 0 || hd->heads <= 0) return MSGC_OK;
  if (pl.kk > MSGC_MAX_TAPS || (pixel && g->s != 1)) return MSGC_ETOOLARGE;
  /* the plan's arrays: per head, chunks (at most one per VL outputs or output row, plus one), offsets of
     chosen outputs, columns and weight offsets of input entries */
  long n_entries = 0;
  for (int h = 0; h < hd->heads; h++) n_entries += hd->counts ? hd->counts[h] : hd->in_channels;
  const long max_chunks = (long)hd->heads * (hd->per_head + 1);
  const size_t bytes = sizeof(head_plan) * (hd->heads + 1) + sizeof(chunk) * max_chunks +
                       sizeof(long) * ((long)hd->heads * hd->per_head + 1 + n_entries * (1 + 2 * g->k)) +
                       sizeof(int) * (n_entries + 1);
  char *mem = msgc_scratch(SCRATCH_PLAN, bytes);
  if (!mem) return MSGC_ENOMEM;
  pl.hp = (head_plan *)mem;
  pl.ch = (chunk *)(pl.hp + hd->heads + 1);
  pl.off = (long *)(pl.ch + max_chunks);
  pl.woff = pl.off + (long)hd->heads * hd->per_head + 1;
  pl.rx = pl.woff + n_entries;
  pl.rw = pl.rx + n_entries * g->k;
  pl.coff = (int *)(pl.rw + n_entries * g->k);
  const int outputs = plan_heads(a, &pl);
  if (pixel) plan_pixel(a, &pl);
  else plan_wide(a, &pl);
  if (!pixel && hd->ocounts)
    for (long e = 0; e < outputs; e++)
      pl.off[e] = (long)(hd->ocols[e] / MSGC_BLOCK) * a->wt.rows * pl.kk * MSGC_BLOCK + hd->ocols[e] % MSGC_BLOCK;
  if (pl.copies) {
    pl.buf = msgc_scratch(SCRATCH_GATHER, (size_t)pl.copies * sizeof(float));
    if (!pl.buf) return MSGC_ENOMEM;
    if (!pixel && a->wt.bias && hd->ocounts) /* each head's chosen biases follow its gathered weights */
      for (int h = 0; h < hd->heads; h++) {
        const head_plan *p = &pl.hp[h];
        float *b = pl.buf + p->g0 + blocks16(p->m) * MSGC_BLOCK * p->n * pl.kk;
        for (int j = 0; j < p->m; j++) b[j] = a->wt.bias[(long)h * hd->per_head + hd->ocols[p->out0 + j]];
      }
  }
  const long entries = pixel && !hd->scale ? a->io.xcols : pl.hp[hd->heads - 1].in0 + pl.hp[hd->heads - 1].n;
  const long work = (long)pl.npix * outputs * (entries + 1) * pl.kk;
  const int nt = a->nthreads > 1 && work > (1 << 15) ? a->nthreads : 1;
  conv_task task = {a, &pl};
  if (pixel) {
    msgc_parallel(gather_pixel_task, &task, entries, nt);
  } else {
    int gathered = 0, infold = 0;
    for (int h = 0; h < hd->heads; h++) gathered |= pl.hp[h].gathered, infold |= pl.hp[h].infold;
    if (gathered) msgc_parallel(gather_weights_task, &task, entries, nt);
    if (infold) msgc_parallel(copy_inputs_task, &task, ((long)g->h * g->w + 63) / 64, nt);
  }
  msgc_parallel(pixel ? tile_pixel_task : tile_wide_task, &task, pl.items, nt);
  if (a->executed) *a->executed += executed_macs(a, &pl, pixel);
  return MSGC_OK;
}
