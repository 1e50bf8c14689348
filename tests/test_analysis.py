"""msgc.analysis and its tools: the numbers behind the gate figures, the figures, TensorBoard summaries."""
import itertools
import json
import os
import pathlib
import sys
import warnings

import pytest
import torch
from PIL import Image

from conftest import load_tool, narrow
from msgc.analysis import (channel_order, collect_gate_statistics, gated_blocks, gated_layers, pairwise_jaccard,
                           select_layers)
from msgc.checkpoint import MSGCCheckpointer
from msgc.modeling import build_model
from msgc.modeling.layers import AttentionGenerator, MaskGenerator
from msgc.utils.events import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def varied_gates(model, seed=0):
    """Generators whose gates differ between images and heads: random last layers, bias 0."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (MaskGenerator, AttentionGenerator)):
            last = m.conv[3]
            last.weight.data = torch.randn(last.weight.shape, generator=g)
            last.bias.data = torch.randn(last.bias.shape, generator=g) * 0.3 + (1.0 if isinstance(
                m, AttentionGenerator) else 0.0)
    return model.eval()


def small_model(cfg, grouping="msgc", attention="none", backbone="msgc_resnet18"):
    return varied_gates(build_model(narrow(cfg, backbone, grouping, attention)))


def batches(n=20, size=16, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return [(images[i:i + batch], labels[i:i + batch]) for i in range(0, n, batch)]


# ------------------------------------------------------------------------------------------------
# The numbers
# ------------------------------------------------------------------------------------------------
def test_usage_maps_equal_the_masks_averaged_by_hand(cfg):
    model = small_model(cfg)
    data = batches()
    stats, _ = collect_gate_statistics(model, data)
    # by hand: each block's mask generators applied to the mean of the block's input
    inputs = {}
    blocks = {name: block for name, block, _, _ in gated_blocks(model.backbone, 16, 16)}
    handles = [b.register_forward_hook(lambda m, i, o, n=n: inputs.setdefault(n, []).append(i[0][0]))
               for n, b in blocks.items()]
    with torch.no_grad():
        for images, _ in data:
            model(images)
        for handle in handles:
            handle.remove()
        for layer in stats["layers"]:
            block = blocks[layer["block"]]
            generator = dict(model.backbone.named_modules())[layer["name"]]
            # batch by batch, as the model ran: other batch shapes may round a logit near 0 the other way
            masks = torch.cat([(generator.logits(x.mean((2, 3), keepdim=True)) >= 0).double()
                               for x in inputs[layer["block"]]])  # N x heads x C
            assert masks.shape == (20, layer["heads"], layer["channels"])
            assert torch.equal(torch.tensor(layer["usage"], dtype=torch.float64), masks.mean(0)), layer["name"]
            assert layer["open"] == pytest.approx(float(masks.mean()), abs=1e-12)
            assert layer["executed_macs"] == pytest.approx(float(masks.mean()) * layer["dense_macs"], rel=1e-12)
            read = masks.amax(1)
            assert layer["union"] == pytest.approx(float(read.mean()), abs=1e-12)
            assert layer["never_read"] == int((read.sum(0) == 0).sum())
            assert block is not None
    varied = [layer for layer in stats["layers"] if 0.05 < layer["open"] < 0.95]
    assert len(varied) > len(stats["layers"]) // 2  # the check above compared real, mixed masks


def test_pairwise_jaccard_matches_sets():
    g = torch.Generator().manual_seed(1)
    masks = (torch.rand(6, 4, 10, generator=g) > 0.5).double()
    masks[0] = 0  # all heads empty: identical
    masks[1, 0] = 0  # one empty head: overlap 0 with every non-empty head
    got = pairwise_jaccard(masks)
    for n in range(6):
        sets = [set(torch.nonzero(masks[n, h]).flatten().tolist()) for h in range(4)]
        pairs = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in itertools.combinations(sets, 2)]
        assert float(got[n]) == pytest.approx(sum(pairs) / len(pairs))
    assert torch.equal(pairwise_jaccard(torch.ones(3, 1, 5)), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("grouping, expected", [("prune", 1.0), ("static", 0.0)])
def test_jaccard_overlap_is_one_for_prune_and_zero_for_static(cfg, grouping, expected):
    model = small_model(cfg, grouping)
    stats, _ = collect_gate_statistics(model, batches(n=12))
    spectrum = [layer for layer in stats["layers"] if layer["spectrum"]]
    assert spectrum and all(layer["jaccard"] == expected for layer in spectrum)
    assert [stage["jaccard"] for stage in stats["stages"]] == [expected] * 4
    if grouping == "static":  # head i reads exactly its quarter of the channels, in every image
        layer = spectrum[0]
        quarter = layer["channels"] // 4
        assert layer["usage"] == [[1.0 if c // quarter == h else 0.0 for c in range(layer["channels"])]
                                  for h in range(4)]
        assert layer["union"] == 1.0 and layer["never_read"] == 0


def test_msgc_heads_sit_between_the_two_ends(cfg):
    stats, _ = collect_gate_statistics(small_model(cfg), batches(n=12))
    values = [layer["jaccard"] for layer in stats["layers"] if layer["spectrum"]]
    assert all(0.0 < v < 1.0 for v in values)


def test_per_image_macs_predictions_and_class_means_are_the_models(cfg):
    model = small_model(cfg)
    data = batches(n=20)
    stats, extremes = collect_gate_statistics(model, data, num_images=18, keep_extremes=3)
    with torch.no_grad():
        outs = [model(images) for images, _ in data]
    macs = torch.cat([o["macs"] for o in outs]).tolist()[:18]
    preds = torch.cat([o["logits"].argmax(1) for o in outs]).tolist()[:18]
    labels = torch.cat([y for _, y in data]).tolist()[:18]
    assert stats["images"] == {"macs": macs, "labels": labels, "predictions": preds}
    assert len(set(macs)) > 10  # images do cost differently
    assert stats["mean_macs"] == pytest.approx(sum(macs) / 18)
    assert stats["mac_ratio"] == pytest.approx(sum(macs) / 18 / model.dense_macs(16, 16))
    for c in range(10):
        mine = [m for m, y in zip(macs, labels) if y == c]
        assert stats["classes"]["count"][c] == len(mine)
        assert stats["classes"]["mean_macs"][c] == (pytest.approx(sum(mine) / len(mine)) if mine else None)
    order = sorted(range(18), key=lambda i: (macs[i], i))
    assert [e["index"] for e in stats["extremes"]["cheapest"]] == order[:3]
    assert [e["index"] for e in stats["extremes"]["most_expensive"]] == sorted(
        range(18), key=lambda i: (-macs[i], i))[:3]
    images = torch.cat([x for x, _ in data])
    assert torch.equal(extremes["cheapest"][0], images[order[0]])


@pytest.mark.parametrize("backbone", ["msgc_resnet18", "msgc_resnet50", "msgc_mobilenetv2"])
def test_layer_dense_macs_are_the_host_convolutions(cfg, backbone):
    """Each mask's convolution at full width costs what fvcore counts for that convolution of the host."""
    from fvcore.nn import FlopCountAnalysis

    model = build_model(narrow(cfg, backbone))
    layers = gated_layers(model.backbone, 32, 32)
    dense_cfg = cfg.clone()
    dense_cfg.MODEL.MSGC.GROUPING = "dense"
    dense = build_model(dense_cfg).eval()
    analysis = FlopCountAnalysis(dense.backbone, torch.zeros(1, 3, 32, 32))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_module = analysis.by_module()
    assert layers and all(layer.conv is not None for layer in layers)
    assert {layer.conv: layer.dense_macs for layer in layers} == {layer.conv: by_module[layer.conv] for layer in layers}


