"""The hosts the paper never tried (ResNeXt-50 32x4d, Wide ResNet-50-2, RegNetY-800MF): stage shapes,
static MACs against fvcore's independent count of torchvision's dense network, deployed vs eval outputs,
and one training step. (Their torchvision weights and logits: test_torchvision_equivalence.py.)"""
import logging

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import SqueezeExcitation

from conftest import narrow
from msgc.modeling import BACKBONE_REGISTRY, build_model
from msgc.modeling.attention import no_attention
from msgc.modeling.grouping import DenseGrouping
from msgc.modeling.kit import msgc_conv2d
from msgc.modeling.layers import MaskGenerator, gated_conv
from test_deploy import check_same, randomize

HOSTS = {"msgc_resnext50_32x4d": "resnext50_32x4d", "msgc_wide_resnet50_2": "wide_resnet50_2",
         "msgc_regnet_y_800mf": "regnet_y_800mf"}


def small(cfg, name, grouping="msgc", attention="none"):
    """A narrow host (cifar stem). ResNeXt at width 0.5 has 2 output channels per group in its first
    stage: with 2 heads, each head of a group computes one of them, as 4 heads do at full width."""
    narrow(cfg, name, grouping, attention)
    if "resnext" in name:
        cfg.MODEL.MSGC.HEADS = 2
    torch.manual_seed(0)
    return build_model(cfg)


