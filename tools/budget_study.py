#!/usr/bin/env python
"""One model, every budget: three ways to serve MAC budgets, compared over seeds on the spectrum study.

    python tools/budget_study.py [--jobs 2] [--seeds 0 1 2] [--budgets 0.35 0.45 0.53 0.6 0.73] \\
        [--moved 0.6] [--configs configs/spectrum] [--output output/budget_study] [--force] [--report-only] \\
        [KEY VALUE ...]

On the short protocol of tools/spectrum_study.py (its host, its ``msgc.yaml`` fine-tuning, the same
run, skip and resume machinery; ``--jobs`` trainings at a time), for each seed:

(a) ``separate``: one ``msgc`` model fine-tuned per budget (the spectrum study's runs, each calibrated
    to its budget on the validation split: ``<output>/msgc/b<budget>/seed<s>``);
(b) ``moved``: the model of (a) at ``--moved`` (0.6), moved to every budget by its budget table
    (``tools/calibrate_gates.py --budgets`` on the validation split: ``<output>/moved/seed<s>``);
(c) ``every``: one model fine-tuned for the whole range (``MODEL.MSGC.BUDGET_RANGE [lo, hi]`` of the
    budgets: ``<output>/every/seed<s>``), its budget table made the same way as (b)'s, and without the
    table too (``every_raw``: the budget as the generators' input alone, ``TEST.BUDGET``).

Every number is measured on the test set (top-1 and the mean eval MAC ratio at each budget); model
selection and calibration use the validation split (``CALIBRATION.DATASET`` of ``msgc.yaml``) only.
It writes ``<output>/budget_study.json`` (every run's numbers, the table's rows, wall and CPU time),
``budget_study.png`` (top-1 against measured MAC ratio, a line per way; mean and sample std over seeds)
and prints the table: per budget and way, mean ± sample std over seeds, and (c) - (a). KEY VALUE pairs
go to every training (as in tools/spectrum_study.py). Steps run seed by seed, (c) and (b) before (a)'s
other budgets, so a study stopped early has whole seeds; ``--report-only`` tabulates what finished.
Needs matplotlib.
"""
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import List

from msgc.analysis.figures import require_matplotlib, spectrum_figure
from msgc.config import load_cfg
from msgc.engine import add_import_argument, import_user_modules
from msgc.evaluation import check_budget
from msgc.utils.errors import ArgumentParser, InvalidValueError
from msgc.utils.file_io import write_json


