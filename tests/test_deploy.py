"""Deployment: the deployed network gives the eval model's outputs while computing only what the
gates keep; the training path's per-sample-weight convolution equals the broadcast one; the benchmark
tool runs end to end."""
import json

import pytest
import torch
from torch import nn

from conftest import narrow
from msgc.deploy import deploy, native
from msgc.modeling import GROUPING_REGISTRY, build_model
from msgc.modeling.grouping import MSGCGrouping
from msgc.modeling.layers import AttentionGenerator, MaskGenerator, gate_heads, gated_conv

BACKBONES = ["msgc_resnet18", "msgc_resnet34", "msgc_resnet50", "msgc_resnet101", "msgc_mobilenetv2",
             "msgc_condensenet"]
GROUPINGS = ["msgc", "prune", "static", "dense"]
SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small(cfg, name, grouping="msgc", attention="none"):
    narrow(cfg, name, grouping, attention)
    torch.manual_seed(0)  # the same weights whatever ran before (a gate within rounding of 0 may flip)
    return build_model(cfg)


def randomize(model, seed=0):
    """BatchNorm statistics, gate logits centred on 0 (about half the gates close, differently for
    each sample) and attention around 1, all random; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.8)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.3)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, MaskGenerator):  # sensitive to the context, so that samples differ
                m.conv[0].weight.normal_(0, 1.0, generator=g)
                m.conv[1].running_var.fill_(0.01)
                m.conv[3].weight.normal_(0, 1.0, generator=g)
                m.conv[3].bias.normal_(0, 0.3, generator=g)
            if isinstance(m, AttentionGenerator):
                m.conv[3].weight.normal_(0, 0.1, generator=g)
    return model.eval()


def images(n=3, seed=1):
    """Random images with per-sample colour offsets, so that pooled contexts (and gates) differ."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g) + 2 * torch.randn(n, 3, 1, 1, generator=g)


def check_same(model, x, tune=False):
    """Every kernel variant this CPU runs, and PyTorch's kernels, give the eval model's outputs: logits
    within 1e-4, the paper's MACs bit for bit. On a GPU: PyTorch's kernels alone."""
    with torch.no_grad():
        want = model(x)
    assert want["logits"].abs().max() > 1e-2  # a difference below 1e-4 must mean something
    on_cpu = x.device.type == "cpu"
    assert not on_cpu or native.available(), native.status()  # CI has a C compiler: the native path must be tested
    got = None
    for isa in [None] + (native.variants() if on_cpu else []):
        deployed = deploy(model, native=isa is not None, isa=isa, tune=tune)
        got = deployed(x)
        torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-4)
        assert torch.equal(got["macs"], want["macs"])
    return got


@pytest.mark.parametrize("attention", ["none", "channel"])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("name", BACKBONES)
def test_deployed_equals_eval(cfg, name, grouping, attention, device):
    model = randomize(small(cfg, name, grouping, attention)).to(device)
    got = check_same(model, images().to(device))
    gap = (got["executed_macs"] / got["macs"] - 1).abs()
    # tiny widths make the attention fold's count differ most (see test_executed_macs_at_full_size)
    assert gap.max() < 0.05, gap
    if grouping in ("msgc", "prune"):  # gates close some channels, differently for each sample
        if "mobilenet" not in name:  # (random narrow MobileNetV2 blocks wash out sample differences)
            assert len(set(got["macs"].tolist())) > 1
        static = model.backbone.complexity(SIZE, SIZE)
        assert got["macs"].max() < 0.95 * (static.main + static.dgc + static.gen)


@pytest.mark.parametrize("name", ["msgc_resnet18", "msgc_resnet50"])
def test_msgc_heads_keeps_the_first_convolutions_dense(cfg, name):
    """The ablation grouping: no single-head input mask anywhere, per-sample head masks everywhere
    msgc has them, and the deployed network equals the eval model."""
    model = randomize(small(cfg, name, "msgc_heads", "none"))
    generators = lambda m, heads: {n for n, g in m.named_modules() if isinstance(g, MaskGenerator) and heads(g.heads)}  # noqa: E731
    reference = small(cfg, name, "msgc", "none")
    assert generators(reference, lambda h: h == 1) and not generators(model, lambda h: h == 1)
    assert generators(model, lambda h: h > 1) == generators(reference, lambda h: h > 1)
    got = check_same(model, images())
    assert len(set(got["macs"].tolist())) > 1


