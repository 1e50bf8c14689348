/* Gathered convolution kernels of msgc.deploy (CPU, float32, one sample, channels-last).
 *
 * A feature map is an HW x C row-major matrix (row stride ldx >= C). A gated head reads a subset of
 * the input channels (idx) and computes ncol output channels. Weights are stored in blocks of 16 output
 * channels, input channel and tap inside (oneDNN calls this layout "Ohwi16o"-like: blocks x rows x taps
 * x 16), so that an open channel's weights for a block are one contiguous run: the kernel reads the
 * open channels' weights where they lie, without copying them, and the open input channels of each
 * pixel by index. Nothing is computed for closed channels.
 *
 * The inner loop keeps a tile of RB output pixels x (16*VB) output channels in vector registers
 * (GCC vector extensions: AVX-512 where the CPU has it, two AVX2 halves otherwise) and, for every
 * (tap, open channel), broadcasts RB input values against VB weight vectors.
 *
 * Built at run time by msgc/deploy/native.py with the machine's C compiler (-O3 -march=native
 * -fopenmp); parallel over tiles with OpenMP (the runtime PyTorch already loaded).
 */
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));

/* Out-of-image taps read zeros from here (longer than any row of channels read). */
static const float ZEROS[1 << 17];

#define MAX_TAPS 49

static inline v16 zero16(void) {
  const v16 z = {0};
  return z;
}

/* Activations fused into the stores: 0 none, 1 ReLU, 2 ReLU6 (clamp to [0, 6]). */
typedef int v16i __attribute__((vector_size(64)));

static inline v16 activate(v16 a, int act) { /* with lane masks: a loop over lanes would not vectorise */
  if (act) {
    const v16 zero = {0};
    a = (v16)((v16i)a & (a > zero));
  }
  if (act == 2) {
    const v16 six = zero16() + 6.0f;
    const v16i low = a < six;
    a = (v16)(((v16i)a & low) | ((v16i)six & ~low));
  }
  return a;
}

static inline float activate1(float a, int act) {
  if (act) a = a > 0 ? a : 0;
  if (act == 2) a = a < 6 ? a : 6;
  return a;
}

#define DEFINE_TILE(VB, RB)                                                                            \
  static void tile_##VB(const float *x, long ldx, int H, int W, int Wo, int k, int s, int p,         \
                        const int *idx, const int *wrow, int n, const float *w, long wblk,           \
                        const float *bias, float *y, long ldy, const float *res, long ldres, int o0, \
                        int npix, int j0, int ncol, int act) {                                       \
    const int kk = k * k;                                                                            \
    v16 acc[RB][VB];                                                                                 \
    for (int v = 0; v < VB; v++) {                                                                   \
      v16 b = {0};                                                                                   \
      if (bias)                                                                                      \
        for (int l = 0; l < 16 && j0 + 16 * v + l < ncol; l++) b[l] = bias[j0 + 16 * v + l];        \
      for (int r = 0; r < RB; r++) acc[r][v] = b;                                                    \
    }                                                                                                \
    /* the taps that touch the image for some pixel of the tile, and each pixel's input there */     \
    const float *px[MAX_TAPS][RB];                                                                   \
    int taps[MAX_TAPS], nt = 0;                                                                      \
    for (int t = 0; t < kk; t++) {                                                                   \
      int any = 0;                                                                                   \
      for (int r = 0; r < RB; r++) {                                                                 \
        int o = o0 + r, oy = o / Wo, ox = o % Wo;                                                    \
        int iy = oy * s - p + t / k, ix = ox * s - p + t % k;                                        \
        int inside = r < npix && iy >= 0 && iy < H && ix >= 0 && ix < W;                            \
        px[nt][r] = inside ? x + ((long)iy * W + ix) * ldx : ZEROS;                                  \
        any |= inside;                                                                               \
      }                                                                                              \
      if (any) taps[nt++] = t;                                                                       \
    }                                                                                                \
    const float *wb = w + (long)(j0 / 16) * wblk;                                                    \
    for (int c = 0; c < n; c++) {                                                                    \
      const int ci = idx ? idx[c] : c;                                                               \
      const float *wc = wb + (long)(wrow ? wrow[c] : c) * kk * 16;                                   \
      for (int q = 0; q < nt; q++) {                                                                 \
        const float *wp = wc + taps[q] * 16;                                                         \
        v16 wv[VB];                                                                                  \
        for (int v = 0; v < VB; v++) wv[v] = *(const v16 *)(wp + v * wblk);                          \
        for (int r = 0; r < RB; r++) {                                                               \
          const float xv = px[q][r][ci];                                                             \
          for (int v = 0; v < VB; v++) acc[r][v] += xv * wv[v];                                      \
        }                                                                                            \
      }                                                                                              \
    }                                                                                                \
    for (int r = 0; r < npix; r++) {                                                                 \
      float *yp = y + (long)(o0 + r) * ldy + j0;                                                     \
      const float *rp = res ? res + (long)(o0 + r) * ldres + j0 : 0;                                 \
      for (int v = 0; v < VB; v++) {                                                                 \
        const int m = ncol - j0 - 16 * v;                                                            \
        if (m <= 0) break;                                                                           \
        v16 a = acc[r][v];                                                                           \
        if (rp) {                                                                                    \
          if (m >= 16) a += *(const v16 *)(rp + 16 * v);                                             \
          else for (int l = 0; l < m; l++) a[l] += rp[16 * v + l];                                   \
        }                                                                                            \
        a = activate(a, act);                                                                        \
        if (m >= 16) *(v16 *)(yp + 16 * v) = a;                                                      \
        else memcpy(yp + 16 * v, &a, m * sizeof(float));                                            \
      }                                                                                              \
    }                                                                                                \
  }

