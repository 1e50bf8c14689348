"""The paper's configs train with the reference's recipe, step by step.

The recipe is encoded here from hellozhuo/msgc (commit 18ad4c7), independently of msgc's solver: the
parameter groups of ``main_dist.py``, its per-epoch learning rate (``utils.adjust_learning_rate``) and
its per-iteration MAC target. Each paper config, scaled down to 4 epochs of 3 iterations on 32x32
synthetic images, is trained by :class:`DefaultTrainer`, and every optimizer step is checked: each
parameter's learning rate, weight decay and momentum, and the MAC target (the schedule's, and the
model's buffer that holds it in float32).
"""
import math

import pytest
import torch
from torch import nn

from conftest import ROOT
from msgc.config import get_cfg
from msgc.engine import DefaultTrainer
from msgc.modeling import BACKBONE_REGISTRY, build_model
from msgc.modeling.layers import AttentionGenerator, Generator, MaskGenerator
from msgc.solver import build_optimizer

EPOCHS, IMAGES, BATCH = 4, 10, 4  # ceil(10 / 4) = 3 iterations per epoch (the last one short), 12 steps


# --- the reference's recipe ------------------------------------------------------------------------
def reference_group(name: str, batchnorm_params: set) -> str:
    """main_dist.py lines 170-185: ``BN_name_pool`` holds the weight and bias names of every
    ``nn.BatchNorm2d``; a parameter whose name contains "mask" goes to ``p_mask``, else one in the pool
    to ``p_bn``, else to ``p_conv``."""
    if "mask" in name:
        return "mask"
    return "bn" if name in batchnorm_params else "conv"


def reference_lr_and_wd(group: str, lr: float, lr_mul: float, wd: float):
    """main_dist.py lines 186-189: (initial lr, weight decay) of each group; ``--lr`` 0.075, ``--lr-mul``
    0.2 and ``--wd`` 1e-4 by default (lines 59-68)."""
    return {"mask": (lr, 0.0), "bn": (lr * lr_mul, 0.0), "conv": (lr * lr_mul, wd)}[group]


def reference_lr_multiplier(epoch: int, epochs: int) -> float:
    """utils.py lines 124-128 (cosine) and 134-135 (warm-up, ``--warm-epoch`` 0 by default: line 49),
    called at the start of every epoch (main_dist.py line 266) and held for the epoch."""
    return 0.5 * (1 + math.cos(math.pi * float(epoch) / float(epochs)))


def reference_mac_target(epoch: int, i: int, loader_len: int, epochs: int, pstart: float, pstop: float,
                         final: float) -> float:
    """main_dist.py lines 330-333: the target of iteration ``i`` of ``epoch``."""
    progress = float(epoch * loader_len + i) / (epochs * loader_len)
    target = (progress - pstart) / (pstop - pstart) * (final - 1) + 1
    return max(target, final) if progress > pstart else 1.0


def batchnorm_param_names(model: nn.Module) -> set:
    return {f"{m_name}.{p}" for m_name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
            for p in ("weight", "bias")}


# --- msgc's trainer on a scaled-down paper config -------------------------------------------------
PAPER = {  # variant: (config, MODEL.MSGC.ATTENTION, MODEL.BACKBONE.WIDTH_MULT, STEM)
    "resnet18": ("msgc_r18.yaml", "none", 0.25, "imagenet"),
    "resnet18_att": ("msgc_r18_att.yaml", "channel", 0.25, "imagenet"),
    "mobilenetv2": ("msgc_mbv2.yaml", "none", 0.5, "imagenet"),
    "mobilenetv2_att": ("msgc_mbv2_att.yaml", "channel", 0.5, "imagenet"),
    # the cifar stem: at 32x32 the imagenet stem's DenseNet-74 cannot reach its target 0.258
    "densenet74": ("msgc_condensenet.yaml", "none", 0.5, "cifar"),
    "densenet74_att": ("msgc_condensenet.yaml", "channel", 0.5, "cifar"),
}


