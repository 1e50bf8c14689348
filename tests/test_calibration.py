"""Gate thresholds, their folding, the gate-noise schedule, reachable MAC ratios and gate calibration."""
import json
import logging
import math
import os

import pytest
import torch

from msgc.checkpoint import MSGCCheckpointer
from msgc.config import get_cfg
from msgc.data import build_normalizer, build_test_loader
from msgc.engine import DefaultTrainer
from msgc.evaluation import calibrate_gates
from msgc.modeling import build_model, check_mac_target, fold_gate_thresholds, mask_generators, set_gate_thresholds
from msgc.modeling.layers import BinaryGate
from msgc.solver import build_gate_noise_schedule
from msgc.utils.errors import InvalidValueError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits_cfg(tmp_path=None, **overrides):
    """The quickstart (an MSGC ResNet-18 at a quarter width on the 16x16 digits), shortened."""
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "quickstart.yaml"))
    cfg.merge_from_list(["SOLVER.MAX_ITER", "30", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "0",
                         "TEST.EVAL_PERIOD", "0", "TEST.GATE_SUMMARY_IMAGES", "0", "TEST.IMS_PER_BATCH", "90",
                         "OUTPUT_DIR", str(tmp_path or ""), "LOG_PERIOD", "1000"])
    for key, value in overrides.items():
        cfg.merge_from_list([key.replace("__", "."), value])
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quickstart's model after 30 iterations towards a MAC target of 0.5, and its config."""
    folder = tmp_path_factory.mktemp("trained")
    cfg = digits_cfg(folder)
    trainer = DefaultTrainer(cfg)
    trainer.train()
    return cfg, str(folder / "model_final.pth")


def load(cfg, weights):
    model = build_model(cfg)
    MSGCCheckpointer(model).load(weights)
    return model.eval()


def batches(cfg):
    norm = build_normalizer(cfg)
    return [norm(x, "cpu") for x, _ in build_test_loader(cfg, "digits")]


def mean_ratio(model, images):
    with torch.no_grad():
        return float(torch.cat([model(x)["macs"] for x in images]).mean()) / model.dense_macs(16, 16)


# ------------------------------------------------------------------------------------------------
# The gate: threshold and noise
# ------------------------------------------------------------------------------------------------
def test_gate_threshold_moves_the_eval_decision_and_folds_into_the_bias():
    torch.manual_seed(0)
    cfg = digits_cfg()
    model = build_model(cfg).eval()
    for g in mask_generators(model):
        torch.nn.init.normal_(g.second.weight, std=2.0)
        torch.nn.init.normal_(g.second.bias, std=2.0)
    gen = mask_generators(model)[3]
    context = torch.randn(8, gen.in_channels, 1, 1)
    logits = gen.logits(context)
    gen.gate.threshold = 0.7
    assert torch.equal(gen(context), (logits >= 0.7).float())
    x = torch.randn(6, 3, 16, 16)
    set_gate_thresholds(model, 0.4)
    with torch.no_grad():
        shifted = model(x)
    bias_before = gen.second.bias.detach().clone()
    fold_gate_thresholds(model)
    assert all(g.gate.threshold == 0.0 for g in mask_generators(model))
    assert torch.allclose(gen.second.bias, bias_before - 0.4, atol=0, rtol=0)
    with torch.no_grad():
        folded = model(x)
    assert torch.equal(folded["macs"], shifted["macs"])
    assert torch.allclose(folded["logits"], shifted["logits"], atol=1e-5)


def test_gate_noise_scale_zero_trains_with_the_eval_decision_and_a_soft_gradient():
    gate = BinaryGate(temperature=0.5).train()
    logits = torch.tensor([-2.0, -0.1, 0.0, 0.3, 3.0], requires_grad=True)
    gate.noise = 0.0
    out = gate(logits)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    out.sum().backward()
    soft = torch.sigmoid(logits.detach() / 0.5)
    assert torch.allclose(logits.grad, soft * (1 - soft) / 0.5)
    # the paper's noise (scale 1) decides some gates otherwise: open with probability sigmoid(logit)
    gate.noise = 1.0
    torch.manual_seed(0)
    many = gate(torch.full((20000,), 1.0))
    assert abs(float(many.mean()) - 1 / (1 + math.exp(-1.0))) < 0.01


