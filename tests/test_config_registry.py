"""Config tree, yaml inheritance, strict keys and registries (a user-registered backbone: test_user_backbone.py)."""
import glob
import os
import re

import pytest

from msgc.config import ConfigError, get_cfg
from msgc.modeling import build_model
from msgc.utils.registry import UnknownNameError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_default_key_has_a_comment():
    lines = open(os.path.join(ROOT, "msgc", "config", "defaults.py")).read().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"_C\.[A-Z_.]+ = (?!CN\(\))", line):
            j = i - 1
            while lines[j].startswith("_C.") and not lines[j].endswith("CN()"):
                j -= 1  # a run of related keys shares the comment above it
            assert lines[j].lstrip().startswith("#"), f"defaults.py:{i + 1} has no comment: {line}"


def test_get_cfg_returns_independent_copies():
    a, b = get_cfg(), get_cfg()
    a.MODEL.MSGC.HEADS = 8
    assert b.MODEL.MSGC.HEADS == 4


def test_base_is_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("MODEL:\n  NUM_CLASSES: 7\n  MSGC:\n    HEADS: 2\n")
    (tmp_path / "sub" / "child.yaml").write_text("_BASE_: ../base.yaml\nMODEL:\n  MSGC:\n    HEADS: 8\n")
    cfg = get_cfg()
    cfg.merge_from_file(str(tmp_path / "sub" / "child.yaml"))
    assert cfg.MODEL.NUM_CLASSES == 7 and cfg.MODEL.MSGC.HEADS == 8


def test_misspelled_key_in_yaml_names_file_and_suggests(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("MODEL:\n  MSGC:\n    HAEDS: 2\n")
    with pytest.raises(ConfigError) as e:
        get_cfg().merge_from_file(str(path))
    msg = str(e.value)
    assert "MODEL.MSGC.HAEDS" in msg and str(path) in msg and "MODEL.MSGC.HEADS" in msg


def test_misspelled_override_suggests():
    with pytest.raises(ConfigError, match="did you mean SOLVER.IMS_PER_BATCH"):
        get_cfg().merge_from_list(["SOLVER.IMS_PER_BATHC", "8"])


def test_wrong_type_override_is_an_error():
    with pytest.raises(ConfigError, match="MODEL.MSGC.HEADS"):
        get_cfg().merge_from_list(["MODEL.MSGC.HEADS", "four"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load_and_build(path):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert model.dense_macs(32, 32) > 0


@pytest.mark.parametrize("key,value,registry", [
    ("MODEL.BACKBONE.NAME", "resnet9000", "backbone"),
    ("MODEL.MSGC.GROUPING", "shuffle", "grouping"),
    ("MODEL.MSGC.ATTENTION", "spatial", "attention"),
])
def test_unknown_names_list_the_registered_ones(cfg, key, value, registry):
    cfg.merge_from_list([key, value])
    with pytest.raises(UnknownNameError) as e:
        build_model(cfg)
    assert f"no {registry} named '{value}'" in str(e.value) and "registered:" in str(e.value)


def test_heads_that_do_not_divide_a_gated_layer(cfg):
    cfg.MODEL.MSGC.HEADS = 3
    with pytest.raises(ValueError, match=r"layer1\.0: MODEL.MSGC.HEADS=3 does not divide its 64 output channels"):
        build_model(cfg)
