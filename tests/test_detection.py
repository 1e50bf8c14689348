"""Tests of projects/MSGCDetection: backbone features, losses, training, COCO evaluation, transfer, bad input."""
import json
import logging
import os
import sys

import pytest
import torch
from torch import nn

PROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "MSGCDetection")
sys.path.insert(0, PROJECT)

from msgc.checkpoint import MSGCCheckpointer  # noqa: E402
from msgc.config import get_cfg  # noqa: E402
from msgc.modeling import build_model  # noqa: E402
from msgc.modeling.layers import MaskGenerator  # noqa: E402
from msgc_detection import (COCOEvaluator, DetectionCheckpointer, add_detection_config,  # noqa: E402
                            build_detection_test_loader, build_detection_train_loader, build_detector,
                            generate_toy_shapes, map_classification_state_dict, register_coco_instances)
from msgc_detection.checkpoint import BODY_PREFIX  # noqa: E402
from msgc_detection.data import load_coco_json, to_unit_range  # noqa: E402
from msgc_detection.data.catalog import DATASET_CATALOG  # noqa: E402

SIZE = 64  # side of the test images


def small_cfg(**overrides):
    """A narrow, CPU-only Faster R-CNN config for 64 x 64 images."""
    cfg = add_detection_config(get_cfg())
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.NUM_CLASSES", 4, "MODEL.BACKBONE.WIDTH_MULT", 0.25,
        "MODEL.DETECTOR.FPN_CHANNELS", 32, "MODEL.DETECTOR.NORM", "BN", "MODEL.DETECTOR.FREEZE_AT", 0,
        "MODEL.DETECTOR.ANCHOR_SIZES", [[8], [16], [32], [64], [128]],
        "MODEL.ROI_HEADS.BOX_HEAD_DIM", 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 32, "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100, "MODEL.RPN.PRE_NMS_TOPK_TEST", 100, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
        "INPUT.MIN_SIZE_TRAIN", [SIZE], "INPUT.MAX_SIZE_TRAIN", SIZE, "INPUT.MIN_SIZE_TEST", SIZE,
        "INPUT.MAX_SIZE_TEST", SIZE, "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2,
        "TEST.IMS_PER_BATCH", 3, "SEED", 0,
    ])
    for key, value in overrides.items():
        cfg.merge_from_list([key.replace("__", "."), value])
    return cfg


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    generate_toy_shapes(os.path.join(root, "toy_shapes"), num_train=8, num_val=6, size=SIZE, seed=3)
    return root


def toy_cfg(root, **overrides):
    return small_cfg(DATASETS__ROOT=root, DATASETS__TRAIN="toy_shapes_train", DATASETS__TEST="toy_shapes_val",
                     **overrides)


def images_and_targets(n=2):
    images = [torch.rand(3, SIZE, SIZE) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [34.0, 30.0, 60.0, 52.0]]),
                "labels": torch.tensor([0, 3])} for _ in range(n)]
    return images, targets


# ------------------------------------------------------------------ backbone


