"""MAC budgets chosen at inference: the budget table, set_budget, TEST.BUDGET and deployment per image."""
import json
import os

import pytest
import torch

from conftest import load_tool
from msgc.checkpoint import MSGCCheckpointer
from msgc.config import get_cfg
from msgc.data import build_normalizer, build_test_loader
from msgc.deploy import deploy
from msgc.deploy import native as native_kernels
from msgc.engine import DefaultTrainer
from msgc.modeling import (BudgetEntry, BudgetTable, budget_table, build_model, mask_generators, set_budget,
                           set_budget_table)
from msgc.utils.errors import InvalidValueError
from test_calibration import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
TABLE_BUDGETS = ["0.3", "0.4", "0.5", "0.6", "0.7"]


def digits_cfg(out="", *overrides):
    """The quickstart (an MSGC ResNet-18 at a quarter width on the 16x16 digits), shortened."""
    cfg = get_cfg()
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(["SOLVER.MAX_ITER", "24", "SOLVER.IMS_PER_BATCH", "32", "SOLVER.WARMUP_ITERS", "0",
                         "SOLVER.CHECKPOINT_PERIOD", "0",
                         "TEST.EVAL_PERIOD", "0", "TEST.GATE_SUMMARY_IMAGES", "0", "TEST.IMS_PER_BATCH", "120",
                         "OUTPUT_DIR", str(out), "LOG_PERIOD", "1000", *overrides])
    return cfg


@pytest.fixture(scope="module")
def tabled(tmp_path_factory):
    """A quickstart model trained for 24 iterations, and its budget table made by calibrate_gates.py on the
    digits: (cfg, the trained checkpoint, the checkpoint with the table, the tool's record)."""
    folder = tmp_path_factory.mktemp("budgets")
    cfg = digits_cfg(folder)
    DefaultTrainer(digits_cfg(folder, "DATASETS.TEST", "")).train()
    weights = str(folder / "model_final.pth")
    record = load_tool("calibrate_gates").main(["--config-file", QUICKSTART, "--dataset", "digits", "--no-eval",
                                                "--budgets", *TABLE_BUDGETS, "MODEL.WEIGHTS", weights,
                                                "CALIBRATION.TOLERANCE", "0.004", "TEST.IMS_PER_BATCH", "180"])
    return cfg, weights, record["output"], record


def images(cfg):
    norm = build_normalizer(cfg)
    return torch.cat([norm(x, "cpu") for x, _ in build_test_loader(cfg, "digits")])


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
def test_the_table_interpolates_linearly_between_measured_ratios_and_names_its_reach():
    table = BudgetTable([BudgetEntry(0.6, 0.5, 0.61, 90.0), BudgetEntry(0.3, 2.5, 0.29, 80.0),
                         BudgetEntry(0.45, 1.0, 0.45, 85.0)], "val", tolerance=0.005)
    assert [e.budget for e in table.entries] == [0.3, 0.45, 0.6] and table.reachable == (0.29, 0.61)
    assert table.threshold(0.45) == 1.0 and table.threshold(0.29) == 2.5
    assert table.threshold(0.37) == pytest.approx(2.5 + (0.37 - 0.29) / (0.45 - 0.29) * (1.0 - 2.5))
    assert table.threshold(0.53) == pytest.approx(1.0 + (0.53 - 0.45) / (0.61 - 0.45) * (0.5 - 1.0))
    assert table.threshold(0.287) == 2.5 and table.threshold(0.614) == 0.5  # within the tolerance: the ends
    thresholds = [table.threshold(b / 100) for b in range(29, 62)]
    assert thresholds == sorted(thresholds, reverse=True)  # monotone
    assert BudgetTable.from_dict(json.loads(json.dumps(table.as_dict()))).entries == table.entries
    for budget, line in ((0.2, r"the budget 0.2 is outside what the budget table reaches: 0.2900 to 0.6100 "
                                r"\(calibrate more budgets with tools/calibrate_gates.py --budgets\)"),
                         (0.0, r"the budget must be a MAC ratio in \(0, 1\], got 0.0"),
                         (-0.5, r"the budget must be a MAC ratio in \(0, 1\], got -0.5"),
                         (1.5, r"the budget must be a MAC ratio in \(0, 1\], got 1.5")):
        with pytest.raises(InvalidValueError, match=line):
            table.threshold(budget)
    with pytest.raises(InvalidValueError, match="the entries come from different models"):
        BudgetTable([BudgetEntry(0.3, 0.5, 0.3, 0.0), BudgetEntry(0.5, 1.0, 0.5, 0.0)])


