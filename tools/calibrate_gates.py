#!/usr/bin/env python
"""Calibrate the gates of a trained checkpoint to a MAC budget on held-out images.

    python tools/calibrate_gates.py --config-file CFG [--dataset NAME] [--budget B] [--output FILE] \\
        [--no-eval] MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

Finds one threshold for every gate such that the mean eval MAC ratio over the test split of
``--dataset`` (default ``CALIBRATION.DATASET``) is ``--budget`` (default ``SOLVER.MAC_TARGET.FINAL``)
within ``CALIBRATION.TOLERANCE``, folds it into the generators' biases and saves the model as a
checkpoint of the usual format (default: ``<weights>_calibrated.pth`` beside the weights), with a JSON
record beside it (``.json``). Unless ``--no-eval``, the model is evaluated on ``DATASETS.TEST`` before
and after. See :mod:`msgc.evaluation.calibration` for why the eval gates miss the budget that the noisy
training gates meet.
"""
import logging
import os

from msgc.checkpoint import MSGCCheckpointer
from msgc.config import load_cfg
from msgc.engine import DefaultTrainer, add_import_argument, import_user_modules
from msgc.evaluation import check_budget
from msgc.utils.env import check_device
from msgc.utils.errors import ArgumentParser, InvalidValueError, MissingFileError, exit_on_user_error
from msgc.utils.file_io import write_json

logger = logging.getLogger("calibrate_gates")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the model's config (yaml)")
    add_import_argument(parser)
    parser.add_argument("--dataset", default="", help="calibration dataset (its test split); default CALIBRATION.DATASET")
    parser.add_argument("--budget", type=float, default=None, help="MAC ratio to reach; default SOLVER.MAC_TARGET.FINAL")
    parser.add_argument("--output", default="", help="the calibrated checkpoint; default <weights>_calibrated.pth")
    parser.add_argument("--no-eval", action="store_true", help="do not evaluate on DATASETS.TEST before and after")
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE pairs (MODEL.WEIGHTS is required)")
    return parser.parse_intermixed_args(argv)


def output_path(weights: str, output: str) -> str:
    if output:
        return output
    stem = os.path.splitext(os.path.basename(weights))[0]
    return os.path.join(os.path.dirname(weights) or ".", f"{stem}_calibrated.pth")


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
    path = output_path(weights, args.output)
    out_dir = os.path.dirname(path) or "."
    os.makedirs(out_dir, exist_ok=True)
    MSGCCheckpointer(model, out_dir).save(os.path.splitext(os.path.basename(path))[0], tag_last=False, cfg=cfg,
                                          calibration=result.as_dict())
    record["output"] = path
    write_json(os.path.splitext(path)[0] + ".json", record, indent=1, sort_keys=True)
    print(f"threshold {result.threshold:.5g}: MAC ratio on {args.dataset or cfg.CALIBRATION.DATASET} "
          f"{result.mac_ratio_before:.4f} -> {result.mac_ratio:.4f} (budget {budget:.4f}); saved {path}")
    return record


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    with exit_on_user_error():  # bad input: one line, exit status 2
        main()
