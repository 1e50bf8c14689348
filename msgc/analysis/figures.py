"""Figures of the numbers that :mod:`msgc.analysis.gates` measures, of training runs and of the spectrum study.

Every function draws from plain numbers (the dicts of ``gates.json``, ``metrics.json`` records, the
study's rows), writes one PNG of a fixed size in pixels, and returns ``{"file": name, "size": [w, h]}``.
matplotlib is an optional extra (``pip install -e ".[vis]"``), imported only here, headless (Agg).
:func:`usage_image` needs no matplotlib: the trainer logs it to TensorBoard.
"""
import itertools
import os

import numpy as np

from ..utils.errors import InvalidValueError, UserError

__all__ = ["MatplotlibMissing", "require_matplotlib", "usage_image", "group_wise_figure", "layer_wise_figure",
           "sample_wise_figure", "extremes_figure", "attention_figure", "write_gate_figures",
           "training_curves_figure", "spectrum_figure", "DPI"]

#: dots per inch of every figure (sizes in pixels are inches x DPI)
DPI = 100
INSTALL_HINT = 'pip install -e ".[vis]"'


class MatplotlibMissing(UserError, ImportError):
    """matplotlib, the optional figure dependency, is not installed (bad input: a one-line error)."""


def require_matplotlib():
    """``matplotlib.pyplot`` on the headless Agg backend, or :class:`MatplotlibMissing` naming the install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MatplotlibMissing(f"figures need matplotlib, which is not installed ({e}): {INSTALL_HINT}") from None
    return plt


def _save(fig, path, plt):
    w, h = (int(round(v * DPI)) for v in fig.get_size_inches())
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return {"file": os.path.basename(path), "size": [w, h]}


def _mega(v):
    return v / 1e6


# ------------------------------------------------------------------------------------------------
# Group-wise
# ------------------------------------------------------------------------------------------------
def usage_image(usage, order=None, cell=(12, 4)) -> np.ndarray:
    """A ``heads x C`` usage map (values in [0, 1]) as an RGB uint8 image, ``cell`` pixels per entry.

    Channels are drawn in ``order`` (default: as given); 0 is white and 1 dark blue, as in the figures.
    """
    u = np.clip(np.asarray(usage, dtype=np.float64), 0.0, 1.0)
    if order is not None:
        u = u[:, list(order)]
    low, high = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = (low + (high - low) * u[..., None]).round().astype(np.uint8)
    return np.repeat(np.repeat(rgb, cell[0], axis=0), cell[1], axis=1)


def _layer(stats, name):
    for layer in stats["layers"]:
        if layer["name"] == name:
            return layer
    names = ", ".join(layer["name"] for layer in stats["layers"])
    raise InvalidValueError(f"no gated layer '{name}'; the gated layers are: {names}")


def group_wise_figure(stats, path, layers):
    """For each named layer: the heads x channels usage map (ordered channels) and the heads' overlap."""
    plt = require_matplotlib()
    rows = [_layer(stats, name) for name in layers]
    fig = plt.figure(figsize=(10, 0.8 + 1.45 * len(rows)))
    grid = fig.add_gridspec(len(rows), 2, width_ratios=(3.7, 1.3), left=0.14, right=0.99,
                            top=1 - 0.55 / fig.get_figheight(), bottom=0.45 / fig.get_figheight(),
                            hspace=0.75, wspace=0.05)
    fig.suptitle(f"Group-wise: how often head h reads channel c over {stats['num_images']} images "
                 "(channels ordered: shared, then head-specific, then unread)", fontsize=9)
    image = None
    for i, layer in enumerate(rows):
        ax = fig.add_subplot(grid[i, 0])
        usage = np.asarray(layer["usage"])[:, layer["order"]]
        image = ax.imshow(usage, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(layer["heads"]), [f"head {h}" for h in range(layer["heads"])], fontsize=7)
        ax.set_xlabel(f"{layer['channels']} input channels (reordered)", fontsize=7, labelpad=1)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(f"{layer['name']}  ({layer['stage']}, gates {layer['conv'] or '?'})", fontsize=8, loc="left")
        text = fig.add_subplot(grid[i, 1])
        text.axis("off")
        text.text(0.04, 0.5, f"mean pairwise Jaccard {layer['jaccard']:.3f}\n"
                             f"union of the heads  {100 * layer['union']:.1f}%\n"
                             f"never read {layer['never_read']:>4d} of {layer['channels']} ch.\n"
                             f"open gates          {100 * layer['open']:.1f}%", fontsize=7, va="center",
                  family="monospace")
    if image is not None:
        cax = fig.add_axes([0.02, 0.45 / fig.get_figheight(), 0.012, 0.5])
        fig.colorbar(image, cax=cax).ax.tick_params(labelsize=6)
        cax.set_title("usage", fontsize=6)
    return _save(fig, path, plt)