def test_attention_is_summarised_over_the_open_channels(cfg):
    model = small_model(cfg, attention="channel")
    data = batches(n=10)
    stats, _ = collect_gate_statistics(model, data)
    att = next(a for a in stats["attention"] if a["name"] == "layer2.0.attgen2")
    assert att["mask"] == "layer2.0.maskgen2"
    block = model.backbone.layer2[0]
    seen = []
    handle = block.register_forward_hook(lambda m, i, o: seen.append(i[0][0]))
    with torch.no_grad():
        for images, _ in data:
            model(images)
    handle.remove()
    with torch.no_grad():
        values = torch.cat([block.attgen2(ctx)[block.maskgen2(ctx) > 0].double()
                            for ctx in (x.mean((2, 3), keepdim=True) for x in seen)])
    assert att["count"] == values.numel() > 0
    assert att["mean"] == pytest.approx(float(values.mean()))
    assert att["quantiles"]["q50"] == pytest.approx(float(values.quantile(0.5)))
    assert sum(att["histogram"]["counts"]) == values.numel()


def test_channel_order_puts_shared_then_head_specific_channels_first():
    usage = [[0.0, 1.0, 0.9, 0.0, 0.6, 0.2],
             [1.0, 1.0, 0.0, 0.0, 0.0, 0.1]]
    # channel 1: both heads; 2 and 4: head 0 only (higher usage first); 0: head 1 only; 5, 3: no head
    assert channel_order(usage) == [1, 2, 4, 0, 5, 3]


