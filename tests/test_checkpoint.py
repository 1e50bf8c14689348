"""MSGCCheckpointer: format recognition, strict fits, original-release layouts, conversion tool."""
import functools
import http.server
import logging
import pathlib
import threading

import pytest
import torch
import torchvision

from conftest import load_tool
from msgc.checkpoint import CheckpointError, MSGCCheckpointer
from msgc.config import get_cfg
from msgc.modeling import build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
# key<TAB>shape listings of every model of the original MSGC release (copied from the reference facts)
LISTINGS = pathlib.Path(__file__).resolve().parent / "data" / "original_checkpoint_keys"
RELEASE_MODELS = {"resnet18": "msgc_resnet18", "resnet50": "msgc_resnet50", "mobilenetv2": "msgc_mobilenetv2",
                  "condensenet": "msgc_condensenet"}


def make_cfg(backbone="msgc_resnet18", grouping="msgc", attention="none", **extra):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.MSGC.GROUPING = grouping
    cfg.MODEL.MSGC.ATTENTION = attention
    for key, value in extra.items():
        node = cfg
        *path, last = key.split("__")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


@functools.lru_cache(maxsize=None)
def _tv_state(arch):
    return torchvision.models.__dict__[arch]().state_dict()


def tv_file(tmp_path, arch="resnet18", **kwargs):
    state = torchvision.models.__dict__[arch](**kwargs).state_dict() if kwargs else _tv_state(arch)
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)
    return str(path), state


def read_listing(name):
    """{key: shape} of an original-release listing (keys with the ``module.`` prefix)."""
    out = {}
    for line in (LISTINGS / f"{name}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        out[key] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    return out


def release_state(listing):
    """A tensor per listed key, each filled with its own value so a misplaced tensor is detected."""
    state = {}
    for i, (key, shape) in enumerate(listing.items()):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(i, dtype=torch.long)
        else:
            state[key] = torch.full(shape, 1e-3 * (i + 1))
    return state


def save_release(path, state):
    optimizer = {"state": {}, "param_groups": [{"lr": 0.075, "momentum": 0.9, "params": [0, 1]}]}
    torch.save({"epoch": 119, "state_dict": state, "best_prec1": 70.1, "optimizer": optimizer}, path)
    return str(path)


def model_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------
# Original MSGC release
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("listing_name", sorted(p.stem for p in LISTINGS.glob("*.txt")))
def test_release_listing_loads_every_key(tmp_path, caplog, listing_name):
    listing = read_listing(listing_name)
    arch, att = listing_name[len("msgc_"):].rsplit("_", 1)
    model = build_model(make_cfg(RELEASE_MODELS[arch], attention="channel" if att == "att" else "none"))
    want = {"backbone." + k[len("module."):] for k in listing}
    assert set(model.state_dict()) == want  # the layouts are the same, key for key

    state = release_state(listing)
    path = save_release(tmp_path / "release.pth", state)
    with caplog.at_level(logging.INFO, logger="msgc"):
        extras = MSGCCheckpointer(model).load(path)
    assert extras == {}  # the release's optimizer state must not reach our optimizer
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "all matched" in caplog.text
    loaded = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded["backbone." + key[len("module."):]], value, rtol=0, atol=0)


def test_release_without_batch_counters_loads(tmp_path):
    listing = read_listing("msgc_resnet18_noatt")
    state = {k: v for k, v in release_state(listing).items() if not k.endswith("num_batches_tracked")}
    model = build_model(make_cfg("msgc_resnet18"))
    MSGCCheckpointer(model).load(save_release(tmp_path / "r.pth", state))
    torch.testing.assert_close(model.state_dict()["backbone.fc.bias"], state["module.fc.bias"])


def test_release_with_attention_into_model_without_warns_but_loads_host(tmp_path, caplog):
    state = release_state(read_listing("msgc_resnet18_att"))
    model = build_model(make_cfg("msgc_resnet18", attention="none"))
    with caplog.at_level(logging.INFO, logger="msgc"):
        MSGCCheckpointer(model).load(save_release(tmp_path / "r.pth", state))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unexpected" in warnings[0] and "backbone.layer1.0.attgen2" in warnings[0]
    torch.testing.assert_close(model.state_dict()["backbone.layer4.1.conv2.weight"],
                               state["module.layer4.1.conv2.weight"])