# ------------------------------------------------------------------------------------------------
# Layer-wise
# ------------------------------------------------------------------------------------------------
def layer_wise_figure(stats, path):
    """Dense against mean executed MACs of every gated convolution, and each stage's spectrum position."""
    plt = require_matplotlib()
    layers = [layer for layer in stats["layers"] if layer["dense_macs"] is not None]
    width = max(8.0, min(16.0, 2.0 + 0.22 * len(layers)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 7.0), gridspec_kw={"height_ratios": (3, 2)},
                                      layout="constrained")
    x = np.arange(len(layers))
    top.bar(x - 0.2, [_mega(layer["dense_macs"]) for layer in layers], 0.4, label="dense", color="#bbbbbb")
    top.bar(x + 0.2, [_mega(layer["executed_macs"]) for layer in layers], 0.4, label="mean executed", color="#1f5fa8")
    top.set_xticks(x, [layer["name"] for layer in layers], rotation=90, fontsize=6)
    top.set_ylabel("MMac per image", fontsize=8)
    top.tick_params(axis="y", labelsize=7)
    top.legend(fontsize=7)
    top.set_title(f"Layer-wise: MACs of each gated convolution, dense and executed (mean of "
                  f"{stats['num_images']} images)", fontsize=9)

    stages = [s for s in stats["stages"] if s["jaccard"] is not None]
    by_name = {layer["name"]: layer for layer in stats["layers"]}
    for i, stage in enumerate(stages):
        values = [by_name[n]["jaccard"] for n in stage["spectrum_layers"]]
        bottom.scatter(np.full(len(values), i) + np.linspace(-0.15, 0.15, len(values)), values, s=12,
                       color="#1f5fa8", alpha=0.6, label="a layer" if i == 0 else None)
        bottom.scatter([i], [stage["jaccard"]], s=90, marker="D", color="#d95f02", zorder=3,
                       label="stage mean" if i == 0 else None)
    bottom.set_xticks(range(len(stages)), [s["stage"] for s in stages], fontsize=8)
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_yticks([0, 0.5, 1], ["0: static\n(disjoint heads)", "0.5", "1: pruning\n(same channels)"], fontsize=7)
    bottom.set_ylabel("mean pairwise Jaccard", fontsize=8)
    bottom.set_title("Where each stage's grouped convolutions sit between static grouping and pruning", fontsize=9)
    bottom.grid(axis="y", alpha=0.3)
    if stages:
        bottom.legend(fontsize=7, loc="best")
    return _save(fig, path, plt)