/* tile sizes: VB vectors of 16 output channels x RB pixels (measured on AVX-512: 24 accumulators
   for 64 channels, 24 for 32, 16 for 16) */
DEFINE_TILE(4, 6)
DEFINE_TILE(2, 12)
DEFINE_TILE(1, 16)

static const int TILE_PIXELS[5] = {0, 16, 12, 0, 6};

/* the tile of vb vectors of outputs (4, 2 or 1) */
static inline void run_tile(int vb, const float *x, long ldx, int H, int W, int Wo, int k, int s, int p,
                            const int *idx, const int *wrow, int n, const float *w, long wblk, const float *bias,
                            float *y, long ldy, const float *res, long ldres, int o0, int npix, int j0, int ncol,
                            int act) {
  if (vb == 4)
    tile_4(x, ldx, H, W, Wo, k, s, p, idx, wrow, n, w, wblk, bias, y, ldy, res, ldres, o0, npix, j0, ncol, act);
  else if (vb == 2)
    tile_2(x, ldx, H, W, Wo, k, s, p, idx, wrow, n, w, wblk, bias, y, ldy, res, ldres, o0, npix, j0, ncol, act);
  else
    tile_1(x, ldx, H, W, Wo, k, s, p, idx, wrow, n, w, wblk, bias, y, ldy, res, ldres, o0, npix, j0, ncol, act);
}

#define MAX_CHUNKS 4096

/* y[o, j] = act(bias[j] + sum_{c < n} sum_{taps} x[in(o, tap), idx[c]] * W[j, wrow[c], tap] + res[o, j]) for every
 * output pixel o of a k x k, stride s, zero-padding p convolution of the H x W input and j < ncol.
 * W is stored in blocks of 16 output channels: W[j, r, t] = w[(((j / 16) * rows + r) * k*k + t) * 16 + j % 16]
 * (the last block zero-padded). idx NULL: channel c of x; wrow NULL: weight row c.
 * Returns 0, or -1 if ncol is too large. */
int msgc_gconv(const float *x, long ldx, int H, int W, int k, int s, int p, const int *idx,
               const int *wrow, int n, const float *w, long rows, const float *bias, float *y, long ldy,
               const float *res, long ldres, int ncol, int act, int nthreads) {
  const int Ho = (H + 2 * p - k) / s + 1, Wo = (W + 2 * p - k) / s + 1, npix = Ho * Wo;
  if (Ho <= 0 || Wo <= 0 || ncol <= 0) return 0;
  if (ncol > 64 * (MAX_CHUNKS - 2) || k * k > MAX_TAPS) return -1;
  const long wblk = rows * k * k * 16;
  const int *RBS = TILE_PIXELS;
  int j0[MAX_CHUNKS], vb[MAX_CHUNKS], first[MAX_CHUNKS + 1], nch = 0, j = 0, total = 0;
  while (ncol - j > 32) { j0[nch] = j; vb[nch++] = 4; j += 64; }
  if (ncol - j > 16) { j0[nch] = j; vb[nch++] = 2; j += 32; }
  if (ncol - j > 0) { j0[nch] = j; vb[nch++] = 1; }
  for (int c = 0; c < nch; c++) {
    first[c] = total;
    total += (npix + RBS[vb[c]] - 1) / RBS[vb[c]];
  }
  first[nch] = total;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && total > 1)
  for (int it = 0; it < total; it++) {
    int c = 0;
    while (first[c + 1] <= it) c++;
    const int rb = RBS[vb[c]], o0 = (it - first[c]) * rb, np = npix - o0 < rb ? npix - o0 : rb;
    run_tile(vb[c], x, ldx, H, W, Wo, k, s, p, idx, wrow, n, w, wblk, bias, y, ldy, res, ldres, o0, np, j0[c], ncol,
             act);
  }
  return 0;
}

