"""What a model costs: MACs per stage (static and measured), parameters, and open gates.

:func:`analyze_model` gives the numbers that ``tools/analyze_model.py`` prints: the backbone's static
costs split by stage as the reference's ``get_flops()`` splits them, the parameters of the host and of
the generators, and (given images) the MACs and open-gate ratios measured over them, with fvcore's count
of the dense host as an independent cross-check.
"""
import logging
import warnings
from collections import OrderedDict
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..modeling import Costs, build_model
from ..modeling.layers import AttentionGenerator, MaskGenerator
from ..utils.errors import UserError, one_line
from .structure import gated_blocks

__all__ = ["FVCORE_NOTE", "analyze_model", "build_dense_model", "fvcore_count", "image_batches",
           "measure_macs_and_gates", "parameter_counts"]

logger = logging.getLogger(__name__)

#: what fvcore's count leaves out or counts differently from the paper's
FVCORE_NOTE = ("fvcore counts one multiply-add as one flop, so its total compares with 'original'; it counts "
               "BatchNorm at 2 per element (shortcut BatchNorms too, which the paper leaves out) and skips "
               "max-pooling (the paper: 4 per output), squeeze-excitation scaling, ReLU and residual additions")
_COST_FIELDS = ("main", "dgc", "gen", "extra")


def _device(module):
    return next(module.parameters()).device


def parameter_counts(modules: Iterable[nn.Module]) -> Tuple[int, int]:
    """(host, generators): the parameters of ``modules`` (each counted once), split into those of the
    mask and attention generators and the others."""
    modules = list(modules)
    gen_ids = {id(p) for m in modules for g in m.modules() if isinstance(g, (MaskGenerator, AttentionGenerator))
               for p in g.parameters()}
    params = {id(p): p for m in modules for p in m.parameters()}
    gen = sum(p.numel() for i, p in params.items() if i in gen_ids)
    return sum(p.numel() for p in params.values()) - gen, gen


def _sub(a: Costs, b: Costs) -> Costs:
    return Costs(*(getattr(a, f) - getattr(b, f) for f in _COST_FIELDS))


def image_batches(cfg, num_images: int, source: str, batch_size: int, size: int) -> Tuple[str, List[torch.Tensor]]:
    """Normalised images to measure a model on: the test loader's, or random normal ones.

    Args:
        cfg: the config (its test dataset and normalisation).
        num_images: how many images in all.
        source: "test" (the test loader; a missing dataset is an error), "random", or "auto" (the test
            loader if its data exists, else random images).
        batch_size: images per batch of random images (the test loader's batches are its own).
        size: the side of random images.

    Returns:
        (description of the source, list of image batches on the CPU).
    """
    if source in ("auto", "test"):
        try:
            from ..data import build_normalizer, build_test_loader

            loader, normalize = build_test_loader(cfg), build_normalizer(cfg)
        except UserError as e:
            if source == "test":
                raise
            logger.info("no test data (%s): measuring on random normal images", one_line(e))
        else:
            batches, seen = [], 0
            for images, _ in loader:
                if seen >= num_images:
                    break
                batches.append(normalize(images[: num_images - seen], "cpu"))
                seen += batches[-1].size(0)
            return "test loader", batches
    gen = torch.Generator().manual_seed(0)
    return "random normal images", [torch.randn(min(batch_size, num_images - start), 3, size, size, generator=gen)
                                    for start in range(0, num_images, batch_size)]


def measure_macs_and_gates(model, batches, blocks) -> Optional[dict]:
    """Mean per-sample MACs of the model and of each gated block, and mean open ratio of every mask
    generator, over image batches.

    Args:
        model: a :class:`msgc.modeling.Classifier` in eval mode.
        batches: an iterable of image batches.
        blocks: the backbone's gated blocks (:func:`msgc.analysis.gated_blocks`).

    Returns:
        ``{"images", "macs", "block_macs": {block: macs}, "gate_open": {mask generator: ratio}}``, or
        None without images.
    """
    block_sum = {name: 0.0 for name, *_ in blocks}
    gate_sum, count = OrderedDict(), 0
    total = 0.0
    module_names = {m: n for n, m in model.backbone.named_modules()}
    hooks = []
    for name, block, _, _ in blocks:
        hooks.append(block.register_forward_hook(
            lambda mod, inp, out, name=name: block_sum.__setitem__(
                name, block_sum[name] + float((out[1] - inp[0][1]).sum()))))
    for m in model.backbone.modules():
        if isinstance(m, MaskGenerator):
            gate_sum[module_names[m]] = 0.0
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out: gate_sum.__setitem__(
                    module_names[mod], gate_sum[module_names[mod]] + float(out.flatten(1).mean(1).sum()))))
    device = _device(model)
    try:
        with torch.no_grad():
            for images in batches:
                total += float(model(images.to(device))["macs"].sum())
                count += images.size(0)
    finally:
        for hook in hooks:
            hook.remove()
    if count == 0:
        return None
    return {"images": count, "macs": total / count,
            "block_macs": {k: v / count for k, v in block_sum.items()},
            "gate_open": OrderedDict((k, v / count) for k, v in gate_sum.items())}


