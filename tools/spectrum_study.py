#!/usr/bin/env python
"""The spectrum study: channel pruning, static grouping and MSGC at equal measured MACs, over seeds.

    python tools/spectrum_study.py [--protocol short|long] [--jobs 2] [--device cpu|cuda] [--quick] \\
        [--seeds 0 1 2] [--budgets 0.35 0.53 0.6 0.73] [--static-heads 2 4 8] \\
        [--methods dense prune static msgc msgc_att] [--configs configs/spectrum] [--output output/spectrum] \\
        [--force] [KEY VALUE ...]

Two protocols (``--protocol``), each a folder of configs and its own defaults of the options below:

- ``short`` (``configs/spectrum``, ``output/spectrum``): a host of 2.3 epochs, fine-tunings of 1.7 at
  raised rates; seeds 0 1 2, every budget, static at 2 4 8 heads, ``dense prune static msgc msgc_att``;
- ``long`` (``configs/spectrum_long``, ``output/spectrum_long``): the paper's regime, a host trained
  until its validation top-1 stops improving and fine-tunings as long, at the paper's rates with its
  per-epoch cosine; seeds 0 1, budget 0.6, static at 4 heads, ``dense prune static msgc msgc_heads``.
  Its host evaluates on the validation split every epoch (its curve: ``curves`` in spectrum.json and
  ``host_curves.png``, from which its length is chosen) and is then evaluated once on the test set
  (``<host>/eval/eval_results.json``).

Each protocol has two stages (configs in ``--configs``):

1. ``host.yaml``: the dense host, trained from scratch once per seed (``<output>/host/seed<s>``);
2. every method fine-tuned from its seed's host (``MODEL.WEIGHTS`` = the host's ``model_final.pth``)
   with ``<method>.yaml``: ``prune``, ``msgc`` and ``msgc_att`` at each of ``--budgets``
   (``SOLVER.MAC_TARGET.FINAL``), ``static`` at each of ``--static-heads`` (its MAC ratio is fixed by
   its head count: the target is set to it), ``dense`` once (the ceiling). Runs live in
   ``<output>/<method>/<point>/seed<s>``.

``--jobs`` trainings run at a time, each on ``NUM_THREADS`` threads; a run starts when its host has
finished. ``--device cuda`` trains and evaluates every run on the GPU (``MODEL.DEVICE cuda``), the
``--jobs`` runs side by side on the one GPU (docs/analysis.md: the long protocol with every budget and
three seeds in one command). A run that already finished is not trained again (``--force`` retrains); an interrupted one
continues from its last checkpoint. A run that fails is reported with its one-line error (and its
dependants as skipped); the others go on. Before anything trains, every run's config is built and
checked: a budget outside (0, 1] or below the MAC ratio of every gate closed is one line.

Each dynamic run ends with its gates calibrated to its budget on the validation split
(``CALIBRATION.DATASET``): the study reports the calibrated model's test top-1 and eval MAC ratio,
with the numbers before calibration beside them, and says for every dynamic run whether its eval MAC
ratio on the test set lands within ``--tolerance`` (0.02) of its budget. It writes
``<output>/spectrum.json`` (every run, the table's rows, the wall and CPU time), ``spectrum.png`` (test
top-1 against eval MAC ratio, one line per method, mean and spread over seeds) and prints the tables.
``--quick`` is the subset of one seed, two budgets (0.53, 0.73) and the three methods of the claim:
``prune``, ``msgc`` and ``static`` at 8 heads (the point beside 0.53), with the host as the ceiling
(``--methods`` given with it wins, e.g. to add ``msgc_att``). KEY VALUE pairs after the options go to
every run, the hosts included (after ``--`` where a list option comes last: ``--budgets 0.6 --
SOLVER.MAX_ITER 300``); a change to stage 2 alone belongs in a copy of the configs (``--configs``).
Needs matplotlib for the figure: ``pip install -e ".[vis]"``.
"""
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

from msgc.analysis.figures import require_matplotlib, spectrum_figure, training_curves_figure
from msgc.config import load_cfg
from msgc.engine import add_import_argument, exit_on_user_error, import_user_modules
from msgc.evaluation import check_budget
from msgc.utils.errors import ArgumentParser, InvalidValueError, UserError, one_line
from msgc.utils.events import read_metrics
from msgc.utils.file_io import write_json

