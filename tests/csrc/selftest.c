/* A self-test of msgc.deploy's kernels in C, for builds that Python cannot load here (another
 * architecture run under user-mode emulation, e.g. AArch64 NEON under qemu-aarch64): every kernel
 * against a plain reference on pseudo-random data. Prints "ok <isa>" and exits 0, or names the first
 * mismatch and exits 1. Built by tests/test_native.py with the kernel sources. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "msgc.h"

static unsigned long long seed = 88172645463325252ULL;
static float rnd(void) { /* xorshift: uniform in [-1, 1) */
  seed ^= seed << 13;
  seed ^= seed >> 7;
  seed ^= seed << 17;
  return (float)((seed >> 11) % 2000000) / 1000000.0f - 1.0f;
}

static float *fill(long n) {
  float *p = malloc(sizeof(float) * (n > 0 ? n : 1));
  for (long i = 0; i < n; i++) p[i] = rnd();
  return p;
}

static int failures = 0;

static void expect(const char *what, const float *got, const float *want, long n, long ldg, long ldw, int cols) {
  for (long i = 0; i < n; i++)
    for (int j = 0; j < cols; j++) {
      const float g = got[i * ldg + j], w = want[i * ldw + j];
      if (!(fabsf(g - w) <= 1e-4f + 1e-4f * fabsf(w))) {
        if (failures < 5) printf("mismatch: %s at (%ld, %d): %g, expected %g\n", what, i, j, g, w);
        failures++;
        return;
      }
    }
}

/* blocked layout of one head's out x rows x kk weights (ceil(out/16) x rows x kk x 16) */
static float *to_blocked(const float *w, int out, int rows, int kk) {
  const int nb = (out + 15) / 16;
  float *b = calloc((size_t)nb * rows * kk * 16, sizeof(float));
  for (int j = 0; j < out; j++)
    for (int r = 0; r < rows; r++)
      for (int t = 0; t < kk; t++) b[(((long)(j / 16) * rows + r) * kk + t) * 16 + j % 16] = w[((long)j * rows + r) * kk + t];
  return b;
}

/* heads of a gated convolution, every kernel and tile family, with chosen outputs and attention */
static void test_conv(int H, int k, int s, int heads, int per, int rows, int chosen, int att) {
  const int p = k / 2, kk = k * k, Ho = (H + 2 * p - k) / s + 1, cx = rows + 5;
  float *x = fill((long)H * H * cx), *w = fill((long)heads * per * rows * kk), *bias = fill((long)heads * per);
  float *res = fill((long)Ho * Ho * heads * per);
  int counts[8], cols[8 * 64], wrow[8 * 64], ocounts[8], ocols[8 * 64], n_in = 0, n_out = 0;
  float scale[8 * 64];
  for (int h = 0; h < heads; h++) {
    counts[h] = h == 1 ? 0 : rows / 2 + h;  /* head 1 reads nothing */
    for (int c = 0; c < counts[h]; c++, n_in++) {
      wrow[n_in] = (c * 7 + h) % rows;
      cols[n_in] = (c * 5 + 3 * h) % cx;
      scale[n_in] = 0.5f + 0.5f * rnd();
    }
    ocounts[h] = chosen ? (h == 2 ? per : per / 3) : per;
    for (int j = 0; j < ocounts[h]; j++, n_out++) ocols[n_out] = chosen && h != 2 ? (j * 3) % per : j;
  }
  float *want = calloc((size_t)Ho * Ho * n_out, sizeof(float));
  for (int h = 0, e0 = 0, o0 = 0; h < heads; e0 += counts[h], o0 += ocounts[h], h++)
    for (int oy = 0; oy < Ho; oy++)
      for (int ox = 0; ox < Ho; ox++)
        for (int j = 0; j < ocounts[h]; j++) {
          const int o = ocols[o0 + j];
          double acc = bias[h * per + o];
          for (int e = 0; e < counts[h]; e++)
            for (int t = 0; t < kk; t++) {
              const int iy = oy * s - p + t / k, ix = ox * s - p + t % k;
              if (iy < 0 || iy >= H || ix < 0 || ix >= H) continue;
              const float xv = x[((long)iy * H + ix) * cx + cols[e0 + e]] * (att ? scale[e0 + e] : 1.0f);
              acc += xv * w[(((long)h * per + o) * rows + wrow[e0 + e]) * kk + t];
            }
          acc += res[((long)oy * Ho + ox) * n_out + o0 + j];
          want[((long)oy * Ho + ox) * n_out + o0 + j] = acc > 0 ? (float)acc : 0.0f;
        }
  const long head_blocked = (long)((per + 15) / 16) * rows * kk * 16;
  float *blocked = malloc(sizeof(float) * heads * head_blocked);
  for (int h = 0; h < heads; h++) {
    float *b = to_blocked(w + (long)h * per * rows * kk, per, rows, kk);
    memcpy(blocked + h * head_blocked, b, sizeof(float) * head_blocked);
    free(b);
  }
  int info[8];
  msgc_info in = {info};
  msgc_describe(&in);
  float *y = malloc(sizeof(float) * Ho * Ho * n_out);
  for (int kernel = 0; kernel <= MSGC_KERNEL_PACKED; kernel++)
    for (int tiles = 0; tiles < (kernel == MSGC_KERNEL_PIXEL ? 1 : 16 + info[4]); tiles++) {
      if (tiles >= info[4] && tiles < 16) continue; /* the families, in both work orders */
      if (kernel == MSGC_KERNEL_PIXEL && s != 1) continue;
      msgc_conv_args a = {0};
      a.g = (msgc_geom){H, H, k, s, p};
      a.hd = (msgc_heads){heads, rows, per, counts, cols, wrow, att ? scale : 0, chosen ? ocounts : 0,
                          chosen ? ocols : 0};
      a.wt = (msgc_weights){blocked, w, rows, bias, kernel, tiles};
      a.io = (msgc_io){x, cx, cx, y, n_out, res, n_out, MSGC_ACT_RELU};
      a.nthreads = 2;
      for (long i = 0; i < (long)Ho * Ho * n_out; i++) y[i] = NAN;
      char what[160];
      snprintf(what, sizeof what, "conv %dx%d/%d at %d, %d heads of %d, chosen %d, att %d, kernel %d/%d", k, k, s, H,
               heads, per, chosen, att, kernel, tiles);
      if (msgc_conv(&a) != MSGC_OK) {
        printf("failed: %s\n", what);
        failures++;
        continue;
      }
      expect(what, y, want, (long)Ho * Ho, n_out, n_out, n_out);
    }
  free(x), free(w), free(bias), free(res), free(want), free(blocked), free(y);
}