def analyze_model(model, size: int, batches=None, fvcore_model=None) -> dict:
    """Per-stage MACs and parameters of a model, measured MACs and open gates, as a dict (what
    ``tools/analyze_model.py --json`` prints); MACs per sample, exact integers where static.

    Args:
        model: a :class:`msgc.modeling.Classifier` (eval mode is set here).
        size: square input side.
        batches: an iterable of image batches for the measured columns (None or empty: none).
        fvcore_model: the dense host (:func:`build_dense_model`), counted with fvcore's FlopCountAnalysis
            (None: skipped).

    Returns:
        ``input_size``, ``heads``, ``stages`` (one row per stage, then one for everything outside the
        gated blocks), ``totals_macs`` and ``totals_mmac`` (original, possible, main, dgc, gen),
        ``params``; with images ``measured`` and ``gated_layers``; with ``fvcore_model`` ``fvcore``.
    """
    model.eval()
    backbone = model.backbone
    heads = backbone.heads
    blocks = gated_blocks(backbone, size, size)
    measured = measure_macs_and_gates(model, batches, blocks) if batches is not None else None
    total = backbone.complexity(size, size)

    stages = OrderedDict()
    for name, block, (h, w), stage in blocks:
        costs, _, _ = block.costs(h, w)
        entry = stages.setdefault(stage, {"blocks": [], "costs": Costs()})
        entry["blocks"].append((name, block))
        entry["costs"] = entry["costs"] + costs

    rows = []
    for stage, entry in stages.items():
        names, modules = zip(*entry["blocks"])
        rows.append(_stage_row(stage, entry["costs"], heads, modules, names, measured))
    other = _sub(total, sum((e["costs"] for e in stages.values()), Costs()))
    rows.append(_other_row(other, backbone, measured, rows))

    host, gen = parameter_counts([backbone])
    result = {
        "input_size": [size, size],
        "heads": heads,
        "stages": rows,
        "totals_macs": total.as_dict(heads),
        "totals_mmac": {k: round(v / 1e6, 4) for k, v in total.as_dict(heads).items()},
        "params": {"host": host, "generators": gen, "total": host + gen},
    }
    if measured is not None:
        result["measured"] = {"images": measured["images"], "mean_macs": measured["macs"],
                              "ratio_to_original": measured["macs"] / total.original}
        result["gated_layers"] = _gate_rows(backbone, measured)
    if fvcore_model is not None:
        result["fvcore"] = fvcore_count(fvcore_model, size, total.original)
    return result


def _stage_row(stage, costs, heads, modules, names, measured):
    host, gen = parameter_counts(modules)
    row = {"stage": stage, "blocks": len(modules), "original": costs.original,
           "possible": costs.possible(heads), "main": costs.main, "dgc": costs.dgc, "gen": costs.gen,
           "host_params": host, "gen_params": gen}
    if measured is not None:
        row["measured"] = sum(measured["block_macs"][n] for n in names)
        opens = [v for k, v in measured["gate_open"].items() if any(k.startswith(n + ".") for n in names)]
        row["gate_open"] = sum(opens) / len(opens) if opens else None
    return row


def _other_row(costs, backbone, measured, rows):
    """Everything outside the gated blocks: the remainder of the whole network's totals."""
    host_all, gen_all = parameter_counts([backbone])
    host_in = sum(r["host_params"] for r in rows)
    gen_in = sum(r["gen_params"] for r in rows)
    row = {"stage": "outside blocks (stem, transitions, head)", "blocks": 0, "original": costs.original,
           "possible": costs.possible(backbone.heads), "main": costs.main, "dgc": costs.dgc,
           "gen": costs.gen, "host_params": host_all - host_in, "gen_params": gen_all - gen_in}
    if measured is not None:
        row["measured"] = measured["macs"] - sum(r["measured"] for r in rows)
        row["gate_open"] = None
    return row


def _gate_rows(backbone, measured):
    rows = []
    modules = dict(backbone.named_modules())
    for name, ratio in measured["gate_open"].items():
        gen = modules[name]
        rows.append({"layer": name, "heads": gen.heads, "channels": gen.channels, "open": ratio})
    return rows


def fvcore_count(dense_model, size: int, original: int) -> dict:
    """fvcore's FlopCountAnalysis of the dense host's logits (one multiply-add = one flop).

    Args:
        dense_model: a :class:`msgc.modeling.Classifier` (eval mode is set here).
        size: square input side.
        original: the host's MACs by this project's count, for the ratio.

    Returns:
        ``flops``, ``mflops``, ``by_operator``, ``ratio_to_original`` and ``note`` (:data:`FVCORE_NOTE`).
    """
    from fvcore.nn import FlopCountAnalysis

    class _Logits(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, x):
            return self.backbone(x)[0]

    dense_model.eval()
    x = torch.zeros(1, 3, size, size, device=_device(dense_model))
    analysis = FlopCountAnalysis(_Logits(dense_model.backbone), x)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings():  # fvcore traces with torch.jit, which warns of its deprecation
        warnings.simplefilter("ignore", FutureWarning)
        flops = analysis.total()
    return {"flops": flops, "mflops": round(flops / 1e6, 4), "by_operator": dict(analysis.by_operator()),
            "ratio_to_original": flops / original, "note": FVCORE_NOTE}


def build_dense_model(cfg):
    """The config's model with grouping "dense" and no attention (new weights): the host network."""
    dense = cfg.clone()
    dense.MODEL.MSGC.GROUPING, dense.MODEL.MSGC.ATTENTION = "dense", "none"
    return build_model(dense)
