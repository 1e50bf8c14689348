"""The static MAC table of the reference's get_flops(), to 4 decimals in MMac, for every paper model."""
import pytest

from msgc.modeling import build_backbone

# ../shared/reference/README.md: (original, possible, main, dgc, mask) in MMac, and parameters in M
GOLDEN = {
    ("msgc_resnet18", "none"): ((1817.2093, 560.6525, 139.4243, 1677.7851, 1.7820), 12.553),
    ("msgc_resnet18", "channel"): ((1817.2093, 562.4909, 139.4243, 1681.7239, 2.6357), 13.417),
    ("msgc_resnet50", "none"): ((4099.6961, 1402.2914, 481.4295, 3618.2666, 16.2952), 36.269),
    ("msgc_resnet50", "channel"): ((4099.6961, 1408.3556, 481.4295, 3625.8934, 20.4528), 40.444),
    ("msgc_mobilenetv2", "none"): ((306.9428, 220.0999, 188.8285, 118.1143, 1.7428), 4.319),
    ("msgc_mobilenetv2", "channel"): ((306.9428, 223.1865, 188.8285, 127.3216, 2.5276), 5.132),
    ("msgc_condensenet", "none"): ((2060.9280, 546.9188, 15.8546, 2045.0734, 19.7959), 30.095),
    ("msgc_condensenet", "channel"): ((2060.9280, 558.3788, 15.8546, 2062.3340, 26.9408), 37.275),
}


@pytest.mark.parametrize("name,attention", sorted(GOLDEN))
def test_static_macs_match_reference(cfg, name, attention):
    cfg.MODEL.NUM_CLASSES = 1000
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.MSGC.ATTENTION = attention
    model = build_backbone(cfg)
    got = model.static_macs(224, 224)
    expected, params = GOLDEN[(name, attention)]
    got_mmac = tuple(round(got[k] / 1e6, 4) for k in ("original", "possible", "main", "dgc", "gen"))
    assert got_mmac == expected
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == params


def test_dense_grouping_costs_the_host(cfg):
    cfg.MODEL.NUM_CLASSES = 1000
    cfg.MODEL.MSGC.GROUPING = "dense"
    for name in ("msgc_resnet18", "msgc_resnet50", "msgc_mobilenetv2", "msgc_condensenet"):
        cfg.MODEL.BACKBONE.NAME = name
        costs = build_backbone(cfg).complexity(224, 224)
        assert costs.gen == 0
        assert round(costs.original / 1e6, 4) == GOLDEN[(name, "none")][0][0]