# ------------------------------------------------------------------------------------------------
# Sample-wise
# ------------------------------------------------------------------------------------------------
def sample_wise_figure(stats, path):
    """A histogram of per-image MACs and the mean MACs per class."""
    plt = require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    macs = np.asarray(stats["images"]["macs"]) / 1e6
    left.hist(macs, bins=min(40, max(5, len(macs) // 8)), color="#1f5fa8")
    left.axvline(macs.mean(), color="#d95f02", label=f"mean {macs.mean():.4g} MMac")
    title = f"Sample-wise: MACs of each of {len(macs)} images"
    dense = stats.get("dense_macs")
    if dense:
        top = left.secondary_xaxis("top", functions=(lambda m: m * 1e6 / dense, lambda r: r * dense / 1e6))
        top.set_xlabel("MAC ratio (of the dense host)", fontsize=7)
        top.tick_params(labelsize=7)
        title += f" (dense host {dense / 1e6:.4g} MMac)"
    left.set_xlabel("MMac per image", fontsize=8)
    left.set_ylabel("images", fontsize=8)
    left.legend(fontsize=7)
    left.set_title(title, fontsize=9)
    classes = stats["classes"]
    present = [i for i, v in enumerate(classes["mean_macs"]) if v is not None]
    right.bar(range(len(present)), [classes["mean_macs"][i] / 1e6 for i in present], color="#1f5fa8")
    right.set_xticks(range(len(present)), [classes["names"][i] for i in present],
                     fontsize=7 if len(present) <= 20 else 4, rotation=0 if len(present) <= 20 else 90)
    lo = min(classes["mean_macs"][i] for i in present) / 1e6
    hi = max(classes["mean_macs"][i] for i in present) / 1e6
    right.set_ylim(max(0.0, lo - 0.6 * (hi - lo + 1e-9)), hi + 0.3 * (hi - lo + 1e-9))
    right.set_xlabel("class (of the label)", fontsize=8)
    right.set_ylabel("mean MMac per image", fontsize=8)
    right.set_title("Mean MACs per class", fontsize=9)
    for ax in (left, right):
        ax.tick_params(labelsize=7)
    return _save(fig, path, plt)


def _display(image, mean, std):
    if str(getattr(image, "dtype", "")) in ("uint8", "torch.uint8"):  # as the loaders give them
        return np.asarray(image, dtype=np.float64).transpose(1, 2, 0) / 255.0
    x = np.asarray(image, dtype=np.float64)
    if mean is not None and std is not None:
        x = x * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]
    else:
        x = (x - x.min()) / max(x.max() - x.min(), 1e-12)
    return np.clip(x.transpose(1, 2, 0), 0.0, 1.0)


def extremes_figure(stats, images, path, mean=None, std=None, class_names=None):
    """The cheapest (top row) and most expensive (bottom row) images with their MACs and prediction.

    Args:
        images: ``{"cheapest": [...], "most_expensive": [...]}`` tensors ``3 x H x W``: uint8 (shown as
            they are) or normalised float.
        mean, std: the normalisation of float images, undone for display (None: each float image is
            stretched to [0, 1]).
    """
    plt = require_matplotlib()
    names = class_names or stats["classes"]["names"]
    k = max(len(stats["extremes"]["cheapest"]), 1)
    fig, axes = plt.subplots(2, k, figsize=(max(6.0, 1.25 * k), 3.7), squeeze=False, layout="constrained")
    fig.suptitle("Sample-wise: the cheapest (top) and the most expensive (bottom) images; "
                 "MMac, prediction / label", fontsize=9)
    for row, key in enumerate(("cheapest", "most_expensive")):
        for col in range(k):
            ax = axes[row][col]
            ax.axis("off")
            if col >= len(stats["extremes"][key]):
                continue
            item = stats["extremes"][key][col]
            ax.imshow(_display(images[key][col], mean, std), interpolation="nearest")
            wrong = item["prediction"] != item["label"]
            ax.set_title(f"{item['macs'] / 1e6:.4g}M\n{names[item['prediction']]} / {names[item['label']]}",
                         fontsize=7, color="#c0392b" if wrong else "black")
    return _save(fig, path, plt)


# ------------------------------------------------------------------------------------------------
# Attention-wise
# ------------------------------------------------------------------------------------------------
def attention_figure(stats, path):
    """Per attention generator: the distribution of its values over the open channels (box plots:
    quartiles, whiskers at the 5th and 95th percentiles, mean as a dot)."""
    plt = require_matplotlib()
    atts = [a for a in stats["attention"] if a["count"]]
    fig, ax = plt.subplots(figsize=(max(8.0, min(16.0, 2 + 0.3 * len(atts))), 4.2), layout="constrained")
    boxes = [{"label": a["name"], "med": a["quantiles"]["q50"], "q1": a["quantiles"]["q25"],
              "q3": a["quantiles"]["q75"], "whislo": a["quantiles"]["q05"], "whishi": a["quantiles"]["q95"],
              "mean": a["mean"], "fliers": []} for a in atts]
    if boxes:
        ax.bxp(boxes, showmeans=True, meanprops={"marker": ".", "markerfacecolor": "#d95f02",
                                                 "markeredgecolor": "#d95f02"})
        ax.set_xticks(range(1, len(boxes) + 1), [b["label"] for b in boxes], rotation=90, fontsize=6)
    else:
        ax.text(0.5, 0.5, "no attention value over an open channel", ha="center", transform=ax.transAxes)
    ax.axhline(1.0, color="k", linewidth=0.6, linestyle=":")
    ax.set_ylabel("attention value", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"Attention-wise: attention over the open channels of each layer ({stats['num_images']} images)",
                 fontsize=9)
    return _save(fig, path, plt)


def write_gate_figures(stats, images, out_dir, layers, mean=None, std=None) -> list:
    """Every gate figure into ``out_dir`` (attention only for models with attention); their files and sizes."""
    out = [group_wise_figure(stats, os.path.join(out_dir, "group_wise.png"), layers),
           layer_wise_figure(stats, os.path.join(out_dir, "layer_wise.png")),
           sample_wise_figure(stats, os.path.join(out_dir, "sample_wise.png")),
           extremes_figure(stats, images, os.path.join(out_dir, "sample_extremes.png"), mean, std)]
    if stats["attention"]:
        out.append(attention_figure(stats, os.path.join(out_dir, "attention_wise.png")))
    return out


# ------------------------------------------------------------------------------------------------
# Training runs (metrics.json)
# ------------------------------------------------------------------------------------------------
def _series(records, key):
    points = [(r["iteration"], r[key]) for r in records if key in r and r[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def training_curves_figure(runs, path):
    """Losses, MAC ratio against its target, validation top-1 and MACs, and learning rates of runs.

    Args:
        runs: ``{label: [metrics.json records]}``; every run gets one colour on every panel.
    """
    plt = require_matplotlib()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    (losses, macs), (val, lrs) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    val_macs = val.twinx()
    for i, (label, records) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        keys = sorted({k for r in records for k in r})
        for key, style in [(k, "-") for k in keys if k.startswith("loss_")] + [("total_loss", ":")]:
            x, y = _series(records, key)
            if x:
                losses.plot(x, y, style, color=c, linewidth=1, alpha=0.9 if key != "loss_macs" else 0.6,
                            label=f"{label}: {key}")
        for key, style in (("mac_ratio", "-"), ("mac_target", "--")):
            x, y = _series(records, key)
            if x:
                macs.plot(x, y, style, color=c, linewidth=1, label=f"{label}: {key}")
        x, y = _series(records, "val/top1")
        if x:
            val.plot(x, y, "o-", color=c, markersize=3, label=f"{label}: top-1")
        key = "val/mac_ratio" if any("val/mac_ratio" in r for r in records) else "val/macs"
        x, y = _series(records, key)
        if x:
            val_macs.plot(x, y, "s--", color=c, markersize=3, alpha=0.6, label=f"{label}: {key[4:]}")
        for key, style in zip((k for k in keys if k.startswith("lr/")), itertools.cycle(("-", "--", ":", "-."))):
            x, y = _series(records, key)
            lrs.plot(x, y, style, color=c, linewidth=1, label=f"{label}: {key[3:]}")
    titles = ((losses, "losses (training, smoothed)", "loss"), (macs, "MAC ratio and its target", "fraction of dense"),
              (val, "validation top-1 (dots) and MACs (squares)", "top-1 (%)"), (lrs, "learning rate", "lr"))
    for ax, title, ylabel in titles:
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="lower left" if ax is val else "best")
    val_macs.set_ylabel("MAC ratio" if any("val/mac_ratio" in r for rs in runs.values() for r in rs) else "MACs",
                        fontsize=8)
    val_macs.tick_params(labelsize=7)
    if val_macs.lines:
        val_macs.legend(fontsize=6, loc="lower right")
    if any(v > 0 for line in losses.lines for v in line.get_ydata()):
        losses.set_yscale("symlog", linthresh=0.1)
    return _save(fig, path, plt)


# ------------------------------------------------------------------------------------------------
# The spectrum study
# ------------------------------------------------------------------------------------------------
def spectrum_figure(rows, path, title="top-1 against MAC ratio"):
    """Each method's top-1 against its MAC ratio, one line per method through its points (budgets, head
    counts) in order of MAC ratio: the seeds as small dots, their mean with error bars of the sample
    standard deviation over seeds on both axes. A method with one point at ratio 1 (the dense host) is
    also drawn as a dashed horizontal line: the ceiling.

    Args:
        rows: dicts with ``method``, ``top1`` and ``mac_ratio`` (lists over seeds), one per point.
    """
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.6), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        c = colors[i % len(colors)]
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: float(np.mean(r["mac_ratio"])))
        xs, ys, xe, ye = [], [], [], []
        for r in points:
            top1, ratio = np.asarray(r["top1"], float), np.asarray(r["mac_ratio"], float)
            ax.scatter(ratio, top1, s=8, color=c, alpha=0.4)
            xs.append(ratio.mean())
            ys.append(top1.mean())
            xe.append(ratio.std(ddof=1) if len(ratio) > 1 else 0.0)
            ye.append(top1.std(ddof=1) if len(top1) > 1 else 0.0)
        seeds = max(len(r["top1"]) for r in points)
        ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="-o", color=c, capsize=3, markersize=4,
                    label=f"{method} ({seeds} seed{'s' if seeds > 1 else ''})")
        if len(points) == 1 and abs(xs[0] - 1.0) < 1e-6:
            ax.axhline(ys[0], color=c, linestyle="--", linewidth=0.8, alpha=0.7)
    ax.set_xlabel("MAC ratio at evaluation (of the dense host)", fontsize=9)
    ax.set_ylabel("top-1 (%)", fontsize=9)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.tick_params(labelsize=8)
    if rows:
        lo = min(min(r["top1"]) for r in rows)
        hi = max(max(r["top1"]) for r in rows)
        pad = max(0.5, 0.1 * (hi - lo))
        ax.set_ylim(lo - pad, min(100.0, hi + pad) + (0.2 if hi + pad >= 100 else 0))
    return _save(fig, path, plt)

