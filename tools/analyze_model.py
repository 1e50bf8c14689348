#!/usr/bin/env python
"""MACs, parameters and gate statistics of the model of a config.

    python tools/analyze_model.py --config-file CFG [KEY VALUE ...] [--num-images N] [--json]

Prints, at the test size (``INPUT.TEST_SIZE``):

- a table per stage of the dense host's MACs and the lowest reachable MACs (every head reading a
  quarter of its channels, plus the generators), split like the reference's ``get_flops()``, with the
  MACs and open-gate ratio measured over N images and the parameters of the host and generators;
- the open-gate ratio of every mask generator over the same images;
- the static totals in MMac (original, possible, main, dgc, gen), the numbers the paper's table uses;
- fvcore's ``FlopCountAnalysis`` of the dense host as an independent cross-check of "original".

Images come from the test loader when the test dataset exists (``--images test``), else they are
random normal images (already "normalised"; ``--images random``). The static numbers need no
weights; ``MODEL.WEIGHTS`` is loaded only for the measured columns (gate statistics of a randomly
initialised model say little), and when it cannot be loaded (e.g. a URL on a machine without
internet access) the tool prints the static tables and says what it skipped. ``--num-images 0``
skips the measurement. ``--json`` prints one JSON object instead, for scripts.
"""
import json
import logging
import warnings
from collections import OrderedDict

import torch
from tabulate import tabulate

from msgc.analysis import gated_blocks
from msgc.checkpoint import MSGCCheckpointer
from msgc.config import load_cfg
from msgc.engine import add_import_argument, import_user_modules
from msgc.modeling import Costs, build_model
from msgc.modeling.layers import AttentionGenerator, MaskGenerator
from msgc.utils.errors import ArgumentParser, UserError, exit_on_user_error, one_line

logger = logging.getLogger("analyze_model")

FVCORE_NOTE = ("fvcore counts one multiply-add as one flop, so its total compares with 'original'; it counts "
               "BatchNorm at 2 per element (shortcut BatchNorms too, which the paper leaves out) and skips "
               "max-pooling (the paper: 4 per output), squeeze-excitation scaling, ReLU and residual additions")
_COST_FIELDS = ("main", "dgc", "gen", "extra")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the model's config (yaml)")
    add_import_argument(parser)
    parser.add_argument("--num-images", type=int, default=32,
                        help="images over which gates are measured (0: static numbers only, no weights loaded)")
    parser.add_argument("--images", choices=("auto", "test", "random"), default="auto",
                        help="test loader, random normal images, or the test loader if its data exists")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE pairs")
    return parser.parse_intermixed_args(argv)


