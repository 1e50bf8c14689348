#!/usr/bin/env python
"""Calibrate the gates of a trained checkpoint to a MAC budget on held-out images.

    python tools/calibrate_gates.py --config-file CFG [--dataset NAME] [--budget B | --budgets B ...] \\
        [--output FILE] [--no-eval] MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

Finds one threshold for every gate such that the mean eval MAC ratio over the test split of
``--dataset`` (default ``CALIBRATION.DATASET``) is ``--budget`` (default ``SOLVER.MAC_TARGET.FINAL``)
within ``CALIBRATION.TOLERANCE``, folds it into the generators' biases and saves the model as a
checkpoint of the usual format (default: ``<weights>_calibrated.pth`` beside the weights), with a JSON
record beside it (``.json``). Unless ``--no-eval``, the model is evaluated on ``DATASETS.TEST`` before
and after. See :mod:`msgc.evaluation.calibration` for why the eval gates miss the budget that the noisy
training gates meet.

With ``--budgets B1 B2 ...`` it calibrates once per budget instead and saves the model unchanged with
its *budget table* (budget -> threshold, measured MAC ratio and top-1 on the calibration set;
default output ``<weights>_budgets.pth``): any budget the table spans is then chosen at inference
(``TEST.BUDGET``, :func:`msgc.modeling.set_budget`, ``msgc.deploy.deploy(model, budget=...)``). Unless
``--no-eval``, the model is evaluated on ``DATASETS.TEST`` as trained and at each budget.
"""
import argparse
import logging
import os
import sys

from msgc.checkpoint import MSGCCheckpointer
from msgc.config import load_cfg
from msgc.engine import DefaultTrainer, add_import_argument, import_user_modules
from msgc.evaluation import check_budget
from msgc.modeling import set_budget, set_gate_thresholds
from msgc.modeling.layers import set_budget_inputs
from msgc.utils.env import check_device
from msgc.utils.errors import ArgumentParser, InvalidValueError, MissingFileError, exit_on_user_error
from msgc.utils.file_io import write_json

logger = logging.getLogger("calibrate_gates")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the model's config (yaml)")
    add_import_argument(parser)
    parser.add_argument("--dataset", default="",
                        help="calibration dataset (its test split); default CALIBRATION.DATASET")
    parser.add_argument("--budget", type=float, default=None,
                        help="MAC ratio to reach; default SOLVER.MAC_TARGET.FINAL")
    parser.add_argument("--budgets", type=budget_list, default=None, metavar="B [B ...]",
                        help="MAC ratios of a budget table (one calibration each), saved with the unchanged model")
    parser.add_argument("--output", default="",
                        help="the checkpoint written; default <weights>_calibrated.pth (with --budgets: "
                             "<weights>_budgets.pth)")
    parser.add_argument("--no-eval", action="store_true", help="do not evaluate on DATASETS.TEST before and after")
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE pairs (MODEL.WEIGHTS is required)")
    return parser.parse_intermixed_args(gather_budgets(sys.argv[1:] if argv is None else list(argv)))


