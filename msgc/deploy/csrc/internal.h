/* Declarations shared by the kernel files (not part of the interface). */
#ifndef MSGC_INTERNAL_H
#define MSGC_INTERNAL_H
#include <stddef.h>

#include "msgc.h"
#include "simd.h"

static inline int out_size(int size, int k, int s, int p) { return (size + 2 * p - k) / s + 1; }

/* fn(ctx, i) for i in [0, n) on up to nthreads threads (the caller among them); returns when all are
 * done. Iterations are claimed one at a time, so threads the machine does not run leave their share to
 * the others (pool.c). Nested calls run serially. */
typedef void (*msgc_task_fn)(void *ctx, long i);
void msgc_parallel(msgc_task_fn fn, void *ctx, long n, int nthreads);

/* Per-thread scratch memory that grows as needed and is kept between calls: one region per slot.
 * Returns NULL if it cannot be allocated. */
enum { SCRATCH_GATHER = 0, SCRATCH_PLANES, SCRATCH_PLAN, SCRATCH_SELECT, SCRATCH_ARENA, SCRATCH_PARTIAL,
       SCRATCH_PACKED, SCRATCH_STRIPE, SCRATCH_EDGE, SCRATCH_CHOSEN, SCRATCH_SLOTS };
void *msgc_scratch(int slot, size_t bytes);

/* Out-of-image taps read zeros from here (longer than any row of channels a kernel reads). */
#define ZERO_FLOATS (1 << 17)
extern const float msgc_zeros[ZERO_FLOATS];

/* ---- the wide kernel: tiles of RB output pixels x NV vectors of output channels ------------------- */

typedef struct {
  const float *x;     /* input (HW x C, row stride ldx) */
  long ldx;
  int H, W, Wo, k, s, p;
  const int *cols;    /* column of x of each input entry */
  const long *woff;   /* offset of each input entry's weights in a block (row * k*k * 16) */
  int n;              /* input entries */
  const long *rx, *rw; /* rows of taps (NULL: none): entry dx * n + c of a kernel row reads x at column offset
                          rx[..] = dx * ldx + column, weights at rw[..] = woff + dx * 16 */
  int rn;             /* k * n */
  const float *w;     /* the head's blocked weights */
  long wblk;          /* floats per block of 16 outputs */
  const float *bias;  /* the head's biases by output (NULL: 0) */
  float *y;           /* the head's first output column */
  long ldy;
  const float *res;   /* residual at the head's first output column (NULL: none) */
  long ldres;
  int m;              /* outputs of the head */
  int act;
} wide_job;

/* input entries cb .. ce - 1 of the tile at pixel o0 (npix pixels), outputs j0 ..; part: NULL, or the
   tile's partial sums (RB x NV vectors), read unless cb == 0 and written unless ce == n */
typedef void (*wide_tile_fn)(const wide_job *job, int o0, int npix, int j0, int cb, int ce, float *part);

typedef struct {
  int nv, rb;  /* vectors of outputs, pixels */
  wide_tile_fn fn;
} wide_tile;

/* the ISA's tiles: the regular ones widest first, then the row family's (7 pixels); family f < the
   last skips the f widest regular tiles (while a narrower one is left), the last takes the row tiles */
extern const wide_tile msgc_wide_tiles[];
extern const int msgc_n_wide_tiles, msgc_wide_families;
const wide_tile *msgc_wide_pick(int family, int left);

/* ---- the pixel kernel: tiles of RB output channels x PV vectors of output positions ----------- */

typedef struct {
  const float *planes;  /* padded input planes, plane_len floats apart */
  long plane_len;
  int Wp, Wo, npos, k;
  const int *cols;      /* plane per input entry (NULL: col0, col0 + 1, ...) */
  int col0;
  const int *wrow;
  int n;
  const float *w;       /* the head's plain weights, rows weight rows per output */
  long rows;
  const int *ocols;     /* output channel per computed output (NULL: 0, 1, ...) */
  const float *bias;
  float *y;
  long ldy;
  const float *res;
  long ldres;
  int act;
} pixel_job;

typedef void (*pixel_tile_fn)(const pixel_job *job, int q0, int j0);
extern const int msgc_pixel_positions; /* output positions per tile */
int msgc_pixel_rows(int left);         /* output channels of the tile for `left` remaining */
pixel_tile_fn msgc_pixel_tile(int rows);

/* ---- the packed kernel: a multi-head convolution as one head over the union of its inputs ---- */
i32 msgc_conv_packed(const msgc_conv_args *a, long whole_hw, int fixed);

/* msgc_conv on a part of a map (a stripe of rows of a 1x1 convolution's HW x C matrix): decisions that
 * depend on the map's size (attention into the inputs or the weights) are taken for whole_hw pixels,
 * and the executed MACs that do not grow with the pixels (attention folded into weights) are counted
 * only where fixed is set (once per map). msgc_conv(a) is msgc_conv_part(a, h * w, 1). */
i32 msgc_conv_part(const msgc_conv_args *a, long whole_hw, int fixed);

/* ---- shared pieces ---------------------------------------------------------------------------------- */

/* x's c columns (row stride ldx, columns by index or not) into zero-padded planes of (h + 2p + 2) x
 * (w + 2p) + 64 floats, times scale (NULL: 1) */
void msgc_make_plane(const float *x, long ldx, int h, int w, int p, long plane_len, float scale, float *plane);

/* output rows oy0 .. oy1 - 1 of the depthwise kernel, on this thread, from input rows that start at row
 * xr0 of the map (x points at row xr0; only the rows the outputs read are touched) into y (at row oy0) */
void msgc_dw_rows(const float *x, long ldx, int xr0, int H, int W, int C, int k, int s, int p, const float *w,
                  const float *bias, float *y, long ldy, int oy0, int oy1, int act);

/* the depthwise kernel on contiguous columns */
void msgc_dw_run(const float *x, long ldx, int H, int W, int C, int k, int s, int p, const float *w,
                 const float *bias, float *y, long ldy, int act, int nthreads);

#endif
