"""The MAC-target scheduler: the current target of the sparsity loss at each iteration."""
from fvcore.common.param_scheduler import ParamScheduler

from ..utils.errors import InvalidValueError

__all__ = ["MACTargetScheduler"]


class MACTargetScheduler:
    """Gives the MAC target (fraction of the dense host's MACs) of the current iteration.

    It mirrors a torch LR scheduler: :meth:`target` is the value for the iteration about to run and
    :meth:`step` advances it after the iteration; its state dict (the iteration) travels in checkpoints
    so a resumed run continues the schedule where it stopped. The target of iteration ``i`` is
    ``schedule(i / max_iter)``, the reference's ``progress``.

    Args:
        schedule: progress in [0, 1] -> MAC target.
        max_iter: iterations of the whole training.
        last_iter: the last finished iteration when resuming (-1: start).
    """

    def __init__(self, schedule: ParamScheduler, max_iter: int, last_iter: int = -1):
        if max_iter <= 0:
            raise InvalidValueError(f"SOLVER.MAX_ITER must be positive, got {max_iter}")
        self.schedule = schedule
        self.max_iter = max_iter
        self.iter = last_iter + 1

    def target(self, iteration: int = None) -> float:
        """The target at ``iteration`` (default: the current one)."""
        it = self.iter if iteration is None else iteration
        return float(self.schedule(min(it, self.max_iter - 1) / self.max_iter))

    def step(self):
        self.iter += 1

    def state_dict(self) -> dict:
        return {"iter": self.iter}

    def load_state_dict(self, state: dict):
        self.iter = int(state["iter"])
