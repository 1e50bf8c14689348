"""Builders of the optimizer and of the learning-rate and MAC-target schedules; ``SCHEDULER_REGISTRY``."""
from ..utils.registry import Registry
from .lr_scheduler import LRScheduleMultiplier, with_warmup
from .mac_scheduler import MACTargetScheduler
from .optimizer import build_optimizer

__all__ = ["SCHEDULER_REGISTRY", "build_lr_scheduler", "build_mac_scheduler", "build_optimizer"]

SCHEDULER_REGISTRY = Registry("SCHEDULER")
SCHEDULER_REGISTRY.__doc__ = """
Schedules of training quantities, by name (``SOLVER.LR_SCHEDULER_NAME``, ``SOLVER.MAC_TARGET.NAME``).

A registered callable is called as ``fn(cfg, what)`` with ``what`` either ``"lr"`` or ``"mac_target"``
and returns an fvcore ``ParamScheduler``: a function of the training progress ``p = iteration /
SOLVER.MAX_ITER`` in [0, 1] that gives

- for ``"lr"``: the multiplier of every parameter group's base learning rate (1.0 at the start;
  linear warm-up is applied on top by :func:`build_lr_scheduler`, whatever the schedule);
- for ``"mac_target"``: the MAC target as a fraction of the dense host's MACs (1.0 at the start, down
  to ``SOLVER.MAC_TARGET.FINAL``).

A schedule that makes no sense for one of them raises ValueError saying so.
"""


def build_lr_scheduler(cfg, optimizer) -> LRScheduleMultiplier:
    """The per-iteration LR scheduler of the config (registered schedule x linear warm-up)."""
    schedule = SCHEDULER_REGISTRY.get(cfg.SOLVER.LR_SCHEDULER_NAME)(cfg, "lr")
    warmup = cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER
    schedule = with_warmup(schedule, warmup, cfg.SOLVER.WARMUP_FACTOR)
    return LRScheduleMultiplier(optimizer, schedule, cfg.SOLVER.MAX_ITER)


def build_mac_scheduler(cfg) -> MACTargetScheduler:
    """The per-iteration MAC-target scheduler of the config (``SOLVER.MAC_TARGET``)."""
    schedule = SCHEDULER_REGISTRY.get(cfg.SOLVER.MAC_TARGET.NAME)(cfg, "mac_target")
    return MACTargetScheduler(schedule, cfg.SOLVER.MAX_ITER)