def _mask_generators(model):
    return [m for m in model.modules() if isinstance(m, MaskGenerator)]


@pytest.mark.parametrize("name", ["msgc_resnet18", "msgc_resnet50", "msgc_mobilenetv2", "msgc_condensenet"])
def test_head_with_every_gate_closed(cfg, name):
    model = randomize(small(cfg, name, "msgc", "channel"))
    closed = 0
    with torch.no_grad():
        for gen in _mask_generators(model):
            if gen.heads > 1:  # close every channel of head 0 of every multi-head mask
                gen.conv[3].bias.view(gen.heads, -1)[0] = -1e4
                closed += 1
    assert closed
    x = images()
    got = check_same(model, x)
    ctx = {}  # and check on one block that head 0 really was closed in eval
    gen = next(g for g in _mask_generators(model) if g.heads > 1)
    hook = gen.register_forward_hook(lambda m, i, o: ctx.setdefault("mask", o))
    with torch.no_grad():
        model(x)
    hook.remove()
    assert ctx["mask"][:, 0].sum() == 0 and ctx["mask"][:, 1:].sum() > 0
    assert (got["executed_macs"] / got["macs"] - 1).abs().max() < 0.05


@pytest.mark.parametrize("name", ["msgc_resnet18", "msgc_resnet50", "msgc_mobilenetv2", "msgc_condensenet"])
def test_every_gate_open(cfg, name):
    model = randomize(small(cfg, name, "msgc", "none"))
    with torch.no_grad():
        for gen in _mask_generators(model):
            gen.conv[3].bias.fill_(1e4)
    got = check_same(model, images(2))
    # every gated convolution runs at full width: the paper's count is the dense host's plus the
    # generators (and the context pooling)
    static = model.backbone.complexity(SIZE, SIZE)
    torch.testing.assert_close(got["macs"], torch.full((2,), float(static.main + static.dgc + static.gen),
                                                        dtype=torch.float64))


@pytest.mark.parametrize("config", ["msgc_r18_att", "msgc_r50", "msgc_mbv2_att", "msgc_condensenet"])
def test_executed_macs_at_full_size(cfg, config):
    """At the paper's sizes the MACs the deployed network runs agree with the paper's count within 2%
    per sample (the gaps: attention folded into weights instead of multiplying activations, folded
    BatchNorm on the computed channels only)."""
    import os

    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "configs", f"{config}.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    model = randomize(build_model(cfg))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    got = check_same(model, x)
    ratio = got["macs"] / model.dense_macs(224, 224)
    assert (ratio < 0.9).all() and (ratio > 0.3).all()
    assert (got["executed_macs"] / got["macs"] - 1).abs().max() < 0.02


@pytest.mark.parametrize("name", ["msgc_resnet18", "msgc_condensenet"])
def test_batch_parallel_equals_sample_by_sample(cfg, name):
    """With at least as many samples as threads, every thread runs whole groups of samples (each alone
    through the first ops, then op by op from the program's group_from on); with one thread, groups
    one after the other: the same outputs as one sample at a time."""
    model = randomize(small(cfg, name, "msgc", "channel"))
    deployed, x = deploy(model, tune=False), images(5)
    torch.set_num_threads(2)
    try:
        whole = deployed(x)
        program = deployed.plan(x).program.program
        assert 0 < program.group_from < program.n_ops and program.group > 1  # both orders run
    finally:
        torch.set_num_threads(1)
    serial = deployed(x)
    torch.testing.assert_close(serial["logits"], whole["logits"], rtol=0, atol=1e-6)
    for i in range(5):
        one = deployed(x[i:i + 1])
        torch.testing.assert_close(one["logits"], whole["logits"][i:i + 1], rtol=0, atol=1e-6)
        assert one["macs"].item() == whole["macs"][i].item()
        assert one["executed_macs"].item() == whole["executed_macs"][i].item()


