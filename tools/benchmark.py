#!/usr/bin/env python
"""Time a model of a config in training, eval or deployed mode, beside its dense host.

    python tools/benchmark.py --config-file CFG [--weights W] --device cpu|cuda --batch-size B \\
        --mode train|eval|deploy [...] --compare-dense [--amp bfloat16|float16] [--channels-last] \\
        [--no-native] [--runtimes eager,compile,onnxruntime,openvino] [--passes N] [--json] [KEY VALUE ...]

Every run (each ``--mode`` given, and the dense host with ``--compare-dense``) is warmed up, then timed
``--iters`` times, the runs taking turns round by round so that a busy machine slows them alike; GPU
work is synchronised before each clock reading. Reported per run: median, quartiles and minimum in
milliseconds per step, and MACs per sample. A step is one forward pass of a batch (eval, deploy, and
the dense host with BatchNorm folded), or forward + backward + SGD step (train, and the dense host in
training mode). Reported too: images per second (batch size over the median step).

``--amp DTYPE`` runs the forward passes under ``torch.autocast`` (training steps in float16 scale the
loss with a ``torch.amp.GradScaler``, as :class:`msgc.engine.AMPTrainer` does), except deploy's, which
stays float32 (deployment's kernels take float32); ``--channels-last``
lays out the models' weights and the batches channels-last (on CUDA the training loader's batches are
channels-last already: :func:`msgc.data.build_normalizer`). ``--no-native`` deploys with PyTorch's
kernels (``deploy(model, native=False)``), which is what deployment on a GPU always runs. ``--device
cuda`` on a machine without CUDA is a one-line error (exit status 2).

The dense host is torchvision's network with the same width and number of classes (BatchNorm folded
into the convolutions for inference), or, where torchvision has none (DenseNet-74, the cifar stem,
ResNet width multipliers), this project's model with ``MODEL.MSGC.GROUPING dense``. For inference it
runs in both memory formats (``dense``: NCHW, ``dense_cl``: channels-last) and the ratios use the
faster. For inference on the CPU, ``--compare-dense`` also times the dense host in the runtimes users
deploy with (``--runtimes``: PyTorch eager in both layouts, ``torch.compile``, ONNX Runtime, OpenVINO
at float32 and at its default precision) and the deployed model, each alone in a fresh process over
``--passes`` alternating passes, checks their logits against PyTorch's and gives deploy's ratio to the
fastest float32 runtime (:mod:`msgc.deploy.runtimes`; ONNX Runtime and OpenVINO: ``pip install -e
".[bench]"``). With ``--compare-dense`` or ``--layers`` it reports the CPU's FMA peak per core for
each kernel variant, and ``--layers`` every convolution's rate as a share of it.

Without ``--weights`` the model keeps random weights and every mask generator's last bias is set to
``--gate-bias`` (0 by default): gate logits centred on 0 close about half of the gated channels, the
operating point of the paper's models. ``MODEL.WEIGHTS`` of the config is ignored: only ``--weights``
loads weights, so the tool never downloads anything by itself.
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time

import torch
from tabulate import tabulate

from msgc.config import load_cfg
from msgc.engine import add_import_argument, import_user_modules
from msgc.utils.env import check_device, cpu_description, describe_cpu
from msgc.utils.errors import ArgumentParser, exit_on_user_error
from msgc.deploy import deploy, native, runtimes as dense_runtimes
from msgc.engine.train_loop import backward_and_step, total_loss
from msgc.modeling import Classifier, build_model
from msgc.modeling.layers import MaskGenerator

def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the model's config (yaml)")
    add_import_argument(parser)
    parser.add_argument("--weights", default="", help="checkpoint to load (default: random weights)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mode", nargs="+", choices=("train", "eval", "deploy"), default=["deploy"],
                        help="one or more of train, eval, deploy")
    parser.add_argument("--compare-dense", action="store_true", help="also time the dense host: in this process, "
                        "in turns with the other runs, and (inference on the CPU) in every runtime of --runtimes, "
                        "each alone in its own process")
    parser.add_argument("--runtimes", type=_runtime_list, default="eager,compile,onnxruntime,openvino",
                        help="with --compare-dense: the runtimes the dense host is timed in, comma-separated, from "
                        "eager (both memory layouts), compile, onnxruntime, openvino (float32 and its default "
                        "precision), or none; deploy is timed the same way (default: all)")
    parser.add_argument("--passes", type=int, default=2, help="with --runtimes: passes over the runtimes, each "
                        "runtime in a fresh process per pass (--warmup and --iters calls each)")
    parser.add_argument("--size", type=int, default=0, help="image side (default INPUT.TEST_SIZE, "
                        "INPUT.TRAIN_SIZE for --mode train)")
    parser.add_argument("--gate-bias", type=float, default=None,
                        help="set mask generators' last bias (default 0 without --weights)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per run")
    parser.add_argument("--iters", type=int, default=50, help="timed steps per run")
    parser.add_argument("--batches", type=int, default=0,
                        help="cycle through this many random batches (default 0: a new batch every step, "
                        "as in deployment; repeated batches let oneDNN reuse kernels built for their "
                        "shapes)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine; "
                        "use with --threads 1, CPU only)")
    parser.add_argument("--isa", default=None, help="native kernel variant for --mode deploy (avx512, avx2, "
                        "portable; default: the best this CPU runs)")
    parser.add_argument("--no-tune", action="store_true", help="deploy with the fixed kernel rule instead of "
                        "measured per-layer choices")
    parser.add_argument("--no-native", action="store_true", help="deploy with PyTorch's kernels "
                        "(deploy(model, native=False); the only choice on a GPU)")
    parser.add_argument("--amp", choices=("none", "bfloat16", "float16"), default="none",
                        help="run the forward passes under torch.autocast in this dtype (float16 training "
                        "steps scale the loss)")
    parser.add_argument("--channels-last", action="store_true",
                        help="models and batches in the channels-last memory format")
    parser.add_argument("--profile", action="store_true", help="also time every op of the deployed program "
                        "(per stage, per kind, slowest ops)")
    parser.add_argument("--layers", action="store_true", help="also give every convolution's MAC rate (GMAC/s of "
                        "the multiply-adds its gates leave, timed alone) beside oneDNN's (PyTorch's convolution, "
                        "channels-last) on the dense layer of the same shape")
    parser.add_argument("--settle-ms", type=float, default=0.0, help="untimed pause before every timed step, so "
                        "that threads a run leaves spinning (OpenMP keeps PyTorch's busy for a while after each "
                        "step) do not spill into the next run's time")
    parser.add_argument("--lead-in", type=int, default=0, help="untimed steps of the same run right before each "
                        "of its timed steps, so that each run is timed in its own steady state (threads the other "
                        "run left spinning have gone idle, its weights are in cache)")
    parser.add_argument("--serving", action="store_true", help="with --runtimes: time every call as in a serving "
                        "loop, right after the batch was decoded from JPEG and normalised with PyTorch (untimed), "
                        "PyTorch's OpenMP workers still spinning")
    parser.add_argument("--contend", action="store_true", help="keep another process busy during the "
                        "measurement (a one-thread eval loop of torchvision's ResNet-18)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE pairs")
    return parser.parse_intermixed_args(argv)


def _runtime_list(text):
    try:
        return dense_runtimes.expand([t.strip() for t in text.split(",") if t.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def setup(args):
    check_device(args.device, "--device")
    cfg = load_cfg(args.config_file, args.opts)
    import_user_modules(cfg, args)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = args.weights
    cfg.freeze()
    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(args.seed)
    return cfg


def build(cfg, args):
    model = build_model(cfg)
    if args.weights:
        from msgc.checkpoint import MSGCCheckpointer

        MSGCCheckpointer(model).load(args.weights)
    bias = args.gate_bias if args.gate_bias is not None else (None if args.weights else 0.0)
    if bias is not None:
        for m in model.modules():
            if isinstance(m, MaskGenerator):
                torch.nn.init.constant_(m.conv[3].bias, bias)
    return model


def dense_host_for_timing(cfg, args, train):
    """The dense host network (:func:`msgc.deploy.runtimes.dense_host`) ready to time: in training mode, or
    torchvision's with BatchNorm folded; and a description of it."""
    spec = dense_runtimes.dense_host(cfg, args.config_file, args.opts)
    net = spec.build().to(cfg.MODEL.DEVICE)
    if train:
        return net.train(), spec.what
    if spec.factory.startswith("torchvision"):
        from torch.fx.experimental.optimization import fuse

        return fuse(net), spec.what + ", BatchNorm folded"
    return net, spec.what


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True)