@pytest.mark.parametrize("name", ["msgc_resnet18", "msgc_resnet34", "msgc_resnet50", "msgc_resnet101"])
def test_fpn_levels_have_the_stage_strides(name):
    cfg = small_cfg(MODEL__BACKBONE__NAME=name, MODEL__BACKBONE__WIDTH_MULT=0.125 if "101" in name else 0.25)
    model = build_detector(cfg).eval()
    fpn = model.detector.backbone
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        levels = fpn(x)
    assert list(levels) == ["res2", "res3", "res4", "res5", "pool"]
    strides = dict(model.backbone.stage_strides, pool=64)
    assert [strides[k] for k in levels] == [4, 8, 16, 32, 64]
    for k, v in levels.items():
        assert v.shape == (2, 32, -(-64 // strides[k]), -(-96 // strides[k])), k  # ceil: padded convs
    # the side channel holds this call's per-image MACs, below the dense host's at this size
    assert fpn.last_macs.shape == (2,)
    assert 0 < fpn.last_macs.max() <= fpn.last_dense_macs * 1.05


def test_retinanet_uses_p6_p7_and_renames_its_losses():
    cfg = small_cfg(MODEL__DETECTOR__NAME="retinanet", MODEL__DETECTOR__IN_FEATURES=["res3", "res4", "res5"])
    model = build_detector(cfg).train()
    with torch.no_grad():
        levels = model.detector.backbone(torch.rand(2, 3, SIZE, SIZE))
    assert list(levels) == ["res3", "res4", "res5", "p6", "p7"]
    out = model(*images_and_targets())
    assert {"loss_cls", "loss_box_reg", "loss_macs", "mac_ratio"} <= set(out)


def test_bad_in_features_and_anchor_levels_are_config_errors():
    with pytest.raises(ValueError, match="IN_FEATURES names 'res9'"):
        build_detector(small_cfg(MODEL__DETECTOR__IN_FEATURES=["res4", "res9"]))
    with pytest.raises(ValueError, match="strides"):
        build_detector(small_cfg(MODEL__DETECTOR__IN_FEATURES=["res2", "res4"]))
    with pytest.raises(ValueError, match="ANCHOR_SIZES has 3 levels but the FPN has 5"):
        build_detector(small_cfg(MODEL__DETECTOR__ANCHOR_SIZES=[[8], [16], [32]]))


def test_freeze_at_and_frozen_batchnorm():
    from torchvision.ops import FrozenBatchNorm2d

    model = build_detector(small_cfg(MODEL__DETECTOR__FREEZE_AT=2, MODEL__DETECTOR__NORM="FrozenBN"))
    body = model.backbone
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert not any(p.requires_grad for m in (body.conv1, body.layer1) for p in m.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert all(p.requires_grad for p in model.detector.rpn.parameters())

    # trained BatchNorm in the host, frozen in the gates' generators (each image's gates its own)
    model = build_detector(small_cfg(MODEL__DETECTOR__NORM="BN", MODEL__DETECTOR__GATE_NORM="FrozenBN"))
    generators = [m for m in model.backbone.modules() if isinstance(m, MaskGenerator)]
    assert generators and all(isinstance(g.conv[1], FrozenBatchNorm2d) for g in generators)
    assert isinstance(model.backbone.bn1, nn.BatchNorm2d) and isinstance(model.backbone.layer1[0].bn2, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="GATE_NORM must be"):
        build_detector(small_cfg(MODEL__DETECTOR__GATE_NORM="GN"))


# ------------------------------------------------------------------ losses


def test_loss_dict_holds_the_backbone_mac_loss():
    torch.manual_seed(0)
    model = build_detector(small_cfg()).train()
    model.set_mac_target(0.1)  # far below the ratio: the MAC loss is active
    out = model(*images_and_targets())
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_macs"} <= set(out)
    assert {"mac_ratio", "mac_target", "gate_open"} <= set(out)
    assert 0.3 < out["mac_ratio"] < 1.2 and out["mac_target"] == pytest.approx(0.1)
    weight = model.mac_loss_weight
    assert out["loss_macs"].item() == pytest.approx(weight * (out["mac_ratio"].item() - 0.1), rel=1e-5)
    out["loss_macs"].backward()  # the MAC loss alone reaches the gates, not the heads
    gate = model.backbone.layer3[0].maskgen2.conv[3].bias
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert model.detector.roi_heads.box_predictor.cls_score.weight.grad is None

    model.set_mac_target(1.5)  # below target: no MAC loss
    assert model(*images_and_targets())["loss_macs"].item() == 0.0


def test_eval_outputs_carry_per_image_macs():
    model = build_detector(small_cfg()).eval()
    with torch.no_grad():
        out = model([torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)])
    assert len(out) == 2
    dense = model.backbone.complexity(SIZE, SIZE).original - model.backbone.head_macs(2, 2)
    for det in out:
        assert {"boxes", "scores", "labels", "macs", "dense_macs"} <= set(det)
        assert det["dense_macs"] == dense
        assert det["labels"].numel() == 0 or 0 <= det["labels"].min() <= det["labels"].max() < 4


@pytest.mark.parametrize("name", ["faster_rcnn", "retinanet"])
def test_an_image_without_boxes_trains_as_a_negative(name):
    features = ["res3", "res4", "res5"] if name == "retinanet" else ["res2", "res3", "res4", "res5"]
    model = build_detector(small_cfg(MODEL__DETECTOR__NAME=name, MODEL__DETECTOR__IN_FEATURES=features)).train()
    images, targets = images_and_targets()
    targets[0] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    out = model(images, targets)
    assert all(torch.isfinite(v) for v in out.values())


def test_bad_targets_are_clear_errors_not_torchvision_asserts():
    model = build_detector(small_cfg()).train()
    images, targets = images_and_targets()
    targets[1] = {"boxes": torch.tensor([[10.0, 10.0, 10.0, 30.0]]), "labels": torch.tensor([1]), "image_id": 7}
    with pytest.raises(ValueError, match=r"image 1 \(image_id 7\).*no area"):
        model(images, targets)
    targets[1] = {"boxes": torch.tensor([[10.0, 10.0, 20.0, 30.0]]), "labels": torch.tensor([4])}
    with pytest.raises(ValueError, match="label 4 is outside 0..3"):
        model(images, targets)
    with pytest.raises(ValueError, match="needs targets"):
        model(images)


# ------------------------------------------------------------------ training on the toy set


def test_a_few_training_iterations_on_the_toy_set(toy_root, tmp_path):
    import train_net

    cfg = toy_cfg(toy_root, SOLVER__MAX_ITER=3, SOLVER__WARMUP_ITERS=0, SOLVER__BASE_LR=0.02,
                  SOLVER__MAC_TARGET__PSTOP=0.5, OUTPUT_DIR=str(tmp_path), LOG_PERIOD=1)
    trainer = train_net.Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.resume_or_load(resume=False)
    results = trainer.train()

    after = trainer.model.state_dict()
    assert not torch.equal(before["detector.rpn.head.conv.0.0.weight"], after["detector.rpn.head.conv.0.0.weight"])
    assert not torch.equal(before["detector.backbone.body.layer4.0.maskgen2.conv.3.weight"],
                           after["detector.backbone.body.layer4.0.maskgen2.conv.3.weight"])
    with open(tmp_path / "metrics.json") as f:
        metrics = [json.loads(line) for line in f]
    assert all("loss_macs" in m and "mac_ratio" in m for m in metrics if "total_loss" in m)
    assert [m for m in metrics if "mac_target" in m][-1]["mac_target"] == pytest.approx(0.5)  # FINAL at PSTOP
    assert {"AP", "AP50", "AP75", "macs", "dense_macs", "mac_ratio"} <= set(results)
    assert 0.0 <= results["AP50"] <= 1.0 and 0.3 < results["mac_ratio"] < 1.2

    # the final checkpoint is a detection checkpoint that --resume continues from
    resumed = train_net.Trainer(toy_cfg(toy_root, SOLVER__MAX_ITER=4, SOLVER__WARMUP_ITERS=0,
                                        OUTPUT_DIR=str(tmp_path)))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    assert torch.equal(resumed.model.state_dict()["detector.rpn.head.conv.0.0.weight"],
                       after["detector.rpn.head.conv.0.0.weight"])


def test_toy_set_is_deterministic_and_its_boxes_are_valid(toy_root, tmp_path):
    again = generate_toy_shapes(str(tmp_path / "toy"), num_train=8, num_val=6, size=SIZE, seed=3)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        with open(os.path.join(toy_root, "toy_shapes", name)) as a, open(os.path.join(again, name)) as b:
            first, second = json.load(a), json.load(b)
        assert first == second
        assert {c["name"] for c in first["categories"]} == {"circle", "square", "triangle", "cross"}
        for ann in first["annotations"]:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
    loader = build_detection_train_loader(toy_cfg(toy_root))
    images, targets = next(iter(loader))
    assert len(images) == 2 and images[0].shape == (3, SIZE, SIZE) and images[0].dtype == torch.uint8
    assert torch.allclose(to_unit_range(images, "cpu")[0], images[0] / 255.0, rtol=0, atol=1e-7)  # the preprocess
    assert targets[0]["boxes"].shape[1] == 4 and targets[0]["labels"].dtype == torch.int64


# ------------------------------------------------------------------ evaluation


def _predictions_from_ground_truth(loader, transform=lambda t: t):
    evaluator = COCOEvaluator.from_dataset(loader.dataset)
    for images, targets in loader:
        outputs = []
        for t in targets:
            t = transform(t)
            outputs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                            "macs": torch.tensor(3.0e6), "dense_macs": 4.0e6})
        evaluator.process((images, targets), outputs)
    return evaluator.evaluate()


