/* The interface of msgc.deploy's CPU kernels: the structs that Python fills (mirrored by ctypes in
 * msgc/deploy/native/abi.py) and the functions it calls.
 *
 * Every struct is declared once, as a list of fields (an X-macro), which gives both the C struct and a
 * text description of it; every entry point takes one pointer to an argument struct and returns an
 * int32 status. msgc_abi() returns the descriptions of all structs and entry points, and Python compares
 * it at load time with the one it derives from its own declarations: a field or a signature changed on
 * one side only is caught before any kernel runs (the library is then not used).
 *
 * Conventions: a feature map of one sample is an HW x C row-major float32 matrix (channels-last), with a
 * row stride >= C. Index arrays are int32. Weights of the "blocked" layout are stored in blocks of
 * MSGC_BLOCK output channels: W[j, r, t] = w[(((j / 16) * rows + r) * k*k + t) * 16 + j % 16], the last
 * block zero-padded; the "plain" layout is W[j, r, t] = w[(j * rows + r) * k*k + t].
 */
#ifndef MSGC_H
#define MSGC_H
#include <stdint.h>

#define MSGC_BLOCK 16  /* output channels per block of the blocked weight layout, on every ISA */
#define MSGC_MAX_TAPS 49
#define MSGC_MAX_GROUP 16  /* samples a thread runs together (msgc_program.group) */

/* activations fused into the stores */
enum { MSGC_ACT_NONE = 0, MSGC_ACT_RELU = 1, MSGC_ACT_RELU6 = 2 };
/* conv kernels (msgc_conv_op.kernel); PACKED: every head as one over the union of their inputs (packed.c) */
enum { MSGC_KERNEL_WIDE = 0, MSGC_KERNEL_PIXEL = 1, MSGC_KERNEL_GATHER = 2, MSGC_KERNEL_PACKED = 3 };
/* msgc_weights.tiles: the wide kernel's tile family (low bits), and its work order: chunk-major (a
   work item is one tile; a chunk's weights stay in cache over its tiles) or PIXEL_MAJOR (a work item is
   a block of output pixels, every chunk of its head on the same inputs: for few inputs, many outputs) */
enum { MSGC_TILES_FAMILY = 15, MSGC_TILES_PIXEL_MAJOR = 16 };
/* program ops */
enum { MSGC_OP_GATES = 1, MSGC_OP_SETS, MSGC_OP_CONV, MSGC_OP_DW, MSGC_OP_AFFINE, MSGC_OP_POOL, MSGC_OP_HEAD,
       MSGC_OP_FUSED };
/* poolings */
enum { MSGC_POOL_AVG = 0, MSGC_POOL_MAX = 1 };
/* what a conv op computes (msgc_conv_op.out_mode) */
enum { MSGC_OUT_ALL = 0, MSGC_OUT_UNION = 1, MSGC_OUT_GROUPS = 2 };
/* status codes */
enum { MSGC_OK = 0, MSGC_ETOOLARGE = -1, MSGC_ENOMEM = -2, MSGC_EPLAN = -3 };

/* field types of the descriptions */
typedef int32_t i32;
typedef int64_t i64;
typedef const float *cf;
typedef float *wf;
typedef const int32_t *ci;
typedef int32_t *wi;
typedef const int64_t *cl;
typedef int64_t *wl;
typedef const void *cv;

/* ---- the structs: X(type, name) per field --------------------------------------------------------- */

/* a convolution's geometry: input h x w, k x k kernel, stride s, zero padding p */
#define MSGC_GEOM(X) X(i32, h) X(i32, w) X(i32, k) X(i32, s) X(i32, p)

/* the heads of a gated convolution. Head i reads counts[i] input channels (counts NULL: in_channels
 * each): columns cols[..] of x and weight rows wrow[..] (flat, head after head; NULL: 0, 1, ... per
 * head), scaled by scale[..] (flat likewise; NULL: none); it computes ocounts[i] of its per_head outputs
 * (ocounts NULL: all), the output channels ocols[..] within the head (flat). Without cols, head i's
 * inputs start at column i * xstep of x (0: every head reads the same columns, as an MSGC convolution's
 * heads do; in_channels: a grouped convolution, each head its own slice). */
