#!/usr/bin/env python
"""The spectrum study: the two ends of the spectrum and its middle at the same MACs, over seeds.

    python tools/spectrum_study.py [--methods dense prune static msgc msgc_att] [--seeds 0 1 2] \\
        [--configs configs/spectrum] [--output output/spectrum] [--jobs 1] [--force] [KEY VALUE ...]

Trains ``<configs>/<method>.yaml`` once per seed with ``tools/train_net.py`` (``SEED <seed>
OUTPUT_DIR <output>/<method>/seed<seed>``, then the KEY VALUE overrides), ``--jobs`` runs at a time;
a run whose ``metrics.json`` already holds its final evaluation is not trained again (``--force``
retrains). Then it reads each run's final validation top-1 and MAC ratio and writes
``<output>/spectrum.json``, the figure ``<output>/spectrum.png`` (top-1 against MAC ratio, the
spread over seeds) and prints the table (mean ± sample standard deviation over seeds, and the range).
Needs matplotlib for the figure: ``pip install -e ".[vis]"``.
"""
import argparse
import logging
import os
import resource
import statistics
import subprocess
import sys
import time

from msgc.analysis.figures import require_matplotlib, spectrum_figure
from msgc.config import load_cfg
from msgc.engine import exit_on_user_error
from msgc.utils.errors import InvalidValueError
from msgc.utils.events import read_metrics
from msgc.utils.file_io import write_json

logger = logging.getLogger("spectrum_study")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("dense", "prune", "static", "msgc", "msgc_att")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="config names in --configs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--configs", default=os.path.join(ROOT, "configs", "spectrum"), help="folder of the configs")
    parser.add_argument("--output", default="output/spectrum", help="folder of the runs and the results")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time (each uses NUM_THREADS threads)")
    parser.add_argument("--force", action="store_true", help="retrain runs that already finished")
    parser.add_argument("opts", nargs="*", help="config overrides for every run: KEY VALUE pairs")
    return parser.parse_intermixed_args(argv)


def run_dir(root, method, seed):
    return os.path.join(root, method, f"seed{seed}")


def final_result(folder, max_iter):
    """The final evaluation of a run (the ``val/*`` record at its last iteration), or None."""
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        return None
    for record in reversed(read_metrics(path)):
        if "val/top1" in record:
            return record if record["iteration"] == max_iter - 1 else None
    return None


def collect(root, methods, seeds, max_iter):
    """``(rows, missing)``: per method with every seed finished, its seeds' top-1, MAC ratio and MACs;
    and the folders of runs without a final evaluation.

    Args:
        max_iter: the runs' SOLVER.MAX_ITER, one int or ``{method: int}``.
    """
    rows, missing = [], []
    for method in methods:
        iters = max_iter[method] if isinstance(max_iter, dict) else max_iter
        results = [final_result(run_dir(root, method, s), iters) for s in seeds]
        missing += [run_dir(root, method, s) for s, r in zip(seeds, results) if r is None]
        if all(r is not None for r in results):
            rows.append({"method": method, "seeds": list(seeds), "top1": [r["val/top1"] for r in results],
                         "mac_ratio": [r.get("val/mac_ratio", 1.0) for r in results],
                         "macs": [r.get("val/macs") for r in results]})
    return rows, missing


def _mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows) -> str:
    """A markdown table: seeds, top-1 mean ± std and range, MAC ratio mean ± std, MMac."""
    lines = ["| method | seeds | top-1 (%), mean ± std | top-1 range | MAC ratio, mean ± std | MMac |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        top, top_sd = _mean_std(row["top1"])
        ratio, ratio_sd = _mean_std(row["mac_ratio"])
        macs = [m for m in row["macs"] if m is not None]
        lines.append(f"| {row['method']} | {len(row['top1'])} | {top:.2f} ± {top_sd:.2f} | "
                     f"{min(row['top1']):.2f} - {max(row['top1']):.2f} | {ratio:.3f} ± {ratio_sd:.3f} | "
                     + (f"{statistics.mean(macs) / 1e6:.3f} |" if macs else "- |"))
    return "\n".join(lines)


def figure(rows, path):
    return spectrum_figure(rows, path, title="The spectrum study: top-1 against MAC ratio (dots: seeds; "
                                             "bars: lowest to highest seed)")


def train(jobs, parallel):
    """Run ``(name, command, log file)`` jobs, ``parallel`` at a time; stop at the first failure."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            name, command, log = pending.pop(0)
            logger.info("training %s (log: %s)", name, log)
            os.makedirs(os.path.dirname(log), exist_ok=True)
            handle = open(log, "w")
            running.append((name, subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT),
                            handle, log, time.perf_counter()))
        time.sleep(0.5)
        for entry in list(running):
            name, proc, handle, log, start = entry
            if proc.poll() is None:
                continue
            handle.close()
            running.remove(entry)
            if proc.returncode:
                for _, other, *_ in running:
                    other.terminate()
                raise RuntimeError(f"training {name} failed (exit status {proc.returncode}); see {log}")
            logger.info("finished %s in %.0f s", name, time.perf_counter() - start)


def _children_cpu():
    """CPU seconds (user + system) of the finished child processes: on a shared machine the wall time
    says little, the CPU time what the study costs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None):
    args = parse_args(argv)
    require_matplotlib()
    os.makedirs(args.output, exist_ok=True)
    configs = {m: os.path.join(args.configs, f"{m}.yaml") for m in args.methods}
    max_iter = {m: load_cfg(path, args.opts).SOLVER.MAX_ITER for m, path in configs.items()}
    jobs = []
    for method in args.methods:
        for seed in args.seeds:
            folder = run_dir(args.output, method, seed)
            if not args.force and final_result(folder, max_iter[method]) is not None:
                logger.info("%s seed %d: finished before, not trained again", method, seed)
                continue
            command = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file",
                       configs[method], *args.opts, "SEED", str(seed), "OUTPUT_DIR", folder]
            jobs.append((f"{method} seed {seed}", command, os.path.join(args.output, "logs", f"{method}_seed{seed}.txt")))
    start, cpu_start = time.perf_counter(), _children_cpu()
    train(jobs, max(1, args.jobs))
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu_start
    rows, missing = collect(args.output, args.methods, args.seeds, max_iter)
    if missing:
        raise InvalidValueError(f"runs without a final evaluation: {', '.join(missing)}")
    fig = figure(rows, os.path.join(args.output, "spectrum.png"))
    write_json(os.path.join(args.output, "spectrum.json"),
               {"rows": rows, "trained": len(jobs), "wall_s": wall, "cpu_s": cpu, "opts": args.opts}, indent=1)
    print(table(rows))
    print(f"\n{len(jobs)} trainings in {wall:.0f} s of wall time and {cpu:.0f} s of CPU time; "
          f"{os.path.join(args.output, fig['file'])} ({fig['size'][0]}x{fig['size'][1]}) and spectrum.json")
    return rows


def cli(argv=None):
    """:func:`main` with bad input (and a missing matplotlib) reported as one line and exit status 2."""
    with exit_on_user_error():
        try:
            return main(argv)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    cli()
