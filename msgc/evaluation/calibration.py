"""Gate calibration: one threshold for every gate, found on held-out images, so that the deterministic
gates of evaluation spend the MAC budget that training aimed at.

Training decides a gate with logistic noise (open with probability ``sigmoid(logit)``); evaluation opens
it where ``logit >= 0``. The sparsity loss meets the target with the noisy gates, so where many logits
sit at small positive values (open at evaluation, closed by the noise now and then in training) the
evaluated network spends more than the target. Calibration moves the gates' common threshold ``t``
(a gate opens where ``logit >= t``) until the mean MAC ratio over a calibration set equals the budget,
then :func:`msgc.modeling.fold_gate_thresholds` moves ``t`` into the generators' biases: a checkpoint of
the usual layout whose gates open at 0 again.

The mean MAC ratio falls as ``t`` grows (a higher threshold closes gates, never opens one), so ``t`` is
found by bracketing and regula falsi (Illinois). It is a step function of ``t``, flat between the logits
of the calibration images: the search ends within ``tolerance`` of the budget, or, where a jump spans
the budget, at the side of the jump closest to it (``CalibrationResult.mac_ratio`` says where).

:func:`build_budget_table` runs one calibration per budget of a list, without folding, and returns the
thresholds as a :class:`msgc.modeling.BudgetTable`: the budget is then chosen at inference
(:func:`msgc.modeling.set_budget`).
"""
import logging
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence


from ..modeling.budget import BudgetEntry, BudgetTable, check_budget
from ..modeling.layers import (budget_generators, fold_gate_thresholds, mask_generators, set_budget_inputs,
                               set_gate_thresholds)
from ..utils.errors import InvalidValueError
from .classification import ClassificationEvaluator
from .evaluator import inference_on_dataset

__all__ = ["CalibrationResult", "build_budget_table", "calibrate_gates", "check_budget"]

logger = logging.getLogger(__name__)

# The search stops when the bracket is narrower than this (logits are float32: about 1e-7 relative).
_MIN_WIDTH = 1e-6
# The bracket grows from this step, doubling, up to this threshold.
_FIRST_STEP, _MAX_THRESHOLD = 0.25, 1e4