def _spectrum_study():
    """tools/spectrum_study.py, the machinery this study reuses, loaded from its file: putting tools/ on
    sys.path would let this folder's train_net.py shadow another one (a project's) in the same process."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spectrum_study.py")
    spec = importlib.util.spec_from_file_location("msgc_tools_spectrum_study", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


spectrum = _spectrum_study()

logger = logging.getLogger("budget_study")

WAYS = {"separate": "(a) one model per budget", "moved": "(b) one model at {moved:g}, moved by its budget table",
        "every": "(c) one model for every budget (+ budget table)",
        "every_raw": "(c') the same, budget input only (no table)"}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.35, 0.45, 0.53, 0.6, 0.73],
                        help="MAC budgets compared (their lowest and highest are the range of (c))")
    parser.add_argument("--moved", type=float, default=0.6, help="the budget of the model that (b) moves")
    parser.add_argument("--configs", default=spectrum.PROTOCOLS["short"]["configs"],
                        help="folder of host.yaml and msgc.yaml (default: configs/spectrum)")
    parser.add_argument("--output", default="output/budget_study")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time (each uses NUM_THREADS threads)")
    parser.add_argument("--force", action="store_true", help="redo runs that already finished")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: the table and figure of the runs that finished")
    add_import_argument(parser)
    parser.add_argument("opts", nargs="*", help="config overrides for every training: KEY VALUE pairs")
    args = parser.parse_intermixed_args(argv)
    for b in args.budgets + [args.moved]:
        check_budget(b, "--budgets and --moved")
    if len(set(args.budgets)) < 2:
        raise InvalidValueError("--budgets: give at least two different budgets (their range trains (c))")
    if args.moved not in args.budgets:
        raise InvalidValueError(f"--moved {args.moved:g} must be one of --budgets {args.budgets}")
    args.budgets = sorted(set(args.budgets))
    return args


@dataclass
class TableRun(spectrum.Run):
    """The budget table of a trained run (``source``, also its ``host``: it waits for it) on the validation
    split, evaluated on the test set at each budget; with ``raw``, also evaluated at each budget without
    the table (``TEST.BUDGET``: a model trained for a range of budgets)."""

    budgets: List[float] = field(default_factory=list)
    dataset: str = ""
    raw: bool = False

    @property
    def record(self) -> str:
        return os.path.join(self.folder, "model_budgets.json")

    def raw_folder(self, b: float) -> str:
        return os.path.join(self.folder, "raw", f"b{b:g}")

    def raw_results(self, b: float) -> str:
        return os.path.join(self.raw_folder(b), "eval", "eval_results.json")

    def commands(self) -> List[list]:
        src = self.host
        imports = [t for m in self.imports for t in ("--import", m)]
        common = [*imports, "--config-file", src.config]
        opts = [*src.opts, "MODEL.WEIGHTS", src.weights, "SEED", str(self.seed)]
        tools = os.path.join(spectrum.ROOT, "tools")
        table = [sys.executable, os.path.join(tools, "calibrate_gates.py"), *common, "--dataset", self.dataset,
                 "--output", os.path.join(self.folder, "model_budgets.pth"),
                 "--budgets", *[repr(b) for b in self.budgets], *opts]
        out = [table]
        if self.raw:
            for b in self.budgets:
                out.append([sys.executable, os.path.join(tools, "train_net.py"), "--eval-only", *common, *opts,
                            "TEST.BUDGET", repr(b), "OUTPUT_DIR", self.raw_folder(b)])
        return out

    def finished(self) -> bool:
        return os.path.isfile(self.record) and (not self.raw or all(os.path.isfile(self.raw_results(b))
                                                                    for b in self.budgets))


def plan(args):
    """(hosts and (a)'s runs, (c)'s runs, the table runs of (b) and (c))."""
    study = spectrum.parse_args(["--protocol", "short", "--methods", "msgc", "--seeds", *map(str, args.seeds),
                                 "--budgets", *map(repr, args.budgets), "--configs", args.configs, "--output",
                                 args.output, "--", *args.opts])
    study.imports = list(args.imports)
    trained = spectrum.plan(study)
    hosts = {r.seed: r for r in trained if r.method == "host"}
    lo, hi = args.budgets[0], args.budgets[-1]
    every = {s: spectrum.Run("every", s, None, os.path.join(args.configs, "msgc.yaml"),
                             list(args.opts) + ["MODEL.MSGC.BUDGET_RANGE", f"[{lo!r}, {hi!r}]",
                                                "SOLVER.MAC_TARGET.FINAL", repr(lo), "CALIBRATION.DATASET", ""],
                             os.path.join(args.output, "every", f"seed{s}"), host=hosts[s], imports=list(args.imports))
             for s in args.seeds}
    dataset = load_cfg(os.path.join(args.configs, "msgc.yaml")).CALIBRATION.DATASET
    if not dataset:
        raise InvalidValueError(f"{args.configs}/msgc.yaml has no CALIBRATION.DATASET: the budget tables need a "
                                "validation split")
    moved_point = f"b{args.moved:g}"
    tables = []
    for s in args.seeds:
        source = next(r for r in trained if r.method == "msgc" and r.point == moved_point and r.seed == s)
        for name, src, raw in (("moved", source, False), ("every", every[s], True)):
            tables.append(TableRun(f"{name}_table", s, None, src.config, [], os.path.join(args.output, f"{name}_table",
                                   f"seed{s}"), host=src, imports=list(args.imports), budgets=list(args.budgets),
                                   dataset=dataset, raw=raw))
    return trained, list(every.values()), tables


def order(trained, every, tables, args) -> list:
    """Every step, seed by seed, each seed's comparison of (c) with (b) first: its host, (c)'s training,
    (a)'s model at ``--moved`` (also (b)'s source), both tables, then (a)'s other budgets. Steps start in
    this order as their dependencies finish, so a study stopped early has whole seeds."""
    out = []
    for s in args.seeds:
        mine = [r for r in trained + every + tables if r.seed == s]
        key = {"host": 0, "every": 1, "every_table": 3, "moved_table": 3}
        moved = f"b{args.moved:g}"
        out += sorted(mine, key=lambda r: key.get(r.method, 2 if r.point == moved else 4))
    return out


def collect(args, trained, tables) -> List[dict]:
    """Every finished measurement: way, seed, budget, test top-1, measured eval MAC ratio."""
    out = []
    for run in trained:
        if run.method == "msgc" and run.status == "done":
            r = spectrum.result(run)
            out.append({"way": "separate", "seed": run.seed, "budget": run.budget, "top1": r["top1"],
                        "mac_ratio": r["mac_ratio"], "val_mac_ratio": r.get("val_mac_ratio")})
    for run in tables:
        if run.status != "done":
            continue
        with open(run.record) as f:
            record = json.load(f)
        entries = {e["budget"]: e for e in record["budget_table"]["entries"]}
        way = "moved" if run.method == "moved_table" else "every"
        for b in run.budgets:
            tested = record["at_budgets"][f"{b:g}"]
            out.append({"way": way, "seed": run.seed, "budget": b, "top1": tested["top1"],
                        "mac_ratio": tested["mac_ratio"], "val_mac_ratio": entries[b]["mac_ratio"],
                        "threshold": entries[b]["threshold"]})
            if run.raw:
                with open(run.raw_results(b)) as f:
                    raw = json.load(f)["results"]
                out.append({"way": "every_raw", "seed": run.seed, "budget": b, "top1": raw["top1"],
                            "mac_ratio": raw["mac_ratio"]})
    return out


def rows(measurements: List[dict]) -> List[dict]:
    """One row per way and budget: the seeds' numbers."""
    groups = {}
    for m in sorted(measurements, key=lambda m: m["seed"]):
        groups.setdefault((m["way"], m["budget"]), []).append(m)
    return [{"way": way, "budget": b, "seeds": [m["seed"] for m in g], "top1": [m["top1"] for m in g],
             "mac_ratio": [m["mac_ratio"] for m in g]} for (way, b), g in sorted(groups.items(), key=lambda i: i[0][1])]


