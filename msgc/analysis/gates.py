"""What the gates learn, in numbers: per-layer head usage, overlap, MACs, and per-image costs.

:func:`collect_gate_statistics` runs a classifier in eval mode over batches of images, reads every
mask (``N x heads x channels``) and attention map through forward hooks on the generators, and returns
a plain dict (JSON-ready: ``tools/visualize_gates.py`` writes it as ``gates.json``) along the paper's
four dimensions:

- **group-wise**, per mask: ``usage[h][c]``, the fraction of images in which head h reads channel c;
  the overlap of the heads' channel sets (below); a channel order that shows shared and head-specific
  channels (:func:`channel_order`);
- **layer-wise**, per mask: the gated convolution's dense MACs and its mean executed MACs (the dense
  cost times the mean of the mask: head h computes its outputs from its open channels only); per
  stage, where its grouped convolutions sit between pruning and static grouping (:data:`SPECTRUM`);
- **sample-wise**: each image's MACs (the model's ``macs``), label and prediction, the mean MACs per
  class, and the cheapest and most expensive images;
- **attention-wise**: the distribution of each attention generator's values over the open channels.

Overlap of the heads of one mask, for one image with channel sets ``S_1 .. S_H``:

- ``jaccard``: the mean over head pairs of ``|S_a & S_b| / |S_a | S_b|`` (1 when both are empty).
  1 means every head reads the same channels: the layer is channel pruning; 0 means disjoint heads: a
  static grouped convolution reads so. A one-head mask is pruning by definition: 1.
- ``union``: the fraction of channels that at least one head reads; ``unread = 1 - union``.

Each is averaged over images; ``never_read`` counts the channels that no head read in any image.
"""
import contextlib
import heapq
import os
from collections import OrderedDict

import torch

from ..data.preprocess import to_device
from ..utils.errors import InvalidValueError, MissingFileError
from .structure import attention_layers, gated_layers

__all__ = ["SPECTRUM", "collect_gate_statistics", "GateRecorder", "pairwise_jaccard", "channel_order",
           "select_layers", "summarize_values", "has_gates", "load_gated_weights"]

SPECTRUM = ("The position of a layer on the spectrum is the mean pairwise Jaccard overlap of its heads' "
            "channel sets: 1 = every head reads the same channels (channel pruning), 0 = disjoint heads "
            "(static grouped convolution). A stage's position is the mean over its grouped convolutions.")