/* ---- every head of a convolution in one call --------------------------------------------------------
 * Head h reads counts[h] input channels (counts NULL: in_channels each): columns cols[...] of x and
 * weight rows wrow[...] (flat, head after head; NULL: 0, 1, ... for each head), scaled by the
 * attention scale[...] (flat likewise; NULL: none), and computes ocounts[h] of its per_head outputs
 * (ocounts NULL: all): output channels ocols[...] within the head (flat, head after head). Head h's
 * weights are w + h * (ceil(per_head / 16) * rows * k*k * 16) (the blocked layout above), its bias
 * bias + h * per_head. Outputs go side by side: head h's first column is the sum of the previous
 * heads' output counts; res (if not NULL) is added there before act.
 * A head's attention is folded into whichever is smaller: its inputs (a scaled copy of its columns,
 * where k*k * outputs > H * W) or its gathered weights. Where outputs are chosen or the attention goes
 * into the weights, the head's weights are first gathered; copies go to a per-thread buffer that
 * grows as needed, made by all threads together, then one parallel loop runs every head's tiles.
 * Returns 0, -1 if a kernel is too large, -2 if the buffer cannot be allocated. */
static __thread float *gather_buf = 0;
static __thread size_t gather_cap = 0;

static float *scratch(float **buf, size_t *cap, size_t need) {
  if (need > *cap) {
    free(*buf);
    *cap = need + need / 4;
    *buf = malloc(*cap * sizeof(float));
    if (!*buf) *cap = 0;
  }
  return *buf;
}