def autocast(args):
    """The context of every timed forward pass: ``torch.autocast`` in ``--amp``'s dtype, or nothing."""
    if args.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.amp))


def train_step(net, loss_of, args):
    """One SGD step of ``net`` on ``(x, y)``: ``loss_of(net, x, y)`` under ``--amp``, then the trainers'
    :func:`msgc.engine.backward_and_step` (the gradient scaled for float16)."""
    opt = sgd(net)
    scaler = torch.amp.GradScaler(torch.device(args.device).type) if args.amp == "float16" else None

    def step(x, y):
        with autocast(args):
            loss = loss_of(net, x, y)
        backward_and_step(loss, opt, scaler)

    return step


def inference_step(net, args, memory_format=None, amp=True):
    """One forward pass of ``net`` without gradients, under ``--amp`` unless ``amp`` is False (the batch
    in ``memory_format``)."""
    def step(x, y):
        with torch.no_grad(), autocast(args) if amp else contextlib.nullcontext():
            net(x if memory_format is None else x.contiguous(memory_format=memory_format))

    return step


def _msgc_loss(model, x, y):
    return total_loss(model.train()(x, y))


def _dense_loss(net, x, y):
    return torch.nn.functional.cross_entropy(net(x), y)


def runners(cfg, args, model):
    """name -> (step function taking (images, labels), description)."""
    out = {}
    for mode in args.mode:
        if mode == "train":
            out["train"] = (train_step(model, _msgc_loss, args), "forward + backward + SGD step")
        elif mode == "eval":
            # eval mode at every step: a train run of the same round switches the model to training
            out["eval"] = (inference_step(lambda x: model.eval()(x), args),
                           "eval mode (closed channels multiplied by 0)")
        else:
            deployed = deploy(model.eval(), native=False if args.no_native else None, isa=args.isa,
                              tune=not args.no_tune, check=False)
            what = "msgc.deploy.deploy(model)" + (f", {deployed.library.variant} kernels" if deployed.native else
                                                  ", PyTorch kernels")
            out["deploy"] = (inference_step(deployed, args, amp=False), what + ", float32")
            out["deploy"][0].deployed = deployed
    if args.compare_dense:
        train = args.mode == ["train"]
        host, what = dense_host_for_timing(cfg, args, train)
        if train:
            host = host.to(memory_format=_memory_format(args))
            loss_of = _msgc_loss if isinstance(host, Classifier) else _dense_loss  # this project's, or torchvision's
            out["dense"] = (train_step(host, loss_of, args),
                            what + (", channels-last" if args.channels_last else ""))
        else:
            # both memory formats: oneDNN is faster channels-last on some layers and CPUs (max-pooling
            # 112x112 NCHW costs 2.5 ms on the 2-core machine of docs/benchmarks.md), and the ratios take the
            # faster one, so that a layout change is not counted as a saving of deployment
            cl = copy.deepcopy(host).to(memory_format=torch.channels_last)
            for name, net, fmt in (("dense", host, torch.contiguous_format), ("dense_cl", cl, torch.channels_last)):
                out[name] = (inference_step(net, args, fmt),
                             what + (", channels-last" if fmt is torch.channels_last else ""))
    return out


