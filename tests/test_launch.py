"""tools/train_net.py end to end in subprocesses: two processes, two "machines", torchrun, runs stopped by
SIGTERM, SIGUSR1 and SIGKILL and resumed, and bad input found inside a spawned rank's data-loader worker."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from msgc.data import TrainingSampler
from msgc.data import read_image
from msgc.engine.launch import find_free_port

ROOT = Path(__file__).resolve().parents[1]

# train_net.py with two additions: every rank saves its final weights, and KILL_AFTER=<n> ends the
# process with SIGKILL right after the checkpoint of iteration n - 1.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, os.path.join({root!r}, "tools"))
    import train_net
    from msgc.engine import HookBase
    from msgc.utils import comm

    class Kill(HookBase):
        def after_step(self):
            if self.trainer.iter + 1 == int(os.environ.get("KILL_AFTER", "0")):
                os.kill(os.getpid(), signal.SIGKILL)

    class Trainer(train_net.Trainer):
        def build_hooks(self):
            return super().build_hooks() + [Kill()]

        def train(self):
            results = super().train()
            weights = self.checkpointer.model.state_dict()
            torch.save(weights, os.path.join(self.cfg.OUTPUT_DIR, f"weights_rank{{comm.get_rank()}}.pth"))
            return results

    train_net.Trainer = Trainer
    if __name__ == "__main__":
        train_net.invoke_main()
""")

SMALL = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.STEM", "cifar", "MODEL.BACKBONE.WIDTH_MULT", "0.25",
         "MODEL.NUM_CLASSES", "10", "DATASETS.TRAIN", "synthetic", "DATASETS.TEST", "synthetic",
         "DATASETS.SYNTHETIC_LENGTH", "40", "DATASETS.SYNTHETIC_TEST_LENGTH", "13", "INPUT.TRAIN_SIZE", "16",
         "INPUT.TEST_SIZE", "16", "INPUT.TEST_RESIZE", "16", "SOLVER.IMS_PER_BATCH", "8", "TEST.IMS_PER_BATCH", "8",
         "DATALOADER.NUM_WORKERS", "0", "SEED", "5", "LOG_PERIOD", "1"]

# long enough for a signal sent after a few iterations to arrive mid-way
SIGNALLED = [*SMALL, "SOLVER.MAX_ITER", "20", "SOLVER.CHECKPOINT_PERIOD", "0", "TEST.EVAL_PERIOD", "0",
             "DATASETS.TEST", "", "MODEL.MSGC.ATTENTION", "channel", "SOLVER.MAC_TARGET.FINAL", "0.6"]


def _driver(tmp_path):
    path = tmp_path / "driver.py"
    path.write_text(DRIVER.format(root=str(ROOT)))
    return str(path)


def _env(**env):
    environ = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    environ.pop("MSGC_DEBUG", None)
    return environ


