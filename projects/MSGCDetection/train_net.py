#!/usr/bin/env python
"""Train or evaluate an MSGC detector (torchvision's Faster R-CNN or RetinaNet on an MSGC FPN).

The core :class:`msgc.engine.DefaultTrainer` with detection ``build_*`` overrides; the flags are those
of ``tools/train_net.py``. Run from the repository root, e.g.::

    # the toy quickstart on the CPU (generates datasets/toy_shapes when absent)
    python projects/MSGCDetection/train_net.py \\
        --config-file projects/MSGCDetection/configs/toy_faster_rcnn_msgc_R18_FPN.yaml

    # COCO on 8 GPUs from a classification checkpoint (msgc's, torchvision's or an original release)
    python projects/MSGCDetection/train_net.py --num-gpus 8 \\
        --config-file projects/MSGCDetection/configs/faster_rcnn_msgc_R50_FPN_1x.yaml MODEL.WEIGHTS r50.pth

    # continue from OUTPUT_DIR/last_checkpoint, or evaluate a trained detector
    python projects/MSGCDetection/train_net.py --config-file ... --resume
    python projects/MSGCDetection/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
"""
import logging
import os
import sys

from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # msgc_detection, from any working folder

from msgc.config import get_cfg  # noqa: E402
from msgc.engine import DefaultTrainer, default_setup, hooks, launch_from_command_line, log_model  # noqa: E402
from msgc.engine.launch import launched_world_size  # noqa: E402
from msgc.evaluation import inference_on_dataset  # noqa: E402
from msgc.utils import comm  # noqa: E402
from msgc.utils.logger import setup_logger  # noqa: E402

from msgc_detection import (COCOEvaluator, DetectionCheckpointer, add_detection_config,  # noqa: E402
                            build_detection_dataset, build_detection_test_loader, build_detection_train_loader,
                            build_detector)
from msgc_detection.config import check_detection_config  # noqa: E402
from msgc_detection.data import check_detection_dataset, to_unit_range  # noqa: E402
from msgc_detection.solver import build_detection_optimizer  # noqa: E402

logger = logging.getLogger("msgc_detection.train_net")


class Trainer(DefaultTrainer):
    """The core trainer with the detector, its data, optimizer, evaluator and checkpointer."""

    best_metric = "val/AP"

    @classmethod
    def build_checkpointer(cls, cfg, model, **checkpointables):
        # loading MODEL.WEIGHTS may map classification weights onto the backbone
        return DetectionCheckpointer(model, cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process(), **checkpointables)

    @classmethod
    def build_model(cls, cfg):
        model = build_detector(cfg)
        log_model(model, cfg)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_detection_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0):
        return build_detection_train_loader(cfg, start_iter=start_iter)

    @classmethod
    def check_config(cls, cfg, args):
        """The core's checks before any process starts, with the detection datasets and settings."""
        check_detection_config(cfg, launched_world_size(args.num_gpus, args.num_machines))
        for name in filter(None, ([] if args.eval_only else [cfg.DATASETS.TRAIN]) + [cfg.DATASETS.TEST]):
            check_detection_dataset(name, cfg.DATASETS.ROOT)
        core = cfg.clone()
        core.defrost()
        core.DATASETS.TRAIN = core.DATASETS.TEST = ""  # names of the detection catalog, checked above
        super().check_config(core, args)

    @classmethod
    def build_preprocess(cls, cfg):
        # uint8 images to [0, 1] on the device; the detector's transform resizes and normalises them
        return to_unit_range

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, model=None):
        return COCOEvaluator.from_dataset(build_detection_dataset(cfg, dataset_name, train=False))

    @classmethod
    def test(cls, cfg, model, evaluator=None):
        model = hooks.unwrap_model(model)
        loader = cls.build_test_loader(cfg, cfg.DATASETS.TEST)
        evaluator = evaluator or COCOEvaluator.from_dataset(loader.dataset)
        results = inference_on_dataset(model, loader, evaluator, preprocess=cls.build_preprocess(cfg))
        if comm.is_main_process():
            logger.info("Evaluation on %s:\n%s", cfg.DATASETS.TEST, results_table(results))
        return results


def results_table(results: dict) -> str:
    """One row: the APs (fractions), MACs in millions and the MAC ratio."""
    row = [f"{v / 1e6:.2f}" if k in ("macs", "dense_macs") else f"{v:.4f}" for k, v in results.items()]
    headers = [f"{k} (M)" if k in ("macs", "dense_macs") else k for k in results]
    return tabulate([row], headers=headers, tablefmt="pipe")


def load_config(args):
    """Defaults + the detection keys, then the yaml file, then the KEY VALUE overrides."""
    cfg = add_detection_config(get_cfg())
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    return cfg


def setup(args):
    cfg = load_config(args)
    check_detection_config(cfg, comm.get_world_size())
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="msgc_detection")
    cfg.freeze()
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return Trainer.evaluate_weights(cfg, args.resume)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main(argv=None):
    """The command line (one-line errors with exit status 2; exit status 143 when preempted)."""
    launch_from_command_line(main, load_config, Trainer, argv, epilog=__doc__)


if __name__ == "__main__":
    invoke_main()