def test_calibrate_gates_budgets_stores_the_table_with_the_unchanged_model(tabled):
    cfg, weights, tabled_weights, record = tabled
    table = BudgetTable.from_dict(record["budget_table"])
    assert [e.budget for e in table.entries] == [float(b) for b in TABLE_BUDGETS]
    assert all(abs(e.mac_ratio - e.budget) <= 0.004 for e in table.entries), table
    assert [e.threshold for e in table.entries] == sorted((e.threshold for e in table.entries), reverse=True)
    assert table.dataset == "digits" and os.path.isfile(os.path.splitext(tabled_weights)[0] + ".json")
    trained, with_table = torch.load(weights, weights_only=True), torch.load(tabled_weights, weights_only=True)
    assert set(with_table["model"]) == set(trained["model"])
    assert all(torch.equal(with_table["model"][k], v) for k, v in trained["model"].items())
    model = load(cfg, tabled_weights)
    assert budget_table(model).entries == table.entries
    assert all(g.gate.threshold == 0.0 for g in mask_generators(model))


# ------------------------------------------------------------------------------------------------
# The budget at inference
# ------------------------------------------------------------------------------------------------
def test_eval_at_three_budgets_lands_within_002_of_each(tabled, tmp_path):
    cfg, _, tabled_weights, _ = tabled
    model = load(cfg, tabled_weights)
    dense = model.dense_macs(16, 16)
    x = images(cfg)
    for budget in (0.35, 0.55):  # between the table's entries
        set_budget(model, budget)
        with torch.no_grad():
            ratio = float(model(x)["macs"].mean()) / dense
        assert abs(ratio - budget) <= 0.02, (budget, ratio)
    out = tmp_path / "eval"
    load_tool("train_net").invoke_main(["--config-file", QUICKSTART, "--eval-only", "MODEL.WEIGHTS", tabled_weights,
                                        "TEST.BUDGET", "0.65", "OUTPUT_DIR", str(out), "TEST.IMS_PER_BATCH", "120"])
    saved = json.loads((out / "eval" / "eval_results.json").read_text())
    results = saved["results"]
    assert saved["budget"] == 0.65 and abs(results["mac_ratio"] - 0.65) <= 0.02
    assert results["macs"] == pytest.approx(results["mac_ratio"] * dense, rel=1e-9) and 0 <= results["top1"] <= 100


def test_a_budget_per_image_equals_each_images_own_budget(tabled):
    cfg, _, tabled_weights, _ = tabled
    model = load(cfg, tabled_weights)
    mixed = assert_each_image_at_its_own_budget(model, images(cfg)[:6], [0.35, 0.7, 0.5, 0.35, 0.62, 0.7])
    assert len(set(mixed["macs"].tolist())) >= 4  # the budgets differ, so do the MACs


def assert_each_image_at_its_own_budget(model, x, budgets):
    """A batch at per-image budgets gives each image the MACs and logits it has alone at its budget."""
    set_budget(model, torch.tensor(budgets))
    with torch.no_grad():
        mixed = model(x)
    for i, b in enumerate(budgets):
        set_budget(model, b)
        with torch.no_grad():
            alone = model(x[i:i + 1])
        assert torch.equal(mixed["macs"][i:i + 1], alone["macs"])
        assert torch.allclose(mixed["logits"][i:i + 1], alone["logits"], atol=1e-5)
    return mixed


@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_the_deployed_program_serves_a_mixed_budget_batch_as_the_eval_model(tabled, native):
    if native and not native_kernels.available():
        pytest.skip(f"native kernels {native_kernels.status()}")
    cfg, _, tabled_weights, _ = tabled
    model = load(cfg, tabled_weights)
    x = images(cfg)[:8]
    deployed = deploy(model, native=native, tune=False, budget=0.5)
    budgets = torch.tensor([0.35, 0.7, 0.5, 0.35, 0.42, 0.7, 0.5, 0.6])
    for request, per_image in ((None, torch.full((8,), 0.5)), (0.62, torch.full((8,), 0.62)), (budgets, budgets)):
        got = deployed(x, budget=request)
        set_budget(model, per_image)
        with torch.no_grad():
            want = model(x)
        assert torch.equal(got["macs"], want["macs"].double()), request
        assert torch.allclose(got["logits"], want["logits"], atol=1e-4), request
    set_budget(model, None)  # as trained: the deployed model at budget 0
    with torch.no_grad():
        want = model(x)
    assert torch.equal(deployed(x, budget=0)["macs"], want["macs"].double())
    assert all(g.gate.threshold == 0.0 for g in mask_generators(model))  # deploy left the source as it was


