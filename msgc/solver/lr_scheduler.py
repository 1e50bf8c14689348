"""A torch LR scheduler driven by an fvcore ``ParamScheduler`` of the training progress."""
from fvcore.common.param_scheduler import ParamScheduler
from torch.optim.lr_scheduler import LRScheduler

from ..utils.errors import InvalidValueError

__all__ = ["LRScheduleMultiplier", "Warmup", "with_warmup"]


class Warmup(ParamScheduler):
    """Multiplies a schedule by a linear ramp from ``factor`` at progress 0 to 1 at progress ``length``.

    Unlike replacing the start of the schedule, the product stays continuous at the end of the warm-up
    whatever the schedule's value there.
    """

    def __init__(self, schedule: ParamScheduler, length: float, factor: float):
        if not 0.0 < length < 1.0:
            raise InvalidValueError(f"warm-up length must be a fraction of training in (0, 1), got {length}: "
                                    "SOLVER.WARMUP_ITERS must be smaller than SOLVER.MAX_ITER")
        self.schedule, self.length, self.factor = schedule, length, factor

    def __call__(self, where: float) -> float:
        value = self.schedule(where)
        if where < self.length:
            value *= self.factor + (1.0 - self.factor) * where / self.length
        return value


def with_warmup(schedule: ParamScheduler, length: float, factor: float) -> ParamScheduler:
    """``schedule`` with a linear warm-up over the first ``length`` of training (none if length is 0)."""
    return Warmup(schedule, length, factor) if length > 0 else schedule


class LRScheduleMultiplier(LRScheduler):
    """Sets every parameter group's LR to ``base_lr x schedule(iteration / max_iter)``.

    Call :meth:`step` once after each optimizer step. Each group keeps its own base LR (the
    optimizer's ``initial_lr``), so the reference's per-group learning rates (generators at BASE_LR,
    the host at BASE_LR x PRETRAINED_LR_MULT) follow one schedule. Past ``max_iter`` the LR stays at the
    last iteration's value. The state dict holds the iteration and base LRs but neither the schedule
    nor ``max_iter``: a resumed run recomputes them from its config.

    Args:
        optimizer: the optimizer whose groups it drives.
        schedule: progress in [0, 1] -> LR multiplier.
        max_iter: iterations of the whole training.
        last_iter: the last finished iteration when resuming (-1: start).
    """

    def __init__(self, optimizer, schedule: ParamScheduler, max_iter: int, last_iter: int = -1):
        if max_iter <= 0:
            raise InvalidValueError(f"SOLVER.MAX_ITER must be positive, got {max_iter}")
        self.schedule = schedule
        self.max_iter = max_iter
        super().__init__(optimizer, last_epoch=last_iter)

    def multiplier(self, iteration: int) -> float:
        """The schedule's value at ``iteration``."""
        return self.schedule(min(iteration, self.max_iter - 1) / self.max_iter)

    def get_lr(self):
        factor = self.multiplier(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule", "max_iter")}
