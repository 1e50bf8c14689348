"""Each gated convolution's kernel, chosen by measuring the candidates on this machine.

Which kernel is fastest for a layer depends on the CPU (vector width, registers, caches), the layer's
shape and how many channels its gates open, so a fixed rule is wrong somewhere. As FFTW's plans and
cuDNN's benchmark mode do, the plan of an input size runs the program once on a real sample, then
times every candidate of every convolution on that sample's state (the ops are replayed in C, so the
measurement holds nothing but the kernel) and keeps the fastest. Choices are cached per machine in
``$MSGC_CACHE/plans-<machine>.json`` (:func:`machine_key`: the CPU's name, family, model and vector
extension, so that CPUs of one name but other FMA pipes keep their own), keyed by the layer's shape,
its open fraction (in tenths), the kernel variant and the thread count; a cached choice is reused
without measuring.

Candidates: the wide kernel with each tile family of the ISA, reading the open inputs in place or from
a contiguous copy made first (gather, then a dense register-tiled product), or, for heads of few
outputs, with every head packed into one over the union of their inputs (zero weights where a head
does not read a channel), in chunk-major or pixel-major order, and, for stride 1, the pixel kernel.
"""
import hashlib
import json
import logging
import os
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

from ..utils.env import machine_info
from .graph import ConvOp
from .native.build import cache_dir
from .native.program import KERNEL_GATHER, KERNEL_PACKED, KERNEL_PIXEL, KERNEL_WIDE, TILES_PIXEL_MAJOR, Program

__all__ = ["candidates", "default_kernel", "machine_key", "split_key", "tune", "PlanCache"]

logger = logging.getLogger(__name__)


#: heads of at most this many outputs are also tried packed into one (their vectors are part-filled)
PACKED_PER_HEAD = 32


def candidates(op: ConvOp, families: int) -> List[Tuple[int, int]]:
    """(kernel, tile family) pairs worth measuring for ``op``."""
    kernels = [KERNEL_WIDE, KERNEL_GATHER]
    if op.weights.heads > 1 and op.weights.per_head <= PACKED_PER_HEAD:
        kernels.append(KERNEL_PACKED)
    out = [(kernel, f + order) for kernel in kernels for f in range(families) for order in (0, TILES_PIXEL_MAJOR)]
    if op.weights.stride == 1:
        out.append((KERNEL_PIXEL, 0))
    return out


def default_kernel(op: ConvOp) -> Tuple[int, int]:
    """The choice without measuring: the pixel kernel for narrow stride-1 heads (<= 24 outputs, which
    fill few lanes of the wide kernel's vectors), the wide kernel's first family otherwise."""
    if op.weights.stride == 1 and op.weights.per_head <= 24:
        return KERNEL_PIXEL, 0
    return KERNEL_WIDE, 0


def machine_key() -> str:
    """What tells this machine's measured choices apart from another's: the CPU's name, family, model and
    widest vector extension (an AMD EPYC of Zen 4 and one of Zen 5 share the name "AMD EPYC", but not
    the FMA pipes the kernels were chosen for) and the number of CPUs."""
    info = machine_info()
    fields = [info["machine"], info["cpu"], info.get("cpu_family", ""), info.get("cpu_model", ""), info.get("isa", ""),
              os.cpu_count()]
    return "-".join(str(f) for f in fields)


class PlanCache:
    """The measured choices of this machine, in one JSON file (written atomically)."""

    def __init__(self, path: Optional[str] = None):
        if path is None:
            key = hashlib.sha256(machine_key().encode()).hexdigest()[:12]
            path = os.path.join(cache_dir(), f"plans-{key}.json")
        self.path = path
        try:
            with open(path) as f:
                self.entries: Dict[str, list] = json.load(f)
        except (OSError, ValueError):
            self.entries = {}

    def save(self) -> None:
        try:
            fd, tmp = tempfile.mkstemp(suffix=".json", dir=os.path.dirname(self.path))
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache: measure again next time
            logger.info("msgc.deploy: cannot write the plan cache %s (%s)", self.path, e)


