"""A deployed graph lowered to the native library's program structs, run one batch per call.

Lowering numbers the buffers and sets, lays out one sample's arena (buffers whose lives do not overlap
share memory), puts every weight in its kernel's layout and fills the op structs of ``msgc.h``. The
structs keep raw pointers: the :class:`Program` holds every tensor they point into.
"""
import contextlib
import ctypes
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..graph import AffineOp, Buffer, ConvOp, DepthwiseOp, GatesOp, Graph, HeadOp, PoolOp, SetsOp
from . import abi
from .library import Library, blocked
from .openmp import release_openmp_workers

__all__ = ["Program", "KERNEL_WIDE", "KERNEL_PIXEL", "KERNEL_GATHER", "KERNEL_PACKED", "TILES_PIXEL_MAJOR",
           "FusedBlock", "fusable_blocks", "fusion_default", "worth_fusing", "FUSE_MIN_BYTES"]

_S = abi.STRUCTS
#: the conv kernels (msgc.h): wide on inputs in place, pixel (stride 1), wide on copied inputs, wide on
#: every head packed as one
KERNEL_WIDE, KERNEL_PIXEL, KERNEL_GATHER, KERNEL_PACKED = 0, 1, 2, 3
#: added to a tile family: the wide kernel's pixel-major work order (msgc.h)
TILES_PIXEL_MAJOR = 16
_OP_GATES, _OP_SETS, _OP_CONV, _OP_DW, _OP_AFFINE, _OP_POOL, _OP_HEAD, _OP_FUSED = range(1, 9)
#: samples of a batch that a thread runs together (at most msgc.h's MSGC_MAX_GROUP)
GROUP = 4


def blocked_layout(weights) -> torch.Tensor:
    """Per head, the blocked layout (``heads x blocks x in x k*k x 16``)."""
    wt = weights.weight.view(weights.heads, weights.per_head, *weights.weight.shape[1:])
    return weights.layout("blocked", lambda _: torch.stack([blocked(w) for w in wt]).contiguous())


def plain_layout(weights) -> torch.Tensor:
    """The plain layout (``heads x per_head x in x k*k``)."""
    return weights.layout("plain", lambda w: w.reshape(weights.heads, weights.per_head, w.size(1), -1).contiguous())


def _ptr(t):
    return None if t is None else t.data_ptr()


def _roots(graph: Graph, blocks: Sequence[Tuple[int, int]] = ()) -> Dict[int, Tuple[int, int]]:
    """Each root buffer's life (first op, last op) among the ops that read or write it or its views; the
    input of a fused block (op numbers ``blocks``) lives until the block's last op (the expansion reads
    it stripe by stripe while the projection writes)."""
    life: Dict[int, List[int]] = {}

    def touch(b: Buffer, i: int):
        r = b.parent if b.parent is not None else b
        lo, hi = life.get(r.id, (i, i))
        life[r.id] = (min(lo, 0 if r.id == graph.input.id else i), max(hi, i))  # the image: from the start

    for i, op in enumerate(graph.ops):
        for name in ("src", "dst", "res"):
            b = getattr(op, name, None)
            if b is not None:
                touch(b, i)
    for i, span in blocks:
        touch(graph.ops[i].src, i + span - 1)
    return life


