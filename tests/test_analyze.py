"""msgc.analysis.analyze_model and tools/analyze_model.py: per-stage MACs that add up to the paper's numbers, and
measured gates."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from msgc.analysis import analyze_model, gated_blocks
from msgc.config import get_cfg
from msgc.modeling import build_model
from msgc.modeling.layers import MaskGenerator

ROOT = pathlib.Path(__file__).resolve().parents[1]

# the reference's get_flops() at 224x224, heads 4, in MMac: original, possible, main, dgc, mask
GOLDEN = {
    ("msgc_resnet18", "none"): (1817.2093, 560.6525, 139.4243, 1677.7851, 1.7820),
    ("msgc_mobilenetv2", "channel"): (306.9428, 223.1865, 188.8285, 127.3216, 2.5276),
}
FIELDS = ("original", "possible", "main", "dgc", "gen")


def make_cfg(backbone, attention="none", **overrides):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.MSGC.ATTENTION = attention
    cfg.merge_from_list([x for kv in overrides.items() for x in (kv[0].replace("__", "."), kv[1])])
    return cfg


@pytest.mark.parametrize("backbone, attention", sorted(GOLDEN))
def test_stage_rows_add_up_to_golden_totals(backbone, attention):
    result = analyze_model(build_model(make_cfg(backbone, attention)), 224)
    assert [r["stage"] for r in result["stages"]][:4] == ["res2", "res3", "res4", "res5"]
    for field, golden in zip(FIELDS, GOLDEN[(backbone, attention)]):
        assert round(result["totals_macs"][field] / 1e6, 4) == golden, field
        assert round(sum(r[field] for r in result["stages"]) / 1e6, 4) == golden, field


def test_condensenet_stages_follow_its_dense_blocks():
    cfg = make_cfg("msgc_condensenet", MODEL__BACKBONE__STEM="cifar", MODEL__BACKBONE__WIDTH_MULT=0.25,
                   MODEL__NUM_CLASSES=10)
    model = build_model(cfg)
    blocks = gated_blocks(model.backbone, 32, 32)
    stages = [stage for *_, stage in blocks]
    assert [stages.count(f"dense{i}") for i in range(1, 6)] == [4, 6, 8, 10, 8]
    first_layers = [size for name, _, size, _ in blocks if name.endswith("denselayer_1")]
    assert first_layers == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]


def test_measured_macs_and_gates_match_the_model():
    cfg = make_cfg("msgc_resnet18", MODEL__BACKBONE__STEM="cifar", MODEL__BACKBONE__WIDTH_MULT=0.25,
                   MODEL__NUM_CLASSES=10)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # close every gate of res3's blocks (the model's layer2)
        for name, m in model.backbone.named_modules():
            if isinstance(m, MaskGenerator) and name.startswith("layer2."):
                m.conv[3].weight.zero_()
                m.conv[3].bias.fill_(-10.0)
    images = [torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    result = analyze_model(model, 32, images)
    with torch.no_grad():
        macs = torch.cat([model(x)["macs"] for x in images])
    assert result["measured"]["images"] == 5
    assert result["measured"]["mean_macs"] == pytest.approx(macs.mean().item(), rel=1e-6)
    rows = {r["stage"]: r for r in result["stages"]}
    assert rows["res3"]["gate_open"] == 0.0
    assert 0.0 < rows["res2"]["gate_open"] <= 1.0
    # closed gates: res3 costs only its un-gated work (the downsampling) and its generators
    assert rows["res3"]["measured"] == pytest.approx(rows["res3"]["main"] + rows["res3"]["gen"], rel=1e-5)
    assert rows["res2"]["possible"] < rows["res2"]["measured"] <= rows["res2"]["original"] + rows["res2"]["gen"]
    layers = {g["layer"]: g for g in result["gated_layers"]}
    assert layers["layer2.1.maskgen2"]["open"] == 0.0 and layers["layer2.1.maskgen2"]["heads"] == 4
    assert len(layers) == 16
    host, gen = result["params"]["host"], result["params"]["generators"]
    assert host + gen == sum(p.numel() for p in model.parameters())
    assert sum(r["host_params"] for r in result["stages"]) == host
    assert sum(r["gen_params"] for r in result["stages"]) == gen


def test_cli_json_totals_equal_static_macs(tmp_path):
    (tmp_path / "small.yaml").write_text(
        "MODEL:\n  DEVICE: cpu\n  NUM_CLASSES: 10\n  BACKBONE:\n    NAME: msgc_resnet18\n    STEM: cifar\n"
        "    WIDTH_MULT: 0.25\n  MSGC:\n    ATTENTION: channel\nINPUT:\n  TEST_SIZE: 32\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "analyze_model.py"), "--config-file", str(tmp_path / "small.yaml"),
         "--num-images", "4", "--images", "random", "--json", "DATASETS.ROOT", str(tmp_path / "none")],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    model = build_model(make_cfg("msgc_resnet18", "channel", MODEL__BACKBONE__STEM="cifar",
                                 MODEL__BACKBONE__WIDTH_MULT=0.25, MODEL__NUM_CLASSES=10))
    assert result["totals_macs"] == model.backbone.static_macs(32, 32)
    assert result["image_source"] == "random normal images" and result["measured"]["images"] == 4
    assert result["params"]["total"] == sum(p.numel() for p in model.parameters())
    fv = result["fvcore"]
    assert "one multiply-add as one flop" in fv["note"]
    assert 0.9 < fv["ratio_to_original"] < 1.1  # same network, counted independently


def test_cli_bad_config_key_is_one_line_error(tmp_path):
    (tmp_path / "c.yaml").write_text("MODEL:\n  DEVICE: cpu\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "analyze_model.py"), "--config-file", str(tmp_path / "c.yaml"),
         "MODEL.HEADS", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: unknown config key 'MODEL.HEADS' in the command-line overrides; did you mean MODEL.MSGC.HEADS, "
        "MODEL.WEIGHTS, MODEL.DEVICE? (MSGC_DEBUG=1 shows the traceback)"]
