"""One model for every budget (MODEL.MSGC.BUDGET_RANGE): the budget input, its MACs, training, bad input."""
import json
import os

import pytest
import torch

from msgc.engine import DefaultTrainer
from msgc.deploy import deploy
from msgc.deploy import native as native_kernels
from msgc.modeling import BudgetEntry, BudgetTable, build_model, mask_generators, set_budget, set_budget_table
from msgc.modeling.budget import budget_range
from msgc.modeling.layers import budget_generators, set_budget_inputs
from msgc.solver import build_mac_scheduler
from msgc.solver.mac_scheduler import sample_budgets
from msgc.utils.errors import InvalidValueError
from conftest import load_tool
from test_budgets import assert_each_image_at_its_own_budget, digits_cfg, images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANGE = ["MODEL.MSGC.BUDGET_RANGE", "[0.35, 0.73]"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def quick_model(*overrides):
    cfg = digits_cfg("", *overrides)
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


def test_the_budget_input_adds_its_macs_to_the_generators_count():
    _, paper = quick_model()
    _, ranged = quick_model(*RANGE)
    generators = budget_generators(ranged)
    assert generators and len(generators) == len(mask_generators(ranged)) and not budget_generators(paper)
    added = sum(1 + g.first.out_channels + g.heads * g.channels for g in generators)
    static_paper, static_ranged = paper.backbone.complexity(16, 16), ranged.backbone.complexity(16, 16)
    assert static_ranged.gen - static_paper.gen == added
    assert (static_ranged.main, static_ranged.dgc) == (static_paper.main, static_paper.dgc)
    x = torch.randn(3, 3, 16, 16)
    ranged.load_state_dict(paper.state_dict(), strict=False)  # the same network, plus the (zero) budget weights
    with torch.no_grad():
        a, b = paper(x), ranged(x)
    assert torch.equal(a["logits"], b["logits"])  # zero budget weights: the paper's generators
    assert torch.equal(b["macs"] - a["macs"], torch.full((3,), float(added), dtype=torch.float64))
    assert set(ranged.state_dict()) - set(paper.state_dict()) == {
        n for n, _ in ranged.named_parameters() if n.endswith(("budget_hidden", "budget_logits"))}


def sloped(model, slope=4.0):
    """Budget weights that open gates as the budget grows (what training learns, set by hand)."""
    for g in budget_generators(model):
        torch.nn.init.constant_(g.budget_logits, slope)
    return model


def test_a_lower_budget_measures_fewer_macs_and_per_image_budgets_are_each_images_own():
    cfg, model = quick_model(*RANGE, "DATASETS.TEST", "digits")
    sloped(model)
    ratios = {}
    for b in (0.4, 0.7):
        set_budget(model, b)
        ratios[b] = DefaultTrainer.test(cfg, model)["mac_ratio"]
    assert ratios[0.4] < ratios[0.7] - 0.02
    set_budget(model, None)
    at_default = DefaultTrainer.test(cfg, model)["mac_ratio"]
    set_budget(model, 0.73)
    assert DefaultTrainer.test(cfg, model)["mac_ratio"] == at_default  # no budget: the range's upper end
    assert_each_image_at_its_own_budget(model, images(cfg)[:4], [0.35, 0.73, 0.5, 0.35])


@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
@pytest.mark.parametrize("tabled", [False, True], ids=["inputs", "inputs+table"])
def test_the_deployed_program_feeds_each_images_budget_to_the_generators(native, tabled):
    if native and not native_kernels.available():
        pytest.skip(f"native kernels {native_kernels.status()}")
    cfg, model = quick_model(*RANGE)
    sloped(model)
    for g in budget_generators(model):
        torch.nn.init.constant_(g.budget_hidden, 0.5)
    if tabled:  # thresholds on top of the budget input, as a calibration of such a model gives
        set_budget_table(model, BudgetTable([BudgetEntry(0.35, 0.3, 0.35, 0.0), BudgetEntry(0.73, -0.2, 0.73, 0.0)],
                                            budget_input=True))
    x = images(cfg)[:6]
    deployed = deploy(model, native=native, tune=False, budget=0.5)
    budgets = torch.tensor([0.35, 0.73, 0.5, 0.35, 0.6, 0.73])
    for request, per_image in ((None, torch.full((6,), 0.5)), (0.4, torch.full((6,), 0.4)), (budgets, budgets)):
        got = deployed(x, budget=request)
        set_budget(model, per_image)
        with torch.no_grad():
            want = model(x)
        assert torch.equal(got["macs"], want["macs"].double()), request
        assert torch.allclose(got["logits"], want["logits"], atol=1e-4), request
    assert len(set(want["macs"].tolist())) > 2  # the budgets made a difference


def test_training_draws_both_ends_in_every_batch_and_aims_the_loss_at_each_budget(tmp_path):
    cfg = digits_cfg(tmp_path, *RANGE, "DATASETS.TEST", "", "SOLVER.MAX_ITER", "6", "SOLVER.IMS_PER_BATCH", "9",
                     "LOG_PERIOD", "1", "SEED", "3")
    trainer = DefaultTrainer(cfg)
    seen = []
    original = type(trainer.model).set_mac_target

    def spy(model, target, groups=None):
        if isinstance(target, torch.Tensor):
            seen.append((budget_generators(model)[0].budget.clone(), target.clone(), groups.clone()))
        return original(model, target, groups)

    trainer.model.set_mac_target = spy.__get__(trainer.model)
    trainer.train()
    assert len(seen) == 6
    for it, (budgets, targets, groups) in enumerate(seen):
        assert budgets.numel() == 9 and budgets.min() == 0.35 and budgets.max() == 0.73
        assert torch.equal(budgets, sample_budgets((0.35, 0.73), it, 9, 3))  # a function of the iteration
        assert torch.equal(groups, torch.arange(9) % 3)
        drawn = budgets[groups == 2]
        assert ((drawn > 0.35) & (drawn < 0.73)).all() and (drawn == drawn[0]).all()  # one drawn budget a batch
        p = min(it / 6 / 0.5, 1.0)  # the linear ramp from 1 to each budget over the first half
        assert torch.allclose(targets, 1 + p * (budgets - 1), atol=1e-12)
    assert budget_generators(trainer.model)[0].budget is None  # after training: the default
    records = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    assert all("loss_macs" in r for r in records) and records[-1]["mac_target"] < 0.6


def test_the_grouped_sparsity_loss_holds_each_group_to_its_own_target():
    _, model = quick_model(*RANGE)
    ratios = torch.tensor([0.5, 0.8, 0.6, 0.5], dtype=torch.float64, requires_grad=True)
    model.set_mac_target(torch.tensor([0.35, 0.73, 0.5, 0.35], dtype=torch.float64), groups=torch.tensor([0, 1, 2, 0]))
    loss = model._grouped_mac_loss(ratios)
    # group 0: 0.5 - 0.35 over 2 of 4 images; group 1: 0.8 - 0.73 over 1; group 2: 0.6 - 0.5 over 1
    expected = model.mac_loss_weight * (0.15 * 0.5 + 0.07 * 0.25 + 0.1 * 0.25)
    assert loss.item() == pytest.approx(expected)
    model.set_mac_target(torch.tensor([0.35, 0.9, 0.5, 0.35], dtype=torch.float64), groups=torch.tensor([0, 1, 2, 0]))
    assert model._grouped_mac_loss(ratios).item() == pytest.approx(model.mac_loss_weight * (0.075 + 0.025))


def test_the_schedule_of_a_range_is_the_papers_ramp_ending_at_each_budget():
    cfg = digits_cfg("", *RANGE, "SOLVER.MAX_ITER", "100")
    scheduler = build_mac_scheduler(cfg)
    budgets = torch.tensor([0.35, 0.5, 0.73], dtype=torch.float64)
    for it in (0, 10, 25, 50, 99):
        paper = digits_cfg("", "SOLVER.MAX_ITER", "100")
        expected = []
        for b in budgets.tolist():
            paper.SOLVER.MAC_TARGET.FINAL = b
            expected.append(build_mac_scheduler(paper).target(it))
        assert torch.allclose(scheduler.target(it, budgets), torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert build_mac_scheduler(digits_cfg("")).budgets(8) is None  # no range: one target, as today


@pytest.mark.parametrize("value,problem", [("[0.8, 0.4]", "0 < lo < hi <= 1"), ("[0.0, 0.5]", "0 < lo < hi <= 1"),
                                           ("[0.3, 1.2]", "0 < lo < hi <= 1"), ("[0.5]", "two MAC ratios")])
def test_a_bad_budget_range_is_one_line_naming_the_key(value, problem):
    with pytest.raises(InvalidValueError) as e:
        quick_model("MODEL.MSGC.BUDGET_RANGE", value)
    assert str(e.value).startswith("MODEL.MSGC.BUDGET_RANGE must be") and problem in str(e.value)
    assert "\n" not in str(e.value)


def test_a_range_without_gates_or_a_budget_outside_it_is_one_line():
    with pytest.raises(InvalidValueError, match=r"^MODEL.MSGC.BUDGET_RANGE \[0.35, 0.73\] needs mask generators; "
                                                r"grouping 'dense'"):
        quick_model(*RANGE, "MODEL.MSGC.GROUPING", "dense")
    _, model = quick_model(*RANGE)
    assert budget_range(model) == (0.35, 0.73)
    for bad in (0.2, [0.5, 0.9]):
        with pytest.raises(InvalidValueError, match=r"outside the range this model was trained for: 0.35 to 0.73"):
            set_budget(model, bad)
    with pytest.raises(InvalidValueError, match=r"SOLVER.MAC_TARGET.FINAL must be below 1 with "
                                                r"MODEL.MSGC.BUDGET_RANGE"):
        build_mac_scheduler(digits_cfg("", *RANGE, "SOLVER.MAC_TARGET.FINAL", "1.0"))
    set_budget_inputs(model, torch.tensor([0.4, 0.5]))
    with pytest.raises(InvalidValueError, match=r"a per-image budget of 2 values for a batch of 3 images"):
        model(torch.randn(3, 3, 16, 16))


def test_the_budget_study_plans_three_ways_and_tabulates_them(tmp_path):
    tool = load_tool("budget_study")
    args = tool.parse_args(["--seeds", "0", "1", "--budgets", "0.6", "0.4", "0.5", "--output", str(tmp_path)])
    trained, every, tables = tool.plan(args)
    assert sorted(r.name for r in trained) == sorted(["host seed 0", "host seed 1"] + [
        f"msgc b{b} seed {s}" for b in (0.4, 0.5, 0.6) for s in (0, 1)])
    assert [r.name for r in every] == ["every seed 0", "every seed 1"]
    assert "[0.4, 0.6]" in every[0].opts and every[0].host.name == "host seed 0"
    assert [r.name for r in tool.order(trained, every, tables, args)][:5] == [
        "host seed 0", "every seed 0", "msgc b0.6 seed 0", "moved_table seed 0", "every_table seed 0"]
    moved = [t for t in tables if t.method == "moved_table"]
    assert [t.host.name for t in moved] == ["msgc b0.6 seed 0", "msgc b0.6 seed 1"]
    every_tables = [t for t in tables if t.method == "every_table"]
    assert [t.host for t in every_tables] == every and all(t.raw for t in every_tables)
    assert not any(t.raw for t in moved)
    command = " ".join(every_tables[0].commands()[0])
    assert "calibrate_gates.py" in command and "--dataset fashion_mnist_val" in command
    assert "--budgets 0.4 0.5 0.6" in command and every[0].weights in command
    assert [c[-1] for c in every_tables[0].commands()[1:]] == [every_tables[0].raw_folder(b) for b in (0.4, 0.5, 0.6)]
    # the numbers of finished runs: (a) from each run's calibration, (b) and (c) from the tables' records
    for i, run in enumerate(r for r in trained if r.method == "msgc"):
        os.makedirs(run.folder)
        run.status, run.max_iter, run.calibrated, run.budget = "done", 1, True, float(run.point[1:])
        (open(os.path.join(run.folder, "metrics.json"), "w")
         .write(json.dumps({"iteration": 0, "val/top1": 80.0 + i, "val/mac_ratio": run.budget}) + "\n"))
        calibration = {"after": {"top1": 80.0 + run.seed + run.budget, "mac_ratio": run.budget + 0.001},
                       "calibration": {"threshold": 0.1, "mac_ratio": run.budget}}
        open(os.path.join(run.folder, "calibration.json"), "w").write(json.dumps(calibration))
    for t in tables:
        assert not t.finished()
        os.makedirs(t.folder)
        entries = [{"budget": b, "threshold": 0.0, "mac_ratio": b, "top1": 1.0} for b in t.budgets]
        at = {f"{b:g}": {"top1": 79.8 + t.seed + b + (0.5 if t.raw else 0.0), "mac_ratio": b} for b in t.budgets}
        open(t.record, "w").write(json.dumps({"budget_table": {"entries": entries}, "at_budgets": at}))
        for b in t.budgets if t.raw else []:
            os.makedirs(os.path.dirname(t.raw_results(b)))
            open(t.raw_results(b), "w").write(json.dumps({"results": {"top1": 70.0, "mac_ratio": b + 0.01}}))
        assert t.finished()
        t.status = "done"
    rows = tool.rows(tool.collect(args, trained, tables))
    row = next(r for r in rows if r["way"] == "separate" and r["budget"] == 0.5)
    assert row["top1"] == [80.5, 81.5] and row["mac_ratio"] == [0.501, 0.501] and row["seeds"] == [0, 1]
    text = tool.table(rows, args.moved)
    assert text.count("\n") == 4
    assert "| 0.5 | 81.00 ± 0.71 / 0.501 ± 0.000 | 80.80 ± 0.71 / 0.500 ± 0.000 | " in text
    assert text.endswith("| 70.00 ± 0.00 / 0.610 ± 0.000 | +0.30 |")  # (c) - (a) at 0.6: 81.30 - 81.00