int msgc_gconv_heads(const float *x, long ldx, int H, int W, int k, int s, int p, int heads,
                     const int *counts, int in_channels, const int *cols, const int *wrow, const float *scale,
                     const int *ocounts, const int *ocols, int per_head, const float *w, long rows,
                     const float *bias, float *y, long ldy, const float *res, long ldres, int act,
                     int nthreads) {
  const int Ho = (H + 2 * p - k) / s + 1, Wo = (W + 2 * p - k) / s + 1, npix = Ho * Wo, kk = k * k;
  if (Ho <= 0 || Wo <= 0 || heads <= 0) return 0;
  if (kk > MAX_TAPS || per_head > 64 * (MAX_CHUNKS - 2)) return -1;
  const long head_w = (long)((per_head + 15) / 16) * rows * kk * 16, hw = (long)H * W;
  /* per head: its inputs and outputs, whether attention goes into the inputs (infold) and whether
     its weights are gathered, and where its copies lie in the buffer */
  long in0[heads + 1], out0[heads + 1], g0[heads + 1];
  char infold[heads], gathered[heads];
  in0[0] = out0[0] = g0[0] = 0;
  for (int h = 0; h < heads; h++) {
    const int n = counts ? counts[h] : in_channels, m = ocounts ? ocounts[h] : per_head;
    infold[h] = scale && (long)kk * m > hw;
    gathered[h] = ocounts || (scale && !infold[h]);
    in0[h + 1] = in0[h] + n;
    out0[h + 1] = out0[h] + m;
    g0[h + 1] = g0[h] + (gathered[h] ? (long)((m + 15) / 16) * 16 * n * kk + m : 0) + (infold[h] ? hw * n : 0);
  }
  float *buf = 0;
  if (g0[heads]) {
    buf = scratch(&gather_buf, &gather_cap, (size_t)g0[heads]);
    if (!buf) return -2;
    if (bias && ocounts) /* each head's chosen biases follow its gathered weights */
      for (int h = 0; h < heads; h++) {
        const long m = out0[h + 1] - out0[h], n = in0[h + 1] - in0[h];
        for (long j = 0; j < m; j++)
          buf[g0[h] + ((m + 15) / 16) * 16 * n * kk + j] = bias[(long)h * per_head + ocols[out0[h] + j]];
      }
  }
  /* where each chosen output lies relative to a (row, tap) of its head's block 0 */
  long off[ocounts ? out0[heads] + 1 : 1];
  for (long j = 0; ocounts && j < out0[heads]; j++) off[j] = (long)(ocols[j] / 16) * rows * kk * 16 + ocols[j] % 16;
  /* work items: the tiles of every head's chunks of 64/32/16 outputs */
  const int max_chunks = heads * ((per_head + 15) / 16 + 2);
  int hd[max_chunks], j0[max_chunks], vb[max_chunks], first[max_chunks + 1], nch = 0, total = 0;
  for (int h = 0; h < heads; h++) {
    const int m = (int)(out0[h + 1] - out0[h]);
    for (int j = 0; j < m; j += 16 * vb[nch++]) {
      hd[nch] = h;
      j0[nch] = j;
      vb[nch] = m - j > 32 ? 4 : m - j > 16 ? 2 : 1;
      first[nch] = total;
      total += (npix + TILE_PIXELS[vb[nch]] - 1) / TILE_PIXELS[vb[nch]];
    }
  }
  first[nch] = total;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    if (buf) { /* the copies: gathered (scaled) weights, scaled inputs */
#pragma omp for schedule(static)
      for (long e = 0; e < in0[heads]; e++) {
        int h = 0;
        while (in0[h + 1] <= e) h++;
        const int n = (int)(in0[h + 1] - in0[h]), m = (int)(out0[h + 1] - out0[h]), c = (int)(e - in0[h]);
        float *dst = buf + g0[h];
        if (gathered[h]) {
          const float sc = scale && !infold[h] ? scale[e] : 1.0f;
          const float *src = w + h * head_w + (long)(wrow ? wrow[e] : c) * kk * 16;
          for (int b = 0; b < (m + 15) / 16; b++)
            for (int t = 0; t < kk; t++) {
              float *d = dst + (((long)b * n + c) * kk + t) * 16;
              const float *st = src + t * 16;
              if (ocounts) {
                const long *o = off + out0[h] + 16 * b;
                for (int l = 0; l < 16; l++) d[l] = 16 * b + l < m ? st[o[l]] * sc : 0.0f;
              } else { /* all outputs, attention into the weights: a scaled copy of whole blocks */
                const float *sb = st + (long)b * rows * kk * 16;
                for (int l = 0; l < 16; l++) d[l] = sb[l] * sc;
              }
            }
          dst += (long)((m + 15) / 16) * 16 * n * kk + m;
        }
        if (infold[h]) {
          const float *xc = x + (cols ? cols[e] : c);
          const float sc = scale[e];
          for (long q = 0; q < hw; q++) dst[q * n + c] = xc[q * ldx] * sc;
        }
      }
    }
#pragma omp for schedule(static)
    for (int it = 0; it < total; it++) {
      int c = 0;
      while (first[c + 1] <= it) c++;
      const int h = hd[c], rb = TILE_PIXELS[vb[c]], o0 = (it - first[c]) * rb;
      const int np = npix - o0 < rb ? npix - o0 : rb;
      const int n = (int)(in0[h + 1] - in0[h]), m = (int)(out0[h + 1] - out0[h]);
      const long gsize = gathered[h] ? (long)((m + 15) / 16) * 16 * n * kk : 0;
      const float *xh = infold[h] ? buf + g0[h] + gsize + (gathered[h] ? m : 0) : x;
      const long ldxh = infold[h] ? n : ldx;
      const int *ci = infold[h] ? 0 : cols ? cols + in0[h] : 0;
      const int *wr = gathered[h] ? 0 : wrow ? wrow + in0[h] : 0;
      const float *wh = gathered[h] ? buf + g0[h] : w + h * head_w;
      const float *bh = !bias ? 0 : ocounts ? buf + g0[h] + gsize : bias + (long)h * per_head;
      run_tile(vb[c], xh, ldxh, H, W, Wo, k, s, p, ci, wr, n, wh, (gathered[h] ? n : rows) * kk * 16, bh,
               y + out0[h], ldy, res ? res + out0[h] : 0, ldres, o0, np, j0[c], m, act);
    }
  }
  return 0;
}

/* ---- narrow heads: vectorised over output pixels ----------------------------------------------------
 * A head with few output channels (MobileNetV2's projections, DenseNet's growth-rate convolutions,
 * a ResNet-50 layer1 head's kept outputs) fills few of a vector's 16 lanes when vectorised over output
 * channels. For stride-1 convolutions these kernels vectorise over 16 output pixels instead, reading a
 * planar, zero-padded copy of the input (channel planes of (H + 2p) x (W + 2p), at least 2 * (W + 2p)
 * + 64 zeros after each; output pixel (oy, ox) at q = oy * (W + 2p) + ox, so a tap is a constant shift
 * of q), and broadcast one weight per output channel: outputs can be any chosen rows of the weights
 * (no gather).
 * Weights are the plain (out, rows, k*k) layout. Lanes that fall on the padding columns are computed
 * and dropped. */