def images(n, size, seed=1):
    """Random images with per-sample colour offsets, so that pooled contexts (and gates) differ."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) + 2 * torch.randn(n, 3, 1, 1, generator=g)


@pytest.mark.parametrize("name", HOSTS)
def test_stage_shapes(cfg, name):
    model = small(cfg, name).eval()
    bb = model.backbone
    with torch.no_grad():
        feats, macs = bb.forward_features(images(2, 32))
        logits = bb.forward_head(feats)
    assert list(feats) == ["stem", "res2", "res3", "res4", "res5"] == list(bb.stage_channels)
    for stage, f in feats.items():
        side = 32 // bb.stage_strides[stage]
        assert f.shape == (2, bb.stage_channels[stage], side, side), stage
    assert logits.shape == (2, 10) and macs.shape == (2,) and macs.dtype == torch.float64


@pytest.mark.parametrize("side", [4, 8])  # the heads' broadcast input, then per-sample weights
def test_heads_within_host_groups_as_the_readme_says(side):
    """A 3x3 with 4 host groups and 2 heads: output o belongs to host group g = o // (out / 4) and, within
    it, to head (o mod (out / 4)) // (out / 8); it reads group g's input channels scaled by that head's
    mask and attention, and nothing of the other groups."""
    n, c, out, groups, heads = 2, 16, 16, 4, 2
    torch.manual_seed(0)
    conv = msgc_conv2d(c, out, 3, heads, groups=groups)
    x = torch.randn(n, c, side, side)
    scale = (torch.rand(n, heads, c) > 0.4).float() * torch.rand(n, heads, c)  # mask x attention
    got = gated_conv(conv, x, scale, None, heads)
    per_group, per_head, cg = out // groups, out // (groups * heads), c // groups
    for o in range(out):
        g, h = o // per_group, (o % per_group) // per_head
        inputs = x[:, g * cg:(g + 1) * cg] * scale[:, h, g * cg:(g + 1) * cg, None, None]
        want = nn.functional.conv2d(inputs, conv.weight[o:o + 1], padding=1)
        torch.testing.assert_close(got[:, o:o + 1], want, rtol=1e-5, atol=1e-5)


# ---- static MACs, counted twice ---------------------------------------------------------------------
#
# fvcore's FlopCountAnalysis counts one multiply-add as one flop for convolutions and linear layers,
# one per input element for adaptive average pooling, and an eval-mode BatchNorm with affine
# parameters as 2 per element (scale and shift); it skips what it has no handle for: max-pooling,
# ReLU, sigmoid, the residual additions and the squeeze-excitation's scaling (aten::mul). The paper's
# count (the reference's get_flops(), which msgc follows) has convolutions and linear layers alike,
# the global pooling at one per element, a BatchNorm at 1 per element but none on the downsampling
# shortcuts (ResNet's downsample.1, RegNet's proj.1), 4 per output of the stem's 3x3 max-pooling, and a
# squeeze-excitation's pooling and scaling at one per element each. fvcore is therefore ~0.1-0.6%
# higher (the BatchNorms counted twice outweigh the max-pooling and the scaling it skips); undoing
# exactly these differences from fvcore's own per-operator and per-module numbers must give ours.

def _torchvision_dense(arch):
    """torchvision's network (weights=None) in eval mode; the ResNets are made on the meta device and
    zero-filled (their random initialisation is slow, and fvcore needs only shapes)."""
    if "regnet" in arch:  # its constructor computes its widths with tensors: not on the meta device
        return torchvision.models.__dict__[arch](weights=None).eval()
    with torch.device("meta"):
        net = torchvision.models.__dict__[arch](weights=None)
    net = net.to_empty(device="cpu").eval()
    with torch.no_grad():
        for t in net.state_dict().values():
            t.zero_()
    return net


def fvcore_as_the_paper_counts(net, size):
    """(fvcore's total, fvcore's count with the paper's conventions) of ``net`` on one size x size image."""
    from fvcore.nn import FlopCountAnalysis

    elements = {"maxpool": 0, "se_scale": 0}

    def count(key):
        def hook(module, inputs, output):
            elements[key] += output.numel()
        return hook

    hooks = [m.register_forward_hook(count("maxpool" if isinstance(m, nn.MaxPool2d) else "se_scale"))
             for m in net.modules() if isinstance(m, (nn.MaxPool2d, SqueezeExcitation))]
    flops = FlopCountAnalysis(net, torch.zeros(1, 3, size, size))
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        total, ops, modules = flops.total(), flops.by_operator(), flops.by_module()
    for h in hooks:
        h.remove()
    assert set(ops) == {"conv", "batch_norm", "adaptive_avg_pool2d", "linear"}, ops
    shortcut_bn = sum(modules[n] for n, m in net.named_modules()
                      if isinstance(m, nn.BatchNorm2d) and n.endswith(("downsample.1", "proj.1")))
    assert shortcut_bn > 0
    paper = (ops["conv"] + ops["linear"] + ops["adaptive_avg_pool2d"] + (ops["batch_norm"] - shortcut_bn) // 2
             + 4 * elements["maxpool"] + elements["se_scale"])
    return total, paper


@pytest.mark.parametrize("name", HOSTS)
def test_static_macs_equal_fvcore_of_the_torchvision_host(name):
    with torch.device("meta"):  # shapes only
        ours = BACKBONE_REGISTRY.get(name)(grouping=DenseGrouping(), attention=no_attention).complexity(224, 224)
    assert ours.gen == ours.extra == 0
    total, paper = fvcore_as_the_paper_counts(_torchvision_dense(HOSTS[name]), 224)
    assert ours.original == paper
    assert 0 < total - ours.original < 0.01 * total  # fvcore: 4259.4M, 11426.9M, 845.8M


# ---- deployment and training ------------------------------------------------------------------------

@pytest.mark.parametrize("name, attention", [("msgc_resnext50_32x4d", "none"), ("msgc_resnext50_32x4d", "channel"),
                                             ("msgc_wide_resnet50_2", "none"), ("msgc_regnet_y_800mf", "none"),
                                             ("msgc_regnet_y_800mf", "channel")])
def test_deployed_equals_eval(cfg, name, attention):
    """Random weights, BatchNorm statistics and gates (about half closed, differently per sample): the
    deployed network's logits within 1e-4 of the eval model's and its MACs bit for bit, on every
    kernel variant and on PyTorch's kernels."""
    model = randomize(small(cfg, name, "msgc", attention))
    torch.set_num_threads(1)
    try:
        got = check_same(model, images(3, 32))
    finally:
        torch.set_num_threads(2)
    assert len(set(got["macs"].tolist())) == 3  # the gates decide differently for each sample
    static = model.backbone.complexity(32, 32)
    assert (got["macs"] < 0.95 * (static.main + static.dgc + static.gen)).all()


@pytest.mark.parametrize("name", HOSTS)
def test_one_training_step(cfg, name, caplog):
    model = small(cfg, name).train()
    model.set_mac_target(0.5)
    x, y = images(4, 16), torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO):
        out = model(x, y)
    assert "has no gate" not in caplog.text
    loss = out["loss_cls"] + out["loss_macs"]
    assert torch.isfinite(loss) and out["loss_macs"] > 0  # the gates start open: above the target
    c = model.backbone.complexity(16, 16)
    assert 0.5 < out["mac_ratio"] <= (c.main + c.dgc + c.gen) / c.original
    loss.backward()
    gens = [m for m in model.modules() if isinstance(m, MaskGenerator)]
    assert len(gens) == 3 * sum(1 for _ in model.backbone.blocks())  # three gates per block
    for g in gens:  # the sparsity loss reaches every gate's generator
        assert g.second.weight.grad is not None and g.second.weight.grad.abs().sum() > 0