def _memory_format(args):
    return torch.channels_last if args.channels_last else torch.contiguous_format


def batch_source(args, cfg, size, device):
    """step number -> (images, labels): new random ones each step, or cycled through ``--batches``."""
    def make():
        images = torch.randn(args.batch_size, 3, size, size, device=device)
        return (images.contiguous(memory_format=_memory_format(args)),
                torch.randint(cfg.MODEL.NUM_CLASSES, (args.batch_size,), device=device))

    if args.batches <= 0:
        return lambda r: make()
    fixed = [make() for _ in range(args.batches)]
    return lambda r: fixed[r % len(fixed)]


def measure(runs, args, batches, device):
    """Warm-up, then ``iters`` rounds in which every run takes one timed step on the round's batch.
    -> name: [ms]."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {name: [] for name in runs}
    for r in range(args.warmup + args.iters):
        x, y = batches(r)
        for name, (step, _) in runs.items():
            if args.settle_ms > 0:
                time.sleep(args.settle_ms / 1e3)
            for _ in range(args.lead_in):
                step(x, y)
            sync()
            t = clock()
            step(x, y)
            sync()
            if r >= args.warmup:
                times[name].append((clock() - t) * 1e3)
    return times


def quartiles(values) -> list:
    """[p25, median, p75] of ``values`` (one or more), interpolated between the samples: never outside
    their range (the default "exclusive" method extrapolates: [0.1, 1.0] gives p25 = -0.125)."""
    values = list(values)
    return statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3


def summary(ms, batch):
    q = quartiles(ms)
    return {"median_ms": statistics.median(ms), "p25_ms": q[0], "p75_ms": q[2], "min_ms": min(ms),
            "mean_ms": statistics.fmean(ms), "std_ms": statistics.pstdev(ms), "n": len(ms),
            "ms_per_image": statistics.median(ms) / batch, "images_per_s": 1e3 * batch / statistics.median(ms)}


_BUSY = ("import torch, torchvision; torch.set_num_threads(1); net = torchvision.models.resnet18().eval(); "
         "x = torch.randn(1, 3, 224, 224)\nwith torch.no_grad():\n    while True: net(x)")


def contender(on: bool):
    """Another process keeping one core busy (None unless ``on``)."""
    if not on:
        return None
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", _BUSY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)  # its start-up (imports) is not the load we mean
    return proc


def deploy_profile(runs, batches):
    """Every op of the deployed program timed alone on one image: per stage, per kind, slowest ops."""
    from msgc.deploy.profile import by_kind, by_scope, profile

    deployed = runs["deploy"][0].deployed
    if not deployed.native:
        return None
    rows = profile(deployed, batches(0)[0])
    slowest = sorted(rows, key=lambda r: -r["ms"])[:12]
    return {"total_ms": sum(r["ms"] for r in rows), "by_stage": by_scope(rows), "by_kind": by_kind(rows),
            "slowest": slowest}


def useful_macs(op, stats, where) -> float:
    """The multiply-adds a convolution's gates leave for one sample (open inputs x outputs wanted x
    taps x output pixels), whatever its kernel computes beside them."""
    wt = op.weights
    ho, wo = op.out_hw
    heads = wt.heads // op.host_groups  # the set's heads (each over every host group)
    if op.in_set is not None and op.in_set.masked:
        o = where[op.in_set]
        ins = [float(n) for n in stats[o:o + heads]]
    else:
        ins = [float(wt.in_channels * op.host_groups)] * heads
    outs = [wt.per_head * op.host_groups] * heads
    if op.out_set is not None and op.out_set.masked and op.out_mode:
        o, s = where[op.out_set], op.out_set
        outs = [stats[o + s.heads]] if op.out_mode == 1 else stats[o + s.heads + 1:o + s.heads + 1 + s.groups]
    return float(ho * wo * wt.kernel ** 2 * sum(n * m for n, m in zip(ins, outs)) / op.host_groups)


def onednn_ms(op, reps=20) -> float:
    """PyTorch's (oneDNN's) time for the dense layer of ``op``'s shape on one channels-last image."""
    wt = op.weights
    conv = torch.nn.Conv2d(wt.in_channels * op.host_groups, wt.out_channels, wt.kernel, wt.stride, wt.padding,
                           groups=op.host_groups).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, conv.in_channels, op.h, op.w).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(3):
            conv(x)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            conv(x)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def depthwise_macs(op, stats, where) -> float:
    """The multiply-adds of a depthwise convolution on the channels it computes (the union of its set)."""
    wt = op.weights
    ho, wo = op.dst.h, op.dst.w
    c = wt.out_channels
    if op.set is not None and op.set.masked:
        c = stats[where[op.set] + op.set.heads]
    return float(ho * wo * c * wt.kernel ** 2)


