"""Builders of the optimizer and of the learning-rate and MAC-target schedules; ``SCHEDULER_REGISTRY``."""
from fvcore.common.param_scheduler import ParamScheduler

from ..modeling.budget import check_budget_range
from ..utils.errors import InvalidValueError
from ..utils.registry import Registry
from .lr_scheduler import LRScheduleMultiplier, with_warmup
from .mac_scheduler import MACTargetScheduler
from .optimizer import build_optimizer

__all__ = ["SCHEDULER_REGISTRY", "build_gate_noise_schedule", "build_lr_scheduler", "build_mac_scheduler",
           "build_optimizer", "check_solver", "iters_per_epoch"]

SCHEDULER_REGISTRY = Registry("SCHEDULER")
SCHEDULER_REGISTRY.__doc__ = """
Schedules of training quantities, by name (``SOLVER.LR_SCHEDULER_NAME``, ``SOLVER.MAC_TARGET.NAME``).

A registered callable is called as ``fn(cfg, what)`` with ``what`` either ``"lr"`` or ``"mac_target"``
and returns an fvcore ``ParamScheduler``: a function of the training progress ``p = iteration /
SOLVER.MAX_ITER`` in [0, 1] that gives

- for ``"lr"``: the multiplier of every parameter group's base learning rate (1.0 at the start;
  linear warm-up is applied on top by :func:`build_lr_scheduler`, whatever the schedule); a schedule
  that steps by epoch reads the epoch's length from :func:`iters_per_epoch`;
- for ``"mac_target"``: the MAC target as a fraction of the dense host's MACs (1.0 at the start, down
  to ``SOLVER.MAC_TARGET.FINAL``);
- for ``"gate_noise"``: the scale of the gates' logistic noise in training (``SOLVER.GATE_NOISE``;
  1.0 is the paper's noise, 0.0 none).

A schedule that makes no sense for one of them raises ValueError saying so.
"""


def _require(ok: bool, key: str, value, what: str, hint: str = ""):
    if not ok:
        raise InvalidValueError(f"{key} must be {what}, got {value!r}" + (f": {hint}" if hint else ""))


def check_solver(cfg):
    """Refuse SOLVER values that no schedule can follow, naming the key and what it must be.

    Called by the schedule builders, and by launchers before any process starts.
    """
    s = cfg.SOLVER
    _require(isinstance(s.MAX_ITER, int) and s.MAX_ITER > 0, "SOLVER.MAX_ITER", s.MAX_ITER,
             "a positive number of iterations")
    _require(0 <= s.WARMUP_ITERS < s.MAX_ITER, "SOLVER.WARMUP_ITERS", s.WARMUP_ITERS,
             f"in [0, SOLVER.MAX_ITER={s.MAX_ITER})", "for a run this short, also set SOLVER.WARMUP_ITERS "
             "(e.g. SOLVER.WARMUP_ITERS 0)")
    _require(0.0 <= s.WARMUP_FACTOR <= 1.0, "SOLVER.WARMUP_FACTOR", s.WARMUP_FACTOR, "in [0, 1]")
    _require(s.IMS_PER_BATCH > 0, "SOLVER.IMS_PER_BATCH", s.IMS_PER_BATCH, "a positive number of images")
    _require(s.BASE_LR >= 0, "SOLVER.BASE_LR", s.BASE_LR, ">= 0")
    _require(s.PRETRAINED_LR_MULT >= 0, "SOLVER.PRETRAINED_LR_MULT", s.PRETRAINED_LR_MULT, ">= 0")
    _require(0.0 <= s.MOMENTUM < 1.0, "SOLVER.MOMENTUM", s.MOMENTUM, "in [0, 1)")
    for key in ("WEIGHT_DECAY", "WEIGHT_DECAY_NORM", "WEIGHT_DECAY_GATES"):
        _require(s[key] >= 0, f"SOLVER.{key}", s[key], ">= 0")
    _require(s.GAMMA > 0, "SOLVER.GAMMA", s.GAMMA, "> 0")
    _require(all(isinstance(x, int) and x > 0 for x in s.STEPS), "SOLVER.STEPS", list(s.STEPS),
             "positive iterations")
    _require(s.CHECKPOINT_PERIOD >= 0, "SOLVER.CHECKPOINT_PERIOD", s.CHECKPOINT_PERIOD,
             ">= 0 (0: only the final checkpoint)")
    _require(s.CHECKPOINT_MAX_KEEP >= 0, "SOLVER.CHECKPOINT_MAX_KEEP", s.CHECKPOINT_MAX_KEEP, ">= 0 (0: keep all)")
    _require(isinstance(s.ITERS_PER_EPOCH, int) and s.ITERS_PER_EPOCH >= 0, "SOLVER.ITERS_PER_EPOCH",
             s.ITERS_PER_EPOCH, ">= 0 (0: from the training set's size)")
    _require(all(isinstance(k, str) and k for k in s.GATE_KEYWORDS), "SOLVER.GATE_KEYWORDS", list(s.GATE_KEYWORDS),
             'a list of non-empty name fragments, e.g. ["mask"] (the paper) or ["mask", "attgen"]')
    t = s.MAC_TARGET
    _require(0.0 < t.FINAL <= 1.0, "SOLVER.MAC_TARGET.FINAL", t.FINAL, "in (0, 1]")
    _require(0.0 <= t.PSTART < t.PSTOP <= 1.0, "SOLVER.MAC_TARGET.PSTART and PSTOP", [t.PSTART, t.PSTOP],
             "0 <= PSTART < PSTOP <= 1 (fractions of the training)")
    budget_range = check_budget_range(cfg.MODEL.MSGC.BUDGET_RANGE)
    _require(budget_range is None or t.FINAL < 1.0, "SOLVER.MAC_TARGET.FINAL", t.FINAL,
             "below 1 with MODEL.MSGC.BUDGET_RANGE", "it sets the target schedule's shape, which then ends at each "
             "sampled budget (e.g. the range's lower end)")
    n = s.GATE_NOISE
    _require(0.0 <= n.FINAL <= 1.0, "SOLVER.GATE_NOISE.FINAL", n.FINAL, "in [0, 1] (1: the paper's noise, 0: none)")
    _require(0.0 <= n.PSTART < n.PSTOP <= 1.0, "SOLVER.GATE_NOISE.PSTART and PSTOP", [n.PSTART, n.PSTOP],
             "0 <= PSTART < PSTOP <= 1 (fractions of the training)")