def test_gate_noise_schedule_and_its_hook():
    cfg = digits_cfg()
    assert build_gate_noise_schedule(cfg)(0.9) == 1.0  # the default: the paper's noise throughout
    cfg.merge_from_list(["SOLVER.GATE_NOISE.NAME", "linear", "SOLVER.GATE_NOISE.FINAL", "0.0"])
    schedule = build_gate_noise_schedule(cfg)
    assert [schedule(p) for p in (0.0, 0.5, 0.75, 1.0)] == [1.0, 1.0, 0.5, 0.0]
    cfg.merge_from_list(["SOLVER.GATE_NOISE.NAME", "cosine", "SOLVER.GATE_NOISE.PSTART", "0.0"])
    assert build_gate_noise_schedule(cfg)(0.5) == pytest.approx(0.5)
    cfg.merge_from_list(["SOLVER.GATE_NOISE.NAME", "multistep"])
    with pytest.raises(InvalidValueError, match="for SOLVER.GATE_NOISE.NAME"):
        build_gate_noise_schedule(cfg)
    cfg.merge_from_list(["SOLVER.GATE_NOISE.NAME", "linear", "SOLVER.GATE_NOISE.FINAL", "1.5"])
    with pytest.raises(InvalidValueError, match=r"SOLVER.GATE_NOISE.FINAL must be in \[0, 1\]"):
        build_gate_noise_schedule(cfg)


def test_training_follows_the_noise_schedule(tmp_path):
    cfg = digits_cfg(tmp_path, SOLVER__MAX_ITER="8", SOLVER__GATE_NOISE__NAME="linear",
                     SOLVER__GATE_NOISE__FINAL="0.0", SOLVER__GATE_NOISE__PSTART="0.0")
    trainer = DefaultTrainer(cfg)
    seen = []

    class Record(type(trainer._hooks[0]).__mro__[-2]):  # a plain HookBase
        def before_step(self):
            seen.append(mask_generators(trainer.model)[0].gate.noise)

    trainer.register_hooks([Record()])
    trainer.train()
    assert seen == [1.0 - i / 8 for i in range(8)]
    records = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    assert [r["gate_noise"] for r in records if "gate_noise" in r][-1] == pytest.approx(1 / 8)


# ------------------------------------------------------------------------------------------------
# Reachable MAC ratios and the target check
# ------------------------------------------------------------------------------------------------
def test_mac_ratio_range_is_every_gate_closed_and_every_gate_open():
    cfg = digits_cfg()
    model = build_model(cfg)
    low, high = model.mac_ratio_range(16, 16)
    costs = model.backbone.complexity(16, 16)
    assert high == pytest.approx((costs.original + costs.gen) / costs.original, rel=1e-12)
    for g in mask_generators(model):  # the same, independently: every bias far below 0
        torch.nn.init.constant_(g.second.bias, -1e6)
    assert mean_ratio(model.eval(), [torch.randn(4, 3, 16, 16)]) == pytest.approx(low, rel=1e-12)
    assert low < costs.possible(4) / costs.original < high
    assert all(g.gate.threshold == 0.0 for g in mask_generators(model)) and not model.training
    static = build_model(digits_cfg(MODEL__MSGC__GROUPING="static"))
    s_low, s_high = static.mac_ratio_range(16, 16)
    assert s_low == s_high == pytest.approx(mean_ratio(static.eval(), [torch.randn(2, 3, 16, 16)]), rel=1e-12)