def layer_rates(runs, batches):
    """Every convolution of the deployed program on one image: the MACs its gates leave, its time alone
    and rate, and oneDNN's time and rate on the dense layer of the same shape. A fused inverted residual
    is one row (its expansion, depthwise and projection: kind ``fused block``), against oneDNN's two 1x1
    convolutions of its shape (the depthwise left out of oneDNN's time and MACs)."""
    from msgc.deploy.graph import ConvOp
    from msgc.deploy.profile import profile

    deployed = runs["deploy"][0].deployed
    if not deployed.native:
        return None
    x = batches(0)[0][:1]
    plan = deployed.plan(x)
    rows = profile(deployed, x)
    _, stats, _ = plan.program.run(x.float().contiguous())
    stats = stats[0].tolist()
    where = dict(plan.graph.stats_layout())
    ops = plan.graph.ops

    def dense_macs(op):
        wt = op.weights
        ho, wo = op.out_hw
        return float(ho * wo * wt.out_channels * wt.in_channels * wt.kernel ** 2)

    out = []
    for i, (op, row) in enumerate(zip(ops, rows)):
        if row.get("fused"):
            continue
        if row["kind"] == "fused block":
            block = ops[i:i + plan.program.fused_at(i)]
            convs = [o for o in block if isinstance(o, ConvOp)]
            macs = sum(useful_macs(c, stats, where) for c in convs) + sum(
                depthwise_macs(o, stats, where) for o in block if not isinstance(o, ConvOp))
            ref, dense = sum(onednn_ms(c) for c in convs), sum(dense_macs(c) for c in convs)
        else:
            if not isinstance(op, ConvOp):
                continue
            macs, ref, dense = useful_macs(op, stats, where), onednn_ms(op), dense_macs(op)
        out.append({"scope": row["scope"], "op": row["op"], "kernel": row.get("kernel", ""), "kind": row["kind"],
                    "macs": macs, "ms": row["ms"], "gmacs": macs / row["ms"] / 1e6, "onednn_ms": ref,
                    "onednn_gmacs": dense / ref / 1e6, "dense_macs": dense})
    totals = {}
    for kind in ("gated conv", "dense conv", "fused block"):
        sel = [r for r in out if r["kind"] == kind]
        if sel:
            ms, ref = sum(r["ms"] for r in sel), sum(r["onednn_ms"] for r in sel)
            totals[kind] = {"macs": sum(r["macs"] for r in sel), "ms": ms, "onednn_ms": ref,
                            "gmacs": sum(r["macs"] for r in sel) / ms / 1e6,
                            "onednn_gmacs": sum(r["dense_macs"] for r in sel) / ref / 1e6}
    return {"layers": out, "totals": totals}


