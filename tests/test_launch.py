"""tools/train_net.py end to end in subprocesses: two processes, two "machines", a killed run resumed,
and a short run on the real digits."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from msgc.engine.launch import find_free_port

ROOT = Path(__file__).resolve().parents[1]

# train_net.py with two additions: every rank saves its final weights, and KILL_AFTER=<n> ends the
# process abruptly (os._exit, no clean-up) right after the checkpoint of iteration n - 1.
DRIVER = textwrap.dedent("""
    import os, sys
    import torch
    sys.path.insert(0, os.path.join({root!r}, "tools"))
    import train_net
    from msgc.engine import HookBase, default_argument_parser, launch
    from msgc.utils import comm

    class Kill(HookBase):
        def after_step(self):
            if self.trainer.iter + 1 == int(os.environ.get("KILL_AFTER", "0")):
                os._exit(17)

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
        args = default_argument_parser().parse_args()
        launch(train_net.main, args.num_gpus, args.num_machines, args.machine_rank, args.dist_url, args=(args,),
               device="cpu")
""")

SMALL = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.STEM", "cifar", "MODEL.BACKBONE.WIDTH_MULT", "0.25",
         "MODEL.NUM_CLASSES", "10", "DATASETS.TRAIN", "synthetic", "DATASETS.TEST", "synthetic",
         "DATASETS.SYNTHETIC_LENGTH", "40", "DATASETS.SYNTHETIC_TEST_LENGTH", "13", "INPUT.TRAIN_SIZE", "16",
         "INPUT.TEST_SIZE", "16", "INPUT.TEST_RESIZE", "16", "SOLVER.IMS_PER_BATCH", "8", "TEST.IMS_PER_BATCH", "8",
         "DATALOADER.NUM_WORKERS", "0", "SEED", "5", "LOG_PERIOD", "2"]


def _driver(tmp_path):
    path = tmp_path / "driver.py"
    path.write_text(DRIVER.format(root=str(ROOT)))
    return str(path)


def _start(tmp_path, args, out, **env):
    environ = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    return subprocess.Popen([sys.executable, _driver(tmp_path), *args, "OUTPUT_DIR", str(out)], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _load(path):
    return torch.load(path, weights_only=True)


def _assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_two_processes_on_cpu_end_with_identical_weights(tmp_path):
    out = tmp_path / "out"
    code, log = _finish(_start(tmp_path, ["--num-gpus", "2", *SMALL, "SOLVER.MAX_ITER", "6"], out))
    print(log)
    assert code == 0, log
    assert "Rank 0 of 2" in log and "top-1 (%)" in log
    assert (out / "log.txt.rank1").exists() and (out / "model_final.pth").exists()
    w0, w1 = _load(out / "weights_rank0.pth"), _load(out / "weights_rank1.pth")
    _assert_same_weights(w0, w1)
    _assert_same_weights(w0, _load(out / "model_final.pth")["model"])


def test_two_machines_on_loopback(tmp_path):
    url = f"tcp://127.0.0.1:{find_free_port()}"
    out0, out1 = tmp_path / "m0", tmp_path / "m1"
    common = ["--num-gpus", "1", "--num-machines", "2", "--dist-url", url]
    procs = [_start(tmp_path, [*common, "--machine-rank", str(r), *SMALL, "SOLVER.MAX_ITER", "4"], out)
             for r, out in ((0, out0), (1, out1))]
    (code0, log0), (code1, log1) = [_finish(p) for p in procs]
    print(log0)
    assert code0 == 0 and code1 == 0, log0 + log1
    assert "Rank 0 of 2" in log0 and (out0 / "model_final.pth").exists()
    assert not (out1 / "model_final.pth").exists()  # only the global rank 0 writes checkpoints
    _assert_same_weights(_load(out0 / "weights_rank0.pth"), _load(out1 / "weights_rank1.pth"))


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    n = 4
    args = [*SMALL, "SOLVER.MAX_ITER", str(2 * n), "SOLVER.CHECKPOINT_PERIOD", str(n), "TEST.EVAL_PERIOD", "0",
            "MODEL.MSGC.ATTENTION", "channel", "SOLVER.MAC_TARGET.FINAL", "0.6"]
    full, part = tmp_path / "full", tmp_path / "part"
    procs = [_start(tmp_path, args, full), _start(tmp_path, args, part, KILL_AFTER=str(n))]
    (code_full, log_full), (code_killed, log_killed) = [_finish(p) for p in procs]
    assert code_full == 0, log_full
    assert code_killed == 17, log_killed
    assert (part / "last_checkpoint").read_text() == f"model_{n - 1:07d}.pth"
    assert not (part / "model_final.pth").exists()

    code, log = _finish(_start(tmp_path, ["--resume", *args], part))
    print(log)
    assert code == 0, log
    assert f"Resuming at iteration {n}" in log
    _assert_same_weights(_load(full / "model_final.pth")["model"], _load(part / "model_final.pth")["model"],
                         atol=1e-6)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    out = tmp_path / "out"
    code, log = _finish(_start(tmp_path, ["--resume", *SMALL, "SOLVER.MAX_ITER", "1", "DATASETS.TEST", ""], out))
    assert code == 0, log
    assert "--resume: no checkpoint in" in log and "starting a new training from scratch" in log
    assert (out / "model_final.pth").exists()


def test_torchrun_runs_train_net_unchanged(tmp_path):
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(find_free_port())]
    environ = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([*torchrun, _driver(tmp_path), *SMALL, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "",
                           "OUTPUT_DIR", str(out)], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout
    assert "Rank 0 of 2" in proc.stdout and (out / "log.txt.rank1").exists()
    _assert_same_weights(_load(out / "weights_rank0.pth"), _load(out / "weights_rank1.pth"))
