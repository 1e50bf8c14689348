"""The dense host in the runtimes a user deploys it with, each timed alone in a fresh process.

A deployed network is worth what it saves against the dense network as people run it: PyTorch eager
mode is one choice, ``torch.compile``, ONNX Runtime and OpenVINO are others, and on some CPUs much
faster. Runtimes must not be timed in turns inside one process: their thread pools keep spinning after
each call and slow the next runtime down (OpenVINO's ResNet-18 took twice its time that way). So every
runtime runs in a process of its own, one after the other, in alternating passes::

    job = Job(folder, host=ModelSpec(...), deployed=ModelSpec(...), ...)   # weights, inputs, references
    for p in range(passes):
        for name in runtimes:                            # eager, eager_cl, compile, onnxruntime, ...
            python -m msgc.deploy.runtimes FOLDER NAME   # build, export, warm up, time, check
    summarise(rows)                                      # medians, ratios against the fastest float32

A worker builds its model from a :class:`ModelSpec` (a factory and its arguments) and the weights the
parent saved, times ``iters`` calls on pre-made random batches after ``warmup`` untimed ones, then
checks its logits on a fixed batch against PyTorch's (the eval model, NCHW, not folded): the largest
difference relative to the largest logit. ONNX Runtime and OpenVINO come with ``pip install -e
".[bench]"``; a runtime that is not installed has a row that says so, and nothing else fails.
"""
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["RUNTIMES", "GROUPS", "ModelSpec", "Job", "expand", "installed", "measure", "summarise", "ratios",
           "dense_host", "model_from_config"]

#: runtime -> (the module it needs, the precision it computes in, what it is)
RUNTIMES: Dict[str, tuple] = {
    "eager": ("torch", "float32", "PyTorch eager, BatchNorm folded, NCHW"),
    "eager_cl": ("torch", "float32", "PyTorch eager, BatchNorm folded, channels-last"),
    "compile": ("torch", "float32", "torch.compile (inductor, frozen weights)"),
    "onnxruntime": ("onnxruntime", "float32", "ONNX Runtime (CPU provider, torch.onnx.export)"),
    "openvino": ("openvino", "float32", "OpenVINO, INFERENCE_PRECISION_HINT f32"),
    "openvino_default": ("openvino", "default", "OpenVINO at its default precision"),
    "deploy": ("torch", "float32", "msgc.deploy.deploy(model)"),
}

#: the names ``--runtimes`` takes -> the runtimes they time
GROUPS: Dict[str, List[str]] = {"eager": ["eager", "eager_cl"], "compile": ["compile"],
                                "onnxruntime": ["onnxruntime"], "openvino": ["openvino", "openvino_default"]}

#: the largest logit difference, relative to the largest logit, that a row passes with
TOLERANCE = {"float32": 1e-3, "default": 5e-2}

_INSTALL = {"onnxruntime": "pip install onnxruntime", "openvino": "pip install openvino"}


def expand(names: List[str]) -> List[str]:
    """``--runtimes`` names (``eager``, ``compile``, ``onnxruntime``, ``openvino``) -> the runtimes, in
    order; ``none`` gives none. Raises ValueError naming an unknown one."""
    out = []
    for name in names:
        if name == "none":
            continue
        if name not in GROUPS:
            raise ValueError(f"unknown runtime {name!r}: choose from {', '.join(GROUPS)} or none")
        out += [r for r in GROUPS[name] if r not in out]
    return out


def installed(runtime: str) -> bool:
    """Whether the module ``runtime`` needs can be imported (looked up, not imported)."""
    try:
        return importlib.util.find_spec(RUNTIMES[runtime][0]) is not None
    except (ImportError, ValueError):
        return False


@dataclass
class ModelSpec:
    """How a worker builds a model: ``factory`` (``"module:function"``) called with ``kwargs`` (JSON),
    then the weights of ``state`` (a file of tensors) loaded into it."""

    factory: str
    kwargs: dict = field(default_factory=dict)
    what: str = ""
    state: str = ""

    def build(self) -> torch.nn.Module:
        module, _, name = self.factory.partition(":")
        model = getattr(importlib.import_module(module), name)(**self.kwargs)
        if self.state:
            model.load_state_dict(torch.load(self.state, weights_only=True))
        return model.eval()


