"""MAC budgets at inference: one trained model, a budget chosen per call (or per image).

A gated model's eval MACs fall as the gates' common threshold ``t`` grows (a gate opens where its
logit is at least ``t``). Calibrating ``t`` on held-out images for a few budgets
(``tools/calibrate_gates.py --budgets ...``, :func:`msgc.evaluation.build_budget_table`) gives a
:class:`BudgetTable`, saved in the checkpoint beside the model (``budget_table``) and attached to the
model when the checkpoint loads. :func:`set_budget` then moves every gate to the threshold of any budget
the table spans:

    table = budget_table(model)               # from the checkpoint; None where it had none
    set_budget(model, 0.5)                    # every image at 0.5 of the dense MACs (on average)
    set_budget(model, torch.tensor([0.4, 0.7]))   # the next batch: image 0 at 0.4, image 1 at 0.7
    set_budget(model, None)                   # as trained (threshold 0)

Thresholds are relative to the model as saved (its gates open at logit 0). Folding a threshold into the
biases (:func:`fold_gate_thresholds`) changes the model the table was made for: calibrate again after it.
"""
import math
from bisect import bisect_left
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from ..utils.errors import InvalidValueError
from .layers import budget_generators, mask_generators, set_budget_inputs, set_gate_thresholds

__all__ = ["BudgetEntry", "BudgetTable", "budget_input", "budget_range", "budget_table", "budget_threshold",
           "budget_thresholds", "check_budget", "check_budget_range", "set_budget", "set_budget_table"]

_ATTRIBUTE = "_msgc_budget_table"


def check_budget(budget: float, where: str = "the budget"):
    """A MAC budget must be a fraction of the dense host's MACs in (0, 1]."""
    if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0) or math.isnan(budget):
        raise InvalidValueError(f"{where} must be a MAC ratio in (0, 1], got {budget!r}")


def check_budget_range(values, key: str = "MODEL.MSGC.BUDGET_RANGE") -> Optional[tuple]:
    """A training range of MAC budgets: ``[]`` (None: no budget input) or ``[lo, hi]`` with
    ``0 < lo < hi <= 1``; anything else is one line naming ``key``."""
    values = list(values or [])
    if not values:
        return None
    ok = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not ok or not (0.0 < values[0] < values[1] <= 1.0):
        raise InvalidValueError(f"{key} must be [] or two MAC ratios [lo, hi] with 0 < lo < hi <= 1, got {values}")
    return float(values[0]), float(values[1])


@dataclass(frozen=True)
class BudgetEntry:
    """One calibration: the ``budget`` asked for, the ``threshold`` found, and the ``mac_ratio`` and
    ``top1`` measured at it on the calibration set."""

    budget: float
    threshold: float
    mac_ratio: float
    top1: float


class BudgetTable:
    """Budget -> gate threshold of one trained model, from calibrations on held-out images.

    Between entries the threshold is linear in the measured MAC ratio between the two neighbouring
    entries (monotone: a lower budget never gets a lower threshold). A budget within ``tolerance`` (the
    calibration's) beyond the ends takes the end's threshold; further out it is an error naming the
    range the table reaches.

    Args:
        entries: the calibrations (any order; at least one).
        dataset: the calibration set's name, for messages and records.
        tolerance: the calibration's tolerance.
        budget_input: the table of a model trained for a range of budgets: each threshold was found
            with the generators deciding for its budget, so thresholds need not fall as budgets grow.
    """

    def __init__(self, entries: Sequence[BudgetEntry], dataset: str = "", tolerance: float = 0.002,
                 budget_input: bool = False):
        if not entries:
            raise InvalidValueError("a budget table needs at least one calibrated budget")
        self.entries: List[BudgetEntry] = sorted(entries, key=lambda e: (e.mac_ratio, -e.threshold))
        self.budget_input = bool(budget_input)
        for a, b in zip(self.entries, self.entries[1:]):
            if b.threshold > a.threshold and not self.budget_input:
                raise InvalidValueError(f"budget table: MAC ratio {b.mac_ratio:.4f} at threshold {b.threshold:.5g} "
                                        f"but {a.mac_ratio:.4f} at the lower threshold {a.threshold:.5g}; the "
                                        "entries come from different models")
        self.dataset, self.tolerance = dataset, float(tolerance)

    @property
    def reachable(self) -> tuple:
        """``(lowest, highest)`` measured MAC ratio of the table."""
        return self.entries[0].mac_ratio, self.entries[-1].mac_ratio

    def threshold(self, budget: float) -> float:
        """The gate threshold of ``budget`` (a MAC ratio in (0, 1] within the table's reach)."""
        check_budget(budget)
        lo, hi = self.reachable
        if not lo - self.tolerance <= budget <= hi + self.tolerance:
            raise InvalidValueError(f"the budget {budget:.4g} is outside what the budget table reaches: "
                                    f"{lo:.4f} to {hi:.4f} (calibrate more budgets with tools/calibrate_gates.py "
                                    "--budgets)")
        budget = min(max(budget, lo), hi)
        i = bisect_left([e.mac_ratio for e in self.entries], budget)
        right = self.entries[i]
        if i == 0 or right.mac_ratio == budget:
            return right.threshold
        left = self.entries[i - 1]
        share = (budget - left.mac_ratio) / (right.mac_ratio - left.mac_ratio)
        return left.threshold + share * (right.threshold - left.threshold)

    def as_dict(self) -> dict:
        """The table as plain data (what checkpoints store)."""
        out = {"entries": [asdict(e) for e in self.entries], "dataset": self.dataset, "tolerance": self.tolerance}
        return dict(out, budget_input=True) if self.budget_input else out

    @classmethod
    def from_dict(cls, data: dict) -> "BudgetTable":
        return cls([BudgetEntry(**e) for e in data["entries"]], data.get("dataset", ""), data.get("tolerance", 0.002),
                   data.get("budget_input", False))

    def __repr__(self):
        rows = ", ".join(f"{e.mac_ratio:.3f}: t={e.threshold:.4g}" for e in self.entries)
        return f"BudgetTable({rows})"


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