#define PV 3 /* pixel vectors per tile: 48 output positions */
#define DEFINE_PTILE(RB)                                                                               \
  static void ptile_##RB(const float *planes, long plane_len, int Wp, int Wo, int npos, int k,        \
                         const int *idx, const int *wrow, int n, const float *w, long wrows,          \
                         const int *ocols, const float *bias, float *y, long ldy, const float *res,   \
                         long ldres, int q0, int j0, int act) {                                       \
    const int kk = k * k;                                                                            \
    v16 acc[RB][PV];                                                                                  \
    const float *wj[RB];                                                                             \
    for (int r = 0; r < RB; r++) {                                                                   \
      const int o = ocols ? ocols[j0 + r] : j0 + r;                                                  \
      wj[r] = w + (long)o * wrows * kk;                                                              \
      const float b = bias ? bias[o] : 0.0f;                                                         \
      for (int v = 0; v < PV; v++)                                                                    \
        for (int l = 0; l < 16; l++) acc[r][v][l] = b;                                               \
    }                                                                                                \
    for (int c = 0; c < n; c++) {                                                                    \
      const float *pl = planes + (long)(idx ? idx[c] : c) * plane_len + q0;                          \
      const long wo = (long)(wrow ? wrow[c] : c) * kk;                                               \
      for (int t = 0; t < kk; t++) {                                                                 \
        const float *xp = pl + (t / k) * Wp + t % k;                                                 \
        v16 xv[PV];                                                                                  \
        for (int v = 0; v < PV; v++) xv[v] = *(const v16 *)(xp + 16 * v);                            \
        for (int r = 0; r < RB; r++) {                                                               \
          const float wv = wj[r][wo + t];                                                            \
          for (int v = 0; v < PV; v++) acc[r][v] += xv[v] * wv;                                      \
        }                                                                                            \
      }                                                                                              \
    }                                                                                                \
    for (int v = 0; v < PV; v++)                                                                      \
      for (int l = 0; l < 16; l++) {                                                                 \
        const int q = q0 + 16 * v + l, ox = q % Wp;                                                  \
        if (q >= npos || ox >= Wo) continue;                                                         \
        const long o = (long)(q / Wp) * Wo + ox;                                                     \
        float *yp = y + o * ldy + j0;                                                                \
        const float *rp = res ? res + o * ldres + j0 : 0;                                            \
        for (int r = 0; r < RB; r++) yp[r] = activate1(rp ? acc[r][v][l] + rp[r] : acc[r][v][l], act); \
      }                                                                                              \
  }
DEFINE_PTILE(8)
DEFINE_PTILE(6)
DEFINE_PTILE(4)
DEFINE_PTILE(2)
DEFINE_PTILE(1)

