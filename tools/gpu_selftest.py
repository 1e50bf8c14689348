#!/usr/bin/env python
"""Run every CUDA code path of msgc once, in one short run on one GPU, and write what passed.

    python tools/gpu_selftest.py [--output-dir DIR] [--budget-s 480] [--rehearse-on-cpu]

The steps, in this order (the most telling first, so that a short budget keeps them):

    environment    torch, CUDA, the GPU, cuDNN, bfloat16 support
    cuda tests     pytest tests/test_cuda.py (AMP float16 + resume of the scaler, channels-last, pinned
                   loaders, nvjpeg, NCCL of one process, eval and deploy on CUDA against the CPU)
    device tests   pytest tests --device cuda -m device (the suite's device-independent tests, but for
                   the 48 variants of deploy against eval, which test_cuda.py samples)
    train          tools/train_net.py, msgc_r50 on synthetic 224x224 ImageNet-shaped data, --num-gpus 1,
                   AMP bfloat16 (the batches are channels-last on CUDA), then a final evaluation
    resume         the same with --resume and a later SOLVER.MAX_ITER: continues from the checkpoint
    eval-only      tools/train_net.py --eval-only of the trained weights
    bench train    tools/benchmark.py --device cuda --mode train --compare-dense, batch 128, --amp
                   bfloat16 --channels-last, for msgc_r50, msgc_r18_att, msgc_mbv2
    bench eval     the same models in eval mode (closed channels masked), float32, batch 128, channels-last
    data gpu/cpu   tools/benchmark_data.py: the training loader with INPUT.DECODE_DEVICE cuda (nvjpeg,
                   in the training process), and with CPU decoding in DataLoader workers for comparison
    bench deploy   the same models: eval mode against deploy(native=False), batch 8 (the deployed
                   model's PyTorch interpreter runs image by image)

Each step is a subprocess with its own timeout (at most what is left of ``--budget-s``); a step that
fails or times out is recorded with its last output line and the next step still runs; once the
budget is spent the remaining steps are skipped. ``DIR`` (default ``output/gpu_selftest``) receives
``selftest.json`` (every step: status, seconds, command, note, and the benchmarks' JSON), ``selftest.txt``
(the table: step, status passed/failed/skipped, seconds, note) and one log per step. Without CUDA the
CUDA steps are skipped (saying so) and the exit status is 0; with CUDA it is 1 when a step failed.

``--rehearse-on-cpu`` runs the same steps on the CPU at toy sizes (32x32 images, a few iterations,
small batches; the pytest steps skipped): it checks the command lines and the parsing of their
outputs on a machine without a GPU, so that the first run on a borrowed GPU spends its time on the GPU.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from msgc.utils.errors import ArgumentParser, exit_on_user_error  # noqa: E402

BENCH_MODELS = ("msgc_r50", "msgc_r18_att", "msgc_mbv2")
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=os.path.join("output", "gpu_selftest"),
                        help="where selftest.json, selftest.txt and the step logs go")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for all steps (default 480)")
    parser.add_argument("--rehearse-on-cpu", action="store_true",
                        help="run the steps on the CPU at toy sizes (checks the plumbing without a GPU)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


class Sizes:
    """The sizes of the steps: the real ones on a GPU, toy ones for ``--rehearse-on-cpu``."""

    def __init__(self, rehearse: bool):
        self.device = "cpu" if rehearse else "cuda"
        self.size = 32 if rehearse else 224
        self.train_iters, self.resume_iters = (4, 6) if rehearse else (200, 300)
        self.train_batch = 4 if rehearse else 64
        self.bench_batch = 2 if rehearse else 128
        self.bench_iters = (["--warmup", "1", "--iters", "2", "--threads", "1"] if rehearse else
                            ["--warmup", "3", "--iters", "10"])
        # deploy(native=False) runs image by image in Python (the reference interpreter): a small batch
        self.deploy = (["--batch-size", "2", "--warmup", "1", "--iters", "2", "--batches", "1", "--threads", "1"]
                       if rehearse else ["--batch-size", "8", "--warmup", "1", "--iters", "3", "--batches", "1"])
        self.workers = "0" if rehearse else "8"
        self.test_images = 8 if rehearse else 512
        self.timeouts = {"train": 60, "resume": 60, "eval-only": 40, "bench": 60, "data": 60} if rehearse else \
            {"train": 150, "resume": 90, "eval-only": 60, "bench": 60, "data": 60}


def synthetic_overrides(sizes: Sizes, output_dir: str, max_iter: int) -> list:
    """train_net.py's KEY VALUE pairs: ImageNet-shaped synthetic data, AMP bfloat16, no downloads."""
    s = str(sizes.size)
    pairs = {"MODEL.DEVICE": sizes.device, "MODEL.WEIGHTS": "", "DATASETS.TRAIN": "synthetic",
             "DATASETS.TEST": "synthetic", "DATASETS.SYNTHETIC_LENGTH": 50000,
             "DATASETS.SYNTHETIC_TEST_LENGTH": sizes.test_images, "INPUT.TRAIN_SIZE": s, "INPUT.TEST_SIZE": s,
             "INPUT.TEST_RESIZE": s, "DATALOADER.NUM_WORKERS": sizes.workers,
             "SOLVER.IMS_PER_BATCH": sizes.train_batch, "TEST.IMS_PER_BATCH": sizes.train_batch * 2,
             "SOLVER.MAX_ITER": max_iter, "SOLVER.WARMUP_ITERS": 0, "SOLVER.CHECKPOINT_PERIOD": max(1, max_iter // 2),
             "TEST.EVAL_PERIOD": 0, "SOLVER.AMP.ENABLED": True, "SOLVER.AMP.DTYPE": "bfloat16", "LOG_PERIOD": 20,
             "SEED": 0, "OUTPUT_DIR": output_dir}
    return [str(x) for kv in pairs.items() for x in kv]


def plan(args, sizes: Sizes) -> list:
    """[(name, command, timeout in seconds, parse(output, record) -> note, needs CUDA)]."""
    py = sys.executable
    train_dir, eval_dir = os.path.join(args.output_dir, "train"), os.path.join(args.output_dir, "eval")
    train = [py, "tools/train_net.py", "--config-file", "configs/msgc_r50.yaml", "--num-gpus", "1"]
    t = sizes.timeouts
    steps = [
        ("cuda tests", [py, "-m", "pytest", "tests/test_cuda.py", "-q", "-rs", "-n", "0", "-p", "no:cacheprovider"],
         120, pytest_note, True),
        # deploy against eval on CUDA is in test_cuda.py: the 48 variants of test_deployed_equals_eval stay on the CPU
        ("device tests", [py, "-m", "pytest", "tests", "-n", "0", "--device", "cuda", "-m", "device", "-k",
                          "not test_deployed_equals_eval", "-q", "-p", "no:cacheprovider"], 120, pytest_note, True),
        ("train", train + synthetic_overrides(sizes, train_dir, sizes.train_iters), t["train"],
         training_note(train_dir, sizes, resumed=False), False),
        ("resume", train + ["--resume"] + synthetic_overrides(sizes, train_dir, sizes.resume_iters), t["resume"],
         training_note(train_dir, sizes, resumed=True), False),
        ("eval-only", train + ["--eval-only"] + synthetic_overrides(sizes, eval_dir, 1)
         + ["MODEL.WEIGHTS", os.path.join(train_dir, "model_final.pth")], t["eval-only"], eval_note(eval_dir), False),
    ]
    bench = [py, "tools/benchmark.py", "--device", sizes.device, "--size", str(sizes.size), "--compare-dense",
             "--channels-last", "--json"]
    batch = bench + ["--batch-size", str(sizes.bench_batch), *sizes.bench_iters]
    for model in BENCH_MODELS:
        steps.append((f"bench train {model}", batch + ["--config-file", f"configs/{model}.yaml", "--mode", "train",
                                                       "--amp", "bfloat16"], t["bench"], benchmark_note, False))
    for model in BENCH_MODELS:
        steps.append((f"bench eval {model}", batch + ["--config-file", f"configs/{model}.yaml", "--mode", "eval"],
                      t["bench"], benchmark_note, False))
    data = [py, "tools/benchmark_data.py", "--config-file", "configs/msgc_r50.yaml", "--folder",
            os.path.join(args.output_dir, "jpegs"), "--num-images", "256", "--batch-size", "64", "--batches", "4",
            "--repeats", "3", "--json", "MODEL.DEVICE", sizes.device]
    steps.append(("data gpu decoding", data + ["--workers", "0", "INPUT.DECODE_DEVICE", "cuda"], t["data"],
                  loader_note, True))
    steps.append(("data cpu decoding", data + ["--workers", sizes.workers], t["data"], loader_note, False))
    for model in BENCH_MODELS:  # last: the slowest per image, the first to go when the budget runs out
        steps.append((f"bench deploy {model}", bench + sizes.deploy + ["--config-file", f"configs/{model}.yaml",
                                                                       "--mode", "eval", "deploy", "--no-native"],
                      t["bench"], benchmark_note, False))
    return steps


def environment() -> dict:
    """What this machine offers (the first step; in this process)."""
    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpus=torch.cuda.device_count(), gpu=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1),
                    capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                    bf16=torch.cuda.is_bf16_supported(), nccl=torch.distributed.is_nccl_available())
    return info