#define MSGC_HEADS(X) \
  X(i32, heads) X(i32, in_channels) X(i32, per_head) X(ci, counts) X(ci, cols) X(ci, wrow) X(cf, scale) \
  X(ci, ocounts) X(ci, ocols) X(i32, xstep)

/* weights: head i's blocked weights start at blocked + i * ceil(per_head / 16) * rows * k*k * 16, its
 * plain ones at plain + i * per_head * rows * k*k, its bias at bias + i * per_head; kernel picks the
 * wide kernel (blocked weights; reading inputs in place, or GATHER: from a contiguous copy of each
 * head's inputs, made first, or PACKED: all heads as one), or the pixel kernel (plain weights, stride
 * 1); tiles: the wide kernel's tile family. */
#define MSGC_WEIGHTS(X) X(cf, blocked) X(cf, plain) X(i64, rows) X(cf, bias) X(i32, kernel) X(i32, tiles)

/* input (xcols columns), output (written in full: every head's outputs side by side), residual added
 * before act */
#define MSGC_IO(X) X(cf, x) X(i64, ldx) X(i32, xcols) X(wf, y) X(i64, ldy) X(cf, res) X(i64, ldres) X(i32, act)

/* bn: count one executed MAC per output (a folded BatchNorm); executed (NULL: not counted) gets the
 * MACs run added */
#define MSGC_CONV_ARGS(X) \
  X(msgc_geom, g) X(msgc_heads, hd) X(msgc_weights, wt) X(msgc_io, io) X(i32, bn) X(i32, nthreads) \
  X(wl, executed)

/* depthwise k x k convolution of the c columns of x; weight tap-major (k*k x c) */
#define MSGC_DW_ARGS(X) \
  X(msgc_geom, g) X(i32, c) X(cf, x) X(i64, ldx) X(cf, weight) X(cf, bias) X(wf, y) X(i64, ldy) X(i32, act) \
  X(i32, nthreads)

/* a block's generators: the context (mean of x's rows), the stacked first layers (w1: nh x c, ReLU),
 * each generator's second layer: desc[desc_fields * g ..] = rows, first hidden unit, hidden units, first
 * output, first weight of w2, output activation (0 none, 1 sigmoid: a squeeze-excitation); logits
 * written to out */
#define MSGC_GEN_ARGS(X) \
  X(cf, x) X(i64, ldx) X(i32, hw) X(i32, c) X(cf, w1) X(cf, b1) X(i32, nh) X(i32, ngen) X(cl, desc) \
  X(i32, desc_fields) X(cf, w2) X(cf, b2) X(wf, out) X(i32, nthreads)

/* a heads x channels gate matrix (open where logit >= 0; logits NULL: all open) -> index sets: counts
 * (heads + 1: the union's size last), idx (open channels, ascending, head after head), vals (att of each
 * idx entry, if att), uni (channels some head reads), pos (each idx entry's place in uni), and, with
 * groups > 0 (one head over groups x channels / groups), gcounts (open per group) and gidx (idx within
 * its group); with host_groups > 1 (the heads of a convolution that also has host groups), the same
 * entries split by host group, host group major: hcounts[g * heads + h], and per entry hidx (channel),
 * hrow (channel within its host group), hpos (place in uni) and hvals (attention) */
#define MSGC_SETS_ARGS(X) \
  X(cf, logits) X(i32, heads) X(i32, channels) X(cf, att) X(wi, counts) X(wi, idx) X(wf, vals) X(wi, uni) \
  X(wi, pos) X(i32, groups) X(wi, gcounts) X(wi, gidx) X(i32, host_groups) X(wi, hcounts) X(wi, hidx) \
  X(wi, hrow) X(wi, hpos) X(wf, hvals)

/* ---- programs: a whole sample in one call -------------------------------------------------------
 * A program is a list of ops over buffers (feature maps of one sample) and index sets, both numbered
 * by the plan. Buffer 0 is the sample's input. A buffer with parent >= 0 is a column slice (col0,
 * cols) of its parent; a root buffer of up to cols columns lives at offset (floats) in the sample's
 * arena. A set's arrays live at ioff (ints) and foff (floats); its counts go to the sample's stats at
 * offset stats (-1: not recorded). */
