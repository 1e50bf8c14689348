"""Optimizer groups and the LR and MAC-target schedules, against the reference's formulas."""
import math

import pytest
import torch
from torch import nn

from msgc.config import get_cfg
from msgc.modeling import build_model
from msgc.solver import SCHEDULER_REGISTRY, build_lr_scheduler, build_mac_scheduler, build_optimizer, iters_per_epoch
from msgc.utils.registry import UnknownNameError


def _cfg(**solver):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.STEM = "cifar"
    cfg.MODEL.BACKBONE.WIDTH_MULT = 0.25
    cfg.MODEL.NUM_CLASSES = 10
    for key, value in solver.items():
        node = cfg.SOLVER
        *path, last = key.split("__")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def reference_mac_target(progress, start, stop, final):
    """main_dist.py of hellozhuo/msgc, train(): the target of the sparsity loss."""
    target = (progress - start) / (stop - start) * (final - 1) + 1
    return max(target, final) if progress > start else 1.0


@pytest.mark.parametrize("final,start,stop", [(0.49, 0.0, 0.5), (0.457, 0.1, 0.6), (0.258, 0.25, 1.0)])
def test_linear_mac_target_equals_reference_formula_exactly(final, start, stop):
    max_iter = 997
    cfg = _cfg(MAX_ITER=max_iter, MAC_TARGET__FINAL=final, MAC_TARGET__PSTART=start, MAC_TARGET__PSTOP=stop)
    sched = build_mac_scheduler(cfg)
    targets = []
    for it in range(max_iter):
        targets.append(sched.target())
        sched.step()
    expected = [reference_mac_target(it / max_iter, start, stop, final) for it in range(max_iter)]
    assert targets == expected  # bit-for-bit
    assert targets[0] == 1.0
    assert (targets[-1] == final) == (stop < 1.0)  # PSTOP 1.0 is reached only after the last iteration


def test_mac_target_values_at_given_iterations():
    cfg = _cfg(MAX_ITER=100, MAC_TARGET__FINAL=0.5, MAC_TARGET__PSTART=0.2, MAC_TARGET__PSTOP=0.6)
    sched = build_mac_scheduler(cfg)
    assert sched.target(0) == 1.0
    assert sched.target(20) == 1.0  # progress == PSTART: not yet started
    assert sched.target(40) == pytest.approx(0.75)
    assert sched.target(60) == 0.5
    assert sched.target(99) == 0.5
    cfg.SOLVER.MAC_TARGET.NAME = "cosine"
    cos = build_mac_scheduler(cfg)
    assert cos.target(20) == 1.0
    assert cos.target(40) == pytest.approx(0.75)  # half-way of a half-cosine is the midpoint
    assert cos.target(30) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi * 0.25)))
    assert cos.target(70) == 0.5


def test_mac_scheduler_state_resumes():
    cfg = _cfg(MAX_ITER=50, MAC_TARGET__FINAL=0.3)
    a = build_mac_scheduler(cfg)
    for _ in range(17):
        a.step()
    b = build_mac_scheduler(cfg)
    b.load_state_dict(a.state_dict())
    assert b.target() == a.target() == reference_mac_target(17 / 50, 0.0, 0.5, 0.3)


def _lrs(cfg, iters):
    model = nn.Linear(2, 2)
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    out = []
    for _ in range(iters):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_lr_with_warmup_values():
    cfg = _cfg(MAX_ITER=100, BASE_LR=0.1, PRETRAINED_LR_MULT=1.0, WARMUP_ITERS=10, WARMUP_FACTOR=0.01)
    lrs = _lrs(cfg, 100)
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * i / 100)) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1 * 0.01)
    assert lrs[5] == pytest.approx(cosine[5] * (0.01 + 0.99 * 0.5))
    assert lrs[10:] == pytest.approx(cosine[10:])
    assert lrs[50] == pytest.approx(0.05)