def test_a_subclass_of_a_registered_backbone_deploys(cfg):
    from msgc.modeling.backbone.resnet import MSGCResNet

    model = randomize(small(cfg, "msgc_resnet18", "msgc", "none"))

    class MyResNet(MSGCResNet):  # found through the class hierarchy
        pass

    model.backbone.__class__ = MyResNet
    check_same(model, images())


def test_a_backbone_without_deployer_is_a_clear_error(cfg):
    from msgc.modeling import Backbone, Classifier

    class Plain(Backbone):
        def __init__(self):
            super().__init__(1)

    with pytest.raises(ValueError, match=r"no deployer for the backbone .*Plain: a chain of blocks deploys with "
                                         r".*it lacks stem_layers, blocks, fc, stem_macs; or register one "
                                         r"with @msgc.deploy.BACKBONE_DEPLOYERS.register\(Plain\)"):
        deploy(Classifier(Plain()).eval())


def test_another_input_size_makes_another_plan(cfg):
    model = randomize(small(cfg, "msgc_resnet50", "msgc", "channel"))
    deployed = deploy(model, tune=False)
    for size in (16, 24, 16):
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size)) + 1
        want, got = model(x), deployed(x)
        torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-4)
        assert torch.equal(got["macs"], want["macs"])
    assert {k[:2] for k in deployed._plans} == {(16, 16), (24, 24)}


def test_the_kernel_choice_avoids_a_slow_candidate(cfg, tmp_path):
    """Each convolution's kernel is the fastest measured; a candidate made artificially slow is not
    chosen, and the choices are cached per machine (a second plan measures nothing)."""
    from msgc.deploy.native.program import Program
    from msgc.deploy.tune import PlanCache, candidates, tune

    model = randomize(small(cfg, "msgc_resnet18", "msgc", "channel"))
    deployed = deploy(model, tune=False)
    graph = deployed.deployer.graph(SIZE, SIZE)
    x = images(1).contiguous()
    cache = PlanCache(str(tmp_path / "plans.json"))
    program = Program(graph, deployed.library)
    first = tune(program, x, 1, cache)  # layers of the same shape and open fraction share a choice
    assert first["measured"] + first["cached"] == len(program.conv_ops)
    assert first["measured"] > len(program.conv_ops) / 2
    chosen = [(op.kernel, op.tiles) for _, op in program.conv_ops]
    slow = {(i, *c): 1e9 for i, c in enumerate(chosen)}  # a second of delay for every first choice
    counts = tune(program, x, 1, cache, slow=slow)
    assert counts["measured"] == len(chosen)
    for i, (_, op) in enumerate(program.conv_ops):
        assert (op.kernel, op.tiles) != chosen[i]
        assert (op.kernel, op.tiles) in candidates(op, deployed.library.tile_families)
    again = Program(graph, deployed.library)
    assert tune(again, x, 1, PlanCache(cache.path)) == {"measured": 0, "cached": len(chosen)}
    assert [(op.kernel, op.tiles) for _, op in again.conv_ops] == chosen
    torch.testing.assert_close(again.run(x)[0], program.run(x)[0], rtol=0, atol=1e-5)


class DeployClock:
    """``time`` for msgc.deploy.build, whose perf_counter is the real clock plus the time that a test adds
    (``real=False``: the added time alone), so that a test decides which side of a timing is slower
    whatever else the machine is doing."""

    def __init__(self, real: bool = True):
        import time

        self.real, self.added, self._time = real, 0.0, time

    def perf_counter(self):
        return (self._time.perf_counter() if self.real else 0.0) + self.added

    def __getattr__(self, name):
        return getattr(self._time, name)


def test_the_plan_cache_of_one_cpu_name_is_split_by_family_and_model(monkeypatch, tmp_path):
    """Zen 4 and Zen 5 EPYCs are both "AMD EPYC": their measured plans must not share a file."""
    import msgc.deploy.tune as tune_module

    monkeypatch.setenv("MSGC_CACHE", str(tmp_path))
    paths = {}
    for family, model in ((25, 17), (26, 2), (25, 17)):
        info = {"machine": "x86_64", "cpu": "AMD EPYC", "cpu_family": family, "cpu_model": model, "isa": "avx512"}
        monkeypatch.setattr(tune_module, "machine_info", lambda info=info: dict(info, threads=2, torch="2.14.1"))
        paths.setdefault((family, model), set()).add(tune_module.PlanCache().path)
    assert len(paths[(25, 17)]) == 1 and paths[(25, 17)] != paths[(26, 2)]