def scaled_paper_cfg(config: str, attention: str, width: float, stem: str, output_dir):
    """The paper config with only its scale changed: epochs, images, width, device; the recipe's keys
    (groups, learning rates, schedule names, MAC target) are the config's own."""
    cfg = get_cfg()
    cfg.merge_from_file(f"{ROOT}/configs/{config}")
    iters = -(-IMAGES // BATCH)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.NUM_CLASSES", "10", "MODEL.MSGC.ATTENTION", attention,
        "MODEL.BACKBONE.WIDTH_MULT", str(width), "MODEL.BACKBONE.STEM", stem,
        "DATASETS.TRAIN", "synthetic", "DATASETS.TEST", "",
        "DATASETS.SYNTHETIC_LENGTH", str(IMAGES), "INPUT.TRAIN_SIZE", "32", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", str(BATCH), "SOLVER.MAX_ITER", str(EPOCHS * iters),
        "SOLVER.ITERS_PER_EPOCH", "0",  # counted from the training set, as the reference's loader does
        "SOLVER.CHECKPOINT_PERIOD", "0", "LOG_PERIOD", "100", "SEED", "0", "OUTPUT_DIR", str(output_dir)])
    return cfg


class StepRecorder:
    """An optimizer step pre-hook: what every parameter trains with at each step, and the MAC target."""

    def __init__(self, model, optimizer, mac_scheduler):
        self.model, self.mac_scheduler, self.steps = model, mac_scheduler, []
        self.names = {id(p): n for n, p in model.named_parameters()}
        optimizer.register_step_pre_hook(self)

    def __call__(self, optimizer, args, kwargs):
        params = {self.names[id(p)]: (g["lr"], g["weight_decay"], g["momentum"], g["nesterov"])
                  for g in optimizer.param_groups for p in g["params"]}
        self.steps.append((params, self.mac_scheduler.target(), self.model.mac_target.clone()))


@pytest.mark.parametrize("variant", PAPER)
def test_paper_config_trains_with_the_reference_recipe_at_every_step(variant, tmp_path, one_thread):
    cfg = scaled_paper_cfg(*PAPER[variant], tmp_path)
    attention = cfg.MODEL.MSGC.ATTENTION
    assert cfg.SOLVER.WARMUP_ITERS == 0  # the reference's --warm-epoch 0 (main_dist.py line 49)
    torch.manual_seed(0)
    trainer = DefaultTrainer(cfg)
    model = trainer.model
    recorder = StepRecorder(model, trainer.optimizer, trainer.mac_scheduler)
    trainer.train()

    s, t = cfg.SOLVER, cfg.SOLVER.MAC_TARGET
    loader_len = math.ceil(IMAGES / BATCH)  # DistributedSampler pads, the loader keeps the short batch
    bn = batchnorm_param_names(model)
    names = [n for n, _ in model.named_parameters()]
    groups = {n: reference_group(n, bn) for n in names}
    assert {"mask", "bn", "conv"} == set(groups.values())
    if attention != "none":  # the attention generators train with the host, their BatchNorm without decay
        assert {groups[n] for n in names if "attgen" in n} == {"bn", "conv"}
    assert len(recorder.steps) == EPOCHS * loader_len == s.MAX_ITER
    for step, (params, mac_target, model_target) in enumerate(recorder.steps):
        epoch, i = divmod(step, loader_len)
        multiplier = reference_lr_multiplier(epoch, EPOCHS)
        assert set(params) == set(names), step
        for n in names:
            lr, wd = reference_lr_and_wd(groups[n], s.BASE_LR, s.PRETRAINED_LR_MULT, s.WEIGHT_DECAY)
            assert params[n] == (lr * multiplier, wd, 0.9, True), (step, n, params[n])
        target = reference_mac_target(epoch, i, loader_len, EPOCHS, t.PSTART, t.PSTOP, t.FINAL)
        assert mac_target == target, step  # bit for bit
        assert model_target.item() == torch.tensor(target, dtype=model_target.dtype).item(), step  # the model's buffer
    # the recipe's numbers themselves (main_dist.py's defaults and scripts.sh), as the paper configs state them
    assert (s.BASE_LR, s.PRETRAINED_LR_MULT, s.WEIGHT_DECAY, s.MOMENTUM, s.NESTEROV) == (0.075, 0.2, 1e-4, 0.9, True)
    assert (t.NAME, t.PSTART, t.PSTOP) == ("linear", 0.0, 0.5)


