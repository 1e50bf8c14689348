#!/usr/bin/env python
"""Figures of what a trained model's gates learn, along the paper's four dimensions.

    python tools/visualize_gates.py --config-file CFG [--num-images N] [--output DIR] \\
        [--dataset NAME] [--layers NAME ...] [KEY VALUE ...]       # e.g. MODEL.WEIGHTS model_final.pth

Runs the eval model over the first N images of the test set (``DATASETS.TEST``, or ``--dataset``) and
writes into DIR:

- ``group_wise.png``: for a few gated layers (``--layers``; default one per stage), how often head h
  reads channel c, channels ordered shared-first, with the heads' overlap beside it;
- ``layer_wise.png``: every gated convolution's dense against mean executed MACs, and per stage where
  its grouped convolutions sit between pruning (Jaccard 1) and static grouping (Jaccard 0);
- ``sample_wise.png``: the histogram of per-image MACs and the mean MACs per class;
  ``sample_extremes.png``: the cheapest and most expensive images with MACs and prediction;
- ``attention_wise.png`` (models with attention): attention values over the open channels per layer;
- ``gates.json``: every number behind the figures (see :mod:`msgc.analysis.gates`).

The weights must be those of the config's model, gates included: a file trained with another grouping,
attention or width is an error. A model without gates (``MODEL.MSGC.GROUPING dense``) is an error too:
it has nothing to show. Needs matplotlib: ``pip install -e ".[vis]"``.
"""
import argparse
import logging
import os
import tempfile

import torch

from msgc.analysis import collect_gate_statistics, has_gates, select_layers
from msgc.analysis.figures import require_matplotlib, write_gate_figures
from msgc.analysis.gates import load_gated_weights
from msgc.config import load_cfg
from msgc.data import build_normalizer, build_test_loader
from msgc.engine import add_import_argument, exit_on_user_error, import_user_modules
from msgc.modeling import build_model
from msgc.utils.errors import FileWriteError, InvalidValueError
from msgc.utils.file_io import write_json

logger = logging.getLogger("visualize_gates")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the model's config (yaml)")
    add_import_argument(parser)
    parser.add_argument("--dataset", default="", help="registered dataset to measure on (default DATASETS.TEST)")
    parser.add_argument("--num-images", type=int, default=512, help="images measured (the first N of the test set)")
    parser.add_argument("--output", default="output/gates", help="folder for the PNG files and gates.json")
    parser.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                        help="gated layers of the group-wise figure (mask names, e.g. layer2.1.maskgen2)")
    parser.add_argument("--extremes", type=int, default=8, help="cheapest and most expensive images shown")
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE pairs, e.g. MODEL.WEIGHTS file.pth")
    return parser.parse_intermixed_args(argv)


def prepare_output(folder: str):
    """Create ``folder`` and check that files can be written there (before the images are run)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test"):
            pass
    except OSError as e:
        raise FileWriteError(f"cannot write to the output folder '{folder}': {e.strerror or e}") from None


def build(cfg, config_file):
    """The config's model with MODEL.WEIGHTS loaded; refuses a model without gates."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("MODEL.DEVICE=%s but CUDA is not available: running on the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    if not has_gates(model):
        raise InvalidValueError(f"{config_file}: the model (MODEL.MSGC.GROUPING {cfg.MODEL.MSGC.GROUPING}) has no "
                                "gates, so there is nothing to visualize; use a gated grouping (msgc, prune or static)")
    if cfg.MODEL.WEIGHTS:
        load_gated_weights(model, cfg.MODEL.WEIGHTS)
    else:
        logger.warning("no MODEL.WEIGHTS: the figures show the gates of a randomly initialised model")
    return model


def main(argv=None):
    args = parse_args(argv)
    cfg = load_cfg(args.config_file, args.opts)
    import_user_modules(cfg, args)
    require_matplotlib()
    model = build(cfg, args.config_file)  # bad weights: an error before the output folder is made
    prepare_output(args.output)
    dataset = args.dataset or cfg.DATASETS.TEST
    loader = build_test_loader(cfg, dataset)
    stats, images = collect_gate_statistics(model, loader, args.num_images, args.extremes,
                                            getattr(loader.dataset, "classes", None), build_normalizer(cfg))
    layers = args.layers or select_layers(stats, 4)
    figures = write_gate_figures(stats, images, args.output, layers, cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
    stats.update(config_file=args.config_file, weights=cfg.MODEL.WEIGHTS, dataset=dataset,
                 model={"backbone": cfg.MODEL.BACKBONE.NAME, "grouping": cfg.MODEL.MSGC.GROUPING,
                        "attention": cfg.MODEL.MSGC.ATTENTION, "heads": cfg.MODEL.MSGC.HEADS},
                 group_wise_layers=layers, figures=figures)
    write_json(os.path.join(args.output, "gates.json"), stats)
    print(f"{stats['num_images']} images of '{dataset}': top-1 {stats['top1']:.2f}%, "
          f"{stats['mean_macs'] / 1e6:.4f} MMac per image"
          + (f" ({stats['mac_ratio']:.4f} of dense)" if stats["mac_ratio"] else ""))
    for fig in figures + [{"file": "gates.json", "size": None}]:
        print(f"  {os.path.join(args.output, fig['file'])}" + (" (%dx%d)" % tuple(fig["size"]) if fig["size"] else ""))
    return stats


def cli(argv=None):
    """:func:`main` with bad input (a missing matplotlib too) reported as one line and exit status 2."""
    with exit_on_user_error():
        return main(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli()
