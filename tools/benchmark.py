#!/usr/bin/env python
"""Time a model of a config in training, eval or deployed mode, beside its dense host.

    python tools/benchmark.py --config-file CFG [--weights W] --device cpu|cuda --batch-size B \\
        --mode train|eval|deploy [...] --compare-dense [--json] [KEY VALUE ...]

Every run (each ``--mode`` given, and the dense host with ``--compare-dense``) is warmed up, then timed
``--iters`` times, the runs taking turns round by round so that a busy machine slows them alike; GPU
work is synchronised before each clock reading. Reported per run: median, quartiles and minimum in
milliseconds per step, and MACs per sample. A step is one forward pass of a batch (eval, deploy, and
the dense host with BatchNorm folded), or forward + backward + SGD step (train, and the dense host in
training mode).

The dense host is torchvision's network with the same width and number of classes (BatchNorm folded
into the convolutions for inference), or, where torchvision has none (DenseNet-74, the cifar stem,
ResNet width multipliers), this project's model with ``MODEL.MSGC.GROUPING dense``. For inference it
runs in both memory formats (``dense``: NCHW, ``dense_cl``: channels-last) and the ratios use the
faster.

Without ``--weights`` the model keeps random weights and every mask generator's last bias is set to
``--gate-bias`` (0 by default): gate logits centred on 0 close about half of the gated channels, the
operating point of the paper's models. ``MODEL.WEIGHTS`` of the config is ignored: only ``--weights``
loads weights, so the tool never downloads anything by itself.
"""
import copy
import json
import os
import statistics
import sys
import time

import torch
from tabulate import tabulate

from msgc.config import load_cfg
from msgc.utils.env import check_device
from msgc.utils.errors import ArgumentParser, exit_on_user_error
from msgc.deploy import deploy
from msgc.modeling import build_model
from msgc.modeling.layers import MaskGenerator

_TORCHVISION = {"msgc_resnet18": "resnet18", "msgc_resnet34": "resnet34", "msgc_resnet50": "resnet50",
                "msgc_resnet101": "resnet101", "msgc_mobilenetv2": "mobilenet_v2"}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the model's config (yaml)")
    parser.add_argument("--weights", default="", help="checkpoint to load (default: random weights)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mode", nargs="+", choices=("train", "eval", "deploy"), default=["deploy"],
                        help="one or more of train, eval, deploy")
    parser.add_argument("--compare-dense", action="store_true", help="also time the dense host")
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
    parser.add_argument("--profile", action="store_true", help="also time every op of the deployed program "
                        "(per stage, per kind, slowest ops)")
    parser.add_argument("--contend", action="store_true", help="keep another process busy during the "
                        "measurement (a one-thread eval loop of torchvision's ResNet-18)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE pairs")
    return parser.parse_intermixed_args(argv)


def setup(args):
    check_device(args.device, "--device")
    cfg = load_cfg(args.config_file, args.opts)
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


def dense_host(cfg, train):
    """The dense host network and a description of it."""
    b = cfg.MODEL.BACKBONE
    name = _TORCHVISION.get(b.NAME)
    width_ok = b.WIDTH_MULT == 1.0 or name == "mobilenet_v2"
    if name is not None and b.STEM == "imagenet" and width_ok:
        import torchvision

        kwargs = {"width_mult": b.WIDTH_MULT} if name == "mobilenet_v2" else {}
        net = getattr(torchvision.models, name)(num_classes=cfg.MODEL.NUM_CLASSES, **kwargs)
        net = net.to(cfg.MODEL.DEVICE)
        if train:
            return net.train(), f"torchvision {name}"
        from torch.fx.experimental.optimization import fuse

        return fuse(net.eval()), f"torchvision {name}, BatchNorm folded"
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.MSGC.GROUPING = "dense"
    cfg.MODEL.MSGC.ATTENTION = "none"
    return build_model(cfg).train(train), f"{b.NAME} with MODEL.MSGC.GROUPING dense"


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True)