def test_paper_epochs_are_the_reference_loaders():
    """ImageNet on 2 GPUs x 128: ceil(ceil(1,281,167 / 2) / 128) = 5005 iterations per epoch."""
    for config, epochs in [("msgc_r18.yaml", 120), ("msgc_r50_att.yaml", 120), ("msgc_mbv2.yaml", 150),
                           ("msgc_mbv2_att.yaml", 150), ("msgc_condensenet.yaml", 120)]:
        cfg = get_cfg()
        cfg.merge_from_file(f"{ROOT}/configs/{config}")
        per_gpu = math.ceil(1281167 / 2)
        assert cfg.SOLVER.ITERS_PER_EPOCH == math.ceil(per_gpu / 128) == 5005
        assert cfg.SOLVER.MAX_ITER == epochs * 5005, config
        assert tuple(cfg.SOLVER.GATE_KEYWORDS) == ("mask",) and cfg.SOLVER.LR_SCHEDULER_NAME == "cosine_epoch"


# --- every registered backbone with attention ------------------------------------------------------
def expected_group(module: nn.Module, owner: nn.Module) -> str:
    """By what a parameter is, not by its name: a mask generator's parameters are gates (the reference's
    ``p_mask``); an attention generator's, and the host's, train with the host (BatchNorm without decay)."""
    if isinstance(owner, MaskGenerator):
        return "gates"
    return "host_norm" if isinstance(module, nn.BatchNorm2d) else "host"


@pytest.mark.parametrize("name", sorted(n for n in BACKBONE_REGISTRY.names() if n.startswith("msgc_")))
def test_every_parameter_of_every_backbone_with_attention_is_in_the_reference_group(name, cfg):
    cfg.merge_from_file(f"{ROOT}/configs/Base-MSGC-ImageNet.yaml")
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.NUM_CLASSES", "10", "MODEL.BACKBONE.NAME", name,
                         "MODEL.BACKBONE.STEM", "cifar",
                         "MODEL.BACKBONE.WIDTH_MULT", "0.25" if "resnet" in name else "0.5",
                         "MODEL.MSGC.ATTENTION", "channel", "MODEL.MSGC.HEADS", "2" if "resnext" in name else "4"])
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    group_of = {id(p): g["name"] for g in optimizer.param_groups for p in g["params"]}
    owners = {}  # parameter -> (its module, the generator that holds it, if any)
    for m in model.modules():
        if isinstance(m, Generator):
            assert type(m) in (MaskGenerator, AttentionGenerator), \
                f"a new generator {type(m).__name__}: give it a group"
            for sub in m.modules():
                for p in sub.parameters(recurse=False):
                    owners[id(p)] = (sub, m)
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), (m, None))
    bn = batchnorm_param_names(model)
    kinds = set()
    for n, p in model.named_parameters():
        module, generator = owners[id(p)]
        expected = expected_group(module, generator)
        assert group_of[id(p)] == expected, f"{name}: {n} trains in {group_of[id(p)]}, the reference's {expected}"
        reference = {"mask": "gates", "bn": "host_norm", "conv": "host"}[reference_group(n, bn)]
        assert reference == expected, f"{name}: {n} would be in the reference's {reference}"
        kinds.add((type(generator).__name__, expected))
    assert {("MaskGenerator", "gates"), ("AttentionGenerator", "host"), ("AttentionGenerator", "host_norm"),
            ("NoneType", "host"), ("NoneType", "host_norm")} == kinds