# ------------------------------------------------------------------------------------------------
# Bad input and old checkpoints
# ------------------------------------------------------------------------------------------------
def test_bad_budgets_are_one_line_errors(tabled):
    cfg, weights, tabled_weights, _ = tabled
    model = load(cfg, tabled_weights)
    lo, hi = budget_table(model).reachable
    for budget, line in ((0.0001, f"outside what the budget table reaches: {lo:.4f} to {hi:.4f}"),
                         (1.2, r"must be a MAC ratio in \(0, 1\], got 1.2"),
                         (-0.1, r"must be a MAC ratio in \(0, 1\], got -0.1")):
        with pytest.raises(InvalidValueError, match=line):
            set_budget(model, budget)
        with pytest.raises(InvalidValueError, match=line):
            deploy(model, native=False, budget=budget)
    set_budget(model, [0.4, 0.5, 0.6])
    with pytest.raises(InvalidValueError, match="a per-image budget of 3 values for a batch of 2 images"):
        model(torch.zeros(2, 3, 16, 16))
    set_budget(model, None)
    deployed = deploy(model, native=False)
    with pytest.raises(InvalidValueError, match="a per-image budget of 3 values for a batch of 5 images"):
        deployed(torch.zeros(5, 3, 16, 16), budget=[0.4, 0.5, 0.6])
    dense = build_model(digits_cfg("", "MODEL.MSGC.GROUPING", "dense"))
    with pytest.raises(InvalidValueError, match="a MAC budget needs a model with gates; MSGCResNet has none"):
        set_budget(dense, 0.5)
    untabled = load(cfg, weights)
    with pytest.raises(InvalidValueError, match="the model has no budget table: make one with tools/calibrate_gates.py "
                       "--budgets"):
        set_budget(untabled, 0.5)
    with pytest.raises(InvalidValueError, match="per-image gate thresholds .* cannot be folded"):
        set_budget(model, [0.4, 0.5])
        deploy(model, native=False)


@pytest.mark.parametrize("overrides,line", [
    (["MODEL.MSGC.GROUPING", "dense"], "TEST.BUDGET 0.5: this model has no gates (grouping 'dense', backbone "
                                       "'msgc_resnet18'): its MACs are fixed; remove TEST.BUDGET"),
    (["MODEL.MSGC.GROUPING", "static"], "TEST.BUDGET 0.5: this model has no gates (grouping 'static', backbone "
                                        "'msgc_resnet18'): its MACs are fixed; remove TEST.BUDGET"),
    (["MODEL.WEIGHTS", "{weights}"], "TEST.BUDGET 0.5: MODEL.WEIGHTS {weights} has no budget table; make one with "
                                     "tools/calibrate_gates.py --budgets 0.3 0.4 ... (or evaluate as trained: "
                                     "TEST.BUDGET 0)"),
    (["--no-eval-only"], "TEST.BUDGET 0.5 sets the budget of an --eval-only evaluation (training evaluates the model "
                         "as it trains); add --eval-only or remove it"),
])
def test_test_budget_bad_input_is_one_line(tabled, tmp_path, capsys, monkeypatch, overrides, line):
    monkeypatch.delenv("MSGC_DEBUG", raising=False)
    _, weights, _, _ = tabled
    eval_only = [] if overrides == ["--no-eval-only"] else ["--eval-only"]
    overrides = [] if overrides == ["--no-eval-only"] else [o.format(weights=weights) for o in overrides]
    argv = ["--config-file", QUICKSTART, *eval_only, "OUTPUT_DIR", str(tmp_path / "out"), "TEST.BUDGET", "0.5",
            *overrides]
    with pytest.raises(SystemExit) as e:
        load_tool("train_net").invoke_main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == f"error: {line.format(weights=weights)} (MSGC_DEBUG=1 shows " \
                                                      "the traceback)"
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_a_table_loads_as_before_and_detaches_a_table(tabled):
    cfg, weights, tabled_weights, _ = tabled
    model = load(cfg, tabled_weights)
    assert budget_table(model) is not None
    MSGCCheckpointer(model).load(weights)  # the trained checkpoint: no table
    assert budget_table(model) is None
    x = images(cfg)[:16]
    reference = load(cfg, weights)
    with torch.no_grad():
        a, b = model.eval()(x), reference(x)
    assert torch.equal(a["macs"], b["macs"]) and torch.equal(a["logits"], b["logits"])
    set_budget_table(model, BudgetTable([BudgetEntry(0.5, 0.0, 0.5, 0.0)]))
    assert budget_table(model).reachable == (0.5, 0.5)
    with pytest.raises(InvalidValueError, match="give --budget .* or --budgets .*, not both"):
        load_tool("calibrate_gates").main(["--config-file", QUICKSTART, "--budget", "0.5", "--budgets", "0.4", "0.6",
                                           "MODEL.WEIGHTS", weights])
    with pytest.raises(InvalidValueError, match=r"the budget 0.01 is outside what the gates reach on 16x16 images: "
                       r"0.0\d+ \(every gate closed\) to 1.0\d+ \(every gate open\)"):
        load_tool("calibrate_gates").main(["--config-file", QUICKSTART, "--dataset", "digits", "--no-eval", "--budgets",
                                           "0.5", "0.01", "MODEL.WEIGHTS", weights])