def run_command(command, timeout: float, log_path: str):
    """(exit status or None when it timed out, its output). The command runs in its own process group,
    all of which is killed at the timeout (DataLoader workers included)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               MSGC_DEBUG="1")  # tracebacks: the log is for whoever fixes what broke
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended meanwhile
                pass
            proc.wait()
            code = None
    with open(log_path) as f:
        return code, f.read()


def last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def json_object(output: str) -> dict:
    """The last JSON object of ``output`` that starts a line (log lines or warnings may come around it)."""
    start = output.rfind("\n{")
    if start < 0:
        raise ValueError("no JSON object in the output")
    return json.JSONDecoder().raw_decode(output[start + 1:])[0]


# What a step that exited with status 0 printed or wrote: parse(output, record) -> a short note, the
# numbers put in record["result"]; ValueError or KeyError when something expected is missing.
def pytest_note(output: str, record: dict) -> str:
    return last_line(output).strip("= ")


def training_note(output_dir: str, sizes: Sizes, resumed: bool):
    def parse(output, record):
        if resumed and "Resuming at iteration" not in output:
            raise ValueError("--resume did not resume from the checkpoint")
        with open(os.path.join(output_dir, "metrics.json")) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        step = [d for d in lines if "total_loss" in d][-1]
        val = [d for d in lines if "val/top1" in d][-1]
        record["result"] = {"iteration": step["iteration"], "total_loss": step["total_loss"],
                            "images_per_s": sizes.train_batch / step["time"], "val_mac_ratio": val["val/mac_ratio"],
                            "mac_ratio": step["mac_ratio"], "mac_target": step["mac_target"]}
        r = record["result"]
        return (f"to iteration {r['iteration'] + 1}: loss {r['total_loss']:.2f}, {r['images_per_s']:.0f} img/s, "
                f"MAC ratio {r['mac_ratio']:.3f} (target {r['mac_target']:.3f}), eval {r['val_mac_ratio']:.3f}")

    return parse


def eval_note(output_dir: str):
    def parse(output, record):
        with open(os.path.join(output_dir, "eval", "eval_results.json")) as f:
            results = json.load(f)["results"]
        record["result"] = results
        return f"{results['num_samples']} images: top-1 {results['top1']:.2f}%, MAC ratio {results['mac_ratio']:.3f}"

    return parse


def benchmark_note(output: str, record: dict) -> str:
    result = record["result"] = json_object(output)
    parts = [f"{name} {r['images_per_s']:.0f} img/s" for name, r in result["runs"].items()]
    return ", ".join(parts + [f"{k} {v:.2f}" for k, v in result["ratios"].items()])


def loader_note(output: str, record: dict) -> str:
    result = record["result"] = json_object(output)
    return f"{result['images_per_s']:.0f} images/s (workers {result['workers']})"


def run_steps(args, sizes: Sizes) -> list:
    """Every step's record, in order (environment first)."""
    records = []
    start = time.perf_counter()
    info = environment()
    records.append({"step": "environment", "status": "passed", "seconds": round(time.perf_counter() - start, 1),
                    "note": (f"{info.get('gpu')}, CUDA {info['cuda']}, torch {info['torch']}" if info["cuda_available"]
                             else f"torch {info['torch']}, {NO_CUDA}"), "result": info})
    cuda = info["cuda_available"]
    os.makedirs(args.output_dir, exist_ok=True)
    for name, command, timeout, parse, needs_cuda in plan(args, sizes):
        record = {"step": name, "command": shlex.join(command)}
        records.append(record)
        left = args.budget_s - (time.perf_counter() - start)
        if args.rehearse_on_cpu and needs_cuda:
            record.update(status="skipped", seconds=0.0, note="needs CUDA: not rehearsed on the CPU")
            continue
        if not cuda and not args.rehearse_on_cpu:
            record.update(status="skipped", seconds=0.0, note=NO_CUDA)
            continue
        if left < 5:
            record.update(status="skipped", seconds=0.0, note=f"the --budget-s of {args.budget_s:g} s is spent")
            continue
        limit = min(timeout, left)
        log_path = os.path.join(args.output_dir, name.replace(" ", "_") + ".log")
        t = time.perf_counter()
        code, output = run_command(command, limit, log_path)
        record.update(seconds=round(time.perf_counter() - t, 1), log=log_path)
        if code is None:
            record.update(status="failed", note=f"timed out after {limit:.0f} s: {last_line(output)}")
        elif code != 0:
            record.update(status="failed", note=f"exit status {code}: {last_line(output)}")
        else:
            try:
                record.update(status="passed", note=parse(output, record))
            except (OSError, ValueError, KeyError, IndexError) as e:  # it ran, but did not print what it should have
                record.update(status="failed", note=f"unexpected output ({type(e).__name__}: {e}): {last_line(output)}")
    return records


def table(records: list) -> str:
    return tabulate([[r["step"], r["status"], f"{r['seconds']:.1f}", r["note"]] for r in records],
                    headers=["step", "status", "seconds", "note"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = Sizes(args.rehearse_on_cpu)
    start = time.perf_counter()
    records = run_steps(args, sizes)
    counts = {s: sum(r["status"] == s for r in records) for s in ("passed", "failed", "skipped")}
    summary = {"device": sizes.device, "rehearsal": args.rehearse_on_cpu, "budget_s": args.budget_s,
               "seconds": round(time.perf_counter() - start, 1), "counts": counts, "steps": records}
    text = (table(records) + f"\n{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
            f"in {summary['seconds']:.0f} s\n")
    with open(os.path.join(args.output_dir, "selftest.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.output_dir, "selftest.txt"), "w") as f:
        f.write(text)
    print(text + f"(written: {os.path.join(args.output_dir, 'selftest.json')} and selftest.txt)")
    return summary


if __name__ == "__main__":
    with exit_on_user_error():
        result = main()
    sys.exit(1 if result["counts"]["failed"] else 0)