def gather_budgets(argv: list) -> list:
    """``--budgets 0.3 0.4 KEY VALUE ...`` -> ``--budgets=0.3,0.4 KEY VALUE ...``: the numbers after
    ``--budgets`` as one value (argparse's ``nargs`` would take the overrides too)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] != "--budgets":
            out.append(argv[i])
            i += 1
            continue
        j = i + 1
        while j < len(argv) and _is_number(argv[j]):
            j += 1
        out.append("--budgets=" + ",".join(argv[i + 1:j]))
        i = j
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def budget_list(text: str) -> list:
    """``0.3,0.4`` -> ``[0.3, 0.4]``."""
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected one MAC ratio or more (--budgets 0.3 0.4 ...), got {text!r}")
    return values


def output_path(weights: str, output: str, suffix: str = "calibrated") -> str:
    if output:
        return output
    stem = os.path.splitext(os.path.basename(weights))[0]
    return os.path.join(os.path.dirname(weights) or ".", f"{stem}_{suffix}.pth")


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_cfg(args.config_file, args.opts)
    import_user_modules(cfg, args)
    check_device(cfg.MODEL.DEVICE)
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise InvalidValueError("give the checkpoint to calibrate: MODEL.WEIGHTS <file>")
    if not os.path.isfile(weights):
        raise MissingFileError(f"MODEL.WEIGHTS: checkpoint {weights} does not exist")
    if args.budgets is not None:
        if args.budget is not None:
            raise InvalidValueError("give --budget (calibrate the model to one budget) or --budgets (a budget table), "
                                    "not both")
        for b in args.budgets:
            check_budget(b, "every --budgets value")
        return budget_table(cfg, args, weights)
    budget = cfg.SOLVER.MAC_TARGET.FINAL if args.budget is None else args.budget
    check_budget(budget, "--budget")
    model = DefaultTrainer.build_model(cfg)
    MSGCCheckpointer(model).load(weights)
    record = {"weights": weights, "dataset": cfg.DATASETS.TEST}
    evaluate = not args.no_eval and bool(cfg.DATASETS.TEST)
    if evaluate:
        record["before"] = DefaultTrainer.test(cfg, model)
    result = DefaultTrainer.calibrate(cfg, model, budget, args.dataset or None)
    record["calibration"] = result.as_dict()
    if evaluate:
        record["after"] = DefaultTrainer.test(cfg, model)
    path = save(model, cfg, output_path(weights, args.output), record, calibration=result.as_dict())
    print(f"threshold {result.threshold:.5g}: MAC ratio on {args.dataset or cfg.CALIBRATION.DATASET} "
          f"{result.mac_ratio_before:.4f} -> {result.mac_ratio:.4f} (budget {budget:.4f}); saved {path}")
    return record


def save(model, cfg, path: str, record: dict, **extras) -> str:
    """Save ``model`` as the checkpoint ``path`` (with ``extras``) and ``record`` beside it as JSON; returns
    ``path``, also written into ``record["output"]``."""
    out_dir = os.path.dirname(path) or "."
    os.makedirs(out_dir, exist_ok=True)
    MSGCCheckpointer(model, out_dir).save(os.path.splitext(os.path.basename(path))[0], tag_last=False, cfg=cfg,
                                          **extras)
    record["output"] = path
    write_json(os.path.splitext(path)[0] + ".json", record, indent=1, sort_keys=True)
    return path


def budget_table(cfg, args, weights: str) -> dict:
    """--budgets: the budget table of the model, saved beside its unchanged weights."""
    model = DefaultTrainer.build_model(cfg)
    MSGCCheckpointer(model).load(weights)
    dataset = args.dataset or cfg.CALIBRATION.DATASET
    table = DefaultTrainer.calibrate_budgets(cfg, model, args.budgets, dataset or None)
    record = {"weights": weights, "dataset": cfg.DATASETS.TEST, "budget_table": table.as_dict()}
    if not args.no_eval and cfg.DATASETS.TEST:
        record["as_trained"] = DefaultTrainer.test(cfg, model)
        record["at_budgets"] = {}
        for entry in table.entries:  # at the threshold found (its MAC ratio may sit beyond the table's reach)
            set_budget_inputs(model, entry.budget if table.budget_input else None)
            set_gate_thresholds(model, entry.threshold)
            record["at_budgets"][f"{entry.budget:g}"] = DefaultTrainer.test(cfg, model)
        set_budget(model, None)
    path = save(model, cfg, output_path(weights, args.output, "budgets"), record, budget_table=table.as_dict())
    lo, hi = table.reachable
    print(f"budget table of {len(table.entries)} budgets on {dataset}: MAC ratios {lo:.4f} to {hi:.4f}; saved {path}")
    for e in table.entries:
        print(f"  budget {e.budget:.4f}: threshold {e.threshold:.5g}, MAC ratio {e.mac_ratio:.4f}, top-1 {e.top1:.2f}")
    return record


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    with exit_on_user_error():  # bad input: one line, exit status 2
        main()
