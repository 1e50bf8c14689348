"""``deploy(model)``: the inference-only network that skips what the gates close.

    deployed = deploy(model.eval())      # folds weights once; shares nothing with model
    out = deployed(images)               # per input size, the first call makes a plan:
        plan = graph of the whole network for h x w, image to logits (deployers, once per size)
               + native: program (lowered once), kernels chosen by measuring (tune), whole-model check
        native program (one C call per batch) | PyTorch interpreter (per sample)
            -> logits, each sample's open counts, executed MACs
        paper MACs from the counts (the source blocks' own functions)

    deployed = deploy(model.eval(), budget=0.5)  # the budget table of model (msgc.modeling.set_budget)
    out = deployed(images, budget=[0.4, 0.7, 0.4])   # per request: one budget, or one per image
        per distinct budget: the generators' output biases rewritten in place (bias - threshold),
        the same program run on that budget's images; outputs put back in the batch's order
"""
import logging
import math
import statistics
import time
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..modeling.budget import Budget, budget_input, budget_table, budget_threshold
from ..modeling.layers import budget_generators, mask_generators, per_sample, set_budget_inputs, set_gate_thresholds
from . import native as native_kernels
from .backbones import deploy_backbone
from .graph import GatesOp, Graph
from .reference import run_reference

__all__ = ["DeployedClassifier", "deploy"]

logger = logging.getLogger(__name__)

_NO_GRAPH = ("a deployed model cannot be {}: which channels it computes, and so its tensor shapes, depend "
             "on each sample's gates; trace or export the source model in eval mode instead (the same "
             "outputs, computed with masks at full width)")


class _Plan:
    """What a deployed model runs for one input size (and thread count)."""

    def __init__(self, graph: Graph, program=None):
        self.graph, self.program = graph, program
        #: the graph's folded generators (whose mask biases a request's budget rewrites)
        self.generators = [op.generators for op in graph.ops if isinstance(op, GatesOp)]
        self.use_source = False  # the eval model measured faster: run it instead
        self.timings: Dict[str, float] = {}
        self.threads = 1  # the thread count the plan is for
        self.op_threads = 1  # threads for a batch of fewer samples than threads (each op's work split)

    def threads_for(self, n: int) -> int:
        """Threads to run a batch of ``n`` samples on: whole samples per thread where there are enough of
        them, else each op on ``op_threads`` (one where splitting the ops measured slower)."""
        return self.threads if n >= self.threads else self.op_threads


def split_pays(all_threads_ms: float, one_thread_ms: float, margin: float = 0.05) -> bool:
    """Whether splitting every op of one sample over the threads is worth it: unless one thread is faster
    by more than ``margin`` (small networks at batch 1, where the threads' hand-offs cost more than the
    work they share), yes."""
    return one_thread_ms * (1 + margin) >= all_threads_ms