def _layout(graph: Graph, blocks: Sequence[Tuple[int, int]] = ()) -> Tuple[Dict[int, int], int]:
    """Offsets (floats) of the root buffers in a sample's arena: first fit among the live ones."""
    life = _roots(graph, blocks)
    size = {b.id: b.h * b.w * b.cols for b in graph.buffers}
    placed: List[Tuple[int, int, int]] = []  # (offset, size, last op)
    offsets, top = {}, 0
    for bid in sorted(life, key=lambda b: life[b][0]):
        start, end = life[bid]
        placed = [p for p in placed if p[2] >= start]
        need, at = size[bid], 0
        for off, sz, _ in sorted(placed):
            if off - at >= need:
                break
            at = max(at, (off + sz + 15) // 16 * 16)
        offsets[bid] = at
        placed.append((at, need, end))
        top = max(top, at + need)
    return offsets, (top + 15) // 16 * 16


def _weight_floats(op) -> int:
    if isinstance(op, (ConvOp, DepthwiseOp)):
        return op.weights.weight.numel()
    if isinstance(op, GatesOp):
        return op.generators.w1.numel() + op.generators.w2.numel()
    if isinstance(op, HeadOp):
        return op.weight.numel()
    return 0


#: without measuring, an inverted residual runs fused where its expanded map (float32, every hidden
#: channel; without expansion the depthwise's output) exceeds this many bytes (a core's L2 cache on Zen
#: 3): where it fits (14x14 and 7x7 maps) writing it and reading it back costs little, and the stripes'
#: few pixels per call read the weights once per stripe instead of once per map
FUSE_MIN_BYTES = 1 << 19


def fusion_default() -> bool:
    """Whether programs fuse their inverted residuals: ``MSGC_FUSE`` (``1``: yes, ``0``: no), default yes."""
    return os.environ.get("MSGC_FUSE", "1") != "0"


def _reads(op) -> List[Buffer]:
    return [b for b in (getattr(op, "src", None), getattr(op, "res", None)) if b is not None]


class FusedBlock(NamedTuple):
    """An inverted residual of a program: ops ``number`` .. ``number + span - 1`` (span 3: expansion,
    depthwise, projection; span 2: depthwise, projection), the first op's own kind and index (unfused)
    and the block's index among the fused ops."""

    number: int
    span: int
    kind: int
    index: int
    fused: int


def worth_fusing(graph: Graph, number: int) -> bool:
    """The rule without measuring (:data:`FUSE_MIN_BYTES`) for the block at op ``number``: its largest
    intermediate map (the expanded one, or the depthwise's output of a block without expansion)."""
    b = graph.ops[number].dst
    return b.h * b.w * b.cols * 4 > FUSE_MIN_BYTES


def fusable_blocks(graph: Graph) -> List[Tuple[int, int]]:
    """(op number i, span) of each inverted residual the native program can run fused: ops i, i + 1,
    i + 2 an ungated 1x1 expansion (stride 1), a k x k depthwise (k <= 3, k > stride) of its output and a
    1x1 projection (stride 1) of the depthwise's output (span 3), or, without expansion, ops i, i + 1
    the depthwise and the projection (span 2); no intermediate map read by anything else (nor a view)."""
    ops, out = graph.ops, []
    readers: Dict[int, int] = {}
    for op in ops:
        for b in _reads(op):
            readers[b.id] = readers.get(b.id, 0) + 1
    viewed = {b.parent.id for b in graph.buffers if b.parent is not None}
    def one_reader(*bufs):
        return not any(readers.get(b.id, 0) != 1 or b.id in viewed or b.parent is not None or b is graph.features
                       for b in bufs)

    def pair(d, p):  # a depthwise and the 1x1 projection of its output
        if not (isinstance(d, DepthwiseOp) and isinstance(p, ConvOp)):
            return False
        dw, pw = d.weights, p.weights
        return (p.src is d.dst and pw.kernel == 1
                and pw.stride == 1 and pw.padding == 0 and dw.kernel <= 3 and dw.kernel > dw.stride
                and dw.padding < dw.kernel)

    i = 0
    while i < len(ops) - 1:
        e = ops[i]
        if (isinstance(e, ConvOp) and i + 2 < len(ops) and pair(ops[i + 1], ops[i + 2]) and ops[i + 1].src is e.dst
                and e.weights.kernel == 1 and e.weights.stride == 1 and e.weights.padding == 0
                and e.weights.heads == 1 and e.in_set is None and e.res is None and e.host_groups == 1
                and one_reader(e.dst, ops[i + 1].dst)):
            out.append((i, 3))
            i += 3
        elif pair(e, ops[i + 1]) and one_reader(e.dst):
            out.append((i, 2))
            i += 2
        else:
            i += 1
    return out


def group_from(graph: Graph, group: int = GROUP) -> int:
    """The op from which a thread's group of samples runs op by op instead of sample by sample.

    Sample by sample, an op's weights come from memory once per sample (the whole network's weights
    pass through the caches between two samples) while its feature maps stay in cache; op by op, the
    weights are read once per group and the feature maps of every sample pass through the caches
    between two ops. Floats moved per group: ``group x weights`` before the split, ``weights + group x
    (input + output)`` after it; the split is where their sum is least (large maps with small weights
    first, small maps with large weights after)."""
    costs = []
    for op in graph.ops:
        w = _weight_floats(op)
        maps = sum(b.h * b.w * b.cols for b in (getattr(op, "src", None), getattr(op, "dst", None)) if b is not None)
        costs.append((group * w, w + group * maps))
    total = sum(c[1] for c in costs)  # split at 0: every op over the group
    best, where = total, 0
    for i, (alone, grouped) in enumerate(costs):
        total += alone - grouped
        if total < best:
            best, where = total, i + 1
    return where


class Program:
    """The native program of a graph, with every tensor its structs point into."""

    def __init__(self, graph: Graph, library: Library, fuse: Optional[bool] = None):
        self.graph, self.lib = graph, library
        self.keep: List[torch.Tensor] = []
        fusable = fusable_blocks(graph)
        offsets, top = _layout(graph, fusable)
        self.logits_base = top
        farena = top + graph.logits_size
        bufs = (_S["msgc_buf"] * len(graph.buffers))()
        for b in graph.buffers:
            parent = -1 if b.parent is None else b.parent.id
            bufs[b.id] = _S["msgc_buf"](b.h, b.w, b.cols, parent, b.col0, offsets.get(b.id, 0))
        stats = {s.id: off for s, off in graph.stats_layout()}
        self.nstats = sum(s.heads + 1 + s.groups for s, _ in graph.stats_layout())
        sets = (_S["msgc_set"] * max(1, len(graph.sets)))()
        iarena = 0
        for s in graph.sets:
            n, split = s.heads * s.channels, s.host_groups > 1
            sets[s.id] = _S["msgc_set"](s.heads, s.channels, s.groups, s.host_groups, iarena, farena,
                                        stats.get(s.id, -1))
            iarena += s.heads + 1 + 3 * n + s.channels + s.groups + (s.heads * s.host_groups + 3 * n if split else 0)
            farena += n * (2 if split else 1)
        kinds = {GatesOp: [], SetsOp: [], ConvOp: [], DepthwiseOp: [], AffineOp: [], PoolOp: [], HeadOp: []}
        ops = (_S["msgc_op"] * len(graph.ops))()
        self.conv_ops: List[Tuple[int, ConvOp]] = []  # (op number, graph op)
        for i, op in enumerate(graph.ops):
            bucket = kinds[type(op)]
            kind, struct = self._lower(op)
            ops[i] = _S["msgc_op"](kind, len(bucket))
            bucket.append(struct)
            if isinstance(op, ConvOp):
                self.conv_ops.append((i, op))
        # inverted residuals fused, switched by fuse()
        conv_index = {number: j for j, (number, _) in enumerate(self.conv_ops)}
        dw_index = {id(op): j for j, op in enumerate(o for o in graph.ops if isinstance(o, DepthwiseOp))}
        fused = []
        self.blocks: List[FusedBlock] = []
        for i, span in fusable:
            first = i if span == 3 else -1
            fused.append(_S["msgc_fused_op"](conv_index[first] if span == 3 else -1,
                                             dw_index[id(graph.ops[i + span - 2])], conv_index[i + span - 1], 0))
            self.blocks.append(FusedBlock(i, span, ops[i].kind, ops[i].index, len(fused) - 1))
        #: per block of :attr:`blocks`, whether it runs fused while the program fuses (the rule, or tune's
        #: measured choice)
        self.block_on = [worth_fusing(graph, b.number) for b in self.blocks]
        self.fused_ops = (_S["msgc_fused_op"] * len(fused))(*fused) if fused else None
        arrays = {k: (type(v[0]) * len(v))(*v) if v else None for k, v in kinds.items()}
        self.convs = arrays[ConvOp]
        self.ops = ops
        self.structs = (ops, bufs, sets, arrays, self.fused_ops)
        self.nout = graph.classes
        self.program = _S["msgc_program"](
            len(graph.ops), ctypes.addressof(ops), *(None if arrays[k] is None else ctypes.addressof(arrays[k])
                                                      for k in (ConvOp, GatesOp, SetsOp, DepthwiseOp, AffineOp,
                                                                PoolOp, HeadOp)),
            None if self.fused_ops is None else ctypes.addressof(self.fused_ops), len(graph.buffers),
            ctypes.addressof(bufs), len(graph.sets), ctypes.addressof(sets), farena, iarena, self.nstats,
            self.nout, 1, GROUP, group_from(graph))
        self.fusing = self.fused = False
        self.fuse(fusion_default() if fuse is None else fuse)

    def fuse(self, on: bool = True) -> None:
        """Run the inverted residuals of :attr:`blocks` that :attr:`block_on` marks fused (one op each,
        stripe by stripe), or every block as its three ops. The outputs, stats and executed MACs are the
        same; op numbers do not change (replaying the expansion's number replays the fused block while
        fused)."""
        for b, chosen in zip(self.blocks, self.block_on):
            self.ops[b.number].kind, self.ops[b.number].index = (_OP_FUSED, b.fused) if on and chosen else (b.kind,
                                                                                                          b.index)
        self.fusing = bool(on)
        self.fused = bool(on and any(self.block_on))

    def fuse_block(self, k: int, on: bool) -> None:
        """Whether block ``k`` of :attr:`blocks` runs fused while the program fuses."""
        self.block_on[k] = bool(on)
        self.fuse(self.fusing)

    def fuse_rows(self, rows: int) -> None:
        """Output rows per stripe of every fused block (0: as many as fit the cache, the default)."""
        for k in range(len(self.blocks)):
            self.fused_ops[k].rows = rows

    @contextlib.contextmanager
    def unfused(self):
        """The program's ops one by one within the block (to time a convolution alone)."""
        was = self.fusing
        self.fuse(False)
        try:
            yield self
        finally:
            self.fuse(was)

    def fused_at(self, number: int) -> int:
        """How many ops op ``number`` stands for while the program runs (a fused block's span for its first
        op, 0 for its others, 1 otherwise)."""
        if not self.fused:
            return 1
        for b, on in zip(self.blocks, self.block_on):
            if not on:
                continue
            if number == b.number:
                return b.span
            if b.number < number < b.number + b.span:
                return 0
        return 1

    def _hold(self, t):
        if t is not None:
            self.keep.append(t)
        return _ptr(t)

    def _lower(self, op):
        if isinstance(op, GatesOp):
            g = op.generators
            macs = op.src.h * op.src.w * op.src.cols + g.macs
            return _OP_GATES, _S["msgc_gates_op"](op.src.id, op.src.cols, g.w1.size(0), len(g), self._hold(g.w1),
                                                   self._hold(g.b1), self._hold(g.desc), g.desc.size(1),
                                                   self._hold(g.w2), self._hold(g.b2),
                                                   self.logits_base + op.logits.offset, macs)
        if isinstance(op, SetsOp):
            logits = -1 if op.logits is None else self.logits_base + op.logits.offset
            att = -1 if op.att is None else self.logits_base + op.att.offset
            return _OP_SETS, _S["msgc_sets_op"](op.set.id, logits, self._hold(op.const), att)
        if isinstance(op, ConvOp):
            return _OP_CONV, self._conv_struct(op)
        if isinstance(op, DepthwiseOp):
            wt = op.weights
            weight = wt.layout("taps", lambda w: w.reshape(w.size(0), -1).t().contiguous())
            return _OP_DW, _S["msgc_dw_op"](op.src.id, op.dst.id, -1 if op.set is None else op.set.id,
                                             _S["msgc_geom"](op.h, op.w, wt.kernel, wt.stride, wt.padding),
                                             self._hold(weight), self._hold(wt.bias), op.act, int(wt.bn))
        if isinstance(op, AffineOp):
            return _OP_AFFINE, _S["msgc_affine_op"](op.src.id, op.dst.id, self._hold(op.scale), self._hold(op.shift),
                                                     op.act, op.macs)
        if isinstance(op, PoolOp):
            return _OP_POOL, _S["msgc_pool_op"](op.src.id, op.dst.id, int(op.kind == "max"), op.k, op.stride,
                                                 op.padding, op.macs)
        if isinstance(op, HeadOp):
            return _OP_HEAD, _S["msgc_head_op"](op.src.id, self._hold(op.weight), self._hold(op.bias),
                                                 op.weight.size(0))
        raise TypeError(f"deploy: no native lowering for {type(op).__name__}")

    def _conv_struct(self, op: ConvOp):
        wt = op.weights
        plain = plain_layout(wt) if wt.stride == 1 else None
        weights = _S["msgc_weights"](self._hold(blocked_layout(wt)), self._hold(plain), wt.in_channels,
                                     self._hold(wt.bias), op.kernel, op.tiles)
        return _S["msgc_conv_op"](
            op.src.id, op.dst.id, -1 if op.res is None else op.res.id, -1 if op.in_set is None else op.in_set.id,
            int(op.att), op.out_mode, -1 if op.out_set is None else op.out_set.id,
            _S["msgc_geom"](op.h, op.w, wt.kernel, wt.stride, wt.padding), wt.heads, wt.in_channels, wt.per_head,
            op.host_groups, weights, op.act, int(wt.bn), int(op.all_rule))

    def set_kernel(self, index: int, kernel: int, tiles: int) -> None:
        """Change the kernel of the ``index``-th convolution (in :attr:`conv_ops` order)."""
        self.convs[index].wt.kernel, self.convs[index].wt.tiles = kernel, tiles
        op = self.conv_ops[index][1]
        op.kernel, op.tiles = kernel, tiles

    def _args(self, x: torch.Tensor, out, stats, executed, threads: int, keep=0, op=-1, reps=0, times=None):
        return _S["msgc_run_args"](ctypes.addressof(self.program), x.size(0), x.data_ptr(), x.stride(0), 0,
                                   out.data_ptr(), _ptr(stats), _ptr(executed), threads, keep, op, reps, _ptr(times))

    def run(self, images: torch.Tensor, threads: int = 0, keep: bool = False):
        """``images``: ``N x 3 x H x W`` (contiguous float32 CPU) -> (logits ``N x classes``, stats
        ``N x nstats`` int32, executed MACs ``N`` int64)."""
        if images.dtype != torch.float32 or images.device.type != "cpu" or not images.is_contiguous():
            raise ValueError("the native program runs on contiguous float32 CPU tensors")
        n = images.size(0)
        out = torch.empty(n, self.nout)
        stats = torch.empty(n, max(1, self.nstats), dtype=torch.int32)
        executed = torch.empty(n, dtype=torch.int64)
        threads = threads or torch.get_num_threads()
        if threads > 1:
            release_openmp_workers()  # PyTorch's spinning workers would take the cores (openmp.py)
        self.lib.run(self._args(images, out, stats, executed, threads, int(keep)))
        return out, stats[:, :self.nstats], executed

    def time_op(self, images: torch.Tensor, op: int, reps: int, threads: int = 0) -> List[int]:
        """Nanoseconds of ``reps`` runs of op number ``op`` on the state a ``run(images[:1], keep=True)``
        of this thread left."""
        times = torch.zeros(reps, dtype=torch.int64)
        out = torch.empty(1, self.nout)
        self.lib.run(self._args(images[:1], out, None, None, threads or torch.get_num_threads(), 1, op, reps, times))
        return times.tolist()