def test_a_deployed_model_slower_than_eval_says_so_and_runs_eval(cfg, monkeypatch, caplog):
    import msgc.deploy.build
    from msgc.deploy.native.program import Program

    model = randomize(small(cfg, "msgc_resnet18", "msgc", "none"))
    deployed = deploy(model, tune=False, check=True)
    run, clock = Program.run, DeployClock()

    def slow_run(self, *args, **kwargs):
        clock.added += 10.0  # ten seconds more than it took, on the plan's clock only
        return run(self, *args, **kwargs)

    monkeypatch.setattr(msgc.deploy.build, "time", clock)
    monkeypatch.setattr(Program, "run", slow_run)
    x = images(2)
    with caplog.at_level("WARNING"):
        got = deployed(x)
    assert "running the eval model instead" in caplog.text and "ms per image" in caplog.text
    assert len(caplog.records) == 1 and "the dense host" in caplog.text
    timings = deployed.plan(x).timings
    assert timings["deployed_ms"] > timings["eval_ms"] > 0 and timings["dense_ms"] > 0
    want = model(x)
    assert torch.equal(got["logits"], want["logits"]) and torch.equal(got["macs"], want["macs"])
    static = model.backbone.complexity(SIZE, SIZE)
    assert (got["executed_macs"] == static.main + static.dgc + static.gen).all()


@pytest.mark.parametrize("split_is_slow", [True, False])
def test_small_batches_run_on_one_thread_where_splitting_the_ops_is_slower(cfg, monkeypatch, tmp_path, split_is_slow):
    """The plan times one sample with its ops split over the threads against one thread (either made
    20 ms slower here, on the plan's clock, which counts 1 ms for the other); where the split is slower,
    batches of fewer samples than threads run on one thread, larger ones still on all. The choice is kept
    in the plan cache: a second process (here a second deploy) runs the same plan without measuring,
    even where its own measurement would have gone the other way."""
    import msgc.deploy.build
    from msgc.deploy.native.program import Program

    model = randomize(small(cfg, "msgc_resnet18", "msgc", "none"))
    run, calls, clock = Program.run, [], DeployClock(real=False)

    def timed_run(self, images, threads=0, keep=False):
        calls.append((images.size(0), threads))
        slow = images.size(0) == 1 and (threads > 1) == split_is_slow  # the one made slow: split, or one thread
        clock.added += 0.021 if slow else 0.001
        return run(self, images, threads, keep)

    monkeypatch.setattr(msgc.deploy.build, "time", clock)
    monkeypatch.setattr(Program, "run", timed_run)
    plans = str(tmp_path / "plans.json")
    torch.set_num_threads(2)
    try:
        deployed = deploy(model, tune=True, check=False, plans=plans)
        one, two = images(1), images(2)
        got_one, got_two = deployed(one), deployed(two)
        ran, plan = calls[-2:], deployed.plan(one)
        split_is_slow = not split_is_slow  # the next measurement would choose the other way
        calls.clear()
        again = deploy(model, tune=True, check=False, plans=plans).plan(one)
    finally:
        torch.set_num_threads(1)
    split_is_slow = not split_is_slow
    assert plan.threads == 2 and plan.op_threads == (1 if split_is_slow else 2)
    if split_is_slow:
        assert (plan.timings["split_ms"], plan.timings["one_thread_ms"]) == pytest.approx((21.0, 1.0))
    assert ran == [(1, plan.op_threads), (2, 2)]
    assert (again.op_threads, again.timings) == (plan.op_threads, plan.timings)
    assert len(calls) == 1  # the tuner's one run of the sample; no thread timing
    for x, got in ((one, got_one), (two, got_two)):
        want = model(x)
        torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-4)
        assert torch.equal(got["macs"], want["macs"])


