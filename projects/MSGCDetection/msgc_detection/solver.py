"""The detector's optimizer: the backbone's groups as in classification, plus the new FPN and heads."""
import torch

from msgc.solver.optimizer import param_groups

__all__ = ["build_detection_optimizer"]


def build_detection_optimizer(cfg, model) -> torch.optim.Optimizer:
    """SGD over the backbone's three groups of :func:`msgc.solver.optimizer.param_groups` and ``heads``.

    ``heads`` (the FPN, RPN and box or RetinaNet heads: everything outside the backbone) trains at
    ``BASE_LR x SOLVER.HEADS_LR_MULT`` with ``SOLVER.WEIGHT_DECAY``. Frozen parameters are skipped.
    """
    s = cfg.SOLVER
    groups = param_groups(model.backbone, s.BASE_LR, s.PRETRAINED_LR_MULT, s.WEIGHT_DECAY, s.WEIGHT_DECAY_NORM,
                          s.WEIGHT_DECAY_GATES, s.GATE_KEYWORDS)
    in_backbone = {id(p) for p in model.backbone.parameters()}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in in_backbone]
    groups.append({"name": "heads", "params": heads, "lr": s.BASE_LR * s.HEADS_LR_MULT,
                   "weight_decay": s.WEIGHT_DECAY})
    return torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV)