def runners(cfg, args, model):
    """name -> (step function taking (images, labels), description)."""
    out = {}
    for mode in args.mode:
        if mode == "train":
            opt = sgd(model)

            def step(x, y, opt=opt):
                losses = model.train()(x, y)
                loss = sum(v for k, v in losses.items() if k.startswith("loss_"))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            out["train"] = (step, "forward + backward + SGD step")
        elif mode == "eval":
            def step(x, y):
                with torch.no_grad():
                    model.eval()(x)

            out["eval"] = (step, "eval mode (closed channels multiplied by 0)")
        else:
            deployed = deploy(model.eval(), isa=args.isa, tune=not args.no_tune, check=False)
            what = "msgc.deploy.deploy(model)" + (f", {deployed.library.variant} kernels" if deployed.native else
                                                  ", PyTorch kernels")
            out["deploy"] = (lambda x, y, d=deployed: d(x), what)
            out["deploy"][0].deployed = deployed
    if args.compare_dense:
        train = args.mode == ["train"]
        host, what = dense_host(cfg, train)
        if train:
            opt = sgd(host)

            def step(x, y):
                loss = torch.nn.functional.cross_entropy(host(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            out["dense"] = (step, what)
        else:
            # both memory formats: oneDNN is faster channels-last on some layers and CPUs (max-pooling
            # 112x112 NCHW costs 2.5 ms on the 2-core machine of the README), and the ratios take the
            # faster one, so that a layout change is not counted as a saving of deployment
            cl = copy.deepcopy(host).to(memory_format=torch.channels_last)
            for name, net, fmt in (("dense", host, torch.contiguous_format), ("dense_cl", cl, torch.channels_last)):
                def step(x, y, net=net, fmt=fmt):
                    with torch.no_grad():
                        net(x.contiguous(memory_format=fmt))

                out[name] = (step, what + (", channels-last" if fmt is torch.channels_last else ""))
    return out


def batch_source(args, cfg, size, device):
    """step number -> (images, labels): new random ones each step, or cycled through ``--batches``."""
    def make():
        return (torch.randn(args.batch_size, 3, size, size, device=device),
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
            sync()
            t = clock()
            step(x, y)
            sync()
            if r >= args.warmup:
                times[name].append((clock() - t) * 1e3)
    return times


def summary(ms, batch):
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "p25_ms": q[0], "p75_ms": q[2], "min_ms": min(ms),
            "mean_ms": statistics.fmean(ms), "std_ms": statistics.pstdev(ms), "n": len(ms),
            "ms_per_image": statistics.median(ms) / batch}


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
    model = build(cfg, args)
    batches = batch_source(args, cfg, size, device)
    runs = runners(cfg, args, model)
    macs = mac_stats(model, runs, [batches(r)[0] for r in range(max(1, min(args.batches or 4, 4)))], size)
    busy = contender(args.contend)
    try:
        times = measure(runs, args, batches, device)
        prof = deploy_profile(runs, batches) if args.profile and "deploy" in runs else None
    finally:
        if busy is not None:
            busy.kill()
    result = {"config": args.config_file, "opts": args.opts, "device": str(device), "batches": args.batches,
              "threads": torch.get_num_threads(), "clock": args.clock, "batch_size": args.batch_size, "size": size,
              "torch": torch.__version__, "contended": args.contend, "runs": {}}
    for name, (_, what) in runs.items():
        result["runs"][name] = {"what": what, **summary(times[name], args.batch_size), **macs.get(name, {})}
    result["ratios"], result["paired_ratios"] = ratios(result["runs"]), paired_ratios(result["runs"], times)
    if prof is not None:
        result["profile"] = prof
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
        q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
        out[f"{a}/{'dense' if b == dense else b}"] = {"median": statistics.median(r), "p25": q[0], "p75": q[2]}
    return out


def report(result):
    rows = []
    for name, r in result["runs"].items():
        executed = r.get("executed_macs")
        rows.append([name, f"{r['median_ms']:.2f}", f"{r['ms_per_image']:.2f}", f"{r['p25_ms']:.2f}-{r['p75_ms']:.2f}",
                     f"{r['min_ms']:.2f}",
                     f"{r['macs'] / 1e6:.1f}" if "macs" in r else "",
                     f"{r['mac_ratio']:.3f}" if "mac_ratio" in r else "",
                     "" if executed is None else f"{executed / 1e6:.1f}", r["what"]])
    head = (f"{result['config']} {' '.join(result['opts'])}: {result['device']}, {result['threads']} threads, "
            f"{result['clock']} clock, "
            f"batch {result['batch_size']}, {result['size']}x{result['size']}, torch {result['torch']}"
            + (", another process busy" if result.get("contended") else ""))
    table = tabulate(rows, headers=["run", "median ms", "ms/image", "p25-p75", "min", "MMACs/sample", "MAC ratio",
                                    "executed MMACs", "what"])
    lines = [head, table]
    for k, v in result["ratios"].items():
        p = result["paired_ratios"].get(k)
        lines.append(f"{k}: {v:.3f}" + ("" if p is None else
                                         f"  (round by round: median {p['median']:.3f}, IQR {p['p25']:.3f}-{p['p75']:.3f})"))
    prof = result.get("profile")
    if prof:
        lines.append(f"deployed program, ops timed alone on one image: {prof['total_ms']:.2f} ms")
        lines.append("  by stage: " + ", ".join(f"{k} {v:.2f}" for k, v in prof["by_stage"].items()))
        lines.append("  by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in prof["by_kind"].items()))
        lines.append(tabulate([[r["scope"], r["op"], r.get("kernel", ""), f"{r['ms']:.3f}"] for r in prof["slowest"]],
                              headers=["slowest ops", "", "kernel", "ms"]))
    return "\n".join(lines)


if __name__ == "__main__":
    with exit_on_user_error():  # bad input (a config key, a weights file, ...): one line, exit status 2
        main(sys.argv[1:])