def test_coco_evaluation_of_perfect_and_wrong_predictions(toy_root):
    loader = build_detection_test_loader(toy_cfg(toy_root))
    perfect = _predictions_from_ground_truth(loader)
    for k in ("AP", "AP50", "AP75"):
        assert perfect[k] == pytest.approx(1.0)
    assert "APl" not in perfect  # no large object in 64 x 64 images: left out, never NaN
    assert perfect["macs"] == 3.0e6 and perfect["mac_ratio"] == pytest.approx(0.75)

    def shifted(t):  # IoU with the truth is about 0.6: counts at IoU 0.5, not at 0.75
        w = t["boxes"][:, 2] - t["boxes"][:, 0]
        return dict(t, boxes=t["boxes"] + torch.stack([w, 0 * w, w, 0 * w], 1) / 4)

    off = _predictions_from_ground_truth(loader, shifted)
    assert off["AP50"] == pytest.approx(1.0) and off["AP75"] < 0.5
    wrong = _predictions_from_ground_truth(loader, lambda t: dict(t, labels=(t["labels"] + 1) % 4))
    assert wrong["AP50"] == 0.0


# ------------------------------------------------------------------ transfer


def _randomise_batchnorm(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)


@pytest.mark.parametrize("layout", ["msgc", "bare"])
def test_classification_checkpoint_gives_the_classifier_features(tmp_path, layout, caplog):
    cfg = small_cfg(MODEL__NUM_CLASSES=10, MODEL__DETECTOR__NORM="FrozenBN", MODEL__DETECTOR__FREEZE_AT=2)
    torch.manual_seed(0)
    classifier = build_model(cfg).eval()
    _randomise_batchnorm(classifier)
    if layout == "msgc":
        MSGCCheckpointer(classifier, str(tmp_path)).save("classifier")
    else:  # a bare backbone state dict, as torchvision's
        torch.save({k[len("backbone."):]: v for k, v in classifier.state_dict().items()}, tmp_path / "classifier.pth")
    detector = build_detector(cfg).eval()
    fpn_before = detector.detector.backbone.fpn.state_dict()
    with caplog.at_level(logging.INFO, logger="msgc_detection"):
        DetectionCheckpointer(detector).load(str(tmp_path / "classifier.pth"))
    assert "dropped: fc.weight, fc.bias" in caplog.text
    assert not any(k.startswith(BODY_PREFIX + "fc.") for k in detector.state_dict())
    for k, v in detector.detector.backbone.fpn.state_dict().items():
        assert torch.equal(v, fpn_before[k]), k

    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want, want_macs = classifier.backbone.forward_features(x)
        got, got_macs = detector.backbone.forward_features(x)
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_macs, want_macs)