@dataclass
class CalibrationResult:
    """The outcome of :func:`calibrate_gates` on its calibration set.

    Attributes:
        budget: the MAC ratio asked for.
        threshold: the common gate threshold found (0: the model was left as it was).
        mac_ratio_before, top1_before: at threshold 0.
        mac_ratio, top1: at ``threshold``.
        passes: evaluations of the calibration set that the call made (the first at threshold 0
            included, unless ``evaluations`` had it).
        num_samples: images of the calibration set (over all processes).
    """

    budget: float
    threshold: float
    mac_ratio_before: float
    top1_before: float
    mac_ratio: float
    top1: float
    passes: int
    num_samples: int

    @property
    def met(self) -> bool:
        """Whether the calibration set's MAC ratio is within 0.02 of the budget (the study's rule)."""
        return abs(self.mac_ratio - self.budget) <= 0.02

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate_gates(model, loader, budget: float, preprocess=None, tolerance: float = 0.002,
                    max_passes: int = 40, evaluations: Optional[Dict[float, dict]] = None) -> CalibrationResult:
    """Set every gate's threshold of ``model`` so that its mean eval MAC ratio over ``loader`` is
    ``budget`` (within ``tolerance``), and return what was found.

    Thresholds a model already has are folded into its biases first. A model trained for a range of
    budgets (``MODEL.MSGC.BUDGET_RANGE``) gets ``budget`` as its generators' input, and the threshold
    tops it up to meet the budget exactly. The threshold found stays on the
    gates (``BinaryGate.threshold``): fold it into the generators' biases with
    :func:`msgc.modeling.fold_gate_thresholds` before saving. A model already within ``tolerance`` of the
    budget is left unchanged (threshold 0). With several processes, each evaluates its shard of
    ``loader`` and the ratios are combined exactly (:class:`ClassificationEvaluator`); every process
    ends with the same threshold.

    Args:
        model: a classifier in the usual sense (``model(images)`` -> ``logits`` and ``macs``, and
            ``model.dense_macs(h, w)``) with gates.
        loader: ``(images, labels)`` batches, e.g. ``build_test_loader(cfg, "fashion_mnist_val")``.
        budget: the MAC ratio to reach, in (0, 1].
        preprocess: ``(images, device) -> input`` (the trainer's :meth:`build_preprocess`).
        tolerance: how close to the budget the mean ratio must come.
        max_passes: evaluations of the loader at most.
        evaluations: threshold -> results of evaluations of this model on ``loader`` already made (by
            an earlier call on the same model, whose thresholds were 0), reused and extended.

    Raises:
        InvalidValueError: a model without gates, a budget outside (0, 1], or a budget the gates
            cannot reach (beyond every gate closed or every gate open).
    """
    check_budget(budget, "the calibration budget")
    if not mask_generators(model):
        raise InvalidValueError(f"gate calibration needs a model with gates; {type(_inner(model)).__name__} has none "
                                "(grouping 'dense' or 'static'?)")
    if not hasattr(model, "dense_macs"):
        raise InvalidValueError("gate calibration needs a classifier with dense_macs(h, w); got "
                                f"{type(model).__name__}")
    fold_gate_thresholds(model)  # thresholds below are relative to the model as it is
    if budget_generators(model):  # a model trained for a range of budgets decides for this one
        set_budget_inputs(model, budget)
    search = _Search(model, loader, budget, preprocess, {} if evaluations is None else evaluations)
    try:
        threshold = search.run(tolerance, max_passes)
    except BaseException:
        set_gate_thresholds(model, 0.0)
        raise
    set_gate_thresholds(model, threshold)
    at = search.results[threshold]
    first = search.results[0.0]
    logger.info("Gate calibration: threshold %.5g; MAC ratio %.4f -> %.4f (budget %.4f), top-1 %.2f -> %.2f on %d "
                "images, %d passes", threshold, first["mac_ratio"], at["mac_ratio"], budget, first["top1"], at["top1"],
                at["num_samples"], search.passes)
    return CalibrationResult(budget, threshold, first["mac_ratio"], first["top1"], at["mac_ratio"], at["top1"],
                             search.passes, at["num_samples"])


def build_budget_table(model, loader, budgets: Sequence[float], preprocess=None, tolerance: float = 0.002,
                       dataset: str = "") -> BudgetTable:
    """One calibration (:func:`calibrate_gates`) of ``model`` per budget of ``budgets`` on ``loader``, as
    a :class:`~msgc.modeling.BudgetTable` of the thresholds found and the MAC ratio and top-1 measured
    at each. Thresholds ``model`` already has are folded first; it ends with every threshold at 0 (as
    trained), the model the table is for. Evaluations are shared between the budgets.

    Args:
        dataset: the calibration set's name, recorded in the table.

    Raises:
        InvalidValueError: as :func:`calibrate_gates`; a budget outside what the gates reach is an error
            naming the reachable range before any calibration.
    """
    if not budgets:
        raise InvalidValueError("a budget table needs at least one budget")
    for b in budgets:
        check_budget(b, "every budget")
    if not mask_generators(model):
        raise InvalidValueError(f"a budget table needs a model with gates; {type(_inner(model)).__name__} has none "
                                "(grouping 'dense' or 'static'?)")
    fold_gate_thresholds(model)
    h, w = _image_size(loader, preprocess)
    lo, hi = model.mac_ratio_range(h, w)
    outside = [b for b in budgets if not lo <= b <= hi]
    if outside:
        raise InvalidValueError(f"the budget {outside[0]:.4g} is outside what the gates reach on {h}x{w} images: "
                                f"{lo:.4f} (every gate closed) to {hi:.4f} (every gate open)")
    evaluations, entries = {}, []
    for b in sorted(set(budgets), reverse=True):
        set_gate_thresholds(model, 0.0)
        if budget_generators(model):  # the budget is an input: each budget's evaluations are its own
            evaluations = {}
        r = calibrate_gates(model, loader, b, preprocess, tolerance, evaluations=evaluations)
        entries.append(BudgetEntry(b, r.threshold, r.mac_ratio, r.top1))
    set_gate_thresholds(model, 0.0)
    set_budget_inputs(model, None)
    table = BudgetTable(entries, dataset, tolerance, budget_input=bool(budget_generators(model)))
    logger.info("Budget table on %s (%d evaluations):\n%s", dataset or "the calibration set", len(evaluations),
                "\n".join(f"  budget {e.budget:.4f}: threshold {e.threshold:9.5g}, MAC ratio {e.mac_ratio:.4f}, "
                          f"top-1 {e.top1:.2f}" for e in table.entries))
    return table


