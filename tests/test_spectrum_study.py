"""tools/spectrum_study.py: its configs, both stages on a tiny Fashion-MNIST, the tables, bad input."""
import json
import pathlib
import shutil

import pytest
import torch

from conftest import load_tool
from test_fashion import fake_fashion

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "spectrum"


def study():
    return load_tool("spectrum_study")


def test_the_study_configs_follow_the_papers_protocol():
    from msgc.config import load_cfg

    cfgs = {m: load_cfg(str(CONFIGS / f"{m}.yaml")) for m in ["host"] + study().PROTOCOLS["short"]["methods"]}
    assert {m: (c.MODEL.MSGC.GROUPING, c.MODEL.MSGC.ATTENTION) for m, c in cfgs.items()} == {
        "host": ("dense", "none"), "dense": ("dense", "none"), "prune": ("prune", "none"),
        "static": ("static", "none"), "msgc": ("msgc", "none"), "msgc_att": ("msgc", "channel")}
    host = cfgs.pop("host")
    assert host.SOLVER.PRETRAINED_LR_MULT == 1.0 and host.DATASETS.TRAIN == "fashion_mnist"
    for c in cfgs.values():  # stage 2: the paper's fine-tuning recipe
        assert (c.SOLVER.PRETRAINED_LR_MULT, c.MODEL.MSGC.GATE_BIAS) == (0.04, 2.0)
        assert c.SOLVER.LR_SCHEDULER_NAME == "cosine"
        assert (c.SOLVER.MAC_TARGET.NAME, c.SOLVER.MAC_TARGET.PSTART, c.SOLVER.MAC_TARGET.PSTOP) == ("linear", 0.0, 0.5)
        assert c.CALIBRATION.DATASET == "fashion_mnist_val" and c.DATASETS.TEST == "fashion_mnist"
    shared = lambda c: (c.MODEL.BACKBONE.WIDTH_MULT, c.INPUT.TRAIN_SIZE, c.SOLVER.IMS_PER_BATCH)  # noqa: E731
    assert len({shared(c) for c in list(cfgs.values()) + [host]}) == 1
    assert len({c.SOLVER.MAX_ITER for c in cfgs.values()}) == 1


def tiny_configs(tmp_path, data):
    """The study's configs, made tiny: a width-0.125 host on 12x12 crops of fake Fashion-MNIST files."""
    folder = tmp_path / "configs"
    shutil.copytree(CONFIGS, folder)
    return folder, ["DATASETS.ROOT", str(data), "MODEL.BACKBONE.WIDTH_MULT", "0.125",
                    "INPUT.TRAIN_SIZE", "12", "INPUT.TEST_RESIZE", "12", "INPUT.TEST_SIZE", "12",
                    "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "0", "SOLVER.IMS_PER_BATCH", "8",
                    "TEST.IMS_PER_BATCH", "30"]


def test_both_stages_fine_tune_from_the_host_calibrate_and_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from msgc.checkpoint.formats import load_checkpoint_file

    fake_fashion(tmp_path / "data")
    configs, opts = tiny_configs(tmp_path, tmp_path / "data")
    # msgc_att diverges at once: its run fails with a one-line error and the others go on
    with open(configs / "msgc_att.yaml", "a") as f:
        f.write("SOLVER:\n  BASE_LR: 1.0e+30\n")
    # stage 2 keeps the host's weights as loaded
    text = (configs / "Base-Finetune.yaml").read_text().replace("PRETRAINED_LR_MULT: 0.04", "PRETRAINED_LR_MULT: 0.0")
    (configs / "Base-Finetune.yaml").write_text(text)
    out = tmp_path / "out"
    tool = study()
    args = ["--seeds", "0", "--budgets", "0.6", "--static-heads", "2", "--configs", str(configs), "--output", str(out),
            "--jobs", "2", *opts]
    with pytest.raises(SystemExit) as exit_info:
        tool.cli(args)
    assert exit_info.value.code == 1
    result = json.loads((out / "spectrum.json").read_text())
    assert [p["run"] for p in result["problems"]] == ["msgc_att b0.6 seed 0"]
    assert result["problems"][0]["error"].startswith("exit status 2: loss is not finite at iteration 1")
    host = load_checkpoint_file(str(out / "host" / "seed0" / "model_final.pth"), None)["model"]
    for run in ("dense/seed0", "prune/b0.6/seed0", "static/h2/seed0", "msgc/b0.6/seed0"):
        tuned = load_checkpoint_file(str(out / run / "model_final.pth"), None)["model"]
        convs = [k for k in host if k.endswith("conv1.weight") or k == "backbone.fc.weight"]
        assert convs and all(torch.equal(tuned[k], host[k]) for k in convs), run  # stage 2 started from the host
    from msgc.config import load_cfg
    from msgc.engine.defaults import seed_all_rng
    from msgc.modeling import build_model

    seed_all_rng(0)  # the host's own initialisation: training moved it
    init = build_model(load_cfg(str(configs / "host.yaml"), opts)).state_dict()
    assert not torch.equal(init["backbone.fc.weight"], host["backbone.fc.weight"])
    runs = {(r["method"], r["point"]): r for r in result["runs"]}
    assert set(runs) == {("host", None), ("dense", None), ("prune", "b0.6"), ("static", "h2"), ("msgc", "b0.6")}
    for key in (("prune", "b0.6"), ("msgc", "b0.6")):  # calibrated on the validation split to the budget
        calibration = json.loads((out / key[0] / key[1] / "seed0" / "calibration.json").read_text())
        assert abs(calibration["calibration"]["mac_ratio"] - 0.6) <= 0.002
        assert runs[key]["mac_ratio"] == calibration["after"]["mac_ratio"]
        assert runs[key]["mac_ratio_raw"] > 0.9  # four iterations: the gates are still open
    assert runs[("static", "h2")]["budget"] == pytest.approx(runs[("static", "h2")]["mac_ratio"], abs=1e-6)
    printed = capsys.readouterr().out
    assert "| prune | b0.6 | 1 |" in printed and "| msgc b0.6 seed 0 | 0.600 |" in printed
    assert (out / "spectrum.png").stat().st_size > 1000
    # a second call trains nothing and reports the same
    again = tool.main(args)
    assert again["trained"] == 1 and again["rows"] == result["rows"]  # only the failed run is tried again


