import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def cfg():
    """A small CPU config: narrow widths keep forward passes cheap."""
    from msgc.config import get_cfg

    c = get_cfg()
    c.MODEL.DEVICE = "cpu"
    c.MODEL.NUM_CLASSES = 10
    return c


def narrow(cfg, name, grouping="msgc", attention="none"):
    """``cfg`` set to a narrow backbone with the cifar stem (width 0.25 for ResNets, else 0.5)."""
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.BACKBONE.WIDTH_MULT = 0.25 if "resnet" in name else 0.5
    cfg.MODEL.BACKBONE.STEM = "cifar"
    cfg.MODEL.MSGC.GROUPING = grouping
    cfg.MODEL.MSGC.ATTENTION = attention
    return cfg