def compare_runtimes(cfg, args, model, size):
    """The dense host (and deploy, if it is a mode) in every runtime of ``--runtimes``, each alone in its
    own process, ``--passes`` passes (:mod:`msgc.deploy.runtimes`); None where this does not apply."""
    if not (args.compare_dense and args.runtimes and args.device == "cpu" and args.mode != ["train"]):
        return None
    import tempfile

    from msgc.utils.imports import imported_modules

    names = args.runtimes + (["deploy"] if "deploy" in args.mode else [])
    with tempfile.TemporaryDirectory(prefix="msgc-runtimes-") as folder:
        host = dense_runtimes.dense_host(cfg, args.config_file, args.opts)
        deployed = dense_runtimes.ModelSpec("msgc.deploy.runtimes:model_from_config",
                                            {"config_file": os.path.abspath(args.config_file), "opts": args.opts})
        job = dense_runtimes.Job(folder, host, deployed if "deploy" in names else None, batch=args.batch_size,
                                 size=size, threads=torch.get_num_threads(), warmup=args.warmup, iters=args.iters,
                                 seed=args.seed, imports=imported_modules(), serving=args.serving,
                                 deploy_options={"isa": args.isa, "tune": not args.no_tune,
                                                 "native": False if args.no_native else None})
        job.save(host.build(), copy.deepcopy(model).float().to(memory_format=torch.contiguous_format).eval())
        rows = dense_runtimes.measure(job, names, args.passes, log=lambda m: print(m, file=sys.stderr, flush=True))
    return {"passes": args.passes, "iters": args.iters, "warmup": args.warmup, "host": host.what,
            **dense_runtimes.summarise(rows)}


