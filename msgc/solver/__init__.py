"""Optimizer, learning-rate and MAC-target schedules (``SCHEDULER_REGISTRY``)."""
from . import schedules  # noqa: F401  (registers the built-in schedules)
from .build import (SCHEDULER_REGISTRY, build_gate_noise_schedule, build_lr_scheduler, build_mac_scheduler,
                    build_optimizer, check_solver, iters_per_epoch)
from .lr_scheduler import LRScheduleMultiplier, Warmup, with_warmup
from .mac_scheduler import MACTargetScheduler
from .optimizer import GATE_KEYWORDS, param_groups
from .schedules import EpochCosine, Ramp

__all__ = ["SCHEDULER_REGISTRY", "GATE_KEYWORDS", "EpochCosine", "LRScheduleMultiplier", "MACTargetScheduler", "Ramp",
           "Warmup", "build_gate_noise_schedule", "build_lr_scheduler", "build_mac_scheduler", "build_optimizer",
           "check_solver", "iters_per_epoch", "param_groups", "with_warmup"]