#define MSGC_BUF(X) X(i32, h) X(i32, w) X(i32, cols) X(i32, parent) X(i32, col0) X(i64, offset)
#define MSGC_SET(X) \
  X(i32, heads) X(i32, channels) X(i32, groups) X(i32, host_groups) X(i64, ioff) X(i64, foff) X(i32, stats)
#define MSGC_OP(X) X(i32, kind) X(i32, index)

/* a convolution: reads buffer src through set in_set (-1: every channel; att: scaled by its
 * attention), writes dst (all outputs, or the union / the groups of out_set), adds buffer res (-1:
 * none) before act; bn: a folded BatchNorm (one executed MAC per output); all_rule: a one-head
 * convolution may compute its few unread outputs instead of gathering around them; host_groups: the
 * convolution's own groups (heads = host_groups x the set's heads, each reading its host group) */
#define MSGC_CONV_OP(X) \
  X(i32, src) X(i32, dst) X(i32, res) X(i32, in_set) X(i32, att) X(i32, out_mode) X(i32, out_set) \
  X(msgc_geom, g) X(i32, heads) X(i32, in_channels) X(i32, per_head) X(i32, host_groups) X(msgc_weights, wt) \
  X(i32, act) X(i32, bn) X(i32, all_rule)

/* a block's generators on buffer src; logits to the float arena at out; macs: their executed MACs */
#define MSGC_GATES_OP(X) \
  X(i32, src) X(i32, c) X(i32, nh) X(i32, ngen) X(cf, w1) X(cf, b1) X(cl, desc) X(i32, desc_fields) X(cf, w2) \
  X(cf, b2) X(i64, out) X(i64, macs)

/* index sets of a mask: logits at arena offset logits, or the constant matrix ext, or none (both -1 /
 * NULL: every channel open); attention at arena offset att (-1: none) */
#define MSGC_SETS_OP(X) X(i32, set) X(i64, logits) X(cf, ext) X(i64, att)

/* depthwise conv of src's channels (set >= 0: only that set's union) */
#define MSGC_DW_OP(X) X(i32, src) X(i32, dst) X(i32, set) X(msgc_geom, g) X(cf, weight) X(cf, bias) X(i32, act) \
  X(i32, bn)

/* dst = act(src * scale + shift) per column; macs: executed MACs per element */
#define MSGC_AFFINE_OP(X) X(i32, src) X(i32, dst) X(cf, scale) X(cf, shift) X(i32, act) X(i32, macs)

/* k x k average or max pooling, stride s, padding p (max: padding never wins; avg: no padding);
 * macs: executed MACs counted per output element (as the paper counts the op) */
#define MSGC_POOL_OP(X) X(i32, src) X(i32, dst) X(i32, kind) X(i32, k) X(i32, s) X(i32, p) X(i32, macs)

/* the classifier: global average pooling of src, then logits = bias + weight (classes x C) . pooled,
 * written to the sample's outputs */
#define MSGC_HEAD_OP(X) X(i32, src) X(cf, weight) X(cf, bias) X(i32, classes)

/* an inverted residual fused (MSGC_OP_FUSED, in the place of its first op): the 1x1 expansion, depthwise
 * and 1x1 projection of program ops op, op + 1, op + 2 (conv, dw and conv ops number expand, dw,
 * project; expand -1: a block without expansion, its depthwise and projection ops op, op + 1),
 * computed stripe by stripe of `rows` output rows (0: sized for the cache), the expanded and depthwise
 * rows of a stripe in the thread's scratch; each thread takes a band of stripes. The op stands for the
 * block's ops (the run goes on after them); each of them still runs alone where it is replayed by
 * number. Decisions (which channels each computes) and executed MACs are those of the ops. */
#define MSGC_FUSED_OP(X) X(i32, expand) X(i32, dw) X(i32, project) X(i32, rows)

/* input_nchw: the samples are images (C x H x W, planar), copied into buffer 0 (HW x C, in the arena);
 * otherwise buffer 0 is the sample itself (HW x C, rows x_ld apart). nout: outputs per sample. A thread
 * runs up to group (<= MSGC_MAX_GROUP) samples together: each alone through the ops before group_from,
 * then op by op over the group. */