def fma_peaks(args):
    """GMAC/s per core of every kernel variant this CPU runs (with --compare-dense or --layers, on the CPU)."""
    if args.device != "cpu" or not (args.compare_dense or args.layers) or not native.available():
        return None
    return native.fma_peaks()


def with_peak_shares(layers, peaks, deployed, threads):
    """Each layer's and total's rate as a share of the FMA peak of the deployed kernels' variant on the
    threads the layers ran on (``peak_share``)."""
    peak = (peaks or {}).get(deployed.library.variant) if deployed.native else None
    if peak:
        for row in layers["layers"] + list(layers["totals"].values()):
            row["peak_share"] = row["gmacs"] / (peak * threads)
        layers["peak"] = {"variant": deployed.library.variant, "gmacs_per_core": peak, "threads": threads}
    return layers


def mac_stats(model, runs, batches, size):
    """Per-sample MACs (mean over a few batches) of the model and of its deployed version."""
    dense = model.dense_macs(size, size)
    out = {"dense": {"macs": dense, "mac_ratio": 1.0}, "dense_cl": {"macs": dense, "mac_ratio": 1.0}}
    model.eval()
    with torch.no_grad():
        macs = torch.cat([model(b)["macs"] for b in batches]).mean().item()
    for name in runs:
        if name in ("eval", "train"):
            out[name] = {"macs": macs, "mac_ratio": macs / dense}
    if "deploy" in runs:
        deployed = runs["deploy"][0].deployed
        executed = torch.cat([deployed(b)["executed_macs"] for b in batches]).mean().item()
        out["deploy"] = {"macs": macs, "mac_ratio": macs / dense, "executed_macs": executed,
                         "executed_ratio": executed / dense}
    return out


def main(argv=None):
    args = parse_args(argv)
    cfg = setup(args)
    device = torch.device(args.device)
    size = args.size or (cfg.INPUT.TRAIN_SIZE if args.mode == ["train"] else cfg.INPUT.TEST_SIZE)
    model = build(cfg, args).to(memory_format=_memory_format(args))
    batches = batch_source(args, cfg, size, device)
    runs = runners(cfg, args, model)
    macs = mac_stats(model, runs, [batches(r)[0] for r in range(max(1, min(args.batches or 4, 4)))], size)
    busy = contender(args.contend)
    try:
        times = measure(runs, args, batches, device)
        prof = deploy_profile(runs, batches) if args.profile and "deploy" in runs else None
        layers = layer_rates(runs, batches) if args.layers and "deploy" in runs else None
        compared = compare_runtimes(cfg, args, model, size)
        peaks = fma_peaks(args)
    finally:
        if busy is not None:
            busy.kill()
    result = {"config": args.config_file, "opts": args.opts, "device": str(device), "batches": args.batches,
              "settle_ms": args.settle_ms, "lead_in": args.lead_in,
              "threads": torch.get_num_threads(), "clock": args.clock, "batch_size": args.batch_size, "size": size,
              "torch": torch.__version__, "cpu": cpu_description(), "contended": args.contend, "amp": args.amp,
              "channels_last": args.channels_last, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
              else None, "runs": {}}
    for name, (_, what) in runs.items():
        result["runs"][name] = {"what": what, **summary(times[name], args.batch_size), **macs.get(name, {})}
    result["ratios"], result["paired_ratios"] = ratios(result["runs"]), paired_ratios(result["runs"], times)
    if prof is not None:
        result["profile"] = prof
    if peaks is not None:
        result["fma_peak_gmacs"] = peaks
    if layers is not None:
        result["layers"] = with_peak_shares(layers, peaks, runs["deploy"][0].deployed, torch.get_num_threads())
    if compared is not None:
        result["runtimes"] = compared
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(report(result))
    return result


