"""tools/gpu_selftest.py on this machine: without CUDA it skips every CUDA step at once and says so; a
step that fails or runs past its timeout is recorded and the next one still runs; the JSON and the table
say the same."""
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def selftest():
    return load_tool("gpu_selftest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the self-test would run")
def test_without_cuda_every_cuda_step_is_skipped_and_said(selftest, tmp_path, capsys):
    summary = selftest.main(["--output-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "selftest.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    steps = saved["steps"]
    names = [s["step"] for s in steps]
    assert names[:6] == ["environment", "cuda tests", "device tests", "train", "resume", "eval-only"]
    assert {f"bench {kind} {m}" for kind in ("train", "eval", "deploy") for m in selftest.BENCH_MODELS} \
        | {"data gpu decoding", "data cpu decoding"} <= set(names)
    assert steps[0]["status"] == "passed" and steps[0]["result"]["cuda_available"] is False
    assert all(s["status"] == "skipped" and s["note"] == selftest.NO_CUDA for s in steps[1:])
    assert saved["counts"] == {"passed": 1, "failed": 0, "skipped": len(steps) - 1}
    assert saved["seconds"] < 30  # it starts nothing
    text = (tmp_path / "selftest.txt").read_text()
    assert text.splitlines()[0].split() == ["step", "status", "seconds", "note"]
    for s in steps:
        assert any(line.startswith(s["step"]) and f" {s['status']} " in line for line in text.splitlines())
    assert text.splitlines()[-1] == f"1 passed, 0 failed, {len(steps) - 1} skipped in {saved['seconds']:.0f} s"
    assert text in capsys.readouterr().out


def test_a_failing_or_hanging_step_is_recorded_and_the_next_still_runs(selftest, tmp_path, monkeypatch):
    py = sys.executable
    steps = [("fails", [py, "-c", "import sys; print('about to break'); sys.exit(3)"], 30, selftest.pytest_note, False),
             ("hangs", [py, "-c", "import time; print('waiting', flush=True); time.sleep(60)"], 2,
              selftest.pytest_note, False),
             ("prints no JSON", [py, "-c", "print('hello')"], 30, selftest.benchmark_note, False),
             ("benchmark", [py, "-c", "import json; print('log line'); print(json.dumps({'runs': {'train': "
                                      "{'images_per_s': 812.4}}, 'ratios': {'train/dense': 1.21}}))"], 30,
              selftest.benchmark_note, False),
             ("needs cuda", [py, "-c", "pass"], 30, selftest.pytest_note, True),
             ("after the budget", [py, "-c", "pass"], 30, selftest.pytest_note, False)]
    monkeypatch.setattr(selftest, "plan", lambda args, sizes: steps)
    clock = _StepClock()  # the budget is spent on a clock of its own: the same whatever else the machine does
    monkeypatch.setattr(selftest, "time", clock)
    monkeypatch.setattr(selftest, "run_command", clock.counting(selftest.run_command, {"benchmark": 9}))
    summary = selftest.main(["--output-dir", str(tmp_path), "--rehearse-on-cpu", "--budget-s", "13"])
    got = {s["step"]: s for s in summary["steps"]}
    assert (got["fails"]["status"], got["fails"]["note"]) == ("failed", "exit status 3: about to break")
    assert got["hangs"]["status"] == "failed" and got["hangs"]["note"] == "timed out after 2 s: waiting"
    assert got["hangs"]["seconds"] < 10
    assert got["prints no JSON"]["status"] == "failed"
    assert got["prints no JSON"]["note"].startswith("unexpected output (ValueError: no JSON object in the output)")
    assert got["benchmark"]["status"] == "passed"
    assert got["benchmark"]["note"] == "train 812 img/s, train/dense 1.21"
    assert got["benchmark"]["result"]["ratios"] == {"train/dense": 1.21}
    assert got["needs cuda"]["status"] == "skipped"
    assert got["needs cuda"]["note"] == "needs CUDA: not rehearsed on the CPU"
    assert got["after the budget"]["status"] == "skipped"
    assert got["after the budget"]["note"] == "the --budget-s of 13 s is spent"
    assert summary["counts"] == {"passed": 2, "failed": 3, "skipped": 2}
    assert "about to break" in (tmp_path / "fails.log").read_text()


class _StepClock:
    """``time`` for the self-test, whose perf_counter moves only when a step runs: 1 s for each step, plus
    ``extra[name]`` for the step whose log is ``name``.log."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def counting(self, run_command, extra):
        def run(command, timeout, log_path):
            out = run_command(command, timeout, log_path)
            self.now += 1.0 + extra.get(Path(log_path).stem, 0.0)
            return out

        return run


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_pytest_device_cuda_without_cuda_is_one_usage_line():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_macs.py", "-n", "0", "--device", "cuda", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 4  # pytest's usage error
    assert lines == ["ERROR: --device cuda needs a CUDA device: torch.cuda.is_available() is False on this machine; "
                     "run without --device, or on a machine with a GPU"]