def test_splitting_pays_unless_one_thread_is_clearly_faster():
    from msgc.deploy.build import split_pays

    assert split_pays(10.0, 12.0) and split_pays(10.4, 10.0)  # within the 5% margin: keep all threads
    assert not split_pays(10.6, 10.0) and not split_pays(16.0, 11.0)


def test_deploy_refuses_a_training_model(cfg):
    model = small(cfg, "msgc_resnet18").train()
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        deploy(model)
    with pytest.raises(ValueError, match="expected a msgc Classifier"):
        deploy(nn.Linear(2, 2).eval())


def test_deployed_model_refuses_training(cfg):
    deployed = deploy(small(cfg, "msgc_resnet18").eval())
    with pytest.raises(RuntimeError, match="inference-only"):
        deployed.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        deployed(images(2), torch.tensor([0, 1]))
    deployed.eval()  # allowed: it already is
    assert not deployed.training and not any(m.training for m in deployed.modules())
    assert not list(deployed.parameters())


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning", "ignore:The tensor attributes:UserWarning")
def test_graph_capture_is_a_clear_error(cfg):
    """Per-sample shapes cannot be captured in a graph: the deployed model says so, and the source
    model (eval mode) traces and exports instead."""
    model = small(cfg, "msgc_resnet18").eval()
    deployed, x = deploy(model), images(1)
    with pytest.raises(RuntimeError, match="cannot be traced"):
        torch.jit.trace(deployed, x, strict=False)
    with pytest.raises(RuntimeError, match="cannot be scripted"):
        torch.jit.script(deployed)
    exported = torch.export.export(model, (x,))
    y = images(1, seed=7)
    torch.testing.assert_close(exported.module()(y)["logits"], model(y)["logits"])


class _OddMask(nn.Module):
    macs = 0

    def __init__(self, channels, heads):
        super().__init__()
        self.heads, self.channels = heads, channels

    def forward(self, context):
        return context.new_ones(context.size(0), self.heads, self.channels)


def test_unsupported_grouping_is_a_clear_error(cfg):
    @GROUPING_REGISTRY.register("odd_for_deploy_test")
    class OddGrouping(MSGCGrouping):
        def head_mask(self, in_channels, channels, reduction):
            return _OddMask(channels, self.heads)

    try:
        model = small(cfg, "msgc_resnet18", "odd_for_deploy_test").eval()
        with pytest.raises(ValueError, match=r"layer1\.0\.maskgen2 is a _OddMask; deploy supports"):
            deploy(model)
    finally:
        GROUPING_REGISTRY._obj_map.pop("odd_for_deploy_test")


@pytest.mark.parametrize("shape", [(4, 8, 8, 16, 4, 3, 1), (3, 16, 8, 9, 4, 3, 2), (2, 12, 24, 10, 4, 1, 1),
                                   (2, 64, 64, 4, 4, 3, 1)])
def test_gated_conv_equals_the_broadcast(shape, device):
    """Both paths of the training-time MSGC convolution (per-sample weights where they are smaller, the
    heads' broadcast input elsewhere; the last shape takes the broadcast) match conv(gate_heads(...)) in
    values and gradients (on a GPU: cuDNN's convolution with groups = N x heads)."""
    n, c, o, h, heads, k, stride = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c * heads, o, k, stride, k // 2, groups=heads, bias=False).to(device)
    x = torch.randn(n, c, h, h, device=device, requires_grad=True)
    mask = (torch.rand(n, heads, c, device=device) > 0.5).float().requires_grad_()
    att = torch.rand(n, heads, c, device=device, requires_grad=True)
    want = conv(gate_heads(x, mask, att, heads))
    got = gated_conv(conv, x, mask, att)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    inputs = (x, mask, att, conv.weight)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups,scaled", [(1, False), (1, True), (2, False), (2, True)])