def ratios(runs):
    """Median-time ratios worth reading: each run against the dense host (the faster of its memory
    formats), eval against deploy."""
    med = {k: v["median_ms"] for k, v in runs.items()}
    if "dense_cl" in med:
        med["dense"] = min(med["dense"], med.pop("dense_cl"))
    out = {}
    for name in ("deploy", "eval", "train"):
        if name in med and "dense" in med:
            out[f"{name}/dense"] = med[name] / med["dense"]
    if "eval" in med and "deploy" in med:
        out["eval/deploy"] = med["eval"] / med["deploy"]
    return out


def paired_ratios(runs, times):
    """The same ratios taken round by round (the runs of a round are timed one right after the other, on
    the same batch) -> name: {median, p25, p75}. A busy machine's slow phases, which last seconds to
    minutes, stretch both sides of a round alike, so these are steadier than the ratio of medians."""
    dense = None
    if "dense" in runs:
        dense = "dense"
        if "dense_cl" in runs and runs["dense_cl"]["median_ms"] < runs["dense"]["median_ms"]:
            dense = "dense_cl"
    pairs = [(name, dense) for name in ("deploy", "eval", "train") if name in times and dense]
    if "eval" in times and "deploy" in times:
        pairs.append(("eval", "deploy"))
    out = {}
    for a, b in pairs:
        r = [x / y for x, y in zip(times[a], times[b])]
        q = quartiles(r)
        out[f"{a}/{'dense' if b == dense else b}"] = {"median": statistics.median(r), "p25": q[0], "p75": q[2]}
    return out