static void test_dw(int H, int s, int C) {
  const int Ho = (H - 1) / s + 1;
  float *x = fill((long)H * H * C), *w = fill(9L * C), *b = fill(C), *y = malloc(sizeof(float) * Ho * Ho * C);
  float *want = malloc(sizeof(float) * Ho * Ho * C);
  for (int oy = 0; oy < Ho; oy++)
    for (int ox = 0; ox < Ho; ox++)
      for (int c = 0; c < C; c++) {
        double acc = b[c];
        for (int t = 0; t < 9; t++) {
          const int iy = oy * s - 1 + t / 3, ix = ox * s - 1 + t % 3;
          if (iy >= 0 && iy < H && ix >= 0 && ix < H) acc += x[((long)iy * H + ix) * C + c] * w[(long)t * C + c];
        }
        want[((long)oy * Ho + ox) * C + c] = acc < 0 ? 0.0f : acc > 6 ? 6.0f : (float)acc;
      }
  msgc_dw_args a = {{H, H, 3, s, 1}, C, x, C, w, b, y, C, MSGC_ACT_RELU6, 2};
  msgc_dwconv(&a);
  expect("depthwise", y, want, (long)Ho * Ho, C, C, C);
  free(x), free(w), free(b), free(y), free(want);
}

static void test_generators(void) {
  const int hw = 37, C = 40, nh = 10, rows = 24;
  float *x = fill((long)hw * C), *w1 = fill((long)nh * C), *b1 = fill(nh), *w2 = fill((long)rows * nh), *b2 = fill(rows);
  float out[24], want[24], ctx[40], hidden[10];
  const int64_t desc[6] = {rows, 0, nh, 0, 0, 0};
  for (int c = 0; c < C; c++) {
    double m = 0;
    for (int r = 0; r < hw; r++) m += x[r * C + c];
    ctx[c] = (float)(m / hw);
  }
  for (int r = 0; r < nh; r++) {
    double v = b1[r];
    for (int c = 0; c < C; c++) v += w1[r * C + c] * ctx[c];
    hidden[r] = v > 0 ? (float)v : 0.0f;
  }
  for (int j = 0; j < rows; j++) {
    double v = b2[j];
    for (int r = 0; r < nh; r++) v += w2[j * nh + r] * hidden[r];
    want[j] = (float)v;
  }
  msgc_gen_args a = {x, C, hw, C, w1, b1, nh, 1, desc, 6, w2, b2, out, 2};
  msgc_generators(&a);
  expect("generators", out, want, 1, rows, rows, rows);
  free(x), free(w1), free(b1), free(w2), free(b2);
}

static void test_head_sets(void) {
  float logits[2 * 8] = {1, -1, 0, -1, 1, 1, -1, -1, -1, -1, 1, -1, 1, -1, -1, -1};
  int counts[3], idx[16], uni[8], pos[16];
  msgc_sets_args a = {logits, 2, 8, 0, counts, idx, 0, uni, pos, 0, 0, 0};
  const int nu = msgc_head_sets(&a);
  const int want_idx[] = {0, 2, 4, 5, 2, 4}, want_uni[] = {0, 2, 4, 5};
  int ok = nu == 4 && counts[0] == 4 && counts[1] == 2 && counts[2] == 4;
  for (int i = 0; ok && i < 6; i++) ok = idx[i] == want_idx[i] && uni[pos[i]] == idx[i];
  for (int i = 0; ok && i < 4; i++) ok = uni[i] == want_uni[i];
  if (!ok) {
    printf("mismatch: head sets\n");
    failures++;
  }
}

int main(void) {
  for (int att = 0; att < 2; att++)
    for (int chosen = 0; chosen < 2; chosen++) {
      test_conv(9, 3, 1, 3, 37, 13, chosen, att);
      test_conv(9, 3, 2, 3, 37, 13, chosen, att);
      test_conv(6, 1, 1, 1, 70, 11, chosen, att);
      test_conv(7, 1, 2, 2, 20, 9, chosen, att);
    }
  test_dw(7, 1, 5);
  test_dw(9, 2, 37);
  test_generators();
  test_head_sets();
  if (failures) return 1;
  printf("ok %s\n", msgc_isa());
  return 0;
}