def test_gate_heads_keeps_a_channels_last_input_channels_last(groups, scaled):
    """A channels-last input (the Normalizer's layout on CUDA) gives the same values as a contiguous one,
    channels-last, and gated_conv takes it on both of its paths."""
    n, c, heads, side = 2, 8, 2, 5
    torch.manual_seed(0)
    x = torch.randn(n, c, side, side)
    scale = torch.rand(n, heads, c) if scaled else None
    x_cl = x.contiguous(memory_format=torch.channels_last)
    want, got = gate_heads(x, scale, None, heads, groups), gate_heads(x_cl, scale, None, heads, groups)
    assert got.shape == (n, heads * c, side, side)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    conv = nn.Conv2d(c * heads, 4 * groups, 3, 1, 1, groups=heads * groups, bias=False)
    for small in (x_cl[:, :, :1, :1], x_cl):  # the broadcast (1x1 maps), then per-sample weights
        mask = torch.rand(n, heads, c)
        torch.testing.assert_close(gated_conv(conv, small, mask, None, heads),
                                   conv(gate_heads(small.contiguous(), mask, None, heads, groups)),
                                   rtol=1e-5, atol=1e-5)


def _benchmark_tool(tmp_path):
    """tools/benchmark.py as a module, and a tiny config for it."""
    from conftest import load_tool

    tool = load_tool("benchmark")
    config = tmp_path / "tiny.yaml"
    config.write_text("MODEL:\n  BACKBONE:\n    NAME: msgc_resnet18\n    STEM: cifar\n    WIDTH_MULT: 0.25\n"
                      "  NUM_CLASSES: 10\n  MSGC:\n    ATTENTION: channel\n")
    return tool, config


