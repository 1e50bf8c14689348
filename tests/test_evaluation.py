"""The classification evaluator: exact sums, so that any split over processes gives the same numbers."""
import json

import pytest
import torch

from msgc.config import get_cfg
from msgc.data import build_normalizer, build_test_loader
from msgc.engine import launch
from msgc.evaluation import ClassificationEvaluator, inference_on_dataset, results_table
from msgc.modeling import build_model
from msgc.utils import comm


def _outputs(n=23, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    # magnitudes far apart: a float64 running sum of these depends on the order of the additions
    macs = (torch.rand(n, generator=g) * 10.0 ** torch.randint(-3, 12, (n,), generator=g)).float()
    return logits, labels, macs


def _feed(evaluator, logits, labels, macs, batch):
    images = torch.zeros(len(labels), 3, 8, 6)
    for i in range(0, len(labels), batch):
        s = slice(i, i + batch)
        evaluator.process((images[s], labels[s]), {"logits": logits[s], "macs": macs[s]})


def test_top_k_and_macs_against_direct_computation():
    logits, labels, macs = _outputs()
    ev = ClassificationEvaluator(dense_macs=lambda h, w: 1000 * h * w)
    _feed(ev, logits, labels, macs, batch=4)
    r = ev.evaluate()
    top5 = logits.topk(5, 1).indices
    assert r["top1"] == 100.0 * (logits.argmax(1) == labels).sum().item() / 23
    assert r["top5"] == 100.0 * (top5 == labels[:, None]).any(1).sum().item() / 23
    assert r["macs"] == pytest.approx(macs.double().mean().item(), rel=1e-12)
    assert r["mac_ratio"] == pytest.approx(r["macs"] / 48000, rel=1e-12)
    assert r["dense_macs"] == 48000 and r["num_samples"] == 23
    table = results_table(r, "toy")
    assert "top-1 (%)" in table and "MAC ratio" in table and "toy" in table


def test_results_do_not_depend_on_batches_or_process_split(monkeypatch):
    logits, labels, macs = _outputs()
    whole = ClassificationEvaluator(dense_macs=lambda h, w: 7 * h * w)
    _feed(whole, logits, labels, macs, batch=23)
    expected = whole.evaluate()
    parts = [ClassificationEvaluator(dense_macs=lambda h, w: 7 * h * w) for _ in range(3)]
    bounds = [0, 8, 16, 23]  # three "ranks" of unequal sizes, fed one sample at a time
    for ev, lo, hi in zip(parts, bounds, bounds[1:]):
        _feed(ev, logits[lo:hi], labels[lo:hi], macs[lo:hi], batch=1)
    monkeypatch.setattr(comm, "all_gather", lambda obj: [p._state() for p in parts])
    assert parts[0].evaluate() == expected  # exactly, not approximately
    # ...while a float64 running sum in the other order does differ: the test can fail
    forward = sum(macs.double().tolist())
    backward = sum(reversed(macs.double().tolist()))
    assert forward != backward


def test_label_out_of_range_is_an_error():
    ev = ClassificationEvaluator()
    with pytest.raises(ValueError, match="test label 9 is out of range for a model with 7 classes"):
        ev.process((torch.zeros(1, 3, 2, 2), torch.tensor([9])), {"logits": torch.zeros(1, 7)})


def _cfg(world_size):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.STEM = "cifar"
    cfg.MODEL.BACKBONE.WIDTH_MULT = 0.25
    cfg.MODEL.NUM_CLASSES = 10
    cfg.DATASETS.TEST = "synthetic"
    cfg.DATASETS.SYNTHETIC_TEST_LENGTH = 37  # odd: the two shards have 19 and 18 images
    cfg.INPUT.TEST_SIZE = cfg.INPUT.TEST_RESIZE = 16
    cfg.TEST.IMS_PER_BATCH = world_size  # one image per process and batch: the same forward per image
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def _evaluate(world_size):
    torch.manual_seed(0)
    cfg = _cfg(world_size)
    model = build_model(cfg)
    return inference_on_dataset(model, build_test_loader(cfg), ClassificationEvaluator(model.dense_macs),
                                preprocess=build_normalizer(cfg))


def _two_process_worker(path):
    torch.set_num_threads(1)
    results = _evaluate(2)
    if comm.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(results, f)


def test_two_processes_give_exactly_the_one_process_numbers(tmp_path):
    path = tmp_path / "results.json"
    launch(_two_process_worker, 2, args=(str(path),), device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _evaluate(1)
    finally:
        torch.set_num_threads(threads)
    assert single["num_samples"] == 37
    assert json.loads(path.read_text()) == single