def _image_size(loader, preprocess) -> tuple:
    images, _ = next(iter(loader))
    if preprocess is not None:
        images = preprocess(images, "cpu")
    return int(images.shape[-2]), int(images.shape[-1])


def _inner(model):
    return getattr(model, "backbone", model)


class _Search:
    """Evaluations of the calibration set at given thresholds (each one pass, remembered)."""

    def __init__(self, model, loader, budget, preprocess, results):
        self.model, self.loader, self.budget, self.preprocess = model, loader, budget, preprocess
        self.results, self.passes = results, 0

    def ratio(self, threshold: float) -> float:
        if threshold not in self.results:
            self.passes += 1
            set_gate_thresholds(self.model, threshold)
            evaluator = ClassificationEvaluator(self.model.dense_macs, topk=(1,))
            self.results[threshold] = inference_on_dataset(self.model, self.loader, evaluator,
                                                           preprocess=self.preprocess)
        return self.results[threshold]["mac_ratio"]

    def excess(self, threshold: float) -> float:
        return self.ratio(threshold) - self.budget

    def run(self, tolerance: float, max_passes: int) -> float:
        if abs(self.excess(0.0)) <= tolerance:
            return 0.0
        met = [t for t in self.results if abs(self.excess(t)) <= tolerance]  # by an earlier search
        if met:
            return min(met, key=lambda t: (abs(self.excess(t)), abs(t)))
        lo, hi = self._bracket()
        f_lo, f_hi = self.excess(lo), self.excess(hi)
        if abs(f_hi) <= tolerance or abs(f_lo) <= tolerance:
            return hi if abs(f_hi) <= abs(f_lo) else lo
        side = 0
        while self.passes < max_passes and hi - lo > _MIN_WIDTH:
            # regula falsi on (lo, f_lo > 0) and (hi, f_hi < 0); Illinois: halve the stale end's value
            t = hi - f_hi * (hi - lo) / (f_hi - f_lo)
            if not lo < t < hi:
                t = 0.5 * (lo + hi)
            f = self.excess(t)
            if abs(f) <= tolerance:
                return t
            if f > 0:
                lo, f_lo = t, f
                f_hi = f_hi / 2 if side == 1 else f_hi
                side = 1
            else:
                hi, f_hi = t, f
                f_lo = f_lo / 2 if side == -1 else f_lo
                side = -1
        return min(self.results, key=lambda t: (abs(self.results[t]["mac_ratio"] - self.budget), abs(t)))

    def _bracket(self):
        """Thresholds ``lo`` (ratio above the budget) and ``hi`` (below it): the closest pair among the
        evaluations made, else one of them 0 and the other found by doubling steps."""
        above = [t for t, r in self.results.items() if r["mac_ratio"] > self.budget]
        below = [t for t, r in self.results.items() if r["mac_ratio"] < self.budget]
        if above and below:
            return max(above), min(below)
        direction = 1.0 if self.excess(0.0) > 0 else -1.0
        near, step = 0.0, _FIRST_STEP
        while step <= _MAX_THRESHOLD:
            far = direction * step
            if (self.excess(far) > 0) != (direction > 0):
                return (near, far) if direction > 0 else (far, near)
            near, step = far, step * 2
        end = "every gate closed" if direction > 0 else "every gate open"
        raise InvalidValueError(f"gate calibration cannot reach the budget {self.budget:.4f}: with {end} the mean MAC "
                                f"ratio is {self.ratio(near):.4f}")