/* output channels per pixel tile: 8 (24 accumulators), 6, 4, 2 or 1 */
static int ptile_rows(int left) { return left >= 8 ? 8 : left >= 6 ? 6 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

/* Every head of a narrow stride-1 convolution in one call: the C columns of x (HW x C, row stride ldx)
 * become planes in a per-thread buffer (with attention: each head's columns, scaled, as its own
 * planes), then one parallel loop runs every head's tiles. Heads as in msgc_gconv_heads (counts, cols,
 * wrow, scale, ocounts, ocols flat, head after head; NULL: all / 0, 1, ... / none); head h's weights are
 * w + h * per_head * rows * k*k (the plain layout), its bias bias + h * per_head (indexed by output
 * channel). Returns 0, or -2 if the buffer cannot be allocated. */
static __thread float *plane_buf = 0;
static __thread size_t plane_cap = 0;

int msgc_gconv_px_heads(const float *x, long ldx, int H, int W, int C, int k, int p, int heads,
                        const int *counts, int in_channels, const int *cols, const int *wrow, const float *scale,
                        const int *ocounts, const int *ocols, int per_head, const float *w, long rows,
                        const float *bias, float *y, long ldy, const float *res, long ldres, int act,
                        int nthreads) {
  const int Wp = W + 2 * p, Ho = H + 2 * p - k + 1, Wo = W + 2 * p - k + 1, kk = k * k;
  if (Ho <= 0 || Wo <= 0 || heads <= 0) return 0;
  const long plane_len = (long)(H + 2 * p + 2) * Wp + 64;
  const int npos = (Ho - 1) * Wp + Wo, nq = (npos + 16 * PV - 1) / (16 * PV);
  long in0[heads + 1], out0[heads + 1];
  in0[0] = out0[0] = 0;
  for (int h = 0; h < heads; h++) {
    in0[h + 1] = in0[h] + (counts ? counts[h] : in_channels);
    out0[h + 1] = out0[h] + (ocounts ? ocounts[h] : per_head);
  }
  /* without attention the heads share the planes of x's C columns; with it every head reads its own
     scaled planes, one per input entry */
  const long nplanes = scale ? in0[heads] : C;
  float *planes = scratch(&plane_buf, &plane_cap, (size_t)nplanes * plane_len);
  if (!planes) return -2;
  const int max_chunks = heads * per_head;
  int hd[max_chunks + 1], j0[max_chunks + 1], rb[max_chunks + 1], nch = 0;
  for (int h = 0; h < heads; h++)
    for (int j = 0, m = (int)(out0[h + 1] - out0[h]); j < m; j += rb[nch++]) {
      hd[nch] = h;
      j0[nch] = j;
      rb[nch] = ptile_rows(m - j);
    }
  const int total = nq * nch;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
#pragma omp for schedule(static)
    for (long e = 0; e < nplanes; e++) {
      float *pl = planes + e * plane_len;
      const float *xc = x + e;
      float sc = 1.0f;
      if (scale) { /* entry e of head h: column cols[e] (or e - in0[h]), times its attention */
        int h = 0;
        while (in0[h + 1] <= e) h++;
        xc = x + (cols ? cols[e] : e - in0[h]);
        sc = scale[e];
      }
      memset(pl, 0, plane_len * sizeof(float));
      for (int yy = 0; yy < H; yy++)
        for (int xx = 0; xx < W; xx++) pl[(long)(yy + p) * Wp + xx + p] = xc[((long)yy * W + xx) * ldx] * sc;
    }
#pragma omp for schedule(static)
    for (int it = 0; it < total; it++) {
      const int c = it % nch, q0 = (it / nch) * 16 * PV, h = hd[c];
      const int n = (int)(in0[h + 1] - in0[h]);
      const int *ci = scale ? 0 : cols ? cols + in0[h] : 0, *wr = wrow ? wrow + in0[h] : 0;
      const float *hp = scale ? planes + in0[h] * plane_len : planes;
      const int *oc = ocols ? ocols + out0[h] : 0;
      const float *wh = w + (long)h * per_head * rows * kk, *bh = bias ? bias + (long)h * per_head : 0;
      float *yh = y + out0[h];
      const float *rh = res ? res + out0[h] : 0;
      if (rb[c] == 8)
        ptile_8(hp, plane_len, Wp, Wo, npos, k, ci, wr, n, wh, rows, oc, bh, yh, ldy, rh, ldres, q0, j0[c], act);
      else if (rb[c] == 6)
        ptile_6(hp, plane_len, Wp, Wo, npos, k, ci, wr, n, wh, rows, oc, bh, yh, ldy, rh, ldres, q0, j0[c], act);
      else if (rb[c] == 4)
        ptile_4(hp, plane_len, Wp, Wo, npos, k, ci, wr, n, wh, rows, oc, bh, yh, ldy, rh, ldres, q0, j0[c], act);
      else if (rb[c] == 2)
        ptile_2(hp, plane_len, Wp, Wo, npos, k, ci, wr, n, wh, rows, oc, bh, yh, ldy, rh, ldres, q0, j0[c], act);
      else
        ptile_1(hp, plane_len, Wp, Wo, npos, k, ci, wr, n, wh, rows, oc, bh, yh, ldy, rh, ldres, q0, j0[c], act);
    }
  }
  return 0;
}

/* ---- gates ------------------------------------------------------------------------------------------
 * A block's generators on one sample: the context (the mean of the block's input over its pixels), the
 * first 1x1 convolutions of every generator stacked into one matrix (BatchNorm folded, then ReLU), and
 * each generator's second convolution on its own slice of the hidden units. These are matrix-vector
 * products, bound by reading the weights (ResNet-50 reads 43 MB of them per image): parallel over rows,
 * one pass over each weight row. */

