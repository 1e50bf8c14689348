"""Where a deployed model's time goes: every op of its native program timed on one sample.

The ops are replayed in C on the state that a run of the sample left (as the kernel choice does), so a
row holds the op alone: no Python, no call overhead. Use it to find the layers that miss a goal.
"""
import statistics
from collections import OrderedDict
from typing import Dict, List

import torch

from .graph import AffineOp, ConvOp, DepthwiseOp, GatesOp, HeadOp, PoolOp, SetsOp

__all__ = ["profile", "by_scope", "by_kind"]


def describe(op) -> str:
    """A short name of an op's kind and shape."""
    if isinstance(op, ConvOp):
        wt = op.weights
        heads = f"{wt.heads}x{wt.per_head}" if wt.heads > 1 else f"{wt.per_head}"
        gated = "gated " if op.in_set is not None else ""
        return f"{gated}conv {wt.kernel}x{wt.kernel}/{wt.stride} {wt.in_channels}->{heads} at {op.h}x{op.w}"
    if isinstance(op, GatesOp):
        return f"generators ({len(op.generators)}) on {op.src.cols} channels"
    if isinstance(op, SetsOp):
        return f"index sets {op.set.heads}x{op.set.channels}"
    if isinstance(op, DepthwiseOp):
        return f"depthwise {op.weights.kernel}x{op.weights.kernel}/{op.weights.stride} at {op.h}x{op.w}"
    if isinstance(op, AffineOp):
        return "batchnorm + relu"
    if isinstance(op, PoolOp):
        return f"{op.kind} pool {op.k}x{op.k}/{op.stride} at {op.src.h}x{op.src.w}"
    if isinstance(op, HeadOp):
        return f"global pool + classifier {op.src.cols}->{op.weight.size(0)}"
    return type(op).__name__


def kind(op) -> str:
    if isinstance(op, ConvOp):
        return "gated conv" if op.in_set is not None else "dense conv"
    return {GatesOp: "generators", SetsOp: "index sets", DepthwiseOp: "depthwise", AffineOp: "batchnorm",
            PoolOp: "pooling", HeadOp: "classifier"}.get(type(op), type(op).__name__)


def kernel_name(op: ConvOp) -> str:
    return ("wide", "pixel", "gather", "packed")[op.kernel] + (
        "" if op.kernel == 1 else f"/{op.tiles % 16}" + ("/pixel-major" if op.tiles & 16 else ""))


def profile(deployed, images: torch.Tensor, reps: int = 7) -> List[Dict]:
    """Per op of ``deployed``'s native program on ``images[:1]``: ``scope`` (block), ``kind``, ``op``
    (kind and shape), ``ms`` (median of ``reps`` replays), and for convolutions the kernel chosen. A fused
    inverted residual is one row, at its first op's place (kind ``fused block``, the block's time); its
    other ops follow with ``ms`` 0 and ``fused`` set."""
    if not deployed.native:
        raise ValueError("profile: the deployed model does not run the native program (deploy with native=True)")
    with torch.no_grad():
        plan = deployed.plan(images)
        x = images[:1].float().contiguous()
        program = plan.program
        program.run(x, keep=True)
        rows = []
        ops = plan.graph.ops
        for i, (op, scope) in enumerate(zip(ops, plan.graph.scopes)):
            span = program.fused_at(i)
            ms = statistics.median(program.time_op(x, i, reps)) / 1e6 if span else 0.0
            row = {"scope": scope, "kind": kind(op), "op": describe(op), "ms": ms}
            if isinstance(op, ConvOp):
                row["kernel"] = kernel_name(op)
            if span > 1:
                block = ops[i:i + span]
                row.update(kind="fused block", op="fused " + ", ".join(describe(o) for o in block),
                           kernel=" + ".join(kernel_name(o) for o in block if isinstance(o, ConvOp)))
            if span == 0:
                row["fused"] = True
            rows.append(row)
    return rows


def _total(rows, key) -> "OrderedDict[str, float]":
    out: "OrderedDict[str, float]" = OrderedDict()
    for r in rows:
        out[key(r)] = out.get(key(r), 0.0) + r["ms"]
    return out


def by_scope(rows: List[Dict], depth: int = 1) -> "OrderedDict[str, float]":
    """Milliseconds per stage: the first ``depth`` parts of the scope (``layer3``, ``features.4``)."""
    return _total(rows, lambda r: ".".join(r["scope"].split(".")[:depth]))


def by_kind(rows: List[Dict]) -> "OrderedDict[str, float]":
    return _total(rows, lambda r: r["kind"])
