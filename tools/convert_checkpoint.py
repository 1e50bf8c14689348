#!/usr/bin/env python
"""Convert a torchvision state dict or an original MSGC release checkpoint to an msgc checkpoint.

    python tools/convert_checkpoint.py IN OUT [--config-file CFG] [KEY VALUE ...]

``MSGCCheckpointer`` reads both formats directly (``MODEL.WEIGHTS`` accepts any file), so converting
is optional: it gives a file in the project's own format, re-keyed into the classifier's namespace
(``backbone.*``). With ``--config-file`` the weights are first loaded into the model of that config,
so a file that does not fit it fails here rather than at training time, and the config is stored in
the checkpoint as a YAML string.
"""
import logging

import torch

from msgc.checkpoint import MSGCCheckpointer
from msgc.checkpoint.formats import convert_to_msgc
from msgc.config import load_cfg
from msgc.engine import add_import_argument, import_user_modules
from msgc.modeling import build_model
from msgc.utils.errors import ArgumentParser, InvalidValueError, exit_on_user_error
from msgc.utils.file_io import write_atomic

logger = logging.getLogger("convert_checkpoint")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="torchvision state dict or original MSGC release checkpoint (path or URL)")
    parser.add_argument("output", help="msgc checkpoint to write")
    parser.add_argument("--config-file", default="", help="check the weights against this config's model "
                        "and store the config in the checkpoint")
    add_import_argument(parser)
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE pairs")
    return parser.parse_intermixed_args(argv)


def setup_cfg(args):
    cfg = load_cfg(args.config_file, args.opts)
    import_user_modules(cfg, args)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def main(argv=None):
    args = parse_args(argv)
    data, fmt = convert_to_msgc(args.input)
    if args.config_file:
        cfg = setup_cfg(args)
        MSGCCheckpointer(build_model(cfg)).load(args.input)  # raises if the weights do not fit
        data["config"] = cfg.dump()
    elif args.opts:
        raise InvalidValueError(f"config overrides ({' '.join(args.opts)}) need --config-file")
    write_atomic(args.output, lambda f: torch.save(data, f))  # OUT is never half written
    logger.info("converted %s (%s, %d tensors) to %s", args.input, fmt, len(data["model"]), args.output)
    return data


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_user_error():  # bad input (CheckpointError, ConfigError, ...): one line, exit status 2
        main()
