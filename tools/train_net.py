#!/usr/bin/env python
"""Train or evaluate an msgc classifier: an example of using the library, meant to be copied and changed.

Examples::

    # the quickstart: the digits on the CPU, a few minutes
    python tools/train_net.py --config-file configs/quickstart.yaml

    # ImageNet on the 8 GPUs of one machine; KEY VALUE pairs override the config
    python tools/train_net.py --config-file configs/msgc_r50.yaml --num-gpus 8 OUTPUT_DIR output/r50

    # continue an interrupted or preempted run from OUTPUT_DIR/last_checkpoint (options before KEY VALUE)
    python tools/train_net.py --config-file configs/msgc_r50.yaml --num-gpus 8 --resume

    # evaluate weights (this project's, torchvision's or an original release checkpoint)
    python tools/train_net.py --config-file configs/msgc_r50.yaml --eval-only MODEL.WEIGHTS model.pth

    # two machines with 8 GPUs each (run on both, with --machine-rank 0 and 1)
    python tools/train_net.py --config-file configs/msgc_r50.yaml --num-gpus 8 --num-machines 2 \\
        --machine-rank 0 --dist-url tcp://<address of machine 0>:29500

    # or under torchrun (then --num-gpus and friends are ignored)
    torchrun --nproc-per-node 8 tools/train_net.py --config-file configs/msgc_r50.yaml

    # a backbone of your own: import the module that registers it (from the folder that holds
    # my_project/; or list it under the config key IMPORTS), in every process, before anything is built
    python <msgc>/tools/train_net.py --import my_project.tiny --config-file my.yaml MODEL.BACKBONE.NAME tiny
"""
import logging
import os

from msgc.config import load_cfg
from msgc.engine import DefaultTrainer, default_setup, launch_from_command_line
from msgc.utils import comm

logger = logging.getLogger("msgc.train_net")


class Trainer(DefaultTrainer):
    """Override ``build_*`` class methods or ``build_hooks`` here to change the training."""


def load_config(args):
    """The config of the command line: defaults, then the yaml file, then the KEY VALUE overrides."""
    return load_cfg(args.config_file, args.opts)


def setup(args):
    """The frozen config of this run, with the output folder, logging and seed prepared."""
    cfg = load_config(args)
    default_setup(cfg, args)
    cfg.freeze()
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return Trainer.evaluate_weights(cfg, args.resume)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        logger.info("Checkpoints, log.txt, metrics.json and TensorBoard events are in %s",
                    os.path.abspath(cfg.OUTPUT_DIR))
    return results


def invoke_main(argv=None):
    """The command line (one-line errors with exit status 2; exit status 143 when preempted)."""
    launch_from_command_line(main, load_config, Trainer, argv, epilog=__doc__)


if __name__ == "__main__":
    invoke_main()