def test_benchmark_tool_runs(tmp_path, capsys):
    tool, config = _benchmark_tool(tmp_path)
    result = tool.main(["--config-file", str(config), "--mode", "train", "eval", "deploy", "--compare-dense",
                        "--size", "16", "--batch-size", "2", "--iters", "2", "--warmup", "1", "--batches", "2",
                        "--threads", "1", "--runtimes", "none", "--json", "SOLVER.IMS_PER_BATCH", "2"])
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{\n"):])  # (log lines of earlier tests' handlers may come first)
    # the dense host in both memory formats; the ratios use the faster
    assert printed["runs"].keys() == {"train", "eval", "deploy", "dense", "dense_cl"} == result["runs"].keys()
    for run in printed["runs"].values():
        assert run["n"] == 2 and 0 < run["min_ms"] <= run["median_ms"]
    assert "MODEL.MSGC.GROUPING dense" in printed["runs"]["dense"]["what"]
    assert 0.2 < printed["runs"]["deploy"]["mac_ratio"] < 0.95
    assert set(printed["ratios"]) == {"deploy/dense", "eval/dense", "train/dense", "eval/deploy"}
    fastest = min(printed["runs"][k]["median_ms"] for k in ("dense", "dense_cl"))
    assert printed["ratios"]["eval/dense"] == printed["runs"]["eval"]["median_ms"] / fastest
    assert printed["paired_ratios"].keys() == printed["ratios"].keys()
    for p in printed["paired_ratios"].values():
        assert 0 < p["p25"] <= p["median"] <= p["p75"]
    # round by round: a slow phase that stretches a whole round cancels out
    times = {"deploy": [6.0, 60.0, 6.0], "dense": [10.0, 100.0, 12.0], "dense_cl": [9.0, 90.0, 9.0],
             "eval": [12.0, 120.0, 12.0]}
    runs = {k: {"median_ms": sorted(v)[1]} for k, v in times.items()}
    paired = tool.paired_ratios(runs, times)
    assert paired["deploy/dense"]["median"] == pytest.approx(6.0 / 9.0)  # against the faster layout
    assert paired["eval/deploy"]["median"] == pytest.approx(2.0)


def test_benchmark_quartiles_stay_within_the_samples(tmp_path):
    """1, 2 and 3 samples: the quartiles interpolate between the samples, never beyond them (the default
    of statistics.quantiles gives -0.125 as the p25 of [0.1, 1.0], a negative quartile of a ratio)."""
    tool, _ = _benchmark_tool(tmp_path)
    assert tool.quartiles([0.5]) == [0.5, 0.5, 0.5]
    assert tool.quartiles([0.1, 1.0]) == pytest.approx([0.325, 0.55, 0.775])
    assert tool.quartiles([3.0, 1.0, 2.0]) == pytest.approx([1.5, 2.0, 2.5])
    times = {"deploy": [1.0, 10.0], "dense": [10.0, 10.0]}
    paired = tool.paired_ratios({"dense": {"median_ms": 10.0}}, times)["deploy/dense"]
    assert (paired["p25"], paired["median"], paired["p75"]) == pytest.approx((0.325, 0.55, 0.775))
    assert tool.summary([4.0, 2.0], batch=2)["p25_ms"] == pytest.approx(2.5)


@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
def test_benchmark_tool_trains_under_autocast_channels_last(tmp_path, capsys, amp, device):
    """The GPU benchmark's settings (on the CPU here, unless pytest --device cuda): training steps under
    autocast (float16 with a GradScaler), models and batches channels-last, against the dense host (this
    project's, which needs labels in training), and deploy with PyTorch's kernels in float32."""
    tool, config = _benchmark_tool(tmp_path)
    common = ["--config-file", str(config), "--device", str(device), "--compare-dense", "--size", "16",
              "--batch-size", "2", "--iters", "2", "--warmup", "1", "--threads", "1", "--amp", amp, "--channels-last",
              "--runtimes", "none", "--json"]
    result = tool.main(common + ["--mode", "train"])
    assert result["runs"].keys() == {"train", "dense"} and (result["amp"], result["channels_last"]) == (amp, True)
    assert "channels-last" in result["runs"]["dense"]["what"] and "train/dense" in result["ratios"]
    for run in result["runs"].values():
        assert run["images_per_s"] == pytest.approx(1e3 * 2 / run["median_ms"])
    result = tool.main(common + ["--mode", "eval", "deploy", "--no-native"])
    assert "PyTorch kernels, float32" in result["runs"]["deploy"]["what"]
    assert 0.2 < result["runs"]["deploy"]["mac_ratio"] < 0.95
    capsys.readouterr()


@pytest.mark.parametrize("name", ["msgc_resnet50", "msgc_mobilenetv2", "msgc_condensenet"])
def test_every_kernel_choice_gives_the_eval_outputs(cfg, name):
    """Whichever candidate the tuner picks for a layer, the outputs are the eval model's: every
    convolution set to each candidate in turn (where it applies), every variant this CPU runs."""
    from msgc.deploy.tune import candidates

    model = randomize(small(cfg, name, "msgc", "channel"))
    x = images(2)
    with torch.no_grad():
        want = model(x)
    for isa in native.variants():
        deployed = deploy(model, isa=isa, tune=False)
        plan = deployed.plan(x)
        ops = plan.program.conv_ops
        for cand in candidates(ops[0][1], deployed.library.tile_families):
            for i, (_, op) in enumerate(ops):
                ok = cand in candidates(op, deployed.library.tile_families)
                plan.program.set_kernel(i, *(cand if ok else (0, 0)))
            got = deployed(x)
            torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-4)
            assert torch.equal(got["macs"], want["macs"])


_OPENMP_SCRIPT = """
import os, torch
from msgc.deploy.native.openmp import openmp_runtime, release_openmp_workers
threads = lambda: len(os.listdir("/proc/self/task"))
if openmp_runtime() is None:
    print("none"); raise SystemExit
torch.set_num_threads(2)
a = torch.randn(512, 512)
base = threads()
a.mul(2).add_(1)  # a parallel op: PyTorch's team has its worker
with_team = threads()
ok = release_openmp_workers()
released = threads()
again = a.mul(2).add(1)
print(base, with_team, int(ok), released, threads(), bool(torch.equal(again, a * 2 + 1)))
"""