class DeployedClassifier(nn.Module):
    """Inference-only classifier that computes only what the gates keep.

    ``model(images)`` -> ``{"logits": N x classes, "macs": N, "executed_macs": N}``: ``logits`` and
    ``macs`` as the source model in eval mode gives them (``macs`` is the paper's count, identical),
    ``executed_macs`` the multiply-adds actually run (float64). It holds folded copies of the weights
    and a reference to the source model (its MAC functions, and the fallback path); it has no
    parameters and cannot train. See :func:`deploy`.

    ``model(images, budget=b)``: the outputs of the source model at the MAC budget ``b`` (one number,
    or one per image; :func:`msgc.modeling.set_budget`, from the budget table the source model had at
    deploy); None: the budget of :func:`deploy`. A batch of several budgets runs the program once per
    distinct budget, on the images of that budget.
    """

    def __init__(self, model: nn.Module, library: Optional["native_kernels.Library"], tune: bool, check: bool,
                 budget: Budget = None, plans: Optional[str] = None):
        super().__init__()
        self.plans = plans  # the plan cache's file (None: this machine's default)
        self.deployer = deploy_backbone(model.backbone)
        self._source = [model]  # not a submodule
        self.library, self.tune, self.check = library, tune, check
        self._plans: Dict[Tuple[int, int, int], _Plan] = {}
        self._table = budget_table(model)
        generators = budget_generators(model)
        self._coder = generators[0] if generators else None  # a budget-input generator: budget -> its code
        #: the gate threshold of requests without a budget (None: the source model's at deploy)
        self.threshold = None if budget is None else self._threshold_of(budget)
        #: the budget input of requests without a budget (None: the source model's at deploy)
        self.budget = None if budget is None else budget_input(budget)
        super().train(False)

    def _threshold_of(self, budget: Budget):
        """A budget's threshold: a float, or one per image (a tensor), from the table of deploy time."""
        return budget_threshold(self._source[0], budget, self._table)

    def _code_of(self, budget):
        """The normalised budget input (:meth:`MaskGenerator.budget_code`) of a budget input (None: the
        generators' at deploy; a model without budget input: None)."""
        if self._coder is None or budget is None:
            return None
        return self._coder.budget_code(budget)

    @property
    def native(self) -> bool:
        """Whether the native program runs (else PyTorch's kernels)."""
        return self.library is not None

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("a deployed model is inference-only: train the source model, then deploy it "
                               "again with msgc.deploy.deploy(model.eval())")
        return super().train(False)

    def __prepare_scriptable__(self):
        raise RuntimeError(_NO_GRAPH.format("scripted (torch.jit.script)"))

    def plan(self, images: torch.Tensor) -> _Plan:
        """The plan for the size of ``images`` (made on first use: one per input size and thread count)."""
        h, w = images.shape[-2:]
        threads = torch.get_num_threads()
        key = (int(h), int(w), threads if self.native else 0)
        if key not in self._plans:
            graph = self.deployer.graph(int(h), int(w))
            plan = _Plan(graph)
            if self.native:
                from .native.program import Program
                from .tune import PlanCache, default_kernel, tune

                plan.program = Program(graph, self.library)
                for i, (_, op) in enumerate(plan.program.conv_ops):
                    plan.program.set_kernel(i, *default_kernel(op))
                x = images[:1].float().contiguous()
                plan.threads = plan.op_threads = threads
                if self.tune:
                    cache = PlanCache(self.plans)
                    counts = tune(plan.program, x, threads, cache)
                    logger.info("msgc.deploy: %dx%d plan: %d kernels measured, %d from the cache", h, w,
                                counts["measured"], counts["cached"])
                    if threads > 1:
                        self._choose_op_threads(plan, x, threads, cache)
                if self.check:
                    self._check(plan, x, threads)
            self._plans[key] = plan
        return self._plans[key]

    @staticmethod
    def _choose_op_threads(plan: _Plan, image, threads, cache, reps: int = 7):
        """Time one sample with every op split over ``threads`` against one thread (turn by turn), and
        keep one thread for small batches where splitting does not pay (:func:`split_pays`).

        Each side counts its fastest run (another process's work only ever adds time), and the choice is
        kept in the plan cache beside the kernels', so that every process on this machine runs the same
        plan: measured anew in each process, a close call went either way and the time of batch 1 with it.
        """
        from .tune import split_key

        key = split_key(plan.program, threads)
        choice = cache.entries.get(key)
        if choice is None:
            times = {threads: [], 1: []}
            for _ in range(reps + 1):
                for t in times:
                    start = time.perf_counter()
                    plan.program.run(image, threads=t)
                    times[t].append((time.perf_counter() - start) * 1e3)
            split, alone = (min(times[t][1:]) for t in (threads, 1))
            choice = cache.entries[key] = [split, alone]
            cache.save()
        split, alone = choice
        plan.timings.update({"split_ms": split, "one_thread_ms": alone})
        if not split_pays(split, alone):
            plan.op_threads = 1
            logger.info("msgc.deploy: %dx%d: one sample takes %.2f ms on one thread, %.2f ms split over %d threads: "
                        "batches of fewer than %d samples run on one thread", image.size(2), image.size(3), alone,
                        split, threads, threads)

    def _check(self, plan: _Plan, image, threads, reps: int = 5):
        """Time the deployed program against the eval model and the dense host on one sample; warn (once)
        where it is slower, and run the eval model where that is faster (the same outputs)."""
        model = self._source[0]
        host = model.backbone.dense_host().eval() if model.backbone.build_args is not None else None

        def median_ms(fn):
            fn()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)

        with torch.no_grad():
            deployed = median_ms(lambda: plan.program.run(image, plan.threads_for(1)))
            source = median_ms(lambda: model(image))
            dense = median_ms(lambda: host(image)) if host is not None else float("inf")
        plan.timings.update({"deployed_ms": deployed, "eval_ms": source, "dense_ms": dense})
        where = f"{image.size(2)}x{image.size(3)} on {threads} threads"
        if deployed > source:
            plan.use_source = True
            logger.warning("msgc.deploy: the deployed model takes %.2f ms per image at %s, the eval model %.2f ms "
                           "(the dense host %.2f ms): running the eval model instead (the same outputs; "
                           "deploy(..., check=False) keeps the deployed kernels, msgc.deploy.profile shows where "
                           "the time goes)", deployed, where, source, dense)
        elif deployed > dense:
            logger.warning("msgc.deploy: the deployed model takes %.2f ms per image at %s, more than the dense host "
                           "without gates (%.2f ms; the eval model %.2f ms): its MAC savings do not become time here "
                           "(msgc.deploy.profile shows where the time goes)", deployed, where, dense, source)

    def forward(self, images: torch.Tensor, labels=None, budget: Budget = None):
        if torch.jit.is_tracing():
            raise RuntimeError(_NO_GRAPH.format("traced (torch.jit.trace)"))
        if torch.compiler.is_compiling():
            raise RuntimeError(_NO_GRAPH.format("compiled or exported (torch.compile, torch.export)"))
        if labels is not None:
            raise RuntimeError("a deployed model is inference-only and takes no labels: call model(images); "
                               "train the source model instead")
        if images.dim() != 4 or images.size(1) != 3:
            raise ValueError(f"deployed model: expected images N x 3 x H x W, got shape {tuple(images.shape)}")
        threshold = self.threshold if budget is None else self._threshold_of(budget)
        inputs = self.budget if budget is None else budget_input(budget)
        for values in (threshold, inputs):
            if isinstance(values, torch.Tensor):
                per_sample(values, images)  # one per image
        with torch.no_grad():
            plan = self.plan(images)
            if plan.use_source:
                return self._run_source(images, threshold, inputs)
            x = images.float().contiguous()
            logits, stats, executed = None, [None] * x.size(0), [None] * x.size(0)
            for (t, b), index in _groups(threshold, inputs):
                for generators in plan.generators:
                    generators.set_threshold(t, self._code_of(b))
                part = x if index is None else x.index_select(0, index.to(x.device)).contiguous()
                out, part_stats, part_executed = self._run(plan, part)
                if index is None:
                    logits, stats, executed = out, part_stats, part_executed
                    continue
                if logits is None:
                    logits = out.new_empty(x.size(0), out.size(1))
                logits[index.to(out.device)] = out
                for j, i in enumerate(index.tolist()):
                    stats[i], executed[i] = part_stats[j], part_executed[j]
        macs = [plan.graph.paper_macs(s) for s in stats]
        return {"logits": logits, "macs": torch.tensor(macs, dtype=torch.float64),
                "executed_macs": torch.tensor(executed, dtype=torch.float64)}

    def _run(self, plan: _Plan, x: torch.Tensor):
        """The plan on the batch ``x`` -> (logits, each sample's stats, each sample's executed MACs)."""
        if self.native:
            logits, stats, executed = plan.program.run(x, threads=plan.threads_for(x.size(0)))
            return logits, stats.tolist(), executed.tolist()
        return run_reference(plan.graph, x)

    def _run_source(self, images, threshold=None, inputs=None):
        model = self._source[0]
        generators = mask_generators(model)
        before = [(g.gate.threshold, g.budget) for g in generators]
        try:
            if threshold is not None:
                set_gate_thresholds(model, threshold)
            if inputs is not None:
                set_budget_inputs(model, inputs)
            out = model(images)
        finally:
            for g, (t, b) in zip(generators, before):
                g.gate.threshold, g.budget = t, b
        c = model.backbone.complexity(images.size(2), images.size(3))
        full = float(c.main + c.dgc + c.gen)  # masks multiply: every gated convolution runs at full width
        return {"logits": out["logits"], "macs": out["macs"],
                "executed_macs": torch.full((images.size(0),), full, dtype=torch.float64)}