static float dot(const float *a, const float *b, int n) {
  v16 s0 = {0}, s1 = {0};
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 += *(const v16 *)(a + i) * *(const v16 *)(b + i);
    s1 += *(const v16 *)(a + i + 16) * *(const v16 *)(b + i + 16);
  }
  for (; i + 16 <= n; i += 16) s0 += *(const v16 *)(a + i) * *(const v16 *)(b + i);
  s0 += s1;
  float s = 0.0f;
  for (int l = 0; l < 16; l++) s += s0[l];
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* ctx[c] = mean over the hw rows of x (row stride ldx) of column c, for c < C (partial sums of 64 rows
 * in float, added up in double); hidden[r] = relu(b1[r] + w1[r, :] . ctx) for r < nh; then for every
 * generator g, desc[g] = (rows, first hidden unit, hidden units, first output, first weight):
 * out[o + j] = b2[o + j] + w2[w + j * units : ...] . hidden[h0 : h0 + units] for j < rows.
 * ctx and hidden are scratch of C and nh floats. */
void msgc_generators(const float *x, long ldx, int hw, int C, const float *w1, const float *b1, int nh,
                     int ngen, const long *desc, const float *w2, const float *b2, float *ctx, float *hidden,
                     float *out, int nthreads) {
  long work = (long)hw * C + (long)nh * C;
  for (int g = 0; g < ngen; g++) work += desc[5 * g] * desc[5 * g + 2];
  const int nblk = (C + 15) / 16;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && work > 65536)
  {
#pragma omp for schedule(static)
    for (int b = 0; b < nblk; b++) {
      const int c0 = 16 * b, m = C - c0 < 16 ? C - c0 : 16;
      double total[16] = {0};
      for (int r0 = 0; r0 < hw; r0 += 64) {
        const int r1 = r0 + 64 < hw ? r0 + 64 : hw;
        if (m == 16) {
          v16 part = {0};
          for (int r = r0; r < r1; r++) part += *(const v16 *)(x + (long)r * ldx + c0);
          for (int l = 0; l < 16; l++) total[l] += part[l];
        } else {
          float part[16] = {0};
          for (int r = r0; r < r1; r++)
            for (int l = 0; l < m; l++) part[l] += x[(long)r * ldx + c0 + l];
          for (int l = 0; l < m; l++) total[l] += part[l];
        }
      }
      for (int l = 0; l < m; l++) ctx[c0 + l] = (float)(total[l] / hw);
    }
#pragma omp for schedule(static)
    for (int r = 0; r < nh; r++) {
      const float v = b1[r] + dot(w1 + (long)r * C, ctx, C);
      hidden[r] = v > 0.0f ? v : 0.0f;
    }
    for (int g = 0; g < ngen; g++) {
      const long *d = desc + 5 * g;
      const int rows = (int)d[0], units = (int)d[2];
      const float *hg = hidden + d[1], *wg = w2 + d[4];
      float *og = out + d[3];
      const float *bg = b2 + d[3];
#pragma omp for schedule(static) nowait
      for (int j = 0; j < rows; j++) og[j] = bg[j] + dot(wg + (long)j * units, hg, units);
    }
  }
}

/* A heads x C gate matrix (logits, row stride C; a channel is open where its logit is >= 0, as
 * Gate.forward decides in eval mode) -> the index sets the kernels run on:
 * counts[h]: head h's open channels; idx: every head's open channels in ascending order, head after
 * head; vals (if att is not NULL): att[h * C + c] for each entry of idx; uni: the channels some head
 * reads, ascending; pos (if not NULL): each idx entry's position within uni. Returns the size of uni,
 * also written to counts[heads]. */
int msgc_head_sets(const float *logits, int heads, int C, const float *att, int *counts, int *idx,
                   float *vals, int *uni, int *pos) {
  int where[C];
  for (int c = 0; c < C; c++) where[c] = -1;
  int n = 0;
  for (int h = 0; h < heads; h++) {
    const float *lh = logits + (long)h * C;
    const int start = n;
    for (int c = 0; c < C; c++)
      if (lh[c] >= 0.0f) {
        if (att) vals[n] = att[(long)h * C + c];
        idx[n++] = c;
        where[c] = 0;
      }
    counts[h] = n - start;
  }
  int nu = 0;
  for (int c = 0; c < C; c++)
    if (where[c] == 0) {
      where[c] = nu;
      uni[nu++] = c;
    }
  if (pos)
    for (int i = 0; i < n; i++) pos[i] = where[idx[i]];
  counts[heads] = nu;
  return nu;
}