def test_quick_is_one_seed_two_budgets_and_the_claims_three_methods():
    tool = study()
    args = tool.parse_args(["--quick"])
    assert (args.seeds, args.budgets, args.static_heads) == ([0], [0.53, 0.73], [8])
    assert args.methods == ["prune", "static", "msgc"]
    assert tool.parse_args(["--quick", "--methods", "msgc_att"]).methods == ["msgc_att"]
    args = tool.parse_args(["--budgets", "0.6", "--", "SOLVER.MAX_ITER", "9"])
    assert (args.budgets, args.opts) == ([0.6], ["SOLVER.MAX_ITER", "9"])
    assert args.methods == tool.PROTOCOLS["short"]["methods"]


def test_device_cuda_trains_every_run_on_the_gpu_and_is_one_line_without_one(capsys, monkeypatch):
    tool = study()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = tool.parse_args(["--protocol", "long", "--device", "cuda", "--jobs", "8", "--seeds", "0", "1", "2",
                            "--budgets", "0.35", "0.53", "0.6", "0.73", "--", "SOLVER.MAX_ITER", "9"])
    args.imports = []
    runs = tool.plan(args)
    assert len(runs) == 3 + 3 * (1 + 3 * 4 + 1)  # hosts; dense, prune msgc msgc_heads at 4 budgets, static
    for run in runs:  # every run, hosts included, on the GPU, the user's overrides after it
        assert run.opts[:4] == ["MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", "9"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        tool.cli(["--device", "cuda"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: --device cuda: torch.cuda.is_available() is False on this machine; run with --device cpu (the "
        "default), or on a machine with a GPU")


def test_bad_budgets_are_one_line_before_anything_trains(tmp_path, capsys):
    fake_fashion(tmp_path / "data")
    configs, opts = tiny_configs(tmp_path, tmp_path / "data")
    tool = study()
    out = tmp_path / "out"
    base = ["--seeds", "0", "--configs", str(configs), "--output", str(out), *opts]
    with pytest.raises(SystemExit) as e:
        tool.cli(base + ["--budgets", "1.5"])
    assert e.value.code == 2 and "--budgets must be a MAC ratio in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tool.cli(base + ["--budgets", "0.01", "--methods", "msgc"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "msgc b0.01 seed 0: SOLVER.MAC_TARGET.FINAL=0.01 cannot be reached" in err
    with pytest.raises(SystemExit) as e:
        tool.cli(base + ["--methods", "static", "--static-heads", "3"])
    assert e.value.code == 2 and "MODEL.MSGC.HEADS=3 does not divide" in capsys.readouterr().err
    assert not out.exists()  # nothing trained


# ---------------------------------------------------------------------------------------------------
# The long protocol (configs/spectrum_long)
# ---------------------------------------------------------------------------------------------------
LONG = ROOT / "configs" / "spectrum_long"


def test_the_long_protocol_is_the_papers_recipe_at_its_batch():
    from msgc.config import load_cfg

    tool = study()
    args = tool.parse_args(["--protocol", "long"])
    assert (args.seeds, args.budgets, args.static_heads, args.methods, args.configs, args.output) == (
        [0, 1], [0.6], [4], ["dense", "prune", "static", "msgc", "msgc_heads"], str(LONG), "output/spectrum_long")
    cfgs = {m: load_cfg(str(LONG / f"{m}.yaml")) for m in ["host"] + args.methods}
    host = cfgs.pop("host")
    epoch = -(-55000 // host.SOLVER.IMS_PER_BATCH)
    assert host.SOLVER.IMS_PER_BATCH == 256 and host.SOLVER.BASE_LR == 0.1 and host.SOLVER.PRETRAINED_LR_MULT == 1.0
    assert host.DATASETS.TEST == "fashion_mnist_val" and host.TEST.EVAL_PERIOD == epoch  # its curve, on validation
    assert host.SOLVER.MAX_ITER % epoch == 0 and 15 <= host.SOLVER.MAX_ITER // epoch <= 30
    for c in cfgs.values():  # the paper's rates, as long as the host, checkpoints every epoch
        s = c.SOLVER
        assert (s.BASE_LR, s.PRETRAINED_LR_MULT, list(s.GATE_KEYWORDS), s.LR_SCHEDULER_NAME, s.ITERS_PER_EPOCH) == (
            0.075, 0.2, ["mask"], "cosine_epoch", 0)
        assert (s.MAX_ITER, s.IMS_PER_BATCH, s.CHECKPOINT_PERIOD) == (host.SOLVER.MAX_ITER, 256, epoch)
        assert c.CALIBRATION.DATASET == "fashion_mnist_val" and c.DATASETS.TEST == "fashion_mnist"
    assert {m: c.MODEL.MSGC.GROUPING for m, c in cfgs.items()} == {m: m for m in args.methods}


def test_the_long_protocol_validates_the_host_resumes_and_skips(tmp_path, capsys):
    """On a tiny config: the host's curve on the validation split and its test evaluation, a fine-tuning,
    then that fine-tuning interrupted after its first checkpoint: the second call resumes it, alone."""
    pytest.importorskip("matplotlib")
    fake_fashion(tmp_path / "data")
    configs, opts = tiny_configs(tmp_path, tmp_path / "data")
    shutil.copytree(LONG, tmp_path / "spectrum_long")
    shutil.move(str(configs), tmp_path / "spectrum")  # spectrum_long inherits ../spectrum/Base-Spectrum.yaml
    opts += ["SOLVER.ITERS_PER_EPOCH", "2", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "2"]
    out = tmp_path / "out"
    args = ["--protocol", "long", "--seeds", "0", "--methods", "msgc_heads", "--configs",
            str(tmp_path / "spectrum_long"), "--output", str(out), *opts]
    tool = study()
    result = tool.cli(args)
    assert [p["iteration"] for p in result["curves"]["host seed 0"]] == [1, 3]  # every epoch of 2 iterations
    assert [p["epoch"] for p in result["curves"]["host seed 0"]] == [1, 2]
    tested = json.loads((out / "host" / "seed0" / "eval" / "eval_results.json").read_text())
    host = [r for r in result["runs"] if r["method"] == "host"][0]
    assert tested["dataset"] == "fashion_mnist" and tested["results"]["num_samples"] == 60  # the test set
    assert host["top1"] == tested["results"]["top1"] and host["val_top1"] == result["curves"]["host seed 0"][-1]["top1"]
    assert (out / "host_curves.png").stat().st_size > 1000
    assert "host seed 0: validation top-1 by epoch: 1:" in capsys.readouterr().out
    # interrupt msgc_heads after its first checkpoint (iteration 1): what a killed process leaves
    run = out / "msgc_heads" / "b0.6" / "seed0"
    (run / "last_checkpoint").write_text("model_0000001.pth")
    for name in ("model_final.pth", "model_best.pth", "model_calibrated.pth", "calibration.json"):
        (run / name).unlink()
    records = [line for line in (run / "metrics.json").read_text().splitlines() if json.loads(line)["iteration"] <= 1]
    (run / "metrics.json").write_text("\n".join(records) + "\n")
    again = tool.cli(args)
    assert again["trained"] == 1  # the host is not trained again, msgc_heads continues
    assert "Resuming at iteration 2" in (out / "logs" / "msgc_heads_b0.6_seed0.txt").read_text()
    assert (run / "calibration.json").is_file() and again["curves"] == result["curves"]
    assert tool.cli(args)["trained"] == 0  # everything finished: nothing trains


def test_the_long_protocols_bad_options_are_one_line(capsys):
    tool = study()
    with pytest.raises(SystemExit) as e:
        tool.cli(["--protocol", "long", "--quick"])
    assert e.value.code == 2 and "--quick is a subset of the short protocol" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tool.cli(["--protocol", "longer"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "invalid choice: 'longer'" in err
