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

import torch
from tabulate import tabulate

from msgc.analysis.costs import analyze_model, build_dense_model, image_batches
from msgc.checkpoint import MSGCCheckpointer
from msgc.config import load_cfg
from msgc.engine import add_import_argument, import_user_modules
from msgc.modeling import build_model
from msgc.utils.errors import ArgumentParser, UserError, exit_on_user_error, one_line

logger = logging.getLogger("analyze_model")


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
    result = analyze_model(model, size, batches or None, build_dense_model(cfg))
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
