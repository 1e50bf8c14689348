"""The registered schedules (see ``SCHEDULER_REGISTRY`` for the contract)."""
import math

from fvcore.common.param_scheduler import ConstantParamScheduler, MultiStepParamScheduler, ParamScheduler

from ..utils.errors import InvalidValueError
from .build import SCHEDULER_REGISTRY, iters_per_epoch

__all__ = ["EpochCosine", "Ramp", "linear", "cosine", "cosine_epoch", "multistep", "constant"]


class Ramp(ParamScheduler):
    """``begin`` until progress ``start``, a linear or cosine ramp to ``end`` at ``stop``, then ``end``.

    The linear shape computes the reference implementation's MAC target exactly as it does
    (``(p - start) / (stop - start) * (end - begin) + begin``, clamped at ``end``), so both give the
    same floating-point values.
    """

    def __init__(self, begin: float, end: float, start: float = 0.0, stop: float = 1.0, shape: str = "linear"):
        if not 0.0 <= start < stop:
            raise InvalidValueError(f"a schedule needs 0 <= start < stop, got start={start}, stop={stop} "
                                    "(SOLVER.MAC_TARGET.PSTART and PSTOP)")
        if shape not in ("linear", "cosine"):
            raise ValueError(f"ramp shape must be 'linear' or 'cosine', got '{shape}'")
        self.begin, self.end, self.start, self.stop, self.shape = begin, end, start, stop, shape

    def __call__(self, where: float) -> float:
        if where <= self.start:
            return self.begin
        if self.shape == "linear":
            value = (where - self.start) / (self.stop - self.start) * (self.end - self.begin) + self.begin
        else:
            frac = min((where - self.start) / (self.stop - self.start), 1.0)
            value = self.end + 0.5 * (self.begin - self.end) * (1.0 + math.cos(math.pi * frac))
        return max(value, self.end) if self.end <= self.begin else min(value, self.end)


class EpochCosine(ParamScheduler):
    """The reference's cosine (``utils.adjust_learning_rate``): ``0.5 (1 + cos(pi e / E))`` for the
    iterations of epoch ``e`` of ``E = max_iter / epoch_iters``, set at the epoch's first iteration and held
    for the whole epoch (a last, partial epoch included; a training shorter than one epoch keeps 1.0).

    Args:
        max_iter: iterations of the whole training.
        epoch_iters: iterations of one epoch.
    """

    def __init__(self, max_iter: int, epoch_iters: int):
        if max_iter <= 0 or epoch_iters <= 0:
            raise InvalidValueError(f"an epoch cosine needs positive iterations, got {epoch_iters} per epoch of "
                                    f"{max_iter}: set SOLVER.ITERS_PER_EPOCH > 0, or 0 to count the training set")
        self.max_iter, self.epoch_iters = max_iter, epoch_iters
        self.epochs = max_iter / epoch_iters

    def __call__(self, where: float) -> float:
        epoch = round(where * self.max_iter) // self.epoch_iters  # the progress is iteration / max_iter
        return 0.5 * (1 + math.cos(math.pi * float(epoch) / self.epochs))


def _ramp(cfg, what: str, shape: str) -> Ramp:
    """The MAC target's or the gate noise's ramp from 1.0 at PSTART to FINAL at PSTOP."""
    if what == "mac_target":
        t = cfg.SOLVER.MAC_TARGET
        if not 0.0 < t.FINAL <= 1.0:
            raise InvalidValueError(f"SOLVER.MAC_TARGET.FINAL must be in (0, 1], got {t.FINAL}")
    else:
        t = cfg.SOLVER.GATE_NOISE
    return Ramp(1.0, t.FINAL, t.PSTART, t.PSTOP, shape)


@SCHEDULER_REGISTRY.register("linear")
def linear(cfg, what: str) -> ParamScheduler:
    """LR: linear decay from 1 to 0. MAC target (the paper) and gate noise: 1.0 until PSTART, linear to
    FINAL at PSTOP."""
    return Ramp(1.0, 0.0) if what == "lr" else _ramp(cfg, what, "linear")


@SCHEDULER_REGISTRY.register("cosine")
def cosine(cfg, what: str) -> ParamScheduler:
    """LR: half-cosine from 1 to 0 (the paper). MAC target and gate noise: 1.0 until PSTART, half-cosine
    to FINAL at PSTOP."""
    return Ramp(1.0, 0.0, shape="cosine") if what == "lr" else _ramp(cfg, what, "cosine")


@SCHEDULER_REGISTRY.register("cosine_epoch")
def cosine_epoch(cfg, what: str) -> ParamScheduler:
    """LR only: the paper's cosine by epoch (:class:`EpochCosine`), epochs of SOLVER.ITERS_PER_EPOCH
    iterations (0: ceil(training images / SOLVER.IMS_PER_BATCH))."""
    _lr_only("cosine_epoch", what)
    return EpochCosine(cfg.SOLVER.MAX_ITER, iters_per_epoch(cfg))


def _lr_only(name: str, what: str):
    if what != "lr":
        key = "SOLVER.MAC_TARGET.NAME" if what == "mac_target" else "SOLVER.GATE_NOISE.NAME"
        raise InvalidValueError(f"the '{name}' schedule is for the learning rate only; use 'linear' or 'cosine' "
                                f"for {key}")


@SCHEDULER_REGISTRY.register("multistep")
def multistep(cfg, what: str) -> ParamScheduler:
    """LR only: multiplied by SOLVER.GAMMA at each iteration of SOLVER.STEPS."""
    _lr_only("multistep", what)
    steps = sorted(s for s in cfg.SOLVER.STEPS if s < cfg.SOLVER.MAX_ITER)
    values = [cfg.SOLVER.GAMMA ** k for k in range(len(steps) + 1)]
    return MultiStepParamScheduler(values, num_updates=cfg.SOLVER.MAX_ITER, milestones=steps)


@SCHEDULER_REGISTRY.register("constant")
def constant(cfg, what: str) -> ParamScheduler:
    """LR: constant. MAC target and gate noise: FINAL from the first iteration."""
    if what == "lr":
        return ConstantParamScheduler(1.0)
    return ConstantParamScheduler((cfg.SOLVER.MAC_TARGET if what == "mac_target" else cfg.SOLVER.GATE_NOISE).FINAL)
