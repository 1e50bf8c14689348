#!/usr/bin/env python
"""Convert a torchvision state dict or an original MSGC release checkpoint to an msgc checkpoint.

    python tools/convert_checkpoint.py IN OUT [--config-file CFG] [KEY VALUE ...]

``MSGCCheckpointer`` reads both formats directly (``MODEL.WEIGHTS`` accepts any file), so converting
is optional: it gives a file in the project's own format, re-keyed into the classifier's namespace
(``backbone.*``). With ``--config-file`` the weights are first loaded into the model of that config,
so a file that does not fit it fails here rather than at training time, and the config is stored in
the checkpoint as a YAML string.
"""
import argparse
import logging
import os
import sys

import torch

from msgc.checkpoint import MSGCCheckpointer
from msgc.checkpoint.formats import convert_to_msgc
from msgc.config import ConfigError, load_cfg
from msgc.modeling import build_model

logger = logging.getLogger("convert_checkpoint")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="torchvision state dict or original MSGC release checkpoint (path or URL)")
    parser.add_argument("output", help="msgc checkpoint to write")
    parser.add_argument("--config-file", default="", help="check the weights against this config's model "
                        "and store the config in the checkpoint")
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE pairs")
    return parser.parse_intermixed_args(argv)


def setup_cfg(args):
    cfg = load_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def save_atomic(data, path):
    """torch.save through a temporary file and os.replace: OUT is never half written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(data, tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    data, fmt = convert_to_msgc(args.input)
    if args.config_file:
        cfg = setup_cfg(args)
        MSGCCheckpointer(build_model(cfg)).load(args.input)  # raises if the weights do not fit
        data["config"] = cfg.dump()
    elif args.opts:
        raise SystemExit("config overrides need --config-file")
    save_atomic(data, args.output)
    logger.info("converted %s (%s, %d tensors) to %s", args.input, fmt, len(data["model"]), args.output)
    return data


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, ConfigError) as e:  # CheckpointError, ConfigError: one line, no traceback
        sys.exit(f"error: {e}")