def test_a_mac_target_the_gates_cannot_reach_is_one_line_before_training(caplog):
    cfg = digits_cfg(SOLVER__MAC_TARGET__FINAL="0.01")
    with pytest.raises(InvalidValueError, match=r"SOLVER.MAC_TARGET.FINAL=0.01 cannot be reached: with every gate "
                       r"closed, grouping 'msgc' of msgc_resnet18 spends 0.0\d+ of the dense MACs at 16x16"):
        DefaultTrainer(cfg)
    cfg = digits_cfg(MODEL__MSGC__GROUPING="static", SOLVER__MAC_TARGET__FINAL="0.3")
    with caplog.at_level(logging.WARNING, logger="msgc.modeling"):
        check_mac_target(cfg, build_model(cfg))
    assert "has no effect: grouping 'static' has no gate, its MAC ratio is fixed at 0.5" in caplog.text


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------
def test_calibration_reaches_the_budget_and_the_folded_checkpoint_decides_the_same(trained, tmp_path):
    cfg, weights = trained
    model = load(cfg, weights)
    images = batches(cfg)
    before = mean_ratio(model, images)
    budget = round(before - 0.12, 3)
    loader = build_test_loader(cfg, "digits")
    result = calibrate_gates(model, loader, budget, build_normalizer(cfg), tolerance=0.003)
    assert result.mac_ratio_before == pytest.approx(before, abs=1e-9)
    assert result.threshold > 0 and abs(result.mac_ratio - budget) <= 0.003 and result.met
    assert mean_ratio(model, images) == pytest.approx(result.mac_ratio, abs=1e-9)  # thresholds kept on the gates
    with torch.no_grad():
        shifted = [model(x) for x in images]
    fold_gate_thresholds(model)
    MSGCCheckpointer(model, str(tmp_path)).save("calibrated", tag_last=False)
    assert not (tmp_path / "last_checkpoint").exists()
    again = load(cfg, str(tmp_path / "calibrated.pth"))  # the usual format: a fresh model loads it strictly
    assert all(g.gate.threshold == 0.0 for g in mask_generators(again))
    with torch.no_grad():
        for x, out in zip(images, shifted):
            got = again(x)
            assert torch.equal(got["macs"], out["macs"])
            assert torch.allclose(got["logits"], out["logits"], atol=1e-5)
    # raising the budget opens gates again: a negative threshold
    model = load(cfg, weights)
    up = calibrate_gates(model, loader, min(1.0, before + 0.05), build_normalizer(cfg), tolerance=0.003)
    assert up.threshold < 0 and abs(up.mac_ratio - min(1.0, before + 0.05)) <= 0.003


def test_a_model_at_its_budget_is_left_unchanged(trained):
    cfg, weights = trained
    model = load(cfg, weights)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    budget = mean_ratio(model, batches(cfg))
    result = calibrate_gates(model, build_test_loader(cfg, "digits"), budget, build_normalizer(cfg))
    assert result.threshold == 0.0 and result.passes == 1
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_calibration_refuses_models_without_gates_bad_budgets_and_unreachable_ones(trained):
    cfg, weights = trained
    loader = build_test_loader(cfg, "digits")
    dense = build_model(digits_cfg(MODEL__MSGC__GROUPING="dense"))
    with pytest.raises(InvalidValueError, match="gate calibration needs a model with gates; MSGCResNet has none"):
        calibrate_gates(dense, loader, 0.5)
    model = load(cfg, weights)
    for budget in (0.0, 1.5, float("nan"), -0.2):
        with pytest.raises(InvalidValueError, match=r"the calibration budget must be a MAC ratio in \(0, 1\]"):
            calibrate_gates(model, loader, budget)
    with pytest.raises(InvalidValueError, match=r"cannot reach the budget 0.0010: with every gate closed the mean MAC "
                       r"ratio is 0.0\d+"):
        calibrate_gates(model, loader, 0.001, build_normalizer(cfg))
    assert all(g.gate.threshold == 0.0 for g in mask_generators(model))  # a failed search leaves no threshold


def test_training_ends_with_a_calibrated_model_when_asked(tmp_path):
    cfg = digits_cfg(tmp_path, SOLVER__MAX_ITER="12", CALIBRATION__DATASET="digits", SOLVER__MAC_TARGET__FINAL="0.6")
    DefaultTrainer(cfg).train()
    record = json.loads((tmp_path / "calibration.json").read_text())
    assert (tmp_path / "last_checkpoint").read_text() != "model_calibrated.pth"  # a resume continues the training
    assert abs(record["calibration"]["mac_ratio"] - 0.6) <= cfg.CALIBRATION.TOLERANCE
    assert record["after"]["mac_ratio"] == pytest.approx(record["calibration"]["mac_ratio"], abs=1e-12)  # digits both
    assert record["before"]["mac_ratio"] == pytest.approx(record["calibration"]["mac_ratio_before"], abs=1e-12)
    final, calibrated = load(cfg, str(tmp_path / "model_final.pth")), load(cfg, str(tmp_path / "model_calibrated.pth"))
    images = batches(cfg)
    assert mean_ratio(final, images) == pytest.approx(record["before"]["mac_ratio"], abs=1e-9)
    assert mean_ratio(calibrated, images) == pytest.approx(record["after"]["mac_ratio"], abs=1e-9)