def signature(op: ConvOp, open_fraction: float, variant: str, threads: int) -> str:
    wt = op.weights
    return (f"{variant}/t{threads}/k{wt.kernel}s{wt.stride}p{wt.padding}/{op.h}x{op.w}/in{wt.in_channels}"
            f"/heads{wt.heads}x{wt.per_head}/att{int(op.att)}/out{op.out_mode}/res{int(op.res is not None)}"
            f"/open{round(open_fraction * 10)}")


def split_key(program: Program, threads: int) -> str:
    """The plan cache's key of a program's thread choice for small batches: its convolutions' shapes
    (which fix the input size), the kernel variant and the thread count."""
    shapes = "|".join(signature(op, 1.0, program.lib.variant, threads) for _, op in program.conv_ops)
    fused = "/fused" if program.fused else ""
    return f"split/{program.lib.variant}/t{threads}{fused}/{hashlib.sha256(shapes.encode()).hexdigest()[:16]}"


def _open_fraction(program: Program, stats: List[int], op: ConvOp) -> float:
    if op.in_set is None or not op.in_set.masked:
        return 1.0
    off = dict(program.graph.stats_layout())[op.in_set]
    s = op.in_set
    return sum(stats[off:off + s.heads]) / (s.heads * s.channels)


def tune(program: Program, x: torch.Tensor, threads: int, cache: Optional[PlanCache] = None, reps: int = 3,
         rounds: int = 3, slow: Optional[Dict[Tuple[int, int, int], float]] = None) -> Dict[str, int]:
    """Choose every convolution's kernel of ``program`` by timing the candidates on sample ``x[:1]``.

    ``slow`` (for tests): extra nanoseconds added to a candidate's time, keyed by (convolution
    number, kernel, tiles). Returns counts: how many choices were measured and how many came from the cache.
    """
    cache = cache if cache is not None else PlanCache()
    with program.unfused():  # each convolution timed alone
        counts = _tune(program, x, threads, cache, reps, rounds, slow)
    if program.fusing and program.blocks:
        fused = tune_fusion(program, x, threads, cache, reps, rounds, save=not slow)
        counts = {k: counts[k] + fused[k] for k in counts}
    return counts


def fusion_candidates(program: Program, k: int) -> List[Tuple[int, int]]:
    """The projection kernels tried for fused block ``k`` of ``program``: its own (chosen for the
    unfused op) and the wide kernel in both work orders (a stripe has few pixels for the pixel
    kernel's planes, and the packed kernel computes more than the heads read)."""
    b = program.blocks[k]
    index = next(j for j, (n, _) in enumerate(program.conv_ops) if n == b.number + b.span - 1)
    op = program.conv_ops[index][1]
    own = (op.kernel, op.tiles)
    return list(dict.fromkeys([own, (KERNEL_WIDE, 0), (KERNEL_WIDE, TILES_PIXEL_MAJOR)]))