def model_from_config(config_file: str, opts: List[str] = ()) -> torch.nn.Module:
    """This project's model of a config file with ``KEY VALUE`` overrides, on the CPU (a worker's factory
    for the models a config builds); the user modules of ``IMPORTS`` are imported first."""
    from ..config import load_cfg
    from ..engine import import_user_modules
    from ..modeling import build_model

    cfg = load_cfg(config_file, list(opts) + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    import_user_modules(cfg)
    return build_model(cfg)


#: this project's backbones -> torchvision's network of the same shape
TORCHVISION = {"msgc_resnet18": "resnet18", "msgc_resnet34": "resnet34", "msgc_resnet50": "resnet50",
               "msgc_resnet101": "resnet101", "msgc_mobilenetv2": "mobilenet_v2"}


def dense_host(cfg, config_file: str = "", opts: List[str] = ()) -> ModelSpec:
    """The dense host of a config's model: torchvision's network with the same width and classes, or,
    where torchvision has none (DenseNet-74, the cifar stem, ResNet width multipliers), this project's
    model of ``config_file`` and ``opts`` with ``MODEL.MSGC.GROUPING dense``."""
    b = cfg.MODEL.BACKBONE
    name = TORCHVISION.get(b.NAME)
    if name is not None and b.STEM == "imagenet" and (b.WIDTH_MULT == 1.0 or name == "mobilenet_v2"):
        kwargs = {"num_classes": cfg.MODEL.NUM_CLASSES}
        if name == "mobilenet_v2":
            kwargs["width_mult"] = b.WIDTH_MULT
        return ModelSpec(f"torchvision.models:{name}", kwargs, f"torchvision {name}")
    dense = list(opts) + ["MODEL.MSGC.GROUPING", "dense", "MODEL.MSGC.ATTENTION", "none"]
    return ModelSpec("msgc.deploy.runtimes:model_from_config",
                     {"config_file": os.path.abspath(config_file) if config_file else "", "opts": dense},
                     f"{b.NAME} with MODEL.MSGC.GROUPING dense")


@dataclass
class Job:
    """What every worker of a comparison shares, written once to ``folder/job.json``.

    Args:
        folder: a temporary folder for the weights, the inputs, the ONNX file and the references.
        host: the dense host; ``deployed``: the source model of the deployed one (None: no deploy row).
        batch, size: the input shape (``batch x 3 x size x size``); threads: each runtime's threads.
        warmup, iters: untimed and timed calls per process; seed: the random inputs'.
        deploy_options: keyword arguments of :func:`msgc.deploy.deploy` (``isa``, ``tune``, ``native``).
        imports: ``(module, where)`` pairs that a worker imports first (user modules).
        serving: time each call as a serving loop makes it: right after the batch was decoded from JPEG
            and normalised with PyTorch on ``threads`` threads (untimed), as an application does;
            PyTorch's OpenMP workers are still spinning when the call starts.
    """

    folder: str
    host: ModelSpec
    deployed: Optional[ModelSpec] = None
    batch: int = 1
    size: int = 224
    threads: int = 1
    warmup: int = 10
    iters: int = 50
    seed: int = 0
    deploy_options: dict = field(default_factory=dict)
    imports: list = field(default_factory=list)
    serving: bool = False

    def save(self, host: torch.nn.Module, deployed: Optional[torch.nn.Module] = None) -> "Job":
        """Write the models' weights, a fixed check batch and PyTorch's logits on it, and ``job.json``."""
        torch.manual_seed(self.seed)
        x = torch.randn(self.batch, 3, self.size, self.size)
        refs = {"x": x}
        for key, spec, model in (("host", self.host, host), ("deployed", self.deployed, deployed)):
            if spec is None:
                continue
            spec.state = os.path.join(self.folder, f"{key}.pt")
            torch.save(model.state_dict(), spec.state)
            with torch.no_grad():
                out = model.eval()(x)
            refs[key] = (out["logits"] if isinstance(out, dict) else out).float()
        torch.save(refs, os.path.join(self.folder, "check.pt"))
        with open(os.path.join(self.folder, "job.json"), "w") as f:
            json.dump(asdict(self), f)
        return self

    @classmethod
    def load(cls, folder: str) -> "Job":
        with open(os.path.join(folder, "job.json")) as f:
            d = json.load(f)
        d["host"] = ModelSpec(**d["host"])
        d["deployed"] = ModelSpec(**d["deployed"]) if d["deployed"] else None
        return cls(**d)


# ---- the parent: one process per runtime, alternating passes ----------------------------------------

def measure(job: Job, runtimes: List[str], passes: int = 2, timeout: float = 1800.0,
            log: Optional[Callable[[str], None]] = None) -> Dict[str, dict]:
    """Time every runtime of ``runtimes`` alone in a fresh process, ``passes`` times in turn.

    Returns runtime -> row: ``status`` (``ok``, ``mismatch``, ``not installed``, ``failed: ...``),
    ``what``, ``precision`` and, once timed, ``times_ms`` (every timed call of every pass),
    ``pass_medians_ms``, ``median_ms`` (of all calls), ``min_ms``, ``error`` (the largest logit
    difference to PyTorch's over the largest logit), ``tolerance``.
    """
    rows = {}
    for name in runtimes:
        module, precision, what = RUNTIMES[name]
        rows[name] = {"what": what, "precision": precision, "status": "ok", "times_ms": [], "pass_medians_ms": []}
        if not installed(name):
            rows[name]["status"] = "not installed"
            rows[name]["what"] += f" ({_INSTALL.get(module, 'pip install ' + module)}, or pip install -e '.[bench]')"
    for p in range(passes):
        for name in runtimes:
            row = rows[name]
            if row["status"] != "ok":
                continue  # not installed, failed or wrong: not run again
            if log:
                log(f"pass {p + 1}/{passes}: {name}")
            row.update(_merge(row, _spawn(job.folder, name, timeout)))
    for row in rows.values():
        if row["times_ms"]:
            row["median_ms"] = statistics.median(row["times_ms"])
            row["min_ms"] = min(row["times_ms"])
    return rows


def _spawn(folder: str, name: str, timeout: float) -> dict:
    """One worker process; its result is the last line of its output (JSON)."""
    cmd = [sys.executable, "-m", "msgc.deploy.runtimes", folder, name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: no result within {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"status": f"failed: {err}"}


def _merge(row: dict, result: dict) -> dict:
    out = {k: v for k, v in result.items() if k not in ("times_ms", "what", "pid")}
    if result.get("what"):
        out["what"] = result["what"]
    times = result.get("times_ms") or []
    if times:
        out["times_ms"] = row["times_ms"] + times
        out["pass_medians_ms"] = row["pass_medians_ms"] + [statistics.median(times)]
        out["pids"] = row.get("pids", []) + [result.get("pid")]
    return out


def ratios(rows: Dict[str, dict]) -> dict:
    """deploy's time against the fastest float32 runtime of the dense host that ran and passed its
    check, and against PyTorch eager (the faster layout): the ratio of the median times, and the range
    of the ratios of the passes' medians. Empty without a timed deploy row."""
    def ok(name):
        return name in rows and rows[name]["status"] == "ok" and rows[name].get("median_ms")

    if not ok("deploy"):
        return {}
    dep = rows["deploy"]
    out = {}
    float32 = [n for n in rows if n != "deploy" and ok(n) and rows[n]["precision"] == "float32"]
    eager = [n for n in ("eager", "eager_cl") if ok(n)]
    for key, names in (("deploy/fastest", float32), ("deploy/eager", eager)):
        if not names:
            continue
        best = min(names, key=lambda n: rows[n]["median_ms"])
        per_pass = [a / b for a, b in zip(dep["pass_medians_ms"], rows[best]["pass_medians_ms"])]
        out[key] = {"against": best, "ratio": dep["median_ms"] / rows[best]["median_ms"],
                    "passes": [min(per_pass), max(per_pass)] if per_pass else []}
    return out


def summarise(rows: Dict[str, dict]) -> dict:
    """The rows without their raw times, and the ratios."""
    return {"rows": {n: {k: v for k, v in r.items() if k != "times_ms"} for n, r in rows.items()},
            "ratios": ratios(rows)}


# ---- a worker: one runtime in this process -----------------------------------------------------------

@dataclass
class _Session:
    """A runtime ready to run: ``call(prepared input) -> raw output``, ``prepare(tensor)`` (done before
    timing), ``logits(raw output) -> tensor``."""

    call: Callable
    prepare: Callable = lambda x: x
    logits: Callable = lambda y: y
    what: str = ""
    precision: str = ""


class _Logits(torch.nn.Module):
    """A classifier that returns a dict (this project's) as one that returns its logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["logits"]


def _folded(model):
    """BatchNorm folded into the convolutions (``torch.fx``), or the model as it is where it does not
    trace -> (model, what was done)."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model), "BatchNorm folded"
    except Exception as e:  # noqa: BLE001 - a model torch.fx cannot trace runs unfolded, and says so
        return model, f"BatchNorm not folded (torch.fx cannot trace it: {type(e).__name__})"


def _eager(job, model, channels_last):
    net, folded = _folded(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)

    def call(x):
        with torch.no_grad():
            return net(x.contiguous(memory_format=fmt))  # the layout change is part of the step

    return _Session(call, what=f"PyTorch eager, {folded}, {'channels-last' if channels_last else 'NCHW'}")


def _compile(job, model):
    import torch._inductor.config as inductor

    inductor.freezing = True
    compiled = torch.compile(model)

    def call(x):
        with torch.no_grad():
            return compiled(x)

    return _Session(call)


def _onnx(job, model) -> str:
    """The model exported to ONNX once per comparison (``folder/host.onnx``; the first worker that needs
    it writes it)."""
    path = os.path.join(job.folder, "host.onnx")
    if not os.path.exists(path):
        import warnings

        x = torch.randn(job.batch, 3, job.size, job.size)
        tmp = path + f".{os.getpid()}.tmp"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(model, (x,), tmp, dynamo=False, input_names=["images"], output_names=["logits"])
        os.replace(tmp, path)
    return path


def _onnxruntime(job, model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = job.threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(_onnx(job, model), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return _Session(lambda x: sess.run(None, {name: x})[0], prepare=lambda x: x.numpy(),
                    logits=torch.from_numpy, what=f"{RUNTIMES['onnxruntime'][2]}, onnxruntime {ort.__version__}")


def _openvino(job, model, hint):
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": job.threads, "PERFORMANCE_HINT": "LATENCY"}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = core.compile_model(core.read_model(_onnx(job, model)), "CPU", config)
    chosen = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # what it computes in
    request = compiled.create_infer_request()

    def call(x):
        request.infer({0: x})
        return request.get_output_tensor(0).data

    name = "openvino" if hint else "openvino_default"
    return _Session(call, prepare=lambda x: x.numpy(), logits=lambda y: torch.from_numpy(y.copy()),
                    what=f"{RUNTIMES[name][2]} (it computes in {chosen}), openvino {ov.__version__.split('-')[0]}",
                    precision="float32" if chosen == "f32" else chosen)


def _deploy(job, model):
    from .build import deploy

    deployed = deploy(model, check=False, **job.deploy_options)
    what = RUNTIMES["deploy"][2] + (f", {deployed.library.variant} kernels" if deployed.native else
                                    ", PyTorch kernels")
    return _Session(lambda x: deployed(x), logits=lambda y: y["logits"], what=what)


_SESSIONS = {"eager": lambda j, m: _eager(j, m, False), "eager_cl": lambda j, m: _eager(j, m, True),
             "compile": _compile, "onnxruntime": _onnxruntime, "openvino": lambda j, m: _openvino(j, m, "f32"),
             "openvino_default": lambda j, m: _openvino(j, m, None)}


def run_worker(folder: str, name: str) -> dict:
    """Build runtime ``name`` of the job in ``folder``, time it and check it -> its result (a row's
    fields). An ImportError of the runtime's module gives ``not installed``, any other error ``failed: ...``."""
    from ..utils.imports import import_pairs

    job = Job.load(folder)
    # idle torch: no spinning pool, except in a serving loop, where torch prepares every batch
    torch.set_num_threads(job.threads if RUNTIMES[name][0] == "torch" or job.serving else 1)
    import_pairs([tuple(p) for p in job.imports])
    try:
        if name == "deploy":
            session = _deploy(job, job.deployed.build())
        else:
            model = job.host.build()
            with torch.no_grad():
                dict_out = isinstance(model(torch.zeros(1, 3, job.size, job.size)), dict)
            session = _SESSIONS[name](job, _Logits(model).eval() if dict_out else model)
    except ImportError as e:
        if e.name and e.name.split(".")[0] == RUNTIMES[name][0]:
            return {"status": "not installed"}
        return {"status": f"failed: {type(e).__name__}: {e}"}
    except Exception as e:  # noqa: BLE001 - one runtime's failure is its row, not the comparison's
        return {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return _time_and_check(job, name, session)


def _time_and_check(job: Job, name: str, session: _Session) -> dict:
    gen = torch.Generator().manual_seed(job.seed + 1)
    batches = [torch.randn(job.batch, 3, job.size, job.size, generator=gen) for _ in range(8)]
    if job.serving:
        batches = [_jpegs(x) for x in batches]
    else:
        batches = [session.prepare(x) for x in batches]
    for i in range(job.warmup):
        session.call(session.prepare(_decode(batches[i % len(batches)])) if job.serving else batches[i % len(batches)])
    times = []
    for i in range(job.iters):
        x = batches[i % len(batches)]
        if job.serving:
            x = session.prepare(_decode(x))
        t = time.perf_counter()
        session.call(x)
        times.append((time.perf_counter() - t) * 1e3)
    refs = torch.load(os.path.join(job.folder, "check.pt"), weights_only=True)
    ref = refs["deployed" if name == "deploy" else "host"]
    got = session.logits(session.call(session.prepare(refs["x"]))).float()
    error = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    precision = session.precision or RUNTIMES[name][1]
    tolerance = TOLERANCE["float32" if precision == "float32" else "default"]
    out = {"status": "ok" if error <= tolerance else "mismatch", "times_ms": times, "error": error,
           "tolerance": tolerance, "precision": precision, "pid": os.getpid()}
    if session.what:
        out["what"] = session.what
    return out


_MEAN, _STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _jpegs(x: torch.Tensor) -> List[torch.Tensor]:
    """A batch of images as the JPEG files a serving loop receives: 4 pixels more on each side (mirrored),
    which :func:`_decode` crops away."""
    from torchvision.io import encode_jpeg

    pixels = torch.nn.functional.pad(x * _STD + _MEAN, (4, 4, 4, 4), mode="reflect")
    return [encode_jpeg((p.clamp(0, 1) * 255).round().to(torch.uint8)) for p in pixels]


def _decode(jpegs: List[torch.Tensor]) -> torch.Tensor:
    """A serving loop's preprocessing with PyTorch ops: decode, centre crop, scale, normalise."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.functional import center_crop

    size = [d - 8 for d in decode_jpeg(jpegs[0]).shape[-2:]]
    images = torch.stack([center_crop(decode_jpeg(j), size) for j in jpegs]).float() / 255
    return ((images - _MEAN) / _STD).contiguous()


if __name__ == "__main__":
    print(json.dumps(run_worker(sys.argv[1], sys.argv[2])))
