"""The evaluator interface and :func:`inference_on_dataset`, which feeds a model's outputs to one."""
import datetime
import logging
import time
from contextlib import contextmanager

import torch

from ..data.preprocess import to_device
from ..utils import comm

__all__ = ["DatasetEvaluator", "inference_on_dataset"]

logger = logging.getLogger(__name__)


class DatasetEvaluator:
    """Accumulates a metric over the batches of a dataset, possibly split over processes.

    ``reset()`` starts over, ``process(batch, outputs)`` takes one batch (``(images, labels)``) and
    the model's eval outputs for it, ``evaluate()`` combines what every process saw and returns the same
    ``{metric: value}`` dict on all of them. It is a collective call when several processes run.
    """

    def reset(self):
        pass

    def process(self, batch, outputs):
        raise NotImplementedError  # abstract: every evaluator implements it

    def evaluate(self) -> dict:
        raise NotImplementedError  # abstract: every evaluator implements it


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def inference_on_dataset(model, data_loader, evaluator: DatasetEvaluator, log_period_s: float = 10.0,
                         preprocess=None) -> dict:
    """Run ``model`` in eval mode over ``data_loader`` (this process's shard) and return the evaluation.

    Each batch is ``(images, labels)``; ``preprocess(images, device)`` makes the model's input on its
    device: :class:`msgc.data.Normalizer` for the uint8 batches of msgc's loaders (default
    :func:`msgc.data.to_device`, which only moves normalised images). The evaluator gets the batch as
    the loader gave it. The model is put back in its previous mode afterwards. Progress is logged every
    ``log_period_s`` seconds.

    Returns:
        ``evaluator.evaluate()``: the same dict on every process.
    """
    preprocess = to_device if preprocess is None else preprocess
    device = next(model.parameters()).device
    evaluator.reset()
    total = _length(data_loader)
    start = last_log = time.perf_counter()
    seen = 0
    with _eval_mode(model), torch.no_grad():
        for i, (images, labels) in enumerate(data_loader):
            outputs = model(preprocess(images, device))
            evaluator.process((images, labels), outputs)
            seen += len(images)
            if time.perf_counter() - last_log > log_period_s:
                last_log = time.perf_counter()
                logger.info("Inference: batch %d/%s, %.4f s/image", i + 1, total, (last_log - start) / seen)
    elapsed = time.perf_counter() - start
    logger.info("Inference on %d images of this process took %s (%.4f s/image)", seen,
                datetime.timedelta(seconds=int(elapsed)), elapsed / max(seen, 1))
    comm.synchronize()
    return evaluator.evaluate()


def _length(loader):
    try:
        return len(loader)
    except TypeError:
        return "?"