def _groups(threshold, inputs=None):
    """``((threshold, budget input), image indices)`` per distinct pair of a request (indices None: every
    image); each of the two is one value or one per image (a tensor)."""
    per_image = [v for v in (threshold, inputs) if isinstance(v, torch.Tensor)]
    if not per_image:
        return [((threshold, inputs), None)]
    n = per_image[0].numel()
    column = lambda v: v.tolist() if isinstance(v, torch.Tensor) else [v] * n  # noqa: E731
    keys = list(zip(column(threshold), column(inputs)))
    distinct = sorted(set(keys), key=lambda k: tuple(-math.inf if v is None else v for v in k))
    if len(distinct) == 1:
        return [(distinct[0], None)]
    return [(k, torch.tensor([i for i, v in enumerate(keys) if v == k])) for k in distinct]


def deploy(model: nn.Module, native: Optional[bool] = None, isa: Optional[str] = None, tune: bool = True,
           check: Optional[bool] = None, budget: Budget = None, plans: Optional[str] = None) -> DeployedClassifier:
    """The deployed (inference-only) version of a :class:`msgc.modeling.Classifier` in eval mode.

    BatchNorm is folded into the convolutions, attention into the gathered weights (or inputs), and
    weights are laid out once for the kernels. The returned module shares no tensors with ``model``;
    deploy again after changing ``model``'s weights.

    Args:
        native: run msgc's C kernels (one call per batch); default: where they build and the model is on
            the CPU in float32. False: PyTorch's kernels (any device).
        isa: the kernel variant (``avx512``, ``avx2``, ``portable``; default: the best this CPU runs).
        tune: choose each convolution's kernel by measuring on this machine (cached per machine);
            False: a fixed rule.
        check: time the deployed model against the eval model when a plan is made, and run the faster
            (with a warning); default: with ``tune``.
        budget: the MAC budget of calls without one (a ratio in (0, 1] within the reach of the model's
            budget table, :func:`msgc.modeling.set_budget`; 0: as trained); None: the gates as ``model``
            has them. ``deployed(images, budget=b)`` chooses it per call or per image.
        plans: the file of measured choices to read and add to (default:
            ``$MSGC_CACHE/plans-<machine>.json``, see :mod:`msgc.deploy.tune`).
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ValueError(f"deploy: expected a msgc Classifier (with a .backbone), got {type(model).__name__}")
    if model.training:
        raise ValueError("deploy: the model is in training mode; call model.eval() first (deployment folds "
                         "BatchNorm running statistics and uses the gates' eval decisions)")
    on_cpu = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    if native is None:
        native = on_cpu and (native_kernels.available() if isa is None else True)
    library = None
    if native:
        if not on_cpu:
            raise ValueError("deploy(native=True): the model must be on the CPU in float32")
        if isa is None and not native_kernels.available():
            raise ValueError(f"deploy(native=True): msgc's native kernels are {native_kernels.status()}")
        library = native_kernels.library(isa)
    return DeployedClassifier(model, library, tune, tune if check is None else check, budget, plans)