def test_select_layers_takes_one_grouped_mask_per_stage(cfg):
    stats, _ = collect_gate_statistics(small_model(cfg), batches(n=4))
    assert select_layers(stats, 4) == [f"layer{i}.1.maskgen2" for i in range(1, 5)]
    assert select_layers(stats, 2) == ["layer1.1.maskgen2", "layer4.1.maskgen2"]


# ------------------------------------------------------------------------------------------------
# The tools
# ------------------------------------------------------------------------------------------------
def _checkpoint(tmp_path, attention="channel"):
    """A quickstart-shaped model with varied gates, saved with its config; returns the overrides."""
    from msgc.config import load_cfg

    opts = ["MODEL.MSGC.ATTENTION", attention, "TEST.IMS_PER_BATCH", "16"]
    cfg = load_cfg(QUICKSTART, opts)
    model = varied_gates(build_model(cfg))
    MSGCCheckpointer(model, str(tmp_path)).save("model", cfg=cfg)
    return opts + ["MODEL.WEIGHTS", str(tmp_path / "model.pth")]


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        image.load()
        return list(image.size)


def test_visualize_gates_writes_valid_pngs_and_their_numbers(tmp_path):
    visualize = load_tool("visualize_gates")
    out = tmp_path / "figs"
    stats = visualize.main(["--config-file", QUICKSTART, "--num-images", "24", "--extremes", "4", "--output",
                            str(out)] + _checkpoint(tmp_path))
    files = {f["file"]: f["size"] for f in stats["figures"]}
    assert set(files) == {"group_wise.png", "layer_wise.png", "sample_wise.png", "sample_extremes.png",
                          "attention_wise.png"}
    for name, size in files.items():
        assert _png_size(out / name) == size, name
    assert files["group_wise.png"] == [1000, 660]  # 4 layers: 10 x (0.8 + 4 x 1.45) inches at 100 dpi
    assert files["sample_wise.png"] == [1000, 360]
    saved = json.loads((out / "gates.json").read_text())
    assert saved["num_images"] == 24 and len(saved["images"]["macs"]) == 24
    assert saved["group_wise_layers"] == [f"layer{i}.1.maskgen2" for i in range(1, 5)]
    assert saved["model"]["attention"] == "channel" and len(saved["attention"]) == 16
    assert all(len(layer["usage"]) == layer["heads"] and len(layer["order"]) == layer["channels"]
               for layer in saved["layers"])
    assert len(saved["extremes"]["cheapest"]) == 4 and sorted(os.listdir(out)) == sorted(list(files) + ["gates.json"])