def budget_table(model: nn.Module) -> Optional[BudgetTable]:
    """The budget table attached to ``model`` (by a checkpoint load or :func:`set_budget_table`), or None."""
    return getattr(_inner(model), _ATTRIBUTE, None)


def set_budget_table(model: nn.Module, table: Optional[BudgetTable]) -> None:
    """Attach ``table`` to ``model`` (None: detach)."""
    object.__setattr__(_inner(model), _ATTRIBUTE, table)


Budget = Union[None, float, Sequence[float], torch.Tensor]


def budget_thresholds(table: BudgetTable, budget: Budget) -> Union[float, torch.Tensor]:
    """The threshold of one budget (a float), or of one budget per image (a 1-D float64 tensor)."""
    if isinstance(budget, (torch.Tensor, list, tuple)):
        values = torch.as_tensor(budget, dtype=torch.float64)
        if values.dim() == 0:
            return table.threshold(float(values))
        if values.dim() != 1:
            raise InvalidValueError(f"a per-image budget is one number per image (a 1-D tensor), got shape "
                                    f"{tuple(values.shape)}")
        return torch.tensor([table.threshold(b) for b in values.tolist()], dtype=torch.float64)
    return table.threshold(budget)


def budget_threshold(model: nn.Module, budget: Budget, table: Optional[BudgetTable] = None
                     ) -> Union[float, torch.Tensor]:
    """The gate threshold(s) of ``budget`` for ``model`` (see :func:`set_budget`; 0 for None or 0), from
    ``table`` (default: the model's). A model trained for a range of budgets (its generators take the
    budget as an input) without a table: threshold 0, the budget checked against the trained range."""
    if not mask_generators(model):
        name = type(getattr(_inner(model), "backbone", model)).__name__
        raise InvalidValueError(f"a MAC budget needs a model with gates; {name} has none "
                                "(grouping 'dense' or 'static': its MACs are fixed)")
    if budget is None or (isinstance(budget, (int, float)) and budget == 0):
        return 0.0
    table = budget_table(model) if table is None else table
    if table is None and budget_range(model) is not None:
        check_in_range(budget_range(model), budget)
        return 0.0
    if table is None:
        raise InvalidValueError("the model has no budget table: make one with tools/calibrate_gates.py --budgets "
                                "0.3 0.4 ... and load the checkpoint it writes")
    return budget_thresholds(table, budget)


def budget_range(model: nn.Module) -> Optional[tuple]:
    """``(lo, hi)``: the budgets ``model`` was trained for, when its generators take the budget as an input
    (``MODEL.MSGC.BUDGET_RANGE``); None for the paper's generators."""
    generators = budget_generators(model)
    return generators[0].budget_range if generators else None


def check_in_range(trained: tuple, budget: Budget, slack: float = 1e-6) -> None:
    """A budget (or one per image) for a model trained for the budgets ``trained`` = (lo, hi) must lie in
    that range."""
    values = torch.as_tensor(budget, dtype=torch.float64).flatten().tolist()
    for b in values:
        check_budget(b)
        if not trained[0] - slack <= b <= trained[1] + slack:
            raise InvalidValueError(f"the budget {b:.4g} is outside the range this model was trained for: "
                                    f"{trained[0]:g} to {trained[1]:g} (MODEL.MSGC.BUDGET_RANGE)")


def budget_input(budget: Budget):
    """The value a budget-input generator reads for ``budget``: None for None or 0 (the trained range's
    upper end), a float, or a float64 tensor of one per image."""
    if budget is None or (isinstance(budget, (int, float)) and budget == 0):
        return None
    if isinstance(budget, (torch.Tensor, list, tuple)):
        values = torch.as_tensor(budget, dtype=torch.float64)
        return float(values) if values.dim() == 0 else values.flatten()
    return float(budget)


def set_budget(model: nn.Module, budget: Budget) -> None:
    """Set every gate of ``model`` to the threshold of ``budget`` in its budget table, and for a model
    trained for a range of budgets (``MODEL.MSGC.BUDGET_RANGE``) give ``budget`` to its generators.

    Args:
        model: a gated model with a budget table (loaded from a checkpoint that has one, or attached
            with :func:`set_budget_table`), or trained for a range of budgets (with or without a table:
            without one, the generators alone meet the budget, as trained).
        budget: a MAC ratio in (0, 1] for every image; one per image (a sequence or a 1-D tensor: the
            next batches must have that many images); None or 0: as trained (threshold 0; a model
            trained for a range: its upper end).

    Raises:
        InvalidValueError: a model without gates, without a budget table (and not trained for a range),
            or a budget outside (0, 1], outside the table's reach or outside the trained range.
    """
    threshold = budget_threshold(model, budget)
    set_budget_inputs(model, budget_input(budget))
    set_gate_thresholds(model, threshold)