#define MSGC_PROGRAM(X) \
  X(i32, n_ops) X(cv, ops) X(cv, convs) X(cv, gates) X(cv, sets_ops) X(cv, dws) X(cv, affines) X(cv, pools) \
  X(cv, heads) X(cv, fused) X(i32, n_bufs) X(cv, bufs) X(i32, n_sets) X(cv, sets) X(i64, farena) \
  X(i64, iarena) X(i32, nstats) X(i32, nout) X(i32, input_nchw) X(i32, group) X(i32, group_from)

/* run samples [0, n): sample i's input at x + i * x_stride, its outputs (logits) to out + i * nout,
 * stats to stats + i * nstats, executed MACs to executed[i]. With op >= 0, run only that op, reps
 * times, on the state the last run of this thread left (n = 1, keep = 1 then), and write each
 * repetition's nanoseconds to times and one repetition's executed MACs to executed[0]. keep: leave
 * the state for such replays. */
#define MSGC_RUN_ARGS(X) \
  X(cv, program) X(i32, n) X(cf, x) X(i64, x_stride) X(i64, x_ld) X(wf, out) X(wi, stats) X(wl, executed) \
  X(i32, nthreads) X(i32, keep) X(i32, op) X(i32, reps) X(wl, times)

/* what the library was built for: out[0..4] = floats per vector, vector registers, MSGC_BLOCK,
 * MSGC_MAX_TAPS, wide tile families */
#define MSGC_INFO(X) X(wi, out)

/* the FMA peak (peak.c): reps timings (nanoseconds, to times) of iters rounds of 12 independent vector
 * multiply-adds held in registers; macs[0] = the multiply-adds of one repetition; sink (may be NULL)
 * receives a value that depends on them all */
#define MSGC_PEAK_ARGS(X) X(i64, iters) X(i32, reps) X(wl, times) X(wl, macs) X(wf, sink)

#define MSGC_STRUCTS(S) \
  S(msgc_geom, MSGC_GEOM) S(msgc_heads, MSGC_HEADS) S(msgc_weights, MSGC_WEIGHTS) S(msgc_io, MSGC_IO) \
  S(msgc_conv_args, MSGC_CONV_ARGS) S(msgc_dw_args, MSGC_DW_ARGS) S(msgc_gen_args, MSGC_GEN_ARGS) \
  S(msgc_sets_args, MSGC_SETS_ARGS) S(msgc_buf, MSGC_BUF) S(msgc_set, MSGC_SET) S(msgc_op, MSGC_OP) \
  S(msgc_conv_op, MSGC_CONV_OP) S(msgc_gates_op, MSGC_GATES_OP) S(msgc_sets_op, MSGC_SETS_OP) \
  S(msgc_dw_op, MSGC_DW_OP) S(msgc_affine_op, MSGC_AFFINE_OP) S(msgc_pool_op, MSGC_POOL_OP) \
  S(msgc_head_op, MSGC_HEAD_OP) S(msgc_fused_op, MSGC_FUSED_OP) S(msgc_program, MSGC_PROGRAM) \
  S(msgc_run_args, MSGC_RUN_ARGS) S(msgc_info, MSGC_INFO) S(msgc_peak_args, MSGC_PEAK_ARGS)

#define MSGC_FIELD_DECL(type, name) type name;
#define MSGC_STRUCT_DECL(name, FIELDS) typedef struct name { FIELDS(MSGC_FIELD_DECL) } name;
MSGC_STRUCTS(MSGC_STRUCT_DECL)

/* ---- entry points: X(name, argument struct) ---------------------------------------------------- */
#define MSGC_ENTRIES(X) \
  X(msgc_conv, msgc_conv_args) X(msgc_dwconv, msgc_dw_args) X(msgc_generators, msgc_gen_args) \
  X(msgc_head_sets, msgc_sets_args) X(msgc_run, msgc_run_args) X(msgc_describe, msgc_info) \
  X(msgc_fma_peak, msgc_peak_args)

#define MSGC_ENTRY_DECL(name, args) i32 name(const args *a);
MSGC_ENTRIES(MSGC_ENTRY_DECL)

/* the descriptions of every struct and entry point, and the ISA the library was built for */
const char *msgc_abi(void);
const char *msgc_isa(void);

#endif
