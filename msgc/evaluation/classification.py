"""Top-1/top-5 accuracy and per-sample MACs of a classifier, exact over any number of processes."""
from fractions import Fraction

import torch
from tabulate import tabulate

from ..utils import comm
from ..utils.errors import InvalidValueError
from .evaluator import DatasetEvaluator

__all__ = ["ClassificationEvaluator", "results_table"]


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy, mean per-sample MACs and their ratio to the dense host network.

    Every process keeps sums only: the sample count, the count of correct top-k predictions, and the
    sums of the per-sample MACs and MAC ratios as exact fractions (a float32 value converts to a
    fraction without rounding). The sums are gathered and added once in :meth:`evaluate`. Exact sums make
    the result independent of how the dataset is split into batches and processes: N processes give
    bit-for-bit the numbers of one, whatever the dataset size.

    Args:
        dense_macs: ``(h, w) -> MACs`` of the dense host at that input size (``model.dense_macs``);
            None to skip the MAC ratio.
        topk: the k of the reported top-k accuracies (clipped to the number of classes).
    """

    def __init__(self, dense_macs=None, topk=(1, 5)):
        self._dense_macs = dense_macs
        self._topk = tuple(topk)
        self.reset()

    def reset(self):
        self._count = 0
        self._correct = {k: 0 for k in self._topk}
        self._macs = Fraction(0)
        self._ratio = Fraction(0)
        self._has_macs = False
        self._sizes = set()

    def process(self, batch, outputs):
        images, labels = batch
        logits = outputs["logits"]
        labels = labels.to(logits.device)
        self._check_labels(labels, logits.shape[1])
        ranked = logits.topk(min(max(self._topk), logits.shape[1]), dim=1).indices
        hits = ranked == labels[:, None]
        for k in self._topk:
            self._correct[k] += int(hits[:, :k].any(dim=1).sum())
        self._count += len(labels)
        if "macs" in outputs:
            self._add_macs(outputs["macs"], tuple(images.shape[-2:]))

    @staticmethod
    def _check_labels(labels, num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.numel():
            raise InvalidValueError(f"test label {int(bad[0])} is out of range for a model with {num_classes} classes")

    def _add_macs(self, macs: torch.Tensor, size: tuple):
        total = sum((Fraction(v) for v in macs.detach().double().cpu().tolist()), Fraction(0))
        self._macs += total
        self._has_macs = True
        self._sizes.add(size)
        if self._dense_macs is not None:
            self._ratio += total / self._dense_macs(*size)

    def _state(self):
        return self._count, self._correct, self._macs, self._ratio, self._has_macs, self._sizes

    def evaluate(self) -> dict:
        states = comm.all_gather(self._state())
        count = sum(s[0] for s in states)
        if count == 0:
            raise InvalidValueError("the evaluation saw no sample: the test dataset is empty")
        results = {f"top{k}": 100.0 * sum(s[1][k] for s in states) / count for k in self._topk}
        results["num_samples"] = count
        if any(s[4] for s in states):
            results["macs"] = float(sum((s[2] for s in states), Fraction(0)) / count)
            if self._dense_macs is not None:
                results["mac_ratio"] = float(sum((s[3] for s in states), Fraction(0)) / count)
            sizes = set().union(*(s[5] for s in states))
            if self._dense_macs is not None and len(sizes) == 1:
                results["dense_macs"] = float(self._dense_macs(*sizes.pop()))
        return results


def results_table(results: dict, name: str = "") -> str:
    """A one-row table of a classification result: top-1, top-5, MACs (M) and MAC ratio."""
    headers, row = [], []
    if name:
        headers.append("dataset")
        row.append(name)
    for key, header, fmt in (("top1", "top-1 (%)", "{:.2f}"), ("top5", "top-5 (%)", "{:.2f}"),
                             ("macs", "MACs (M)", "{:.3f}"), ("dense_macs", "dense MACs (M)", "{:.3f}"),
                             ("mac_ratio", "MAC ratio", "{:.4f}")):
        if key in results:
            value = results[key] / 1e6 if key in ("macs", "dense_macs") else results[key]
            headers.append(header)
            row.append(fmt.format(value))
    return tabulate([row], headers=headers, tablefmt="pipe")