def _start(tmp_path, args, out, launcher=(), **env):
    """The driver in a new session (a process group, as a scheduler's job), stdout and stderr apart."""
    return subprocess.Popen([*launcher, sys.executable, _driver(tmp_path), *args, "OUTPUT_DIR", str(out)],
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _signal_after(proc, iteration: int, signum, group=True):
    """Send ``signum`` once the log shows ``iteration``, to the run's process group or to its first process."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"iter: {iteration}/" in line:
            (os.killpg if group else os.kill)(proc.pid, signum)
            break
    out, err = proc.communicate(timeout=240)
    return proc.returncode, "".join(lines) + out, err


def _load(path):
    return torch.load(path, weights_only=True)


def _assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _stopped_iteration(out_dir: Path) -> int:
    name = (out_dir / "last_checkpoint").read_text()
    assert name.startswith("model_") and name != "model_final.pth", name
    return int(name[len("model_"):-len(".pth")])


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """An uninterrupted two-process run of SIGNALLED: the reference of the stopped runs."""
    tmp = tmp_path_factory.mktemp("reference")
    code, log, err = _finish(_start(tmp, ["--num-gpus", "2", *SIGNALLED], tmp / "out"))
    assert code == 0, log + err
    return tmp / "out", log


def test_two_processes_on_cpu_end_with_identical_weights(two_process_run):
    out, log = two_process_run
    assert "Rank 0 of 2" in log and (out / "log.txt.rank1").exists() and (out / "model_final.pth").exists()
    w0, w1 = _load(out / "weights_rank0.pth"), _load(out / "weights_rank1.pth")
    _assert_same_weights(w0, w1)
    _assert_same_weights(w0, _load(out / "model_final.pth")["model"])


def test_sigterm_to_two_processes_saves_stops_and_resumes_to_the_same_weights(tmp_path, two_process_run):
    out = tmp_path / "out"
    # to the whole process group, as a scheduler does: the launcher and both ranks get it
    code, log, err = _signal_after(_start(tmp_path, ["--num-gpus", "2", *SIGNALLED], out), 4, signal.SIGTERM)
    assert code == 143, log + err
    assert err == "", err  # no traceback anywhere
    stopped = _stopped_iteration(out)
    assert 4 <= stopped < 19 and not (out / "model_final.pth").exists()
    assert f"SIGTERM received: stopping after iteration {stopped}" in log
    assert "Resume with:\n  python " in log and "--resume" in log
    assert not list(out.glob("*.tmp.*"))

    code, log, err = _finish(_start(tmp_path, ["--resume", "--num-gpus", "2", *SIGNALLED], out))
    assert code == 0, log + err
    assert f"Resuming at iteration {stopped + 1}" in log
    reference = two_process_run[0]
    _assert_same_weights(_load(reference / "model_final.pth")["model"], _load(out / "model_final.pth")["model"],
                         atol=1e-6)


def test_torchrun_stopped_by_sigterm_saves_and_says_how_to_resume(tmp_path):
    """(Resuming is the same code as after the launcher's processes, tested above.)"""
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(find_free_port()), "--no-python"]
    # to torchrun alone: it passes SIGTERM on to its workers
    code, log, err = _signal_after(_start(tmp_path, SIGNALLED, out, launcher=torchrun), 4, signal.SIGTERM,
                                   group=False)
    assert code != 0, log + err  # torchrun reports the signal it got in its own way
    stopped = _stopped_iteration(out)
    assert 4 <= stopped < 19
    assert f"Stopped after iteration {stopped} with a checkpoint (exit status 143)" in log
    assert "Resume with:\n  torchrun <the same torchrun options> " in log
    assert _load(out / f"model_{stopped:07d}.pth")["iteration"] == stopped


def test_two_machines_on_loopback(tmp_path):
    url = f"tcp://127.0.0.1:{find_free_port()}"
    out0, out1 = tmp_path / "m0", tmp_path / "m1"
    common = ["--num-gpus", "1", "--num-machines", "2", "--dist-url", url]
    procs = [_start(tmp_path, [*common, "--machine-rank", str(r), *SMALL, "SOLVER.MAX_ITER", "4"], out)
             for r, out in ((0, out0), (1, out1))]
    (code0, log0, err0), (code1, log1, err1) = [_finish(p) for p in procs]
    assert code0 == 0 and code1 == 0, log0 + err0 + log1 + err1
    assert "Rank 0 of 2" in log0 and (out0 / "model_final.pth").exists()
    assert not (out1 / "model_final.pth").exists()  # only the global rank 0 writes checkpoints
    _assert_same_weights(_load(out0 / "weights_rank0.pth"), _load(out1 / "weights_rank1.pth"))


def test_runs_killed_or_stopped_with_data_workers_resume_to_the_same_weights(tmp_path):
    """SIGKILL after a checkpoint, and SIGUSR1 to the process group (data-loader workers included),
    with DATALOADER.NUM_WORKERS 2; both resumed with 2 workers end with the weights of an uninterrupted
    run without workers: every sample's augmentation is a function of its place in the stream."""
    n = 4
    args = [*SIGNALLED, "SOLVER.CHECKPOINT_PERIOD", str(n)]
    workers = ["DATALOADER.NUM_WORKERS", "2"]
    full, killed, stopped = tmp_path / "full", tmp_path / "killed", tmp_path / "stopped"
    procs = [_start(tmp_path, args, full), _start(tmp_path, [*args, *workers], killed, KILL_AFTER=str(n))]
    (code_full, log_full, err_full), (code_killed, log_killed, _) = [_finish(p) for p in procs]
    assert code_full == 0, log_full + err_full
    assert code_killed == -signal.SIGKILL, log_killed
    assert (killed / "last_checkpoint").read_text() == f"model_{n - 1:07d}.pth"
    code, log, err = _signal_after(_start(tmp_path, [*args, *workers], stopped), 6, signal.SIGUSR1)
    assert code == 143, log + err
    assert "SIGUSR1 received" in log and err == ""
    at = _stopped_iteration(stopped)

    reference = _load(full / "model_final.pth")["model"]
    for out, start in ((killed, n), (stopped, at + 1)):
        code, log, err = _finish(_start(tmp_path, ["--resume", *args, *workers], out))
        assert code == 0, log + err
        assert f"Resuming at iteration {start}" in log
        _assert_same_weights(reference, _load(out / "model_final.pth")["model"], atol=1e-6)


def test_corrupt_image_read_by_a_worker_of_rank_1_ends_every_process_with_one_line(tmp_path):
    root, size = tmp_path / "data", 8
    classes = ["a", "b"]
    paths = []
    for i in range(size):
        folder = root / "train" / classes[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{i}.png")
        Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(paths[-1])
    # ImageFolder sorts by class, then by name; rank 1 reads position 1 of the stream first
    ordered = sorted(paths, key=lambda p: (p.parent.name, p.name))
    first_of_rank1 = ordered[TrainingSampler(size, seed=5, rank=0, world_size=1).epoch(0)[1]]
    first_of_rank1.write_bytes(b"not an image")
    with pytest.raises(Exception) as reason:
        read_image(str(first_of_rank1))
    args = ["--num-gpus", "2", *SMALL, "DATASETS.TRAIN", "imagefolder", "DATASETS.TEST", "", "DATASETS.ROOT",
            str(root), "DATALOADER.NUM_WORKERS", "1", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3"]
    code, log, err = _finish(_start(tmp_path, args, tmp_path / "out"))
    assert code == 2, log + err
    assert err.splitlines()[0] == (f"error: {reason.value} (rank 1 of 2, DataLoader worker 0; "
                                   "MSGC_DEBUG=1 shows the traceback)"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in log