def report(result):
    rows = []
    for name, r in result["runs"].items():
        executed = r.get("executed_macs")
        rows.append([name, f"{r['median_ms']:.2f}", f"{r['ms_per_image']:.2f}", f"{r['images_per_s']:.0f}",
                     f"{r['p25_ms']:.2f}-{r['p75_ms']:.2f}",
                     f"{r['min_ms']:.2f}",
                     f"{r['macs'] / 1e6:.1f}" if "macs" in r else "",
                     f"{r['mac_ratio']:.3f}" if "mac_ratio" in r else "",
                     "" if executed is None else f"{executed / 1e6:.1f}", r["what"]])
    head = (f"{result['config']} {' '.join(result['opts'])}: {result['device']}"
            + (f" ({result['gpu']})" if result.get("gpu") else "") + f", {result['threads']} threads, "
            f"{result['clock']} clock, "
            f"batch {result['batch_size']}, {result['size']}x{result['size']}, torch {result['torch']}"
            + (f", autocast {result['amp']}" if result.get("amp", "none") != "none" else "")
            + (", channels-last" if result.get("channels_last") else "")
            + (", another process busy" if result.get("contended") else ""))
    table = tabulate(rows, headers=["run", "median ms", "ms/image", "images/s", "p25-p75", "min", "MMACs/sample",
                                    "MAC ratio", "executed MMACs", "what"])
    lines = [head]
    if result.get("cpu"):
        lines.append("CPU: " + describe_cpu(result["cpu"]))
    lines.append(table)
    for k, v in result["ratios"].items():
        p = result["paired_ratios"].get(k)
        lines.append(f"{k}: {v:.3f}" + ("" if p is None else
                                         f"  (round by round: median {p['median']:.3f}, "
                                         f"IQR {p['p25']:.3f}-{p['p75']:.3f})"))
    prof = result.get("profile")
    if prof:
        lines.append(f"deployed program, ops timed alone on one image: {prof['total_ms']:.2f} ms")
        lines.append("  by stage: " + ", ".join(f"{k} {v:.2f}" for k, v in prof["by_stage"].items()))
        lines.append("  by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in prof["by_kind"].items()))
        lines.append(tabulate([[r["scope"], r["op"], r.get("kernel", ""), f"{r['ms']:.3f}"] for r in prof["slowest"]],
                              headers=["slowest ops", "", "kernel", "ms"]))
    peaks = result.get("fma_peak_gmacs")
    if peaks:
        lines.append("FMA peak per core (one thread, a register-resident loop of 12 vector FMAs): "
                     + ", ".join(f"{v} {g:.1f}" for v, g in peaks.items()) + " GMAC/s")
    layers = result.get("layers")
    if layers:
        lines.append(report_layers(layers))
    if result.get("runtimes"):
        lines.append(report_runtimes(result["runtimes"]))
    return "\n".join(lines)


def report_layers(layers):
    peak = layers.get("peak")
    lines = ["convolutions alone on one image: MACs the gates leave and their rate; oneDNN on the dense layer of the "
             "same shape" + (f"; % peak: the rate over {peak['threads']} x {peak['gmacs_per_core']:.1f} GMAC/s (the "
                             f"{peak['variant']} FMA peak per core x threads)" if peak else "")]

    def share(r):
        return [f"{100 * r['peak_share']:.0f}"] if peak else []

    rows = [[r["scope"], r["op"], r["kernel"], f"{r['macs'] / 1e6:.1f}", f"{r['ms']:.3f}", f"{r['gmacs']:.1f}",
             *share(r), f"{r['onednn_ms']:.3f}", f"{r['onednn_gmacs']:.1f}"] for r in layers["layers"]]
    rows += [["total", kind, "", f"{t['macs'] / 1e6:.1f}", f"{t['ms']:.3f}", f"{t['gmacs']:.1f}", *share(t),
              f"{t['onednn_ms']:.3f}", f"{t['onednn_gmacs']:.1f}"] for kind, t in layers["totals"].items()]
    lines.append(tabulate(rows, headers=["layer", "", "kernel", "MMACs", "ms", "GMAC/s", *(["% peak"] if peak else []),
                                         "oneDNN ms", "oneDNN GMAC/s"]))
    return "\n".join(lines)


def report_runtimes(compared):
    lines = [f"the dense host ({compared['host']}) and deploy, each runtime alone in a fresh process, "
             f"{compared['passes']} passes of {compared['warmup']} + {compared['iters']} calls:"]
    rows = []
    for name, r in compared["rows"].items():
        timed = "median_ms" in r
        rows.append([name, f"{r['median_ms']:.2f}" if timed else "",
                     " ".join(f"{m:.2f}" for m in r["pass_medians_ms"]), f"{r['min_ms']:.2f}" if timed else "",
                     f"{r['error']:.1e} (<= {r['tolerance']:.0e})" if "error" in r else "", r["precision"],
                     r["status"], r["what"]])
    lines.append(tabulate(rows, headers=["runtime", "median ms", "pass medians", "min", "logits vs PyTorch",
                                         "precision", "status", "what"]))
    labels = {"deploy/fastest": "deploy / fastest float32 runtime", "deploy/eager": "deploy / PyTorch eager"}
    for key, r in compared["ratios"].items():
        lo_hi = f" (passes {r['passes'][0]:.3f}-{r['passes'][1]:.3f})" if r["passes"] else ""
        lines.append(f"{labels[key]} ({r['against']}): {r['ratio']:.3f}{lo_hi}")
    return "\n".join(lines)


if __name__ == "__main__":
    with exit_on_user_error():  # bad input (a config key, a weights file, ...): one line, exit status 2
        main(sys.argv[1:])
