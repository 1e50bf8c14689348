#!/usr/bin/env python
"""Training curves of one or several runs, drawn from their ``metrics.json``.

    python tools/plot_metrics.py OUTPUT_DIR [OUTPUT_DIR ...] [--output FILE] [--labels NAME ...]

Four panels, every run in its own colour on each: the losses, ``mac_ratio`` against ``mac_target``,
validation top-1 and MAC ratio (or MACs), and the learning rate of each parameter group. The figure
goes to ``--output`` (default: ``OUTPUT_DIR/metrics.png`` for one run, ``metrics.png`` for several).
Needs matplotlib: ``pip install -e ".[vis]"``.
"""
import argparse
import os

from msgc.analysis.figures import require_matplotlib, training_curves_figure
from msgc.engine import exit_on_user_error
from msgc.utils.errors import FileWriteError, InvalidValueError, MissingFileError
from msgc.utils.events import read_metrics


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="output folders holding metrics.json")
    parser.add_argument("--output", default="", help="the PNG file to write")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend name per run (default: folder names)")
    return parser.parse_args(argv)


def load_runs(folders, labels=None) -> dict:
    """``{label: records}`` of each folder's metrics.json (one-line errors for a missing or broken file)."""
    if labels is not None and len(labels) != len(folders):
        raise InvalidValueError(f"--labels gives {len(labels)} names for {len(folders)} runs")
    runs = {}
    for i, folder in enumerate(folders):
        path = os.path.join(folder, "metrics.json")
        if not os.path.isfile(path):
            raise MissingFileError(f"{path} does not exist: is {folder} the OUTPUT_DIR of a training run?")
        records = read_metrics(path)
        if not records:
            raise InvalidValueError(f"{path} holds no record yet")
        label = labels[i] if labels else os.path.basename(os.path.normpath(folder)) or folder
        while label in runs:
            label += "'"
        runs[label] = records
    return runs


def main(argv=None):
    args = parse_args(argv)
    require_matplotlib()
    runs = load_runs(args.runs, args.labels)
    output = args.output or (os.path.join(args.runs[0], "metrics.png") if len(args.runs) == 1 else "metrics.png")
    folder = os.path.dirname(output) or "."
    if not os.path.isdir(folder):
        raise FileWriteError(f"cannot write {output}: the folder {folder} does not exist")
    try:
        figure = training_curves_figure(runs, output)
    except OSError as e:
        raise FileWriteError(f"cannot write {output}: {e.strerror or e}") from None
    print(f"{output} ({figure['size'][0]}x{figure['size'][1]}): {len(runs)} run(s)")
    return figure


def cli(argv=None):
    """:func:`main` with bad input (a missing matplotlib too) reported as one line and exit status 2."""
    with exit_on_user_error():
        return main(argv)


if __name__ == "__main__":
    cli()
