"""torchvision weights loaded through MSGCCheckpointer give torchvision's logits.

Grouping ``dense`` is the host network itself; grouping ``msgc`` with every gate forced open and no
attention is the host too: each head reads every channel, and the grouped convolution over the heads'
copies computes the dense convolution, head by head.
"""
import pytest
import torch
import torchvision

from msgc.checkpoint import MSGCCheckpointer
from msgc.config import get_cfg
from msgc.modeling import build_model
from msgc.modeling.layers import MaskGenerator

CASES = [("resnet18", "msgc_resnet18"), ("resnet50", "msgc_resnet50"), ("mobilenet_v2", "msgc_mobilenetv2"),
         ("resnext50_32x4d", "msgc_resnext50_32x4d"), ("wide_resnet50_2", "msgc_wide_resnet50_2"),
         ("regnet_y_800mf", "msgc_regnet_y_800mf")]


def _randomise(model, generator):
    """Non-trivial BN statistics and affine parameters, and a classifier with logits of order 1."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) / m.in_features ** 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                m.weight.copy_(1 + 0.1 * torch.randn(c, generator=generator))
                m.bias.copy_(0.1 * torch.randn(c, generator=generator))


def _force_gates_open(model):
    count = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MaskGenerator):
                m.conv[3].weight.zero_()
                m.conv[3].bias.fill_(10.0)
                count += 1
    return count


@pytest.mark.parametrize("arch, backbone", CASES)
@pytest.mark.parametrize("grouping", ["dense", "msgc"])
def test_logits_equal_torchvision(tmp_path, arch, backbone, grouping):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    reference = torchvision.models.__dict__[arch](num_classes=10).eval()
    _randomise(reference, gen)
    torch.save(reference.state_dict(), tmp_path / f"{arch}.pth")

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.MSGC.GROUPING = grouping
    cfg.MODEL.MSGC.ATTENTION = "none"
    cfg.MODEL.NUM_CLASSES = 10
    model = build_model(cfg).eval()
    MSGCCheckpointer(model).load(str(tmp_path / f"{arch}.pth"))
    gates = _force_gates_open(model)
    assert (gates > 0) == (grouping == "msgc")

    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        want = reference(x)
        out = model(x)
    assert want.abs().max() > 0.5  # a difference below 1e-4 must mean something
    diff = (out["logits"] - want).abs().max().item()
    assert diff < 1e-4, f"{arch} ({grouping}): max abs logit difference {diff:.3g}"
    # all gates open, no attention: the per-sample cost is the dense cost plus the generators
    costs = model.backbone.complexity(64, 64)
    expected = costs.original + (costs.gen if grouping == "msgc" else 0)
    torch.testing.assert_close(out["macs"], torch.full((2,), float(expected), dtype=torch.float64), rtol=1e-6, atol=0)