def build_lr_scheduler(cfg, optimizer) -> LRScheduleMultiplier:
    """The per-iteration LR scheduler of the config (registered schedule x linear warm-up)."""
    check_solver(cfg)
    schedule = SCHEDULER_REGISTRY.get(cfg.SOLVER.LR_SCHEDULER_NAME)(cfg, "lr")
    warmup = cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER
    schedule = with_warmup(schedule, warmup, cfg.SOLVER.WARMUP_FACTOR)
    return LRScheduleMultiplier(optimizer, schedule, cfg.SOLVER.MAX_ITER)


def build_gate_noise_schedule(cfg) -> ParamScheduler:
    """The gates' noise scale as a function of the training progress (``SOLVER.GATE_NOISE``)."""
    check_solver(cfg)
    return SCHEDULER_REGISTRY.get(cfg.SOLVER.GATE_NOISE.NAME)(cfg, "gate_noise")


def build_mac_scheduler(cfg) -> MACTargetScheduler:
    """The per-iteration MAC-target scheduler of the config (``SOLVER.MAC_TARGET``; with
    ``MODEL.MSGC.BUDGET_RANGE``, a budget per iteration and the target aimed at it)."""
    check_solver(cfg)
    schedule = SCHEDULER_REGISTRY.get(cfg.SOLVER.MAC_TARGET.NAME)(cfg, "mac_target")
    budget_range = check_budget_range(cfg.MODEL.MSGC.BUDGET_RANGE)
    return MACTargetScheduler(schedule, cfg.SOLVER.MAX_ITER, final=cfg.SOLVER.MAC_TARGET.FINAL,
                              budget_range=budget_range, seed=max(cfg.SEED, 0))


def iters_per_epoch(cfg) -> int:
    """Iterations of one epoch: ``SOLVER.ITERS_PER_EPOCH``, or when it is 0 ``ceil(N / IMS_PER_BATCH)``
    for the N images of the ``DATASETS.TRAIN`` training set (built here to count them).

    The ceiling is what the reference's loader gives: each of its processes pads the set to a multiple
    of the processes (``DistributedSampler``) and keeps the last, short batch (ImageNet, 2 x 128:
    ``ceil(640,584 / 128) = ceil(1,281,167 / 256) = 5005``).
    """
    if cfg.SOLVER.ITERS_PER_EPOCH > 0:
        return cfg.SOLVER.ITERS_PER_EPOCH
    from ..data import build_dataset  # only here: the solver needs the data only to count it

    images = len(build_dataset(cfg, cfg.DATASETS.TRAIN, "train", transform=None))
    return -(-images // cfg.SOLVER.IMS_PER_BATCH)
