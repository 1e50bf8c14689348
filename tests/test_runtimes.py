"""msgc.deploy.runtimes: the dense host in the runtimes users deploy with, each timed alone in a fresh
process; a runtime that is not installed; the ratios against the fastest float32 runtime; the tool's
--runtimes. A narrow cifar ResNet-18 on 16x16 images keeps every worker cheap; ONNX Runtime and
OpenVINO are exercised where installed (``pip install -e ".[bench]"``)."""
import importlib.util
import os
import sys

import pytest
import torch

from conftest import load_tool
from msgc.deploy import runtimes
from msgc.deploy.runtimes import Job, ModelSpec

TINY = ("MODEL:\n  BACKBONE:\n    NAME: msgc_resnet18\n    STEM: cifar\n    WIDTH_MULT: 0.25\n  NUM_CLASSES: 10\n"
        "  MSGC:\n    ATTENTION: channel\n")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A saved comparison of the tiny model (its dense host and the model itself, gates centred on 0)."""
    from msgc.config import load_cfg
    from msgc.modeling.layers import MaskGenerator

    folder = tmp_path_factory.mktemp("runtimes")
    config = folder / "tiny.yaml"
    config.write_text(TINY)
    cfg = load_cfg(str(config))
    host = runtimes.dense_host(cfg, str(config))
    assert host.factory == "msgc.deploy.runtimes:model_from_config"  # the cifar stem: torchvision has none
    source = ModelSpec("msgc.deploy.runtimes:model_from_config", {"config_file": str(config)})
    torch.manual_seed(0)
    model = source.build()
    for m in model.modules():
        if isinstance(m, MaskGenerator):
            torch.nn.init.constant_(m.conv[3].bias, 0.0)
    return Job(str(folder), host, source, batch=2, size=16, threads=1, warmup=1, iters=3).save(host.build(), model)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["eager", "eager_cl", "deploy", "onnxruntime", "openvino", "openvino_default"])
def test_a_worker_times_its_runtime_and_checks_it_against_pytorch(job, name, keep_threads):
    """In this process (what the child process runs): timed calls, and logits within the tolerance of
    the precision the runtime reports (OpenVINO's default: the one it chose)."""
    module = runtimes.RUNTIMES[name][0]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[bench]')")
    got = runtimes.run_worker(job.folder, name)
    assert got["status"] == "ok", got
    assert len(got["times_ms"]) == job.iters and min(got["times_ms"]) > 0
    assert 0 <= got["error"] <= got["tolerance"]
    if name == "openvino":
        assert got["precision"] == "float32" and "computes in f32" in got["what"]
    if name == "openvino_default":
        assert "computes in" in got["what"]  # f32, or bf16 on CPUs with AVX512_BF16 or AMX
    if name == "deploy":
        assert got["error"] < 1e-4 and "deploy" in got["what"]


def test_a_serving_worker_decodes_and_normalises_with_torch_before_every_call(job, keep_threads, monkeypatch):
    """--serving: each call's batch comes from JPEG files decoded and normalised with torch right before it
    (the images the check batch would give, within JPEG's loss), with torch on the job's threads."""
    import dataclasses
    import json as json_

    x = torch.nn.functional.interpolate(torch.randn(2, 3, 4, 4), size=16, mode="bilinear").clamp(-1.5, 1.5)  # smooth
    images = runtimes._decode(runtimes._jpegs(x))
    assert images.shape == x.shape and images.dtype == torch.float32
    assert (images - x).abs().mean() < 0.15  # 8-bit pixels and JPEG's loss (about 0.7 for noise)
    calls = []
    monkeypatch.setattr(runtimes, "_decode", lambda jpegs: calls.append(len(jpegs)) or images)
    serving = dataclasses.replace(runtimes.Job.load(job.folder), serving=True, threads=2)
    with open(os.path.join(job.folder, "job.json"), "w") as f:
        json_.dump(dataclasses.asdict(serving), f)
    try:
        got = runtimes.run_worker(job.folder, "eager")
        assert got["status"] == "ok", got
        assert calls == [2] * (job.warmup + job.iters) and torch.get_num_threads() == 2
    finally:
        with open(os.path.join(job.folder, "job.json"), "w") as f:
            json_.dump(dataclasses.asdict(job), f)


def test_each_runtime_runs_alone_in_a_fresh_process_and_absent_ones_say_so(job, monkeypatch):
    """Two passes: the same runtime in two different child processes; ONNX Runtime and OpenVINO made
    absent (as without the [bench] extra) have rows that say so, and nothing fails."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "openvino", None)
    rows = runtimes.measure(job, ["eager_cl", "onnxruntime", "openvino", "openvino_default"], passes=2)
    row = rows["eager_cl"]
    assert row["status"] == "ok" and len(row["pass_medians_ms"]) == 2 and len(row["times_ms"]) == 2 * job.iters
    assert len(set(row["pids"])) == 2 and os.getpid() not in row["pids"]
    assert row["median_ms"] > 0 and row["error"] <= row["tolerance"]
    for name in ("onnxruntime", "openvino", "openvino_default"):
        assert rows[name]["status"] == "not installed" and "pip install" in rows[name]["what"]
        assert "median_ms" not in rows[name]
    assert runtimes.summarise(rows)["ratios"] == {}  # no deploy row


def test_a_worker_whose_runtime_cannot_be_imported_says_not_installed(job, monkeypatch, keep_threads):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert runtimes.run_worker(job.folder, "onnxruntime") == {"status": "not installed"}


def _row(medians, precision="float32", status="ok"):
    times = [m for m in medians for _ in range(3)]
    return {"status": status, "precision": precision, "pass_medians_ms": list(medians), "times_ms": times,
            "median_ms": sorted(times)[len(times) // 2] if times else None}


def test_deploy_is_compared_with_the_fastest_float32_runtime_that_passed():
    """A bfloat16 runtime, one whose logits differ and one not installed never count as the fastest."""
    rows = {"eager": _row([10.0, 12.0]), "eager_cl": _row([9.0, 9.0]), "onnxruntime": _row([6.0, 8.0]),
            "openvino": _row([1.0, 1.0], status="mismatch"), "openvino_default": _row([3.0, 3.0], precision="bf16"),
            "compile": {"status": "not installed", "precision": "float32", "pass_medians_ms": [], "times_ms": []},
            "deploy": _row([4.0, 6.0])}
    got = runtimes.ratios(rows)
    assert got["deploy/fastest"]["against"] == "onnxruntime"
    fastest = rows["onnxruntime"]["median_ms"]
    assert got["deploy/fastest"]["ratio"] == pytest.approx(rows["deploy"]["median_ms"] / fastest)
    assert got["deploy/fastest"]["passes"] == pytest.approx([4.0 / 6.0, 6.0 / 8.0])  # pass by pass
    assert got["deploy/eager"]["against"] == "eager_cl"
    assert got["deploy/eager"]["passes"] == pytest.approx([4.0 / 9.0, 6.0 / 9.0])
    assert runtimes.ratios({"eager": _row([1.0])}) == {}


def test_runtime_names():
    assert runtimes.expand(["eager", "openvino"]) == ["eager", "eager_cl", "openvino", "openvino_default"]
    assert runtimes.expand(["none"]) == []
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        runtimes.expand(["tensorrt"])


def test_the_benchmark_tool_reports_the_runtimes_the_cpu_and_the_peak(tmp_path, capsys, monkeypatch, keep_threads):
    """tools/benchmark.py --compare-dense --runtimes eager (the workers run in this process here, to keep
    the test fast): every row, the ratios, the CPU's family and model and the FMA peak per variant."""
    from msgc.deploy import native

    tool = _tool()
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    monkeypatch.setattr(runtimes, "_spawn", lambda folder, name, timeout: runtimes.run_worker(folder, name))
    result = tool.main(["--config-file", str(config), "--mode", "deploy", "--compare-dense", "--size", "16",
                        "--iters", "2", "--warmup", "1", "--threads", "1", "--runtimes", "eager", "--passes", "1"])
    out = capsys.readouterr().out
    compared = result["runtimes"]
    assert list(compared["rows"]) == ["eager", "eager_cl", "deploy"]
    assert all(r["status"] == "ok" for r in compared["rows"].values())
    assert set(compared["ratios"]) == {"deploy/fastest", "deploy/eager"}
    assert "deploy / fastest float32 runtime" in out and "deploy / PyTorch eager" in out
    assert f"family {result['cpu']['family']}" in out if result["cpu"]["family"] else True
    if native.available():
        assert list(result["fma_peak_gmacs"]) == native.variants() and "FMA peak per core" in out
    with pytest.raises(SystemExit) as e:
        tool.main(["--config-file", str(config), "--runtimes", "eager,tensorrt"])
    assert e.value.code == 2 and "unknown runtime 'tensorrt'" in capsys.readouterr().err


def test_layer_rates_are_given_as_a_share_of_the_fma_peak(tmp_path, capsys, keep_threads):
    from msgc.deploy import native

    if not native.available():
        pytest.skip(f"native kernels: {native.status()}")
    tool = _tool()
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    result = tool.main(["--config-file", str(config), "--mode", "deploy", "--layers", "--size", "16", "--iters", "1",
                        "--warmup", "1", "--threads", "1", "--json"])
    capsys.readouterr()
    peak = result["layers"]["peak"]
    assert peak["variant"] == native.library().variant and peak["threads"] == 1
    for row in result["layers"]["layers"]:
        assert row["peak_share"] == pytest.approx(row["gmacs"] / peak["gmacs_per_core"])


def _tool():
    return load_tool("benchmark")