logger = logging.getLogger("spectrum_study")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("dense", "prune", "static", "msgc", "msgc_att", "msgc_heads")
DYNAMIC = ("prune", "msgc", "msgc_att", "msgc_heads")
#: each protocol's defaults of the options (what a given option replaces)
PROTOCOLS = {
    "short": {"configs": os.path.join(ROOT, "configs", "spectrum"), "output": "output/spectrum", "seeds": [0, 1, 2],
              "budgets": [0.35, 0.53, 0.6, 0.73], "static_heads": [2, 4, 8],
              "methods": ["dense", "prune", "static", "msgc", "msgc_att"]},
    "long": {"configs": os.path.join(ROOT, "configs", "spectrum_long"), "output": "output/spectrum_long",
             "seeds": [0, 1], "budgets": [0.6], "static_heads": [4],
             "methods": ["dense", "prune", "static", "msgc", "msgc_heads"]},
}
QUICK = {"seeds": [0], "budgets": [0.53, 0.73], "static_heads": [8], "methods": ["prune", "static", "msgc"]}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="short",
                        help="short (configs/spectrum) or long (configs/spectrum_long): the defaults of the options "
                        "below")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods of stage 2 (default: the protocol's)")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: short 0 1 2, long 0 1")
    parser.add_argument("--budgets", nargs="+", type=float,
                        help="MAC budgets of the dynamic methods (fractions of the dense host's MACs); default: short "
                        "0.35 0.53 0.6 0.73, long 0.6")
    parser.add_argument("--static-heads", nargs="+", type=int,
                        help="head counts of the static grouping (each gives one MAC ratio); default: short 2 4 8, "
                        "long 4")
    parser.add_argument("--quick", action="store_true",
                        help="the short protocol's subset: one seed, two budgets, prune, static and msgc")
    parser.add_argument("--configs", help="folder of the configs (default: the protocol's)")
    parser.add_argument("--output", help="folder of the runs and the results (default: output/spectrum, "
                        "output/spectrum_long)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time (each uses NUM_THREADS threads)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where every run trains (MODEL.DEVICE); with cuda, the --jobs runs share the one GPU")
    parser.add_argument("--tolerance", type=float, default=0.02, help="how close to its budget a run's eval MAC "
                        "ratio must land")
    parser.add_argument("--force", action="store_true", help="retrain runs that already finished")
    add_import_argument(parser)  # passed on to every training
    parser.add_argument("opts", nargs="*", help="config overrides for every run: KEY VALUE pairs")
    args = parser.parse_intermixed_args(argv)
    if args.quick and args.protocol != "short":
        parser.error("--quick is a subset of the short protocol; with --protocol long choose the subset with "
                     "--seeds, --budgets, --methods")
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None or key != "methods":
                setattr(args, key, value)
    for key, value in PROTOCOLS[args.protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for b in args.budgets:
        check_budget(b, "--budgets")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidValueError("--device cuda: torch.cuda.is_available() is False on this machine; run with "
                                    "--device cpu (the default), or on a machine with a GPU")
        args.opts = ["MODEL.DEVICE", "cuda", *args.opts]
    return args


# ---------------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training of the study: ``method`` at ``point`` (a budget, a head count, or None) for ``seed``."""

    method: str
    seed: int
    point: Optional[str]
    config: str
    opts: List[str]
    folder: str
    host: Optional["Run"] = None
    budget: Optional[float] = None  # the MAC target; for static its fixed ratio
    max_iter: int = 0
    calibrated: bool = False  # ends with a gate calibration (calibration.json)
    test_dataset: str = ""  # evaluated on it after training (eval/eval_results.json): a host validated on another
    iters_per_epoch: int = 0
    status: str = "pending"  # pending, done, failed, skipped
    error: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    imports: List[str] = field(default_factory=list)  # the study's --import modules

    @property
    def name(self) -> str:
        return " ".join(str(p) for p in (self.method, self.point, f"seed {self.seed}") if p is not None)

    @property
    def weights(self) -> str:
        return os.path.join(self.folder, "model_final.pth")

    @property
    def test_results(self) -> str:
        return os.path.join(self.folder, "eval", "eval_results.json")

    def commands(self) -> List[list]:
        """The training (resumed from the last checkpoint if any), then for a run with ``test_dataset`` the
        evaluation of its final model on it."""
        host = ["MODEL.WEIGHTS", self.host.weights] if self.host is not None else []
        imports = [t for m in self.imports for t in ("--import", m)]
        tool = [sys.executable, os.path.join(ROOT, "tools", "train_net.py")]
        run = [*imports, "--config-file", self.config, *self.opts, *host, "SEED", str(self.seed),
               "OUTPUT_DIR", self.folder]
        train = tool + ["--resume"] + run
        if not self.test_dataset:
            return [train]
        test = ["MODEL.WEIGHTS", self.weights, "DATASETS.TEST", self.test_dataset]
        return [train, tool + ["--eval-only"] + run + test]


def plan(args) -> List[Run]:
    """Every run of the study, hosts first."""
    cfg_path = lambda name: os.path.join(args.configs, f"{name}.yaml")  # noqa: E731
    runs = []
    hosts = {s: Run("host", s, None, cfg_path("host"), list(args.opts), os.path.join(args.output, "host", f"seed{s}"),
                    imports=list(args.imports)) for s in args.seeds}
    runs += hosts.values()
    for method in args.methods:
        if method == "dense":
            points = [(None, [])]
        elif method == "static":
            points = [(f"h{h}", ["MODEL.MSGC.HEADS", str(h)]) for h in args.static_heads]
        else:
            points = [(f"b{b:g}", ["SOLVER.MAC_TARGET.FINAL", repr(float(b))]) for b in args.budgets]
        for point, opts in points:
            for s in args.seeds:
                folder = os.path.join(args.output, method, *([point] if point else []), f"seed{s}")
                runs.append(Run(method, s, point, cfg_path(method), list(args.opts) + opts, folder, host=hosts[s],
                                imports=list(args.imports)))
    return runs


def check(runs: List[Run]):
    """Build every run's config and model and refuse, before anything trains, what cannot work: a
    missing config or dataset, a schedule no run can follow, a budget below the MAC ratio of every gate
    closed, a static head count that does not divide the layers. Sets each run's budget, length and
    whether it calibrates; a static run's target becomes its fixed MAC ratio. A host whose
    ``DATASETS.TEST`` is not the fine-tunings' test set (the long protocol's, validated every epoch)
    is evaluated on that test set after training."""
    from msgc.data import check_dataset
    from msgc.modeling import check_mac_target
    from msgc.modeling import build_model
    from msgc.solver import check_solver
    from msgc.solver.build import iters_per_epoch

    ranges, tests = {}, {}
    for run in runs:
        if not os.path.isfile(run.config):
            raise InvalidValueError(f"{run.name}: config {run.config} does not exist")
        cfg = load_cfg(run.config, run.opts)
        import_user_modules(cfg)  # the config's IMPORTS (main imported the --import modules)
        check_solver(cfg)
        for name in {cfg.DATASETS.TRAIN, cfg.DATASETS.TEST, cfg.CALIBRATION.DATASET} - {""}:
            check_dataset(cfg, name, "test")
        key = (run.method, run.point)
        if key not in ranges:
            model = build_model(cfg)
            ranges[key] = model.mac_ratio_range(cfg.INPUT.TRAIN_SIZE, cfg.INPUT.TRAIN_SIZE)
            gated = ranges[key][1] - ranges[key][0] > 1e-9
            if gated:
                try:
                    check_mac_target(cfg, model)
                except UserError as e:
                    raise InvalidValueError(f"{run.name}: {one_line(e)}") from None
        low, high = ranges[key]
        run.max_iter = cfg.SOLVER.MAX_ITER
        tests[run.method] = cfg.DATASETS.TEST
        if run.method == "host":
            run.iters_per_epoch = iters_per_epoch(cfg)
        if high - low > 1e-9:
            run.budget = cfg.SOLVER.MAC_TARGET.FINAL
            run.calibrated = bool(cfg.CALIBRATION.DATASET)
        else:
            run.budget = low
            if run.method == "static":
                run.opts += ["SOLVER.MAC_TARGET.FINAL", repr(round(low, 6))]
    test_sets = {name for method, name in tests.items() if method != "host"}
    if len(test_sets) > 1:
        raise InvalidValueError(f"the fine-tunings' configs evaluate on different test sets {sorted(test_sets)}: give "
                                "them one DATASETS.TEST")
    for run in runs:
        if run.method == "host" and test_sets and tests["host"] not in test_sets:
            run.test_dataset = test_sets.pop()
            test_sets.add(run.test_dataset)


def finished(run: Run) -> bool:
    """Whether the run has its final evaluation (and, when it calibrates, its calibration; when it has a
    ``test_dataset``, its evaluation on it). A run of another kind (a subclass of :class:`Run` with its
    own ``finished()`` method, e.g. a calibration step of tools/budget_study.py) says it itself."""
    own = getattr(run, "finished", None)
    if own is not None:
        return own()
    if final_record(run) is None:
        return False
    if run.test_dataset and not os.path.isfile(run.test_results):
        return False
    return not run.calibrated or os.path.isfile(os.path.join(run.folder, "calibration.json"))


def final_record(run: Run) -> Optional[dict]:
    """The run's final evaluation (the ``val/*`` record at its last iteration), or None."""
    path = os.path.join(run.folder, "metrics.json")
    if not os.path.isfile(path):
        return None
    for record in reversed(read_metrics(path)):
        if "val/top1" in record:
            return record if record["iteration"] == run.max_iter - 1 else None
    return None


def last_error(log: str) -> str:
    """The run's one-line error (its log's last ``error:`` line), or the log's last line."""
    try:
        with open(log, errors="replace") as f:
            lines = [line.rstrip() for line in f if line.strip()]
    except OSError:
        return f"no log at {log}"
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1][len("error: "):] if errors else (lines[-1] if lines else "no output")


def train(runs: List[Run], jobs: int, log_dir: str):
    """Train the pending runs, ``jobs`` at a time, each once its host is done; a failure is recorded
    and its dependants are skipped, the others go on."""
    pending, running = [r for r in runs if r.status == "pending"], []
    while pending or running:
        for run in [r for r in pending if r.host is not None and r.host.status in ("failed", "skipped")]:
            pending.remove(run)
            run.status, run.error = "skipped", f"its host ({run.host.name}) did not finish"
            logger.warning("%s: skipped, %s", run.name, run.error)
        ready = [r for r in pending if r.host is None or r.host.status == "done"]
        while ready and len(running) < jobs:
            run = ready.pop(0)
            pending.remove(run)
            stem = "_".join(str(p) for p in (run.method, run.point, f"seed{run.seed}") if p)
            log = os.path.join(log_dir, stem + ".txt")
            os.makedirs(log_dir, exist_ok=True)
            logger.info("training %s (log: %s)", run.name, log)
            handle = open(log, "w")
            commands = run.commands()
            running.append([run, _start(commands.pop(0), handle), handle, log, time.perf_counter(), commands])
        if not running:
            continue
        time.sleep(0.5)
        for entry in list(running):
            run, proc, handle, log, start, commands = entry
            if proc.poll() is None:
                continue
            if proc.returncode == 0 and commands:  # the next command of the run, in its slot
                entry[1] = _start(commands.pop(0), handle)
                continue
            handle.close()
            running.remove(entry)
            run.seconds = time.perf_counter() - start
            if proc.returncode == 0 and finished(run):
                run.status = "done"
                logger.info("finished %s in %.0f s", run.name, run.seconds)
            else:
                run.status, run.error = "failed", f"exit status {proc.returncode}: {last_error(log)}"
                logger.error("%s failed (%s); log: %s", run.name, run.error, log)


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------
def result(run: Run) -> dict:
    """A finished run's numbers: the final test evaluation, and for calibrated runs the calibration and
    the calibrated model's test evaluation (the numbers the study reports)."""
    record = final_record(run)
    out = {"method": run.method, "point": run.point, "seed": run.seed, "budget": run.budget,
           "top1_raw": record["val/top1"], "mac_ratio_raw": record.get("val/mac_ratio", 1.0),
           "seconds": round(run.seconds, 1)}
    if run.test_dataset:  # the final record is the validation split's: the test set's comes after
        with open(run.test_results) as f:
            tested = json.load(f)["results"]
        out.update(val_top1=out["top1_raw"], top1_raw=tested["top1"], mac_ratio_raw=tested.get("mac_ratio", 1.0))
    out["top1"], out["mac_ratio"] = out["top1_raw"], out["mac_ratio_raw"]
    if run.calibrated:
        with open(os.path.join(run.folder, "calibration.json")) as f:
            calibration = json.load(f)
        out.update(top1=calibration["after"]["top1"], mac_ratio=calibration["after"]["mac_ratio"],
                   threshold=calibration["calibration"]["threshold"],
                   val_mac_ratio=calibration["calibration"]["mac_ratio"])
    return out


def curve(run: Run) -> List[dict]:
    """A host's evaluations during training: iteration, epoch and top-1 on its ``DATASETS.TEST``."""
    records = read_metrics(os.path.join(run.folder, "metrics.json"))
    per_epoch = run.iters_per_epoch or run.max_iter
    return [{"iteration": r["iteration"], "epoch": round((r["iteration"] + 1) / per_epoch, 2), "top1": r["val/top1"]}
            for r in records if "val/top1" in r]


def curves_text(curves: dict) -> str:
    """One line per host: its top-1 at each evaluation (epoch: top-1)."""
    return "\n".join(f"{name}: validation top-1 by epoch: " + " ".join(f"{p['epoch']:g}:{p['top1']:.2f}" for p in ps)
                     for name, ps in curves.items())


def _mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rows(results: List[dict], tolerance: float) -> List[dict]:
    """One row per method and point: its seeds' numbers, and the largest miss of the budget."""
    groups = {}
    for r in results:
        groups.setdefault((r["method"], r["point"]), []).append(r)
    out = []
    for (method, point), group in groups.items():
        group.sort(key=lambda r: r["seed"])
        row = {"method": method, "point": point, "budget": group[0]["budget"], "seeds": [r["seed"] for r in group]}
        for key in ("top1", "mac_ratio", "top1_raw", "mac_ratio_raw"):
            row[key] = [r[key] for r in group]
        if method in DYNAMIC:
            row["miss"] = max(abs(r["mac_ratio"] - r["budget"]) for r in group)
            row["miss_raw"] = max(abs(r["mac_ratio_raw"] - r["budget"]) for r in group)
            row["met"] = row["miss"] <= tolerance
        out.append(row)
    order = {m: i for i, m in enumerate(("host",) + METHODS)}
    return sorted(out, key=lambda r: (order.get(r["method"], 99), statistics.mean(r["mac_ratio"])))


def _pm(values, digits):
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(rows_: List[dict], tolerance: float) -> str:
    """The markdown table: per method and point, the calibrated test top-1 and eval MAC ratio (mean ±
    sample std over seeds), the budget and whether every seed met it, and the numbers before calibration."""
    lines = [f"| method | point | seeds | test top-1 (%) | eval MAC ratio | budget | within ±{tolerance:g} | before "
             "calibration: top-1 / MAC ratio |", "|---|---|---|---|---|---|---|---|"]
    for row in rows_:
        met = "-" if "met" not in row else ("yes" if row["met"] else f"**no** (by {row['miss'] - tolerance:.3f})")
        before = (f"{_pm(row['top1_raw'], 2)} / {_pm(row['mac_ratio_raw'], 3)}"
                  if row["top1_raw"] != row["top1"] else "-")
        lines.append(f"| {row['method']} | {row['point'] or '-'} | {len(row['seeds'])} | {_pm(row['top1'], 2)} | "
                     f"{_pm(row['mac_ratio'], 3)} | {row['budget']:.3f} | {met} | {before} |")
    return "\n".join(lines)


def runs_table(results: List[dict]) -> str:
    """Every dynamic run's eval MAC ratio against its budget, before and after calibration."""
    lines = ["| run | budget | eval MAC ratio before / after calibration | miss after | test top-1 before / after |",
             "|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["method"], r["budget"], r["seed"])):
        if r["method"] in DYNAMIC:
            lines.append(f"| {r['method']} {r['point']} seed {r['seed']} | {r['budget']:.3f} | "
                         f"{r['mac_ratio_raw']:.4f} / "
                         f"{r['mac_ratio']:.4f} | {r['mac_ratio'] - r['budget']:+.4f} | {r['top1_raw']:.2f} / "
                         f"{r['top1']:.2f} |")
    return "\n".join(lines)


def figure(rows_, path):
    return spectrum_figure(rows_, path, title="Fashion-MNIST: test top-1 against eval MAC ratio (mean; bars: "
                                              "sample std over seeds)")


def _start(command: list, log) -> subprocess.Popen:
    """A training's process, in ROOT, writing to ``log``."""
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_child_env())


def _child_env() -> dict:
    """The trainings' environment: this one, with this working folder on PYTHONPATH (they run in ROOT),
    so that they find the user modules that this process found here."""
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


def children_cpu():
    """CPU seconds (user + system) of the finished child processes: on a shared machine the wall time
    says little, the CPU time what the study costs (the budget study reads it too)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None):
    args = parse_args(argv)
    require_matplotlib()
    import_user_modules(args=args)
    runs = plan(args)
    check(runs)
    os.makedirs(args.output, exist_ok=True)
    for run in runs:
        if not args.force and finished(run):
            run.status = "done"
            logger.info("%s: finished before, not trained again", run.name)
        elif args.force and os.path.isdir(run.folder):
            for name in ("last_checkpoint", "metrics.json", "calibration.json"):
                if os.path.exists(os.path.join(run.folder, name)):
                    os.remove(os.path.join(run.folder, name))
    trained = sum(r.status == "pending" for r in runs)
    start, cpu_start = time.perf_counter(), children_cpu()
    train(runs, max(1, args.jobs), os.path.join(args.output, "logs"))
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu_start
    results = [result(r) for r in runs if r.status == "done" and r.method != "host"]
    hosts = [result(r) for r in runs if r.status == "done" and r.method == "host"]
    rows_ = rows(hosts + results, args.tolerance)
    validated = [r for r in runs if r.status == "done" and r.method == "host" and r.test_dataset]
    curves = {r.name: curve(r) for r in validated}
    problems = [{"run": r.name, "status": r.status, "error": r.error} for r in runs if r.status != "done"]
    out = {"rows": rows_, "runs": hosts + results, "problems": problems, "trained": trained,
           "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "opts": args.opts, "jobs": args.jobs,
           "tolerance": args.tolerance, "protocol": args.protocol, "curves": curves}
    points = [r for r in rows_ if r["method"] != "host"]
    fig = figure(points, os.path.join(args.output, "spectrum.png")) if results else None
    if curves:
        training_curves_figure({r.name: read_metrics(os.path.join(r.folder, "metrics.json")) for r in validated},
                               os.path.join(args.output, "host_curves.png"))
    write_json(os.path.join(args.output, "spectrum.json"), out, indent=1)
    print(table(rows_, args.tolerance))
    print()
    print(runs_table(results))
    if curves:
        print("\n" + curves_text(curves) + f"\n(the hosts' curves: {os.path.join(args.output, 'host_curves.png')})")
    missed = [r for r in rows_ if r.get("met") is False]
    print(f"\n{trained} trainings in {wall:.0f} s of wall time and {cpu:.0f} s of CPU time"
          + (f"; {os.path.join(args.output, fig['file'])} ({fig['size'][0]}x{fig['size'][1]})" if fig else "")
          + " and spectrum.json")
    for row in missed:
        print(f"missed: {row['method']} {row['point']}: an eval MAC ratio {row['miss']:.3f} from its budget "
              f"{row['budget']:.3f} (tolerance {args.tolerance})")
    for p in problems:
        print(f"{p['status']}: {p['run']}: {p['error']}", file=sys.stderr)
    return out


def run_main(main_func, argv=None) -> dict:
    """``main_func(argv)`` (this study's or another that reuses it) with bad input (and a missing
    matplotlib) reported as one line and exit status 2; a run that failed makes the exit status 1 (the
    others' results are written)."""
    with exit_on_user_error():
        out = main_func(argv)
    if out["problems"]:
        sys.exit(1)
    return out


def cli(argv=None):
    """:func:`main` as a command: see :func:`run_main`."""
    return run_main(main, argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    cli()