def _one_line_error(capsys, tool, args):
    with pytest.raises(SystemExit) as exit_info:
        tool.cli(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_visualize_gates_bad_input_is_one_line(tmp_path, capsys):
    visualize = load_tool("visualize_gates")
    weights = _checkpoint(tmp_path)
    base = ["--config-file", QUICKSTART, "--num-images", "8", "--output", str(tmp_path / "o")]
    # weights of another grouping: the heads' convolution has another shape
    line = _one_line_error(capsys, visualize, base + weights + ["MODEL.MSGC.GROUPING", "prune"])
    assert "model.pth" in line and "shape" in line
    # the config lacks the attention the weights have
    line = _one_line_error(capsys, visualize, base + weights + ["MODEL.MSGC.ATTENTION", "none"])
    assert "gate tensors that the model lacks" in line and "attgen" in line
    # the config has attention the weights lack
    plain = _checkpoint(tmp_path / "plain", attention="none")
    line = _one_line_error(capsys, visualize, base + plain + ["MODEL.MSGC.ATTENTION", "channel"])
    assert "has no weights for 112 gate tensors" in line and "attgen" in line  # 16 generators x 7 tensors
    # no gates at all
    line = _one_line_error(capsys, visualize, base + ["MODEL.MSGC.GROUPING", "dense"])
    assert "has no gates" in line and "dense" in line
    # an output folder that cannot be created (its parent is a file)
    (tmp_path / "file").write_text("")
    line = _one_line_error(capsys, visualize, ["--config-file", QUICKSTART, "--output", str(tmp_path / "file" / "o")])
    assert "cannot write to the output folder" in line and "file" in line
    # weights that do not exist
    line = _one_line_error(capsys, visualize, base + ["MODEL.WEIGHTS", str(tmp_path / "missing.pth")])
    assert "missing.pth" in line and "does not exist" in line
    assert not (tmp_path / "o").exists()  # no output folder is left behind by any of them


def test_tools_without_matplotlib_say_how_to_install_it(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    _metrics(tmp_path / "run")
    for tool, args in ((load_tool("visualize_gates"), ["--config-file", QUICKSTART, "--output", str(tmp_path / "o")]),
                       (load_tool("plot_metrics"), [str(tmp_path / "run")])):
        line = _one_line_error(capsys, tool, args)
        assert 'pip install -e ".[vis]"' in line and "matplotlib" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "run" / "metrics.png").exists()


def _metrics(folder, scale=1.0, lines=None):
    folder.mkdir()
    records = lines or [
        {"iteration": 9, "loss_cls": 2.0 * scale, "loss_macs": 0.5, "total_loss": 2.5, "mac_ratio": 0.9,
         "mac_target": 0.8, "lr/gates": 0.1, "lr/host": 0.02},
        {"iteration": 19, "loss_cls": 1.0 * scale, "loss_macs": 0.0, "total_loss": 1.0, "mac_ratio": 0.6,
         "mac_target": 0.6, "lr/gates": 0.05, "lr/host": 0.01, "val/top1": 80.0 * scale, "val/mac_ratio": 0.61}]
    (folder / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_metrics_draws_several_runs(tmp_path):
    plot = load_tool("plot_metrics")
    _metrics(tmp_path / "a")
    _metrics(tmp_path / "b", scale=0.9)
    figure = plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "m.png")])
    assert _png_size(tmp_path / "m.png") == figure["size"] == [1100, 750]
    assert plot.main([str(tmp_path / "a")])["file"] == "metrics.png" and (tmp_path / "a" / "metrics.png").is_file()
    with pytest.raises(FileNotFoundError, match="metrics.json does not exist"):
        plot.main([str(tmp_path / "missing")])
    with pytest.raises(OSError, match="cannot write .*m.png: the folder .*nowhere does not exist"):
        plot.main([str(tmp_path / "a"), "--output", str(tmp_path / "nowhere" / "m.png")])


def test_read_metrics_keeps_what_a_resumed_run_wrote_last(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 1, "a": 1}\n{"iteration": 3, "a": 3}\n{"iteration": 5, "a": 5}\n'
                    '{"iteration": 4, "a": 40}\n{"iteration": 5, "a": 50}\n{"iteration": 6, "a"')
    assert [(r["iteration"], r["a"]) for r in read_metrics(str(path))] == [(1, 1), (3, 3), (4, 40), (5, 50)]
    path.write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.json:2: not a metrics record"):
        read_metrics(str(path))


# ------------------------------------------------------------------------------------------------
# TensorBoard
# ------------------------------------------------------------------------------------------------
def test_training_logs_gate_images_and_histograms_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from msgc.config import get_cfg
    from msgc.engine import DefaultTrainer

    cfg = narrow(get_cfg(), "msgc_resnet18")
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.NUM_CLASSES", "10", "DATASETS.TRAIN", "synthetic",
                         "DATASETS.TEST", "synthetic", "DATASETS.SYNTHETIC_LENGTH", "16",
                         "DATASETS.SYNTHETIC_TEST_LENGTH", "12", "INPUT.TRAIN_SIZE", "16", "INPUT.TEST_RESIZE", "16",
                         "INPUT.TEST_SIZE", "16", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "8",
                         "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "2", "TEST.IMS_PER_BATCH", "6",
                         "TEST.GATE_SUMMARY_IMAGES", "10", "LOG_PERIOD", "2", "SEED", "0",
                         "SOLVER.CHECKPOINT_PERIOD", "100", "OUTPUT_DIR", str(tmp_path)])
    trainer = DefaultTrainer(cfg)
    trainer.train()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    maps = [f"gates/group_wise/layer{i}.1.maskgen2" for i in range(1, 5)]
    assert set(maps) <= set(tags["images"])
    assert "gates/macs_per_image" in tags["histograms"]
    assert "gates/open/layer1.0.maskgen1" in tags["scalars"]
    hist = events.Histograms("gates/macs_per_image")
    assert [h.step for h in hist] == [1, 3]  # the evaluations after iterations 2 and 4
    assert all(h.histogram_value.num == 10 for h in hist)
    image = events.Images(maps[0])[-1]
    assert (image.width, image.height) == (16 * 4, 4 * 12)  # 16 channels x 4 heads, 4 x 12 pixels each
    assert Image.open(__import__("io").BytesIO(image.encoded_image_string)).size == (64, 48)