/* ---- depthwise ---------------------------------------------------------------------------------------
 * y[o, c] = act(bias[c] + sum_{taps} x[in(o, tap), c] * w[tap * C + c]) for the C columns of x (a k x k
 * depthwise convolution, stride s, zero padding p; weights tap-major, so that 16 neighbouring channels
 * are one vector). MobileNetV2 runs it on the hidden channels that some projection head reads: a new
 * channel count for every sample, which costs oneDNN a new kernel each time. Kernels up to 3x3. */
static inline v16 load_part(const float *p, int m) { /* m <= 16 floats, the rest zero */
  if (m == 16) return *(const v16 *)p;
  v16 v = {0};
  memcpy(&v, p, m * sizeof(float));
  return v;
}

/* One output row oy, channels c0 .. c0 + m - 1 (m <= 16), of a depthwise k x k convolution: the taps'
 * weight vectors stay in registers (k <= 3) while four output pixels at a time accumulate. */
static inline __attribute__((always_inline)) void dw_row(
    const float *x, long ldx, int H, int W, int C, const int k, const int s, int p, const float *w,
    const float *bias, float *y, long ldy, int Wo, int oy, int c0, int m, int act) {
  v16 wv[9], b = {0};
  for (int t = 0; t < k * k; t++) wv[t] = load_part(w + (long)t * C + c0, m);
  if (bias) b = load_part(bias + c0, m);
  for (int ox0 = 0; ox0 < Wo; ox0 += 4) {
    const int nr = Wo - ox0 < 4 ? Wo - ox0 : 4;
    v16 acc[4] = {b, b, b, b};
    if (m == 16 && nr == 4 && ox0 * s - p >= 0 && (ox0 + 3) * s - p + k <= W) { /* inside: no checks */
      for (int ky = 0; ky < k; ky++) {
        const int iy = oy * s - p + ky;
        if (iy < 0 || iy >= H) continue;
        const float *xp = x + ((long)iy * W + ox0 * s - p) * ldx + c0;
        for (int kx = 0; kx < k; kx++)
          for (int r = 0; r < 4; r++) acc[r] += *(const v16 *)(xp + (long)(r * s + kx) * ldx) * wv[ky * k + kx];
      }
      for (int r = 0; r < 4; r++) *(v16 *)(y + ((long)oy * Wo + ox0 + r) * ldy + c0) = activate(acc[r], act);
      continue;
    }
    for (int ky = 0; ky < k; ky++) {
      const int iy = oy * s - p + ky;
      if (iy < 0 || iy >= H) continue;
      const float *row = x + (long)iy * W * ldx + c0;
      for (int kx = 0; kx < k; kx++) {
        const v16 wk = wv[ky * k + kx];
        for (int r = 0; r < 4; r++) {
          const int ix = (ox0 + r) * s - p + kx;
          if (r < nr && ix >= 0 && ix < W) acc[r] += load_part(row + (long)ix * ldx, m) * wk;
        }
      }
    }
    for (int r = 0; r < nr; r++) {
      const v16 a = activate(acc[r], act);
      float *yp = y + ((long)oy * Wo + ox0 + r) * ldy + c0;
      if (m == 16) *(v16 *)yp = a;
      else memcpy(yp, &a, m * sizeof(float));
    }
  }
}

/* Returns 0, or -1 for a kernel larger than 3x3. */
int msgc_dwconv(const float *x, long ldx, int H, int W, int C, int k, int s, int p, const float *w,
                const float *bias, float *y, long ldy, int act, int nthreads) {
  const int Ho = (H + 2 * p - k) / s + 1, Wo = (W + 2 * p - k) / s + 1;
  if (k > 3) return -1;
  if (Ho <= 0 || Wo <= 0 || C <= 0) return 0;
  const int nb = (C + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && (long)Ho * Wo * C > 16384)
  for (int it = 0; it < Ho * nb; it++) {
    /* the last block of a partial 16 overlaps its neighbour (the same values written twice): whole
       vectors are much faster than partial ones */
    const int oy = it / nb, c0 = C >= 16 && 16 * (it % nb) > C - 16 ? C - 16 : 16 * (it % nb);
    const int m = C - c0 < 16 ? C - c0 : 16;
    if (k == 3 && s == 1) /* constants: the tap loops unroll */
      dw_row(x, ldx, H, W, C, 3, 1, p, w, bias, y, ldy, Wo, oy, c0, m, act);
    else if (k == 3 && s == 2)
      dw_row(x, ldx, H, W, C, 3, 2, p, w, bias, y, ldy, Wo, oy, c0, m, act);
    else
      dw_row(x, ldx, H, W, C, k, s, p, w, bias, y, ldy, Wo, oy, c0, m, act);
  }
  return 0;
}