def test_release_of_other_architecture_is_an_error(tmp_path):
    path = save_release(tmp_path / "r50.pth", release_state(read_listing("msgc_resnet50_noatt")))
    model = build_model(make_cfg("msgc_resnet18"))
    before = model_state(model)
    with pytest.raises(CheckpointError, match=r"r50\.pth: .*resnet50 weights but the model is a resnet18"):
        MSGCCheckpointer(model).load(path)
    for key, value in model.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------------------------------------------
# torchvision state dicts
# ---------------------------------------------------------------------------------------------------
def test_torchvision_weights_load_and_generators_keep_init(tmp_path, caplog):
    path, state = tv_file(tmp_path, "resnet18")
    model = build_model(make_cfg("msgc_resnet18", attention="channel"))
    gen_before = {k: v for k, v in model_state(model).items() if "maskgen" in k or "attgen" in k}
    with caplog.at_level(logging.INFO, logger="msgc"):
        assert MSGCCheckpointer(model).load(path) == {}
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded["backbone." + key], value), key
    for key, value in gen_before.items():
        assert torch.equal(loaded[key], value), key
    assert torch.all(loaded["backbone.layer1.0.maskgen2.conv.3.bias"] == 2.0)
    # the expected missing generators are tabulated, at INFO level (not a warning)
    assert "| missing  | generator | backbone.layer1.0.maskgen1" in caplog.text
    assert "backbone.layer4.1.attgen2" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_old_torchvision_file_without_batch_counters_loads(tmp_path):
    state = {k: v for k, v in _tv_state("mobilenet_v2").items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "mbv2.pth")
    model = build_model(make_cfg("msgc_mobilenetv2"))
    MSGCCheckpointer(model).load(str(tmp_path / "mbv2.pth"))
    assert torch.equal(model.state_dict()["backbone.classifier.1.weight"], state["classifier.1.weight"])


@pytest.mark.parametrize("arch, backbone, pattern", [
    ("resnet50", "msgc_resnet18", r"198 unexpected \('layer1\.0\.bn3.*resnet50 weights but the model is a resnet18"),
    ("resnet34", "msgc_resnet18", r"unexpected \('layer1\.2\..*resnet34 weights but the model is a resnet18"),
    ("resnet18", "msgc_resnet50", r"host tensors missing .*resnet18 weights but the model is a resnet50"),
    ("resnet18", "msgc_mobilenetv2", r"host tensors missing .*resnet18 weights but the model is a mobilenet_v2"),
])
def test_torchvision_weights_of_other_architecture_are_an_error(tmp_path, arch, backbone, pattern):
    path, _ = tv_file(tmp_path, arch)
    model = build_model(make_cfg(backbone))
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/{arch}\.pth: this torchvision state dict does not "
                                              rf"fit the model: .*{pattern}"):
        MSGCCheckpointer(model).load(path)


def test_missing_host_tensor_is_an_error_naming_it(tmp_path):
    state = dict(_tv_state("resnet18"))
    del state["layer3.1.bn2.running_var"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"1 host tensors missing \('layer3\.1\.bn2\.running_var'\)"):
        MSGCCheckpointer(build_model(make_cfg())).load(str(tmp_path / "partial.pth"))


