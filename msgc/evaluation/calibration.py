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
"""
import logging
import math
from dataclasses import asdict, dataclass

import torch

from ..modeling.layers import fold_gate_thresholds, mask_generators, set_gate_thresholds
from ..utils.errors import InvalidValueError
from .classification import ClassificationEvaluator
from .evaluator import inference_on_dataset

__all__ = ["CalibrationResult", "calibrate_gates", "check_budget"]

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
        passes: evaluations of the calibration set (the first at threshold 0 included).
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


def check_budget(budget: float, where: str = "the budget"):
    """A MAC budget must be a fraction of the dense host's MACs in (0, 1]."""
    if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0) or math.isnan(budget):
        raise InvalidValueError(f"{where} must be a MAC ratio in (0, 1], got {budget!r}")


def calibrate_gates(model, loader, budget: float, preprocess=None, tolerance: float = 0.002,
                    max_passes: int = 40) -> CalibrationResult:
    """Set every gate's threshold of ``model`` so that its mean eval MAC ratio over ``loader`` is
    ``budget`` (within ``tolerance``), and return what was found.

    Thresholds a model already has are folded into its biases first. The threshold found stays on the
    gates (``Gate.threshold``): fold it into the generators' biases with
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

    Raises:
        InvalidValueError: a model without gates, a budget outside (0, 1], or a budget the gates
            cannot reach (beyond every gate closed or every gate open).
    """
    check_budget(budget, "the calibration budget")
    if not mask_generators(model):
        raise InvalidValueError(f"gate calibration needs a model with gates; {type(_inner(model)).__name__} has none "
                                "(grouping 'dense' or 'static'?)")
    if not hasattr(model, "dense_macs"):
        raise InvalidValueError(f"gate calibration needs a classifier with dense_macs(h, w); got {type(model).__name__}")
    fold_gate_thresholds(model)  # thresholds below are relative to the model as it is
    search = _Search(model, loader, budget, preprocess)
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
                at["num_samples"], len(search.results))
    return CalibrationResult(budget, threshold, first["mac_ratio"], first["top1"], at["mac_ratio"], at["top1"],
                             len(search.results), at["num_samples"])


def _inner(model):
    return getattr(model, "backbone", model)


class _Search:
    """Evaluations of the calibration set at given thresholds (each one pass, remembered)."""

    def __init__(self, model, loader, budget, preprocess):
        self.model, self.loader, self.budget, self.preprocess = model, loader, budget, preprocess
        self.results = {}

    def ratio(self, threshold: float) -> float:
        if threshold not in self.results:
            set_gate_thresholds(self.model, threshold)
            evaluator = ClassificationEvaluator(self.model.dense_macs, topk=(1,))
            self.results[threshold] = inference_on_dataset(self.model, self.loader, evaluator, preprocess=self.preprocess)
        return self.results[threshold]["mac_ratio"]

    def excess(self, threshold: float) -> float:
        return self.ratio(threshold) - self.budget

    def run(self, tolerance: float, max_passes: int) -> float:
        if abs(self.excess(0.0)) <= tolerance:
            return 0.0
        lo, hi = self._bracket()
        f_lo, f_hi = self.excess(lo), self.excess(hi)
        if abs(f_hi) <= tolerance or abs(f_lo) <= tolerance:
            return hi if abs(f_hi) <= abs(f_lo) else lo
        side = 0
        while len(self.results) < max_passes and hi - lo > _MIN_WIDTH:
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
        """Thresholds ``lo`` (ratio above the budget) and ``hi`` (below it), one of them 0."""
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