@pytest.mark.skipif(not native.available(), reason="no native kernels")
def test_a_call_on_two_threads_ends_pytorchs_idle_openmp_team_first(cfg, monkeypatch):
    """Before the native program runs on two threads it ends PyTorch's idle OpenMP team
    (msgc/deploy/native/openmp.py), not on one thread; in a fresh process (thread counts there do not
    depend on what ran before) the release ends the worker PyTorch's parallel op left, and PyTorch's next
    parallel op starts it again with the same results."""
    import os
    import subprocess
    import sys

    from msgc.deploy.native import program

    calls = []
    monkeypatch.setattr(program, "release_openmp_workers", lambda: calls.append(1))
    deployed, x = deploy(randomize(small(cfg, "msgc_resnet18")), tune=False), images(2)
    torch.set_num_threads(2)
    try:
        two = deployed(x)["logits"]
    finally:
        torch.set_num_threads(1)
    assert calls == [1]
    torch.testing.assert_close(deployed(x)["logits"], two, rtol=0, atol=1e-6)
    assert calls == [1]  # one thread: nothing to release
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("no /proc: thread counts are not visible here")
    out = subprocess.run([sys.executable, "-c", _OPENMP_SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MSGC_RELEASE_OPENMP": "1"}).stdout.split()
    if out == ["none"]:
        pytest.skip("PyTorch's OpenMP runtime has no omp_pause_resource_all here")
    base, with_team, ok, released, restarted = map(int, out[:5])
    assert with_team > base and ok == 1 and released < with_team and restarted > released, out
    assert out[5] == "True"


@pytest.mark.skipif(not native.available(), reason="no native kernels")
@pytest.mark.parametrize("attention", ["none", "channel"])
def test_fused_inverted_residuals_equal_the_unfused_ops(cfg, attention):
    """MobileNetV2's inverted residuals fused (expansion, depthwise and projection stripe by stripe, the
    first block's depthwise and projection; threads taking bands of rows: msgc/deploy/csrc/program.c)
    give the outputs, stats and executed MACs of their ops one after the other: stride-1 and stride-2
    blocks on odd and even maps, one stripe per block or stripes of 1 to 3 rows, on 1 and 2 threads
    (bands, the rows two bands share computed once), batches of 1 and 3, every projection kernel."""
    from msgc.deploy.native.program import KERNEL_GATHER, KERNEL_PACKED, KERNEL_PIXEL, KERNEL_WIDE

    model = randomize(small(cfg, "msgc_mobilenetv2", "msgc", attention))
    for size in (17, 16):
        g = torch.Generator().manual_seed(size)
        x = torch.randn(3, 3, size, size, generator=g) + 2 * torch.randn(3, 3, 1, 1, generator=g)
        with torch.no_grad():
            want = model(x)
        deployed = deploy(model, tune=False)
        program = deployed.plan(x).program
        strides = {program.graph.ops[b.number + b.span - 2].weights.stride for b in program.blocks}
        assert [b.span for b in program.blocks] == [2] + [3] * 16 and strides == {1, 2}
        program.block_on = [True] * len(program.blocks)  # the rule leaves such small maps unfused
        last = {b.number + b.span - 1 for b in program.blocks}
        projections = [j for j, (n, _) in enumerate(program.conv_ops) if n in last]
        for kernel in (KERNEL_PIXEL, KERNEL_WIDE, KERNEL_PACKED, KERNEL_GATHER):
            for j in projections:
                program.set_kernel(j, kernel, 0)
            for threads in (1, 2):
                for n in (1, 3):
                    batch = x[:n].contiguous()
                    program.fuse(False)
                    logits, stats, executed = program.run(batch, threads=threads)
                    for rows in (0, 1, 2, 3):
                        program.fuse(True)
                        program.fuse_rows(rows)
                        got = program.run(batch, threads=threads)
                        torch.testing.assert_close(got[0], logits, rtol=0, atol=1e-6)
                        assert torch.equal(got[1], stats) and torch.equal(got[2], executed)
                        torch.testing.assert_close(got[0], want["logits"][:n], rtol=0, atol=1e-4)
        program.fuse_rows(0)
        out = deployed(x)  # through the deployed model: the eval model's paper MACs
        assert program.fused and torch.equal(out["macs"], want["macs"])
        torch.testing.assert_close(out["logits"], want["logits"], rtol=0, atol=1e-4)
    # the profile shows a fused block as one row, its depthwise and projection within it
    from msgc.deploy.profile import profile

    rows = profile(deployed, x, reps=1)
    assert [r["kind"] for r in rows].count("fused block") == len(program.blocks)
    assert all(rows[j]["ms"] == 0 and rows[j]["fused"] for b in program.blocks
               for j in range(b.number + 1, b.number + b.span))