def reference_epoch_cosine(iteration, iters_per_epoch, epochs):
    """hellozhuo/msgc utils.adjust_learning_rate (cosine), set at each epoch's start and held."""
    return 0.5 * (1 + math.cos(math.pi * float(iteration // iters_per_epoch) / epochs))


def test_epoch_cosine_holds_each_epochs_value():
    cfg = _cfg(MAX_ITER=12, BASE_LR=1.0, PRETRAINED_LR_MULT=1.0, LR_SCHEDULER_NAME="cosine_epoch", ITERS_PER_EPOCH=3)
    lrs = _lrs(cfg, 14)
    assert lrs == [reference_epoch_cosine(min(i, 11), 3, 4) for i in range(14)]  # bit for bit, held past MAX_ITER
    assert lrs[:6] == [1.0] * 3 + [0.5 * (1 + math.cos(math.pi / 4))] * 3
    cfg.SOLVER.MAX_ITER = 10  # a last, partial epoch: 10 / 3 epochs
    assert _lrs(cfg, 10) == pytest.approx([reference_epoch_cosine(i, 3, 10 / 3) for i in range(10)])
    cfg.SOLVER.ITERS_PER_EPOCH = 50  # shorter than an epoch (e.g. a smoke run of a paper config): the first epoch's 1.0
    assert _lrs(cfg, 10) == [1.0] * 10


def test_epoch_cosine_at_imagenet_scale_is_the_references_over_every_iteration():
    cfg = _cfg(MAX_ITER=150 * 5005, LR_SCHEDULER_NAME="cosine_epoch", ITERS_PER_EPOCH=5005)
    sched = build_lr_scheduler(cfg, build_optimizer(cfg, nn.Linear(2, 2)))
    assert all(sched.multiplier(i) == reference_epoch_cosine(i, 5005, 150) for i in range(0, 150 * 5005, 7))
    assert sched.multiplier(5004) == 1.0 and sched.multiplier(5005) < 1.0


def test_epoch_cosine_with_warmup_multiplies_the_held_value():
    cfg = _cfg(MAX_ITER=12, BASE_LR=1.0, PRETRAINED_LR_MULT=1.0, LR_SCHEDULER_NAME="cosine_epoch", ITERS_PER_EPOCH=3,
               WARMUP_ITERS=4, WARMUP_FACTOR=0.1)
    lrs = _lrs(cfg, 12)
    ramp = [0.1 + 0.9 * i / 4 for i in range(4)]  # the linear warm-up, on top of the held value
    assert lrs[:4] == pytest.approx([reference_epoch_cosine(i, 3, 4) * ramp[i] for i in range(4)])
    assert lrs[4:] == pytest.approx([reference_epoch_cosine(i, 3, 4) for i in range(4, 12)])


def test_epoch_length_from_the_training_set():
    """ITERS_PER_EPOCH 0: ceil(images / IMS_PER_BATCH), the reference loader's length."""
    cfg = _cfg(MAX_ITER=9, BASE_LR=1.0, PRETRAINED_LR_MULT=1.0, LR_SCHEDULER_NAME="cosine_epoch", IMS_PER_BATCH=4)
    cfg.merge_from_list(["DATASETS.TRAIN", "synthetic", "DATASETS.SYNTHETIC_LENGTH", "10", "INPUT.TRAIN_SIZE", "8"])
    assert iters_per_epoch(cfg) == 3
    assert _lrs(cfg, 9) == [reference_epoch_cosine(i, 3, 3) for i in range(9)]
    cfg.SOLVER.ITERS_PER_EPOCH = 2
    assert iters_per_epoch(cfg) == 2


def test_multistep_lr_values():
    cfg = _cfg(MAX_ITER=100, BASE_LR=1.0, PRETRAINED_LR_MULT=1.0, LR_SCHEDULER_NAME="multistep", STEPS=(30, 80),
               GAMMA=0.1)
    lrs = _lrs(cfg, 100)
    assert lrs[29] == 1.0 and lrs[30] == pytest.approx(0.1) and lrs[79] == pytest.approx(0.1)
    assert lrs[80] == pytest.approx(0.01) and lrs[99] == pytest.approx(0.01)


def test_lr_scheduler_state_dict_resumes_and_has_no_objects():
    cfg = _cfg(MAX_ITER=40)
    model = nn.Linear(2, 2)
    opt = build_optimizer(cfg, model)
    a = build_lr_scheduler(cfg, opt)
    for _ in range(13):
        opt.step()
        a.step()
    state = a.state_dict()
    assert all(isinstance(v, (int, float, bool, list)) for v in state.values())
    opt2 = build_optimizer(cfg, model)
    b = build_lr_scheduler(cfg, opt2)
    b.load_state_dict(state)
    opt2.step()
    b.step()
    a.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])


def test_schedule_errors():
    with pytest.raises(ValueError, match="learning rate only"):
        build_mac_scheduler(_cfg(MAC_TARGET__NAME="multistep"))
    with pytest.raises(UnknownNameError, match="linear"):
        build_mac_scheduler(_cfg(MAC_TARGET__NAME="exponential"))
    with pytest.raises(ValueError, match="FINAL"):
        build_mac_scheduler(_cfg(MAC_TARGET__FINAL=0.0))
    with pytest.raises(ValueError, match="'cosine_epoch' schedule is for the learning rate only"):
        build_mac_scheduler(_cfg(MAC_TARGET__NAME="cosine_epoch"))
    with pytest.raises(ValueError, match="SOLVER.ITERS_PER_EPOCH must be >= 0"):
        build_mac_scheduler(_cfg(ITERS_PER_EPOCH=-1))
    with pytest.raises(ValueError, match="SOLVER.GATE_KEYWORDS"):
        build_mac_scheduler(_cfg(GATE_KEYWORDS=("mask", "")))
    assert {"linear", "cosine", "cosine_epoch", "multistep", "constant"} <= set(SCHEDULER_REGISTRY.names())


def test_optimizer_groups_with_attention_generators_as_gates():
    """msgc's default (SOLVER.GATE_KEYWORDS "mask" and "attgen"): the attention generators train as gates.
    The paper's configs use the reference's rule instead (below, and tests/test_paper_recipe.py)."""
    cfg = _cfg(BASE_LR=0.075, PRETRAINED_LR_MULT=0.2, WEIGHT_DECAY=1e-4)
    cfg.MODEL.MSGC.ATTENTION = "channel"
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"gates", "host_norm", "host"}
    names = {id(p): n for n, p in model.named_parameters()}
    gate_names = [names[id(p)] for p in groups["gates"]["params"]]
    assert any("maskgen" in n for n in gate_names) and any("attgen" in n for n in gate_names)
    assert all("maskgen" in n or "attgen" in n for n in gate_names)
    # the generators' own BatchNorms train with the gates (for the mask generators, as in the reference)
    assert any(".conv.1.weight" in n for n in gate_names)
    norm_names = [names[id(p)] for p in groups["host_norm"]["params"]]
    assert norm_names and all(".bn" in n or "downsample.1" in n for n in norm_names)
    host_names = [names[id(p)] for p in groups["host"]["params"]]
    assert "backbone.conv1.weight" in host_names and "backbone.fc.weight" in host_names
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert groups["gates"]["lr"] == 0.075 and groups["gates"]["weight_decay"] == 0.0
    assert groups["host_norm"]["lr"] == pytest.approx(0.015) and groups["host_norm"]["weight_decay"] == 0.0
    assert groups["host"]["lr"] == pytest.approx(0.015) and groups["host"]["weight_decay"] == 1e-4
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_optimizer_groups_of_the_reference_rule():
    """SOLVER.GATE_KEYWORDS ["mask"] (the paper's configs): the attention generators' convolutions train
    with the host's, with weight decay, and their BatchNorms with the host's BatchNorms."""
    cfg = _cfg(BASE_LR=0.075, PRETRAINED_LR_MULT=0.2, WEIGHT_DECAY=1e-4, GATE_KEYWORDS=("mask",))
    cfg.MODEL.MSGC.ATTENTION = "channel"
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: [names[id(p)] for p in g["params"]] for g in opt.param_groups}
    assert groups["gates"] and all("maskgen" in n for n in groups["gates"])
    att = [n for n, _ in model.named_parameters() if "attgen" in n]
    assert att and set(att) <= set(groups["host"]) | set(groups["host_norm"])
    assert {n for n in att if ".conv.1." in n} == {n for n in groups["host_norm"] if "attgen" in n}
