"""Gates, per-sample MACs, groupings and the public model API, on narrow networks and small images."""
import pytest
import torch
from torch import nn

from conftest import narrow
from msgc.modeling import build_model
from msgc.modeling.layers import BinaryGate, MaskGenerator

BACKBONES = ["msgc_resnet18", "msgc_resnet50", "msgc_mobilenetv2", "msgc_condensenet"]


small = narrow


def mix_gates(model, seed=0):
    """Random generator weights and BN statistics so that gates differ between samples."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, MaskGenerator):
                m.conv[3].weight.normal_(0, 1.0, generator=g)
                m.conv[3].bias.normal_(0, 0.5, generator=g)
    return model


def set_gates(model, value):
    """Force every gate open (value > 0) or closed (value < 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MaskGenerator):
                m.conv[3].weight.zero_()
                m.conv[3].bias.fill_(value)
    return model


def test_gate_training_is_binary_with_straight_through_gradient():
    gate = BinaryGate().train()
    logits = torch.randn(8, 4, 16, requires_grad=True)
    out = gate(logits)
    assert set(out.detach().unique().tolist()) <= {0.0, 1.0}
    (out * torch.randn_like(out)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gate_eval_is_deterministic_threshold():
    gate = BinaryGate().eval()
    logits = torch.randn(8, 4, 16)
    logits[0, 0, 0] = 0.0
    a, b = gate(logits), gate(logits)
    assert torch.equal(a, b)
    assert torch.equal(a, (logits >= 0).float())


def test_gate_noise_is_logistic():
    """Training gates open with probability sigmoid(logit): a logit of 0 opens half of them."""
    torch.manual_seed(0)
    gate = BinaryGate().train()
    assert abs(gate(torch.zeros(100000)).mean().item() - 0.5) < 0.01
    assert abs(gate(torch.full((100000,), 1.0)).mean().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.01


def test_mask_generator_starts_open_and_attention_starts_at_one(cfg):
    model = build_model(small(cfg, "msgc_resnet18", attention="channel")).eval()
    gens = [m for m in model.modules() if isinstance(m, MaskGenerator)]
    assert gens and all(torch.all(m.conv[3].bias == 2.0) for m in gens)
    atts = [m for m in model.modules() if type(m).__name__ == "AttentionGenerator"]
    ctx = torch.randn(3, atts[0].in_channels, 1, 1)
    assert torch.equal(atts[0](ctx), torch.ones(3, atts[0].heads, atts[0].channels))


@pytest.mark.parametrize("name", BACKBONES)
def test_generators_get_gradients_in_training(cfg, name, device):
    cfg.MODEL.DEVICE = str(device)
    model = build_model(small(cfg, name, attention="channel")).train()
    labels = torch.tensor([0, 1, 2, 3], device=device)
    losses = model(torch.randn(4, 3, 16, 16, device=device), labels)
    model.set_mac_target(0.1)  # next pass applies the sparsity loss
    losses = model(torch.randn(4, 3, 16, 16, device=device), labels)
    assert losses["loss_macs"] > 0
    (losses["loss_cls"] + losses["loss_macs"]).backward()
    gens = [m for m in model.modules() if isinstance(m, MaskGenerator)]
    assert all(m.conv[3].weight.grad is not None and m.conv[3].weight.grad.abs().sum() > 0 for m in gens)
    assert 0 < losses["gate_open"] <= 1


@pytest.mark.parametrize("attention", ["none", "channel"])
@pytest.mark.parametrize("name", BACKBONES)
def test_per_sample_macs_do_not_depend_on_the_batch(cfg, name, attention):
    torch.manual_seed(0)
    model = mix_gates(build_model(small(cfg, name, attention=attention))).eval()
    x = torch.randn(4, 3, 16, 16) + 2 * torch.randn(4, 3, 1, 1)  # samples with different contexts
    out = model(x)
    assert out["logits"].shape == (4, 10) and out["macs"].shape == (4,)
    assert len(set(out["macs"].tolist())) > 1, "gates should differ between samples"
    for i in (0, 3):
        alone = model(x[i:i + 1])
        assert alone["macs"].item() == out["macs"][i].item()
        torch.testing.assert_close(alone["logits"][0], out["logits"][i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", BACKBONES)
def test_open_gates_cost_the_host_plus_generators(cfg, name):
    model = set_gates(build_model(small(cfg, name)), 10.0).eval()
    macs = model(torch.randn(2, 3, 16, 16))["macs"]
    costs = model.backbone.complexity(16, 16)
    assert torch.allclose(macs, torch.full((2,), float(costs.original + costs.gen), dtype=macs.dtype))


@pytest.mark.parametrize("name", BACKBONES)
def test_closed_gates_cost_main_and_generators_only(cfg, name):
    model = set_gates(build_model(small(cfg, name)), -10.0).eval()
    macs = model(torch.randn(2, 3, 16, 16))["macs"]
    costs = model.backbone.complexity(16, 16)
    expected = costs.main + costs.gen
    if name == "msgc_mobilenetv2":  # closed projections make the expansions unread: the bonus
        expected -= sum(t.cost[n] for blk, t in _block_terms(model.backbone, 16) for n in blk.spec.nodes
                        if getattr(n, "name", "") in ("expansion", "depthwise"))
    assert torch.allclose(macs, torch.full((2,), float(expected), dtype=macs.dtype), rtol=1e-6)


def _block_terms(backbone, size):
    h = w = size
    h, w = backbone.stem_macs(h, w)[1:]
    for blk in backbone.blocks():
        t = blk.spec.terms(h, w)
        yield blk, t
        h, w = t.out_hw


@pytest.mark.parametrize("name", BACKBONES)
def test_dense_grouping_costs_exactly_the_host(cfg, name):
    model = build_model(small(cfg, name, grouping="dense")).eval()
    assert not any(isinstance(m, MaskGenerator) for m in model.modules())
    macs = model(torch.randn(2, 3, 16, 16))["macs"]
    assert torch.allclose(macs, torch.full((2,), float(model.dense_macs(16, 16)), dtype=macs.dtype))


def test_static_grouping_is_a_grouped_convolution(cfg):
    """Head i of a static MSGC conv reads only slice i: the same as nn.Conv2d(groups=heads)."""
    model = build_model(small(cfg, "msgc_resnet18", grouping="static")).eval()
    block = model.backbone.layer1[0]
    x = torch.randn(2, block.planes, 8, 8)
    mask = block.maskgen2(x[:, :, :1, :1])
    from msgc.modeling.layers import gate_heads

    got = block.conv2(gate_heads(x, mask, None, block.heads))
    grouped = nn.Conv2d(block.planes, block.planes, 3, 1, 1, groups=block.heads, bias=False)
    c_in = block.planes // block.heads
    with torch.no_grad():  # keep, for output group g, only the weights of input slice g
        w = block.conv2.weight.view(block.heads, -1, block.planes, 3, 3)
        grouped.weight.copy_(torch.cat([w[g, :, g * c_in:(g + 1) * c_in] for g in range(block.heads)]))
    torch.testing.assert_close(got, grouped(x))
    # and it counts the gated convolution at 1/heads
    macs = model(torch.randn(1, 3, 32, 32))["macs"]
    assert macs.item() < model.dense_macs(32, 32)


def test_prune_grouping_uses_one_head(cfg):
    model = build_model(small(cfg, "msgc_resnet50", grouping="prune")).eval()
    block = model.backbone.layer1[0]
    assert block.conv2.groups == 1 and block.maskgen2.heads == 1
    assert model(torch.randn(1, 3, 32, 32))["logits"].shape == (1, 10)


def test_training_call_without_labels_is_an_error(cfg):
    model = build_model(small(cfg, "msgc_resnet18")).train()
    with pytest.raises(ValueError, match="needs labels"):
        model(torch.randn(2, 3, 32, 32))


def test_label_out_of_range_is_an_error(cfg):
    model = build_model(small(cfg, "msgc_resnet18")).train()
    with pytest.raises(ValueError, match="label 12 is out of range for MODEL.NUM_CLASSES=10"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([1, 12]))


def test_mac_loss_follows_the_reference(cfg):
    """loss_macs = lambda * (mean MACs / dense - target) while at or above the target, else 0."""
    model = build_model(small(cfg, "msgc_resnet18")).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    out = model(x, y)
    assert out["loss_macs"] == 0  # target 1.0 and fewer MACs than the host
    model.set_mac_target(0.3)
    torch.manual_seed(1)
    out = model(x, y)
    assert out["loss_macs"].item() == pytest.approx(30.0 * (out["mac_ratio"].item() - 0.3), rel=1e-5)
    assert out["mac_target"].item() == pytest.approx(0.3)


@pytest.mark.parametrize("name", ["msgc_resnet50", "msgc_mobilenetv2", "msgc_condensenet"])
def test_dense_host_is_the_network_without_gates(cfg, name):
    """dense_host(): this class with the dense grouping and this network's weights, as a dense model
    built from the config and loaded with the same weights."""
    dense = build_model(small(cfg.clone(), name, grouping="dense")).eval()
    model = mix_gates(build_model(small(cfg, name, attention="channel"))).eval()
    host = model.backbone.dense_host().eval()
    assert not any(isinstance(m, MaskGenerator) for m in host.modules())
    dense.backbone.load_state_dict(host.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(host(x)[0], dense(x)["logits"])
    own = model.backbone.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in host.state_dict().items())  # the model's own weights
    assert host.complexity(16, 16).original == model.backbone.complexity(16, 16).original