def setup_cfg(args):
    cfg = load_cfg(args.config_file, args.opts)
    import_user_modules(cfg, args)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("MODEL.DEVICE=%s but CUDA is not available: analysing on the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def _device(module):
    return next(module.parameters()).device


def _params(modules):
    """(host, generator) parameter counts of modules."""
    gen_ids = {id(p) for m in modules for g in m.modules() if isinstance(g, (MaskGenerator, AttentionGenerator))
               for p in g.parameters()}
    params = {id(p): p for m in modules for p in m.parameters()}
    gen = sum(p.numel() for i, p in params.items() if i in gen_ids)
    return sum(p.numel() for p in params.values()) - gen, gen


def _sub(a: Costs, b: Costs) -> Costs:
    return Costs(*(getattr(a, f) - getattr(b, f) for f in _COST_FIELDS))


# ------------------------------------------------------------------------------------------------
# Measurement over images
# ------------------------------------------------------------------------------------------------
def image_batches(cfg, num_images, source, batch_size, size):
    """(description, list of normalised image batches): the test loader's images or random ones."""
    if source in ("auto", "test"):
        try:
            from msgc.data import build_normalizer, build_test_loader

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


def measure(model, batches, blocks):
    """Mean per-sample MACs (whole model and per block) and mean open ratio of every mask generator."""
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


# ------------------------------------------------------------------------------------------------
# Analysis
# ------------------------------------------------------------------------------------------------
def analyze(model, size, batches=None, fvcore_model=None):
    """The numbers the tool prints, as a dict (see ``--json``); MACs per sample, exact integers where static.

    Args:
        model: a :class:`msgc.modeling.Classifier` (eval mode is set here).
        size: square input side.
        batches: an iterable of image batches for the measured columns (None or empty: none).
        fvcore_model: the dense host, counted with fvcore's FlopCountAnalysis (None: skipped).
    """
    model.eval()
    backbone = model.backbone
    heads = backbone.heads
    blocks = gated_blocks(backbone, size, size)
    measured = measure(model, batches, blocks) if batches is not None else None
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

    host, gen = _params([backbone])
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
    host, gen = _params(modules)
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
    host_all, gen_all = _params([backbone])
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


def fvcore_count(dense_model, size, original):
    """fvcore's FlopCountAnalysis of the dense host's logits (one multiply-add = one flop)."""
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


def dense_host(cfg):
    """The config's model with grouping "dense" and no attention: the host network."""
    dense = cfg.clone()
    dense.MODEL.MSGC.GROUPING, dense.MODEL.MSGC.ATTENTION = "dense", "none"
    return build_model(dense)


# ------------------------------------------------------------------------------------------------
# Printing
# ------------------------------------------------------------------------------------------------
def _m(v, digits=4):
    return "-" if v is None else f"{v / 1e6:.{digits}f}"


def format_report(result) -> str:
    measured = "measured" in result
    headers = ["stage", "blocks", "dense MMac", "possible MMac", "main", "dgc", "gen"]
    if measured:
        headers += ["measured MMac", "gates open"]
    headers += ["host params (M)", "gen params (M)"]
    rows = []
    for r in result["stages"]:
        row = [r["stage"], r["blocks"] or "", _m(r["original"]), _m(r["possible"]), _m(r["main"]),
               _m(r["dgc"]), _m(r["gen"])]
        if measured:
            row += [_m(r["measured"]), "-" if r["gate_open"] is None else f"{100 * r['gate_open']:.1f}%"]
        row += [_m(r["host_params"], 3), _m(r["gen_params"], 3)]
        rows.append(row)
    h, w = result["input_size"]
    out = [f"Per stage at {h}x{w}, MACs per image ({result['heads']} heads; 'possible' = every head "
           "reading 1/heads of its channels, generators included):",
           tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)]
    t = result["totals_mmac"]
    p = result["params"]
    out += ["", "Static totals (the reference's get_flops()), MMac:",
            tabulate([[t["original"], t["possible"], t["main"], t["dgc"], t["gen"],
                       f"{p['total'] / 1e6:.3f}"]],
                     headers=["original", "possible", "main", "dgc", "gen", "params (M)"],
                     tablefmt="pipe", floatfmt=".4f")]
    if measured:
        m = result["measured"]
        out += ["", f"Measured over {m['images']} images ({result.get('image_source', '?')}): "
                f"{m['mean_macs'] / 1e6:.4f} MMac per image, {100 * m['ratio_to_original']:.2f}% of original",
                "", "Open gates per gated layer:",
                tabulate([[g["layer"], g["heads"], g["channels"], f"{100 * g['open']:.1f}%"]
                          for g in result["gated_layers"]],
                         headers=["mask generator", "heads", "channels", "open"], tablefmt="pipe")]
    if "fvcore" in result:
        f = result["fvcore"]
        ops = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sorted(f["by_operator"].items(), key=lambda kv: -kv[1]))
        out += ["", f"fvcore FlopCountAnalysis of the dense host: {f['mflops']:.4f} M flops "
                f"({100 * f['ratio_to_original']:.2f}% of original; {ops}).", f"Note: {f['note']}."]
    if "skipped" in result:
        out += ["", f"Skipped: {result['skipped']}."]
    return "\n".join(out)


def load_weights(model, weights: str):
    """Load ``weights`` (if any) for the measured columns; returns what was skipped without them, or None."""
    if not weights:
        return None
    try:
        MSGCCheckpointer(model).load(weights)
    except UserError as e:
        return f"the measured MACs and open-gate ratios, because MODEL.WEIGHTS could not be loaded: {one_line(e)}"
    return None


def main(argv=None):
    args = parse_args(argv)
    cfg = setup_cfg(args)
    model = build_model(cfg)  # the static numbers need no weights
    size = cfg.INPUT.TEST_SIZE
    skipped = load_weights(model, cfg.MODEL.WEIGHTS) if args.num_images > 0 else None
    source, batches = None, None
    if args.num_images > 0 and skipped is None:
        source, batches = image_batches(cfg, args.num_images, args.images, args.batch_size, size)
    result = analyze(model, size, batches or None, dense_host(cfg))
    result["config_file"] = args.config_file
    result["model"] = cfg.MODEL.BACKBONE.NAME
    if source is not None:
        result["image_source"] = source
    if skipped:
        result["skipped"] = skipped
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_user_error():  # bad input: one line, exit status 2
        main()
