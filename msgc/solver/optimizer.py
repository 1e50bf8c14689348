"""The optimizer of the paper: SGD with Nesterov momentum over three parameter groups."""
import torch
from torch import nn

from ..utils.errors import InvalidValueError

__all__ = ["build_optimizer", "param_groups", "GATE_KEYWORDS"]

# The default of SOLVER.GATE_KEYWORDS: a parameter whose name contains one of these trains as a gate.
# "mask" is the reference's own and only test (main_dist.py: every name containing "mask" trains at the
# gates' rate, so its attention generators train with the host); "attgen" adds msgc's choice of training
# the attention generators as gates too. The paper's configs set ("mask",).
GATE_KEYWORDS = ("mask", "attgen")

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, base_lr: float, host_lr_mult: float, weight_decay: float,
                 weight_decay_norm: float, weight_decay_gates: float, gate_keywords=GATE_KEYWORDS) -> list:
    """The three parameter groups of the reference's recipe, as optimizer param-group dicts.

    - ``gates``: every parameter whose name contains one of ``gate_keywords`` (the generators' own
      BatchNorms included), at ``base_lr`` with ``weight_decay_gates``;
    - ``host_norm``: weights and biases of the other normalisation layers, at ``base_lr x host_lr_mult``
      with ``weight_decay_norm``;
    - ``host``: every other parameter, at ``base_lr x host_lr_mult`` with ``weight_decay``.

    With ``gate_keywords=("mask",)`` (the paper's configs) these are the reference's groups
    ``p_mask``, ``p_bn`` and ``p_conv``: the attention generators' BatchNorms then go to ``host_norm``
    and their convolutions to ``host``. Each group carries its ``name`` (the trainer logs
    ``lr/<name>``); empty groups are left out and frozen parameters (``requires_grad=False``) are skipped.

    Args:
        model: the module whose parameters are grouped.
        base_lr, host_lr_mult: the gates' learning rate and the host's multiplier of it.
        weight_decay, weight_decay_norm, weight_decay_gates: the three groups' weight decays.
        gate_keywords: name fragments that put a parameter in ``gates`` (``SOLVER.GATE_KEYWORDS``).
    """
    gate_keywords = tuple(gate_keywords)
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(False)}
    groups = {"gates": [], "host_norm": [], "host": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(k in name for k in gate_keywords):
            groups["gates"].append(p)
        elif id(p) in norm_params:
            groups["host_norm"].append(p)
        else:
            groups["host"].append(p)
    host_lr = base_lr * host_lr_mult
    settings = {"gates": (base_lr, weight_decay_gates), "host_norm": (host_lr, weight_decay_norm),
                "host": (host_lr, weight_decay)}
    return [{"name": k, "params": v, "lr": settings[k][0], "weight_decay": settings[k][1]}
            for k, v in groups.items() if v]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (``SOLVER.MOMENTUM``, ``SOLVER.NESTEROV``) over :func:`param_groups` of the config
    (``SOLVER.GATE_KEYWORDS`` chooses the gate group)."""
    s = cfg.SOLVER
    groups = param_groups(model, s.BASE_LR, s.PRETRAINED_LR_MULT, s.WEIGHT_DECAY, s.WEIGHT_DECAY_NORM,
                          s.WEIGHT_DECAY_GATES, s.GATE_KEYWORDS)
    if not groups:
        raise InvalidValueError("the model has no trainable parameters (are all its parameters frozen?)")
    return torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV)