def _pm(values, digits):
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(rows_: List[dict], moved: float) -> str:
    """Per budget: each way's test top-1 and measured eval MAC ratio (mean ± sample std over seeds), and
    the mean top-1 of (c) minus (a)'s."""
    ways = [w for w in WAYS if any(r["way"] == w for r in rows_)]
    head = "| budget | " + " | ".join(f"{WAYS[w].format(moved=moved)}: top-1 (%) / MAC ratio" for w in ways)
    lines = [head + " | (c) - (a), top-1 |", "|---|" + "---|" * (len(ways) + 1)]
    for b in sorted({r["budget"] for r in rows_}):
        at = {r["way"]: r for r in rows_ if r["budget"] == b}
        cells = [f"{_pm(at[w]['top1'], 2)} / {_pm(at[w]['mac_ratio'], 3)}" if w in at else "-" for w in ways]
        gap = (f"{statistics.mean(at['every']['top1']) - statistics.mean(at['separate']['top1']):+.2f}"
               if "every" in at and "separate" in at else "-")
        lines.append(f"| {b:g} | " + " | ".join(cells) + f" | {gap} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    require_matplotlib()
    import_user_modules(args=args)
    trained, every, tables = plan(args)
    spectrum.check(trained + every)
    os.makedirs(args.output, exist_ok=True)
    runs = order(trained, every, tables, args)
    for run in runs:
        if not args.force and spectrum.finished(run):
            run.status = "done"
            logger.info("%s: finished before, not run again", run.name)
        elif args.force and os.path.isdir(run.folder):
            for name in ("last_checkpoint", "metrics.json", "calibration.json", "model_budgets.json"):
                if os.path.exists(os.path.join(run.folder, name)):
                    os.remove(os.path.join(run.folder, name))
    pending = sum(r.status == "pending" for r in runs)
    start, cpu_start = time.perf_counter(), spectrum.children_cpu()
    if args.report_only:
        for run in runs:
            if run.status == "pending":
                run.status, run.error = "skipped", "--report-only"
    else:
        spectrum.train(runs, max(1, args.jobs), os.path.join(args.output, "logs"))
    wall, cpu = time.perf_counter() - start, spectrum.children_cpu() - cpu_start
    measurements = collect(args, trained, tables)
    rows_ = rows(measurements)
    problems = [{"run": r.name, "status": r.status, "error": r.error} for r in runs if r.status != "done"]
    gaps = {}
    for b in args.budgets:
        at = {r["way"]: r for r in rows_ if r["budget"] == b}
        if "every" in at and "separate" in at:
            gaps[f"{b:g}"] = statistics.mean(at["every"]["top1"]) - statistics.mean(at["separate"]["top1"])
    out = {"rows": rows_, "measurements": measurements, "problems": problems, "ran": pending, "wall_s": round(wall, 1),
           "cpu_s": round(cpu, 1), "jobs": args.jobs, "opts": args.opts, "budgets": args.budgets, "moved": args.moved,
           "gap_c_minus_a": gaps, "goal_met": bool(gaps) and all(g >= -0.3 for g in gaps.values())}
    labels = {w: WAYS[w].format(moved=args.moved) for w in WAYS}
    fig = None
    if rows_:
        fig = spectrum_figure([dict(r, method=labels[r["way"]]) for r in rows_ if r["way"] != "every_raw"],
                              os.path.join(args.output, "budget_study.png"),
                              title="Fashion-MNIST: test top-1 against measured eval MAC ratio (mean; bars: sample "
                                    "std over seeds)")
    write_json(os.path.join(args.output, "budget_study.json"), out, indent=1)
    print(table(rows_, args.moved))
    print(f"\n{pending} steps in {wall:.0f} s of wall time and {cpu:.0f} s of CPU time"
          + (f"; {os.path.join(args.output, fig['file'])}" if fig else "") + " and budget_study.json")
    if gaps:
        print("goal, (c) within 0.3 points of (a) at every budget: " + ("met" if out["goal_met"] else "not met")
              + " (" + ", ".join(f"{b}: {g:+.2f}" for b, g in gaps.items()) + ")")
    for p in problems:
        print(f"{p['status']}: {p['run']}: {p['error']}", file=sys.stderr)
    return out


def cli(argv=None):
    """:func:`main` with bad input as one line (exit status 2); a failed run makes the exit status 1."""
    return spectrum.run_main(main, argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    cli()
