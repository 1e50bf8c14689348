"""The MAC-target scheduler: the current target of the sparsity loss at each iteration, and for a model
trained for a range of budgets the budget of each iteration."""
import random
from typing import Optional, Tuple, Union

import torch
from fvcore.common.param_scheduler import ParamScheduler

from ..utils.errors import InvalidValueError

__all__ = ["MACTargetScheduler", "budget_slots", "sample_budgets"]


def sample_budgets(budget_range: Tuple[float, float], iteration: int, n: int, seed: int = 0) -> torch.Tensor:
    """The training budgets of the ``n`` images of ``iteration``'s batch for a model trained for every
    budget of ``budget_range`` (``MODEL.MSGC.BUDGET_RANGE``): the sandwich rule of slimmable networks
    inside each batch, image ``j`` at the range's lower end (``j % 3 == 0``), at its upper end
    (``j % 3 == 1``) or at one budget drawn uniformly from the range for the whole batch (``j % 3 == 2``;
    from ``seed`` and the iteration alone, so a resumed run draws what the uninterrupted one drew). A
    float64 tensor of ``n``.

    Every batch mixing the budgets keeps the BatchNorm statistics of training those of evaluation (the
    running statistics are a mixture over budgets either way; per-batch budgets would normalise each
    training batch with one budget's statistics). One drawn budget per batch, not one per image, makes
    the sparsity loss of the drawn group the paper's loss at that budget (with a budget per image the
    group is held to its targets only on average). Either way, the budget input alone undershoots the
    budgets inside the range (docs/analysis.md, "Training one model for every budget")."""
    lo, hi = budget_range
    drawn = random.Random(seed * 1_000_003 + iteration).uniform(lo, hi)
    return torch.tensor([(lo, hi, drawn)[j % 3] for j in range(n)], dtype=torch.float64)


def budget_slots(n: int) -> torch.Tensor:
    """The slot of each image of :func:`sample_budgets` (0: lower end, 1: upper end, 2: drawn): the groups
    whose mean MAC ratios the sparsity loss holds to their mean targets."""
    return torch.arange(n) % 3


class MACTargetScheduler:
    """Gives the MAC target (fraction of the dense host's MACs) of the current iteration.

    It mirrors a torch LR scheduler: :meth:`target` is the value for the iteration about to run and
    :meth:`step` advances it after the iteration; its state dict (the iteration) travels in checkpoints
    so a resumed run continues the schedule where it stopped. The target of iteration ``i`` is
    ``schedule(i / max_iter)``, the reference's ``progress``.

    With ``budget_range`` (one model for every budget of the range), each image of an iteration's batch
    has a budget ``b`` (:meth:`budgets`, :func:`sample_budgets`) and its target follows the schedule's
    shape to ``b`` instead of ``final`` (the schedule's end, ``SOLVER.MAC_TARGET.FINAL``, which must then
    be below 1)::

        target_b(p) = b + (1 - b) * (schedule(p) - final) / (1 - final)

    which for the registered ramps (linear, cosine, constant) is the same ramp from 1.0 to ``b``.

    Args:
        schedule: progress in [0, 1] -> MAC target.
        max_iter: iterations of the whole training.
        last_iter: the last finished iteration when resuming (-1: start).
        final: the schedule's end (needed with ``budget_range``).
        budget_range: ``(lo, hi)``, or None: one budget, the schedule's.
        seed: of the budgets drawn within the range.
    """

    def __init__(self, schedule: ParamScheduler, max_iter: int, last_iter: int = -1, final: Optional[float] = None,
                 budget_range: Optional[Tuple[float, float]] = None, seed: int = 0):
        if max_iter <= 0:
            raise InvalidValueError(f"SOLVER.MAX_ITER must be positive, got {max_iter}")
        if budget_range is not None and (final is None or not final < 1.0):
            raise InvalidValueError(f"SOLVER.MAC_TARGET.FINAL must be below 1 with MODEL.MSGC.BUDGET_RANGE (it sets "
                                    f"the schedule's shape, which then ends at each sampled budget), got {final}")
        self.schedule = schedule
        self.max_iter = max_iter
        self.iter = last_iter + 1
        self.final, self.budget_range, self.seed = final, budget_range, int(seed)

    def budgets(self, n: int, iteration: int = None) -> Optional[torch.Tensor]:
        """The budgets of the ``n`` images of ``iteration`` (default: the current one); None without a
        budget range."""
        if self.budget_range is None:
            return None
        return sample_budgets(self.budget_range, self.iter if iteration is None else iteration, n, self.seed)

    def target(self, iteration: int = None, budgets: Optional[torch.Tensor] = None) -> Union[float, torch.Tensor]:
        """The target at ``iteration`` (default: the current one); with ``budgets`` (a model trained for a
        range), the target of each budget."""
        it = self.iter if iteration is None else iteration
        value = float(self.schedule(min(it, self.max_iter - 1) / self.max_iter))
        if budgets is None:
            return value
        return budgets + (1.0 - budgets) * ((value - self.final) / (1.0 - self.final))

    def step(self):
        self.iter += 1

    def state_dict(self) -> dict:
        return {"iter": self.iter}

    def load_state_dict(self, state: dict):
        self.iter = int(state["iter"])