def test_checkpoint_of_another_width_is_an_error_naming_the_key(tmp_path):
    MSGCCheckpointer(build_model(small_cfg(MODEL__BACKBONE__WIDTH_MULT=0.5)), str(tmp_path)).save("wide")
    with pytest.raises(ValueError, match=r"does not fit the model: '\S+' has shape \(32, .* but the model's "
                                         r"'detector\.backbone\.body\.\S+' is \(16, "):
        DetectionCheckpointer(build_detector(small_cfg())).load(str(tmp_path / "wide.pth"))


def test_map_classification_state_dict_by_prefix():
    t = torch.zeros(1)
    mapped, dropped = map_classification_state_dict({"module.conv1.weight": t, "module.fc.weight": t,
                                                     "module.layer1.0.maskgen1.conv.3.bias": t})
    assert set(mapped) == {BODY_PREFIX + "conv1.weight", BODY_PREFIX + "layer1.0.maskgen1.conv.3.bias"}
    assert dropped == ["fc.weight"]
    mapped, dropped = map_classification_state_dict({"backbone.conv1.weight": t, "mac_target": t})
    assert set(mapped) == {BODY_PREFIX + "conv1.weight"} and dropped == ["mac_target"]


# ------------------------------------------------------------------ bad input


def _write_coco(tmp_path, images, annotations, categories=None, files=()):
    for name in files:
        from PIL import Image

        Image.new("RGB", (SIZE, SIZE)).save(tmp_path / name)
    data = {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(path)


def _image(i):
    return {"id": i, "file_name": f"{i}.png", "width": SIZE, "height": SIZE}


def _ann(i, image_id, bbox, cat=1, **extra):
    return dict({"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox}, **extra)


def test_bad_boxes_are_skipped_with_counts_and_empty_images_filtered(tmp_path, caplog):
    anns = [_ann(1, 1, [2, 3, 10, 12]), _ann(2, 1, [5, 5, 0, 9]), _ann(3, 1, [5, 5, -3, 9]),
            _ann(4, 1, [50, 50, 30, 30], cat=7), _ann(5, 1, [100, 100, 5, 5]), _ann(6, 1, [1, 1, 5, 5], iscrowd=1),
            _ann(7, 2, [1, 1, 0, 0]), _ann(8, 99, [1, 1, 5, 5])]
    path = _write_coco(tmp_path, [_image(1), _image(2), _image(3)], anns, files=["1.png", "2.png", "3.png"])
    with caplog.at_level(logging.WARNING):
        train = load_coco_json(path, str(tmp_path), num_classes=2, filter_empty=True)
    assert train.skipped == {"annotations with a box of zero or negative width or height": 3,
                             "annotations whose box lies outside the image": 1, "crowd annotations": 1,
                             "annotations of images that are not loaded": 1, "images without usable boxes": 2}
    assert "skipped 3 annotations with a box of zero or negative width or height" in caplog.text
    (record,) = train.records
    assert record["boxes"].tolist() == [[2, 3, 12, 15], [50, 50, 64, 64]]  # the second clipped to the image
    assert record["labels"].tolist() == [0, 1]  # category ids 1 and 7 -> labels 0 and 1
    assert train.category_ids == [1, 7]
    test = load_coco_json(path, str(tmp_path), num_classes=2, filter_empty=False)
    assert [len(r["labels"]) for r in test.records] == [2, 0, 0]  # images without boxes stay for evaluation


def test_missing_image_files_are_an_error_unless_skipped(tmp_path):
    path = _write_coco(tmp_path, [_image(1), _image(2)], [_ann(1, 2, [1, 1, 5, 5])], files=["1.png"])
    with pytest.raises(FileNotFoundError, match=r"1 image files do not exist \(first: .*2.png\).*SKIP_CORRUPT"):
        load_coco_json(path, str(tmp_path), num_classes=2)
    coco = load_coco_json(path, str(tmp_path), num_classes=2, skip_missing=True)
    assert [r["image_id"] for r in coco.records] == [1]
    assert coco.skipped["images whose file does not exist"] == 1


def test_category_errors(tmp_path):
    path = _write_coco(tmp_path, [_image(1)], [_ann(1, 1, [1, 1, 5, 5], cat=3)], files=["1.png"])
    with pytest.raises(ValueError, match="annotation 1 has category_id 3, which the json's categories do not declare"):
        load_coco_json(path, str(tmp_path), num_classes=2)
    with pytest.raises(ValueError, match="declares 2 categories but MODEL.NUM_CLASSES is 1"):
        load_coco_json(path, str(tmp_path), num_classes=1)


def test_registered_dataset_with_missing_files_is_a_clear_error(tmp_path):
    register_coco_instances("test_detection_missing", "nowhere/instances.json", "nowhere/images")
    try:
        with pytest.raises(FileNotFoundError, match="dataset 'test_detection_missing'.*does not exist"):
            build_detection_test_loader(small_cfg(DATASETS__ROOT=str(tmp_path)), "test_detection_missing")
    finally:
        DATASET_CATALOG._obj_map.pop("test_detection_missing")


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(PROJECT, "configs"))))
def test_every_config_loads_and_builds(name):
    cfg = add_detection_config(get_cfg())
    cfg.merge_from_file(os.path.join(PROJECT, "configs", name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.WIDTH_MULT", 0.125])
    model = build_detector(cfg)
    assert model.num_classes == cfg.MODEL.NUM_CLASSES