def test_shape_mismatch_names_the_key(tmp_path):
    path, _ = tv_file(tmp_path, "resnet18", num_classes=10)
    model = build_model(make_cfg("msgc_resnet18"))
    before = model_state(model)
    with pytest.raises(CheckpointError, match=r"'fc\.weight' has shape \(10, 512\) in the file but the model's "
                                              r"'backbone\.fc\.weight' is \(1000, 512\)"):
        MSGCCheckpointer(model).load(path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    narrow = build_model(make_cfg("msgc_resnet18", MODEL__BACKBONE__WIDTH_MULT=0.5))
    path, _ = tv_file(tmp_path, "resnet18")
    with pytest.raises(CheckpointError, match=r"'conv1\.weight' has shape \(64, 3, 7, 7\) in the file but the "
                                              r"model's 'backbone\.conv1\.weight' is \(32, 3, 7, 7\)"):
        MSGCCheckpointer(narrow).load(path)


class _Detector(torch.nn.Module):
    """A model that holds a backbone among other modules, as a detector does."""

    def __init__(self, backbone, second=None):
        super().__init__()
        self.body = torch.nn.Module()
        self.body.bottom_up = backbone
        self.head = torch.nn.Linear(4, 2)
        if second is not None:
            self.other = second


def test_foreign_weights_go_to_the_backbone_of_a_larger_model(tmp_path):
    path, state = tv_file(tmp_path, "resnet18")
    detector = _Detector(build_model(make_cfg()).backbone)
    head_before = detector.head.weight.clone()
    MSGCCheckpointer(detector).load(path)  # the head is not the file's business: no error
    assert torch.equal(detector.state_dict()["body.bottom_up.layer2.0.downsample.0.weight"],
                       state["layer2.0.downsample.0.weight"])
    assert torch.equal(detector.head.weight, head_before)
    twice = _Detector(build_model(make_cfg()).backbone, build_model(make_cfg()).backbone)
    with pytest.raises(CheckpointError, match=r"several backbones \(body\.bottom_up, other\)"):
        MSGCCheckpointer(twice).load(path)


# ---------------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------------
class _NotWeights:
    pass


def test_unreadable_and_unknown_files_are_one_line_errors(tmp_path):
    model = build_model(make_cfg())
    ckpt = MSGCCheckpointer(model)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "unknown.pth")
    torch.save({"model": _tv_state("resnet18")}, tmp_path / "fvcore_style.pth")
    torch.save({"state_dict": {"a": 1}}, tmp_path / "bad_state.pth")
    torch.save({"x": _NotWeights()}, tmp_path / "pickled.pth")
    good, _ = tv_file(tmp_path, "resnet18")
    data = pathlib.Path(good).read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    cases = {
        "missing.pth": r"^checkpoint .*missing\.pth does not exist$",
        "text.pth": r"^cannot read checkpoint .*text\.pth: not a PyTorch file",
        "truncated.pth": r"^cannot read checkpoint .*truncated\.pth: not a PyTorch file, or a truncated one",
        "empty.pth": r"^cannot read checkpoint .*empty\.pth: not a PyTorch file",
        "pickled.pth": r"^cannot read checkpoint .*pickled\.pth: it holds Python objects \(.*_NotWeights\) that a safe",
        "unknown.pth": r"^.*unknown\.pth: unknown checkpoint format, a dict with keys 'epoch', 'weights'; msgc reads",
        "fvcore_style.pth": r"^.*fvcore_style\.pth: unknown checkpoint format, a dict with keys 'model'",
        "bad_state.pth": r"^.*bad_state\.pth: has a 'state_dict' entry that is not a dict of tensors",
    }
    for name, pattern in cases.items():
        with pytest.raises(CheckpointError, match=pattern) as info:
            ckpt.load(str(tmp_path / name))
        assert "\n" not in str(info.value), name
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------------
# This project's checkpoints
# ---------------------------------------------------------------------------------------------------
def test_project_checkpoint_round_trip(tmp_path):
    cfg = make_cfg("msgc_resnet18", MODEL__NUM_CLASSES=10, MODEL__BACKBONE__WIDTH_MULT=0.25)
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # 4 images of 64x64: at 32x32 the ImageNet stem leaves layer4 1x1, BatchNorm then normalises two values per
    # channel and about one seed in a hundred steps into weights whose eval outputs overflow
    model(torch.randn(4, 3, 64, 64), torch.tensor([1, 2, 3, 4]))["loss_cls"].backward()
    optimizer.step()
    MSGCCheckpointer(model, str(tmp_path), optimizer=optimizer).save("model_0000004", cfg=cfg, iteration=4)

    fresh = build_model(cfg)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.01, momentum=0.9)
    assert not torch.equal(fresh.state_dict()["backbone.conv1.weight"], model.state_dict()["backbone.conv1.weight"])
    ckpt = MSGCCheckpointer(fresh, str(tmp_path), optimizer=fresh_opt)
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000004.pth")
    extras = ckpt.resume_or_load("", resume=True)
    assert extras["iteration"] == 4 and "MSGC:" in extras["config"]
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh_opt.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    model.eval(), fresh.eval()
    x = torch.randn(3, 3, 32, 32)
    out, out_fresh = model(x), fresh(x)
    assert torch.isfinite(out["logits"]).all()
    assert torch.equal(out["logits"], out_fresh["logits"]) and torch.equal(out["macs"], out_fresh["macs"])


