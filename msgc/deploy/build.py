"""``deploy(model)``: the inference-only network that skips what the gates close.

``DEPLOY_REGISTRY`` maps a backbone class name to the class that deploys it.
"""
from typing import Optional

import torch
from torch import nn

from ..utils.registry import Registry
from . import native as native_kernels

__all__ = ["DEPLOY_REGISTRY", "DeployedClassifier", "deploy"]

DEPLOY_REGISTRY = Registry("DEPLOY")
DEPLOY_REGISTRY.__doc__ = """
Registry of deployed backbones, keyed by the source backbone's class name (``MSGCResNet``, ...).

An entry is constructed as ``entry(backbone, native=bool)`` from a backbone in eval mode (``native``:
use :mod:`msgc.deploy.native`'s kernels for gated convolutions) and is a module with
``forward_sample(image) -> (logits 1 x classes, macs float, executed int)`` for one
``1 x 3 x H x W`` image: ``macs`` equal to the eval model's (the paper's count) and ``executed`` the MACs
it ran, counted from the shapes it ran with.
"""


_NO_GRAPH = ("a deployed model cannot be {}: which channels it computes, and so its tensor shapes, depend "
             "on each sample's gates; trace or export the source model in eval mode instead (the same "
             "outputs, computed with masks at full width)")


class DeployedClassifier(nn.Module):
    """Inference-only classifier that computes only what the gates keep, one sample at a time.

    ``model(images)`` -> ``{"logits": N x classes, "macs": N, "executed_macs": N}``: ``logits`` and
    ``macs`` as the source model in eval mode gives them (``macs`` is the paper's count, identical),
    ``executed_macs`` the multiply-adds actually run (float64). Samples of a batch run one after the
    other: which channels are computed differs per sample. It holds folded copies of the weights and
    keeps a reference to the source model's MAC accounting; it has no parameters and cannot train.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        super().train(False)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("a deployed model is inference-only: train the source model, then deploy it "
                               "again with msgc.deploy.deploy(model.eval())")
        return super().train(False)

    def __prepare_scriptable__(self):
        raise RuntimeError(_NO_GRAPH.format("scripted (torch.jit.script)"))

    def forward(self, images: torch.Tensor, labels=None):
        if torch.jit.is_tracing():
            raise RuntimeError(_NO_GRAPH.format("traced (torch.jit.trace)"))
        if torch.compiler.is_compiling():
            raise RuntimeError(_NO_GRAPH.format("compiled or exported (torch.compile, torch.export)"))
        if labels is not None:
            raise RuntimeError("a deployed model is inference-only and takes no labels: call model(images); "
                               "train the source model instead")
        if images.dim() != 4 or images.size(1) != 3:
            raise ValueError(f"deployed model: expected images N x 3 x H x W, got shape {tuple(images.shape)}")
        logits, macs, executed = [], [], []
        with torch.no_grad():
            for image in images.float().split(1):
                out, m, e = self.backbone.forward_sample(image)
                logits.append(out)
                macs.append(m)
                executed.append(e)
        return {"logits": torch.cat(logits), "macs": torch.tensor(macs, dtype=torch.float64),
                "executed_macs": torch.tensor(executed, dtype=torch.float64)}


def deploy(model: nn.Module, native: Optional[bool] = None) -> DeployedClassifier:
    """The deployed (inference-only) version of a :class:`msgc.modeling.Classifier` in eval mode.

    BatchNorm is folded into the convolutions, attention into the gathered weights (or inputs), and
    weights are rearranged once so that each sample's gathers are contiguous. The returned module
    shares no tensors with ``model``; deploy again after changing ``model``'s weights.

    ``native``: run gated convolutions with msgc's C kernels (:mod:`msgc.deploy.native`), which read
    open channels in place; default: where they build and the model is on the CPU in float32. False:
    PyTorch's kernels on gathered copies (any device). A deployed model runs on the device it was
    deployed on.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ValueError(f"deploy: expected a msgc Classifier (with a .backbone), got {type(model).__name__}")
    if model.training:
        raise ValueError("deploy: the model is in training mode; call model.eval() first (deployment folds "
                         "BatchNorm running statistics and uses the gates' eval decisions)")
    on_cpu = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    if native is None:
        native = on_cpu and native_kernels.available()
    elif native and not (on_cpu and native_kernels.available()):
        raise ValueError("deploy(native=True): " + ("the model must be on the CPU in float32" if not on_cpu
                                                     else f"msgc's native kernels are {native_kernels.status()}"))
    return DeployedClassifier(DEPLOY_REGISTRY.get(type(backbone).__name__)(backbone, native=native))