_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def pairwise_jaccard(mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean pairwise Jaccard overlap of the heads of a mask ``N x heads x C`` in {0, 1}.

    Returns N values; a pair of empty heads counts as identical (1) and a one-head mask gives 1.
    """
    m = mask.double()
    heads = m.size(1)
    if heads == 1:
        return m.new_ones(m.size(0))
    inter = m @ m.transpose(1, 2)
    size = m.sum(2)
    union = size[:, :, None] + size[:, None, :] - inter
    overlap = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    a, b = torch.triu_indices(heads, heads, 1)
    return overlap[:, a, b].mean(1)


def channel_order(usage) -> list:
    """An order of the channels of a ``heads x C`` usage map that makes its structure visible.

    A head *reads* a channel when it does so in at least half of the images. Channels read by more
    heads come first (shared channels, then partly shared ones, then head-specific ones grouped by
    head, then channels no head reads); ties go to the first head reading it, then to higher usage.
    """
    u = torch.as_tensor(usage, dtype=torch.float64)
    read = u >= 0.5
    count = read.sum(0)
    first = torch.where(read.any(0), read.double().argmax(0), torch.full_like(count, u.size(0)))
    total = u.sum(0)
    return sorted(range(u.size(1)), key=lambda c: (-int(count[c]), int(first[c]), -float(total[c]), c))


def summarize_values(values: torch.Tensor, bins: int = 30) -> dict:
    """Count, mean, std, quantiles and a histogram of a 1-d tensor (what a box plot is drawn from)."""
    v = values.double().flatten()
    if v.numel() == 0:
        return {"count": 0}
    q = torch.quantile(v, torch.tensor(_QUANTILES, dtype=torch.float64)).tolist() if v.numel() < 2 ** 24 \
        else _quantiles_sorted(v)
    lo, hi = q[0], q[-1]
    if hi <= lo:
        hi = lo + 1e-6
    counts = torch.histc(v, bins, lo, hi).long().tolist()
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64).tolist()
    return {"count": int(v.numel()), "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            "quantiles": dict(zip((f"q{int(100 * p):02d}" for p in _QUANTILES), q)),
            "histogram": {"edges": edges, "counts": counts}}


def _quantiles_sorted(v):
    s = v.sort().values
    return [float(s[min(int(p * (s.numel() - 1) + 0.5), s.numel() - 1)]) for p in _QUANTILES]


def has_gates(model) -> bool:
    """Whether a model (or backbone) holds any mask: False for the ``dense`` grouping."""
    from .structure import MASK_TYPES

    return any(isinstance(m, MASK_TYPES) for m in model.modules())


def load_gated_weights(model, path: str):
    """Load ``path`` into ``model`` like :class:`~msgc.checkpoint.MSGCCheckpointer`, gates included.

    The checkpointer lets generator tensors be missing (they keep their initialisation) or unused;
    figures of such gates would show an untrained or another model's gates, so either is an error
    here (an InvalidValueError naming the file and a key), as is any misfit the checkpointer refuses.
    """
    from ..checkpoint import MSGCCheckpointer
    from ..checkpoint.formats import LOAD_INFO_KEY, check_fit, is_generator_key, load_checkpoint_file

    if "://" not in path and not os.path.isfile(path):
        raise MissingFileError(f"MODEL.WEIGHTS: checkpoint {path} does not exist")
    data = load_checkpoint_file(path, model)
    missing, unexpected = check_fit(model.state_dict(), data["model"], data[LOAD_INFO_KEY])
    for keys, what in ((missing, "has no weights for {} gate tensors of the model"),
                       (unexpected, "holds {} gate tensors that the model lacks")):
        gates = [k for k in keys if is_generator_key(k)]
        if gates:
            raise InvalidValueError(f"{path} {what.format(len(gates))} (e.g. '{gates[0]}'): it was trained with "
                             "another MODEL.MSGC.GROUPING, ATTENTION or HEADS than the config's")
    MSGCCheckpointer(model).load(path)


class _MaskStats:
    def __init__(self, layer):
        self.layer = layer
        self.count = 0
        self.usage = torch.zeros(layer.heads, layer.channels, dtype=torch.float64)
        self.open = self.jaccard = self.union = 0.0
        self.ever_read = torch.zeros(layer.channels, dtype=torch.bool)

    def add(self, mask):
        m = mask.detach().to("cpu", torch.float64)
        read = m.amax(1)  # N x C: read by at least one head
        self.count += m.size(0)
        self.usage += m.sum(0)
        self.open += float(m.flatten(1).mean(1).sum())
        self.jaccard += float(pairwise_jaccard(m).sum())
        self.union += float(read.mean(1).sum())
        self.ever_read |= read.amax(0) > 0

    def as_dict(self):
        n = max(self.count, 1)
        usage = self.usage / n
        layer = self.layer
        executed = None if layer.dense_macs is None else self.open / n * layer.dense_macs
        return OrderedDict(
            name=layer.name, block=layer.block, stage=layer.stage, heads=layer.heads, channels=layer.channels,
            spectrum=layer.spectrum, conv=layer.conv, dense_macs=layer.dense_macs, executed_macs=executed,
            open=self.open / n, jaccard=self.jaccard / n, union=self.union / n, unread=1.0 - self.union / n,
            never_read=int((~self.ever_read).sum()), order=channel_order(usage), usage=usage.tolist())


class GateRecorder:
    """Forward hooks that accumulate the statistics of every mask and attention generator.

    Use as a context manager around forward passes of the model in eval mode, calling
    :meth:`end_batch` after each pass (attention values are kept where the mask of the same batch is
    open, whatever order the block computes them in).

    Args:
        layers: the :class:`~msgc.analysis.structure.GatedLayer` list of the model.
        attentions: its :class:`~msgc.analysis.structure.AttentionLayer` list.
    """

    def __init__(self, layers, attentions=()):
        self.masks = OrderedDict((layer.name, _MaskStats(layer)) for layer in layers)
        self.attentions = OrderedDict((a.name, a) for a in attentions)
        self.attention_values = {name: [] for name in self.attentions}
        self._modules = [(layer.name, layer.module) for layer in layers] + [(a.name, a.module) for a in attentions]
        self._batch = {}
        self._handles = []

    def __enter__(self):
        for name, module in self._modules:
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name):
        def hook(module, inputs, output):
            self._batch[name] = output.detach()
        return hook

    def end_batch(self):
        """Add the masks and attention maps of the last forward pass to the statistics."""
        for name, stats in self.masks.items():
            if name in self._batch:
                stats.add(self._batch[name])
        for name, layer in self.attentions.items():
            if name not in self._batch:
                continue
            values = self._batch[name].to("cpu", torch.float32)
            mask = self._batch.get(layer.mask)
            if mask is not None and mask.shape == values.shape:
                values = values[mask.to("cpu") > 0]
            self.attention_values[name].append(values.flatten())
        self._batch = {}

    def layer_dicts(self):
        return [stats.as_dict() for stats in self.masks.values()]

    def attention_dicts(self):
        out = []
        for name, layer in self.attentions.items():
            values = torch.cat(self.attention_values[name]) if self.attention_values[name] else torch.zeros(0)
            out.append(OrderedDict(name=name, block=layer.block, stage=layer.stage, heads=layer.heads,
                                   channels=layer.channels, mask=layer.mask,
                                   over="open channels" if layer.mask else "all channels",
                                   **summarize_values(values)))
        return out


class _Extremes:
    """The k cheapest and k most expensive images seen so far (by MACs; ties: the earlier image)."""

    def __init__(self, k):
        self.k = k
        self.low, self.high = [], []  # heaps of (key, -index, index, payload): the root is the first out

    def add(self, index, macs, payload_fn):
        for heap, key in ((self.low, -macs), (self.high, macs)):
            if len(heap) < self.k:
                heapq.heappush(heap, (key, -index, index, payload_fn()))
            elif self.k and (key, -index) > heap[0][:2]:
                heapq.heapreplace(heap, (key, -index, index, payload_fn()))

    def result(self):
        low = sorted(self.low, key=lambda t: (-t[0], t[2]))
        high = sorted(self.high, key=lambda t: (-t[0], t[2]))
        return [t[3] for t in low], [t[3] for t in high]


class _Samples:
    """Per-image MACs, labels and predictions, and the extreme images."""

    def __init__(self, keep_extremes):
        self.macs, self.labels, self.preds = [], [], []
        self.extremes = _Extremes(keep_extremes)

    def add(self, images, labels, outputs):
        macs = outputs["macs"].double().cpu().tolist()
        preds = outputs["logits"].argmax(1).cpu().tolist()
        for i, (m, y, p) in enumerate(zip(macs, labels.tolist(), preds)):
            index = len(self.macs)
            self.extremes.add(index, m, lambda: (index, m, int(y), int(p), images[i].detach().cpu()))
            self.macs.append(m)
            self.labels.append(int(y))
            self.preds.append(int(p))


def _first(batches, num_images):
    """The batches, cut after ``num_images`` images (None: all)."""
    seen = 0
    for images, labels in batches:
        if num_images is not None:
            if seen >= num_images:
                return
            images, labels = images[:num_images - seen], labels[:num_images - seen]
        seen += len(images)
        yield images, labels


def _stages(layers):
    stages = OrderedDict()
    for layer in layers:
        entry = stages.setdefault(layer["stage"], {"stage": layer["stage"], "layers": [], "spectrum_layers": [],
                                                   "dense_macs": 0, "executed_macs": 0.0})
        entry["layers"].append(layer["name"])
        if layer["spectrum"]:
            entry["spectrum_layers"].append(layer["name"])
        if layer["dense_macs"] is not None:
            entry["dense_macs"] += layer["dense_macs"]
            entry["executed_macs"] += layer["executed_macs"]
    by_name = {layer["name"]: layer for layer in layers}
    for entry in stages.values():
        values = [by_name[n]["jaccard"] for n in entry["spectrum_layers"]]
        entry["jaccard"] = sum(values) / len(values) if values else None
    return list(stages.values())


def collect_gate_statistics(model, batches, num_images=None, keep_extremes: int = 8, class_names=None,
                            preprocess=None) -> tuple:
    """Run ``model`` (a classifier) in eval mode over ``batches`` and measure its gates.

    Args:
        model: an msgc :class:`~msgc.modeling.Classifier` (``model(images)`` gives ``logits`` and ``macs``).
        batches: an iterable of ``(images, labels)`` (a loader's uint8 images, or normalised float ones,
            on any device).
        num_images: stop after this many images (None: all).
        keep_extremes: how many of the cheapest and of the most expensive images to keep.
        class_names: names of the labels (default: their numbers).
        preprocess: ``(images, device) -> images``, the model's input on its device:
            :func:`msgc.data.build_normalizer` for uint8 batches (default :func:`msgc.data.to_device`).

    Returns:
        ``(stats, extremes)``: the dict described in this module's docstring, and ``{"cheapest": [...],
        "most_expensive": [...]}`` lists of ``3 x H x W`` image tensors (as ``batches`` gave them) in the
        order of ``stats["extremes"]``.

    Raises:
        ValueError: no image in ``batches``.
    """
    device = next(model.parameters()).device
    preprocess = to_device if preprocess is None else preprocess
    recorder, size = None, None
    samples = _Samples(keep_extremes)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for images, labels in _first(batches, num_images):
                if recorder is None:  # the layers' costs depend on the input size
                    size = tuple(images.shape[-2:])
                    layers = gated_layers(model.backbone, *size), attention_layers(model.backbone, *size)
                    recorder = stack.enter_context(GateRecorder(*layers))
                outputs = model(preprocess(images, device))
                recorder.end_batch()
                samples.add(images, labels, outputs)
    finally:
        model.train(was_training)
    if not samples.macs:
        raise InvalidValueError("no image to measure the gates on: the dataset is empty or --num-images is 0")
    return _report(model, size, recorder, samples, class_names)


def _report(model, size, recorder, samples, class_names):
    macs, labels, preds = samples.macs, samples.labels, samples.preds
    layers = recorder.layer_dicts()
    n = len(macs)
    num_classes = max(max(labels), max(preds)) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    per_class = [[m for m, y in zip(macs, labels) if y == c] for c in range(len(names))]
    low, high = samples.extremes.result()
    dense = model.dense_macs(*size) if hasattr(model, "dense_macs") else None
    stats = OrderedDict(
        num_images=n, input_size=list(size), heads=model.backbone.heads, dense_macs=dense,
        mean_macs=sum(macs) / n, mac_ratio=None if not dense else sum(macs) / n / dense,
        top1=100.0 * sum(y == p for y, p in zip(labels, preds)) / n, spectrum_definition=SPECTRUM,
        layers=layers, stages=_stages(layers), attention=recorder.attention_dicts(),
        images=OrderedDict(macs=macs, labels=labels, predictions=preds),
        classes=OrderedDict(names=names, count=[len(v) for v in per_class],
                            mean_macs=[sum(v) / len(v) if v else None for v in per_class]),
        extremes=OrderedDict((key, [OrderedDict(index=i, macs=m, label=y, prediction=p) for i, m, y, p, _ in items])
                             for key, items in (("cheapest", low), ("most_expensive", high))))
    images = {"cheapest": [t[4] for t in low], "most_expensive": [t[4] for t in high]}
    return stats, images


def select_layers(stats: dict, k: int = 4) -> list:
    """Names of up to ``k`` masks worth drawing, in network order: the last grouped-convolution mask of
    each stage (evenly spaced stages when there are more than ``k``), then other masks."""
    order = [layer["name"] for layer in stats["layers"]]
    per_stage = [(s["spectrum_layers"] or s["layers"])[-1] for s in stats["stages"] if s["layers"]]
    if len(per_stage) > k:
        step = (len(per_stage) - 1) / max(k - 1, 1)
        chosen = [per_stage[round(i * step)] for i in range(k)]
    else:
        spectrum = [layer["name"] for layer in stats["layers"] if layer["spectrum"]]
        chosen = list(dict.fromkeys(per_stage + spectrum[::-1] + order[::-1]))[:k]
    return sorted(set(chosen), key=order.index)