def test_project_checkpoint_of_other_width_is_an_error(tmp_path):
    MSGCCheckpointer(build_model(make_cfg(MODEL__BACKBONE__WIDTH_MULT=0.25)), str(tmp_path)).save("small")
    with pytest.raises(CheckpointError, match=r"small\.pth: this msgc checkpoint does not fit the model: "
                                              r"'backbone\.conv1\.weight' has shape \(16, 3, 7, 7\)"):
        MSGCCheckpointer(build_model(make_cfg(MODEL__BACKBONE__WIDTH_MULT=0.5))).load(str(tmp_path / "small.pth"))


def test_load_from_url(tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "www").mkdir()
    torch.save(_tv_state("resnet18"), tmp_path / "www" / "r18.pth")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        model = build_model(make_cfg())
        MSGCCheckpointer(model).load(f"http://127.0.0.1:{server.server_port}/r18.pth")
    finally:
        server.shutdown()
    assert torch.equal(model.state_dict()["backbone.conv1.weight"], _tv_state("resnet18")["conv1.weight"])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# ---------------------------------------------------------------------------------------------------
# tools/convert_checkpoint.py
# ---------------------------------------------------------------------------------------------------
def test_convert_torchvision_round_trip(tmp_path):
    convert = load_tool("convert_checkpoint")
    src, state = tv_file(tmp_path, "resnet50")
    convert.main([src, str(tmp_path / "out" / "r50_msgc.pth")])
    data = torch.load(tmp_path / "out" / "r50_msgc.pth", weights_only=True)
    assert data["__msgc__"] == 1 and data["converted_from"] == {"format": "torchvision", "file": "resnet50.pth"}
    assert set(data["model"]) == {"backbone." + k for k in state}
    direct, converted = build_model(make_cfg("msgc_resnet50")), build_model(make_cfg("msgc_resnet50"))
    MSGCCheckpointer(direct).load(src)
    MSGCCheckpointer(converted).load(str(tmp_path / "out" / "r50_msgc.pth"))
    for key, value in direct.state_dict().items():
        if "maskgen" not in key:
            assert torch.equal(converted.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match="already an msgc checkpoint"):
        convert.main([str(tmp_path / "out" / "r50_msgc.pth"), str(tmp_path / "again.pth")])


def test_convert_release_with_config(tmp_path):
    convert = load_tool("convert_checkpoint")
    state = release_state(read_listing("msgc_mobilenetv2_att"))
    src = save_release(tmp_path / "mbv2_att.pth", state)
    (tmp_path / "mbv2.yaml").write_text("MODEL:\n  BACKBONE:\n    NAME: msgc_mobilenetv2\n")
    out = str(tmp_path / "mbv2_msgc.pth")
    convert.main([src, out, "--config-file", str(tmp_path / "mbv2.yaml"), "MODEL.MSGC.ATTENTION", "channel"])
    data = torch.load(out, weights_only=True)
    cfg = get_cfg()
    cfg.merge_from_other_cfg(type(cfg).load_cfg(data["config"]))
    assert cfg.MODEL.BACKBONE.NAME == "msgc_mobilenetv2" and cfg.MODEL.MSGC.ATTENTION == "channel"
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    MSGCCheckpointer(model).load(out)
    for key, value in state.items():
        assert torch.equal(model.state_dict()["backbone." + key[len("module."):]], value), key
    # a config whose model the weights do not fit stops the conversion, and nothing is written
    with pytest.raises(CheckpointError, match="does not fit the model"):
        convert.main([src, str(tmp_path / "no.pth"), "--config-file", str(tmp_path / "mbv2.yaml"),
                      "MODEL.NUM_CLASSES", "100"])
    assert not (tmp_path / "no.pth").exists()