def tune_fusion(program: Program, x: torch.Tensor, threads: int, cache: PlanCache, reps: int = 3, rounds: int = 3,
                save: bool = True) -> Dict[str, int]:
    """Whether each inverted residual of ``program`` runs fused, and with which kernels: the block's ops
    (with their measured kernels) timed against the fused block with each of :func:`fusion_candidates`
    for the projection, turn by turn; where fused is fastest, then the fused block with each wide tile
    family and work order for the expansion (its stripes have fewer pixels than its map). The fastest is
    kept (and cached per machine, keyed by both convolutions' shapes and open fractions)."""
    with program.unfused():
        _, stats, _ = program.run(x[:1], threads=threads, keep=True)
    stats = stats[0].tolist()
    conv_index = {n: j for j, (n, _) in enumerate(program.conv_ops)}
    measured = reused = 0
    for k, block in enumerate(program.blocks):
        number, last = block.number, block.number + block.span - 1
        e, p = program.graph.ops[number], program.graph.ops[last]
        pj = conv_index[last]
        first = signature(e, 1.0, program.lib.variant, threads) if block.span == 3 else (
            f"dw{e.weights.kernel}s{e.weights.stride}/{e.h}x{e.w}/c{e.weights.out_channels}")
        key = f"fuse/{first}|" + signature(p, _open_fraction(program, stats, p), program.lib.variant, threads)
        cands = fusion_candidates(program, k)
        ej = conv_index[number] if block.span == 3 else None
        ecands = [(e.kernel, e.tiles)] + [(KERNEL_WIDE, f + order) for f in range(program.lib.tile_families)
                                          for order in (0, TILES_PIXEL_MAJOR)] if ej is not None else []
        ecands = list(dict.fromkeys(ecands))
        hit = cache.entries.get(key)
        if hit is not None and (not hit[0] or (tuple(hit[1:3]) in cands and (ej is None or tuple(hit[4:6]) in ecands))):
            if hit[0]:
                program.set_kernel(pj, hit[1], hit[2])
                if ej is not None:
                    program.set_kernel(ej, hit[4], hit[5])
            program.fuse_block(k, bool(hit[0]))
            reused += 1
            continue
        own = (p.kernel, p.tiles)
        timings: Dict[tuple, float] = {}
        for rnd in range(rounds + 1):
            program.fuse_block(k, False)
            program.set_kernel(pj, *own)
            t = sum(min(program.time_op(x, j, reps if rnd else 1, threads)) for j in range(number, last + 1))
            if rnd:
                timings[("unfused",)] = min(timings.get(("unfused",), t), t)
            program.fuse_block(k, True)
            for cand in cands:
                program.set_kernel(pj, *cand)
                t = min(program.time_op(x, number, reps if rnd else 1, threads))
                if rnd:
                    timings[cand] = min(timings.get(cand, t), t)
        best = min(timings, key=timings.get)
        on = best != ("unfused",)
        program.set_kernel(pj, *(best if on else own))
        program.fuse_block(k, on)
        entry = [int(on), *(best if on else own), int(timings[best])]
        if on and ej is not None:  # the expansion's kernel on the stripes
            etimes: Dict[tuple, float] = {}
            for rnd in range(rounds + 1):
                for cand in ecands:
                    program.set_kernel(ej, *cand)
                    t = min(program.time_op(x, number, reps if rnd else 1, threads))
                    if rnd:
                        etimes[cand] = min(etimes.get(cand, t), t)
            ebest = min(etimes, key=etimes.get)
            program.set_kernel(ej, *ebest)
            entry = [1, *best, int(etimes[ebest]), *ebest]
        elif ej is not None:
            entry += [e.kernel, e.tiles]
        cache.entries[key] = entry
        measured += 1
    if measured and save:
        cache.save()
    return {"measured": measured, "cached": reused}


def _tune(program, x, threads, cache, reps, rounds, slow):
    _, stats, _ = program.run(x[:1], threads=threads, keep=True)
    stats = stats[0].tolist()
    measured = reused = 0
    for index, (number, op) in enumerate(program.conv_ops):
        key = signature(op, _open_fraction(program, stats, op), program.lib.variant, threads)
        cands = candidates(op, program.lib.tile_families)
        hit = cache.entries.get(key)
        if hit is not None and tuple(hit[:2]) in cands and not slow:
            program.set_kernel(index, hit[0], hit[1])
            reused += 1
            continue
        timings = {}
        for rnd in range(rounds + 1):  # interleaved rounds (the first warms up): a slow moment hits all alike
            for cand in cands:
                program.set_kernel(index, *cand)
                t = program.time_op(x, number, reps if rnd else 1, threads)
                if rnd:  # the minimum: another process can only add time
                    best_t = min(t) + (slow or {}).get((index, *cand), 0.0)
                    timings[cand] = min(timings.get(cand, best_t), best_t)
        best = min(timings, key=timings.get)
        program.set_kernel(index, *best)
        cache.entries[key] = [best[0], best[1], int(timings[best])]
        measured += 1
    if measured and not slow:
        cache.save()
    return {"measured": measured, "cached": reused}
