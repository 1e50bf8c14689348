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
from .layers import mask_generators, set_gate_thresholds

__all__ = ["BudgetEntry", "BudgetTable", "budget_table", "budget_threshold", "budget_thresholds", "check_budget",
           "set_budget", "set_budget_table"]

_ATTRIBUTE = "_msgc_budget_table"


def check_budget(budget: float, where: str = "the budget"):
    """A MAC budget must be a fraction of the dense host's MACs in (0, 1]."""
    if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0) or math.isnan(budget):
        raise InvalidValueError(f"{where} must be a MAC ratio in (0, 1], got {budget!r}")


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
    """

    def __init__(self, entries: Sequence[BudgetEntry], dataset: str = "", tolerance: float = 0.002):
        if not entries:
            raise InvalidValueError("a budget table needs at least one calibrated budget")
        self.entries: List[BudgetEntry] = sorted(entries, key=lambda e: (e.mac_ratio, -e.threshold))
        for a, b in zip(self.entries, self.entries[1:]):
            if b.threshold > a.threshold:
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
        return {"entries": [asdict(e) for e in self.entries], "dataset": self.dataset, "tolerance": self.tolerance}

    @classmethod
    def from_dict(cls, data: dict) -> "BudgetTable":
        return cls([BudgetEntry(**e) for e in data["entries"]], data.get("dataset", ""), data.get("tolerance", 0.002))

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
    ``table`` (default: the model's)."""
    if not mask_generators(model):
        name = type(getattr(_inner(model), "backbone", model)).__name__
        raise InvalidValueError(f"a MAC budget needs a model with gates; {name} has none "
                                "(grouping 'dense' or 'static': its MACs are fixed)")
    if budget is None or (isinstance(budget, (int, float)) and budget == 0):
        return 0.0
    table = budget_table(model) if table is None else table
    if table is None:
        raise InvalidValueError("the model has no budget table: make one with tools/calibrate_gates.py --budgets "
                                "0.3 0.4 ... and load the checkpoint it writes")
    return budget_thresholds(table, budget)


def set_budget(model: nn.Module, budget: Budget) -> None:
    """Set every gate of ``model`` to the threshold of ``budget`` in its budget table.

    Args:
        model: a gated model with a budget table (loaded from a checkpoint that has one, or attached
            with :func:`set_budget_table`).
        budget: a MAC ratio in (0, 1] for every image; one per image (a sequence or a 1-D tensor: the
            next batches must have that many images); None or 0: as trained (threshold 0).

    Raises:
        InvalidValueError: a model without gates, without a budget table, or a budget outside (0, 1] or
            outside the table's reach.
    """
    set_gate_thresholds(model, budget_threshold(model, budget))
