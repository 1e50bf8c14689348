"""The training loop: hooks, a trainer base that owns the loop, and the one-step trainers.

:class:`TrainerBase` runs ``before_train``, then for every iteration ``before_step``, ``run_step``,
``after_step``, then ``after_train``, calling the registered hooks at each point in their order.
Everything else (schedules, checkpoints, evaluation, logging) is a hook. :class:`SimpleTrainer` and
:class:`AMPTrainer` implement ``run_step`` for a model that returns a dict of losses.
"""
import logging
import math
import time
import weakref

import torch

from ..data.preprocess import to_device
from ..utils.errors import InvalidValueError, UserError, one_line
from ..utils.events import EventStorage, get_event_storage

__all__ = ["HookBase", "TrainerBase", "SimpleTrainer", "AMPTrainer", "NonFiniteLossError", "backward_and_step",
           "total_loss"]

logger = logging.getLogger(__name__)


class HookBase:
    """A piece of training logic called at fixed points of :meth:`TrainerBase.train`.

    Subclasses override any of ``before_train``, ``before_step``, ``after_step`` and ``after_train``.
    ``self.trainer`` (a weak proxy) is set when the hook is registered; ``trainer.iter`` is the current
    iteration and ``trainer.storage`` the open :class:`~msgc.utils.events.EventStorage`. A hook with state
    worth resuming returns it from :meth:`state_dict` (plain Python values); it travels in checkpoints.
    """

    trainer = None

    def before_train(self):
        pass

    def after_train(self):
        pass

    def before_step(self):
        pass

    def after_step(self):
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class TrainerBase:
    """Owns the loop over iterations, the hooks and the :class:`EventStorage` of a training run.

    Subclasses implement :meth:`run_step`. ``iter`` is the current iteration; after a complete run it
    equals ``max_iter``, which hooks use to tell a finished run from an interrupted one.
    """

    def __init__(self):
        self._hooks = []
        self.iter = 0
        self.start_iter = 0
        self.max_iter = 0
        self.storage = None

    def register_hooks(self, hooks):
        """Append hooks (None entries are skipped); they run in the order registered."""
        for h in hooks:
            if h is None:
                continue
            if not isinstance(h, HookBase):
                raise TypeError(f"a hook must be a HookBase, got {type(h).__name__}")
            h.trainer = weakref.proxy(self)  # no reference cycle between trainer and hooks
            self._hooks.append(h)

    def train(self, start_iter: int, max_iter: int):
        """Run iterations ``start_iter`` .. ``max_iter - 1``."""
        logger.info("Starting training from iteration %d to %d", start_iter, max_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        with EventStorage(start_iter) as self.storage:
            try:
                self.before_train()
                for self.iter in range(start_iter, max_iter):
                    self.before_step()
                    self.run_step()
                    self.after_step()
                self.iter = max_iter  # marks a finished run for the after_train hooks
            except UserError as e:  # bad input: the command line shows it in one line, no traceback
                logger.error("Training stopped at iteration %d: %s", self.iter, one_line(e))
                raise
            except Exception:
                logger.exception("Exception during training at iteration %d:", self.iter)
                raise
            finally:
                self.after_train()

    def before_train(self):
        for h in self._hooks:
            h.before_train()

    def after_train(self):
        self.storage.iter = min(self.iter, self.max_iter - 1)
        for h in self._hooks:
            h.after_train()

    def before_step(self):
        self.storage.iter = self.iter
        for h in self._hooks:
            h.before_step()

    def after_step(self):
        for h in self._hooks:
            h.after_step()

    def run_step(self):
        raise NotImplementedError  # abstract: SimpleTrainer, AMPTrainer and DefaultTrainer implement it

    def state_dict(self) -> dict:
        """The hooks' states, keyed by hook class name (the iteration travels beside it)."""
        hooks = {}
        for h in self._hooks:
            state = h.state_dict()
            if state:
                hooks[type(h).__qualname__] = state
        return {"hooks": hooks}

    def load_state_dict(self, state: dict):
        saved = dict(state.get("hooks", {}))
        for h in self._hooks:
            name = type(h).__qualname__
            if name in saved:
                h.load_state_dict(saved.pop(name))
        for name in saved:
            logger.warning("The checkpoint has the state of a hook %s that this trainer does not have", name)


class SimpleTrainer(TrainerBase):
    """One step = one batch, the model's loss dict, backward, optimizer step.

    The model takes ``model(images, labels)`` in training mode and returns a dict: entries whose key
    starts with ``loss_`` are summed into the loss; the others (e.g. ``mac_ratio``) are logged as
    metrics. A non-finite loss stops training with an error naming the iteration and every loss.

    Args:
        model: a module in training mode (possibly DistributedDataParallel).
        data_loader: an iterable of ``(images, labels)`` batches, endless; may be set later (before
            ``train``) through the ``data_loader`` attribute.
        optimizer: the optimizer of the model's parameters.
        check_finite_loss: raise :class:`FloatingPointError` on a NaN or infinite loss.
        preprocess: ``(images, device) -> images``, what turns a batch's images into the model's input
            on its device: :class:`msgc.data.Normalizer` for uint8 batches; default
            :func:`msgc.data.to_device` (move only, for batches already normalised).
    """

    # Metrics that change slowly and are reported as logged, not as a median over a window.
    unsmoothed_metrics = ("mac_target",)

    def __init__(self, model, data_loader, optimizer, check_finite_loss: bool = True, preprocess=None):
        super().__init__()
        self.model = model
        self.data_loader = data_loader
        self.optimizer = optimizer
        self.check_finite_loss = check_finite_loss
        self.preprocess = to_device if preprocess is None else preprocess
        self._data_iter = None
        self.device = next(model.parameters()).device

    def drop_data_iterator(self):
        """Forget the data loader's iterator (a DataLoader's worker processes end with it); the next
        batch starts a new one."""
        self._data_iter = None

    def after_train(self):
        super().after_train()
        self.drop_data_iterator()

    def next_batch(self):
        """The next ``(images, labels)`` on the model's device (images through ``preprocess``), and the
        seconds spent waiting for the loader."""
        if self._data_iter is None:
            if self.data_loader is None:
                raise RuntimeError("the trainer has no data loader: set trainer.data_loader before train()")
            self._data_iter = iter(self.data_loader)
        start = time.perf_counter()
        images, labels = next(self._data_iter)
        data_time = time.perf_counter() - start
        labels = labels.to(self.device, non_blocking=self.device.type == "cuda")
        return self.preprocess(images, self.device), labels, data_time

    def run_step(self):
        if not self.model.training:
            raise RuntimeError("SimpleTrainer.run_step needs the model in training mode (call model.train())")
        images, labels, data_time = self.next_batch()
        outputs = self.model(images, labels)
        loss = total_loss(outputs)
        backward_and_step(loss, self.optimizer, before_step=lambda: self.write_metrics(outputs, loss, data_time))

    def write_metrics(self, outputs: dict, loss: torch.Tensor, data_time: float):
        """Log losses and metrics of this step (this process's values); check that the loss is finite."""
        values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in outputs.items()}
        total = float(loss.detach())
        if self.check_finite_loss and not math.isfinite(total):
            losses = ", ".join(f"{k}={v:.6g}" for k, v in values.items() if k.startswith("loss_"))
            raise NonFiniteLossError(f"loss is not finite at iteration {self.iter}: {losses} (total {total}); "
                                     "lower the learning rate or check the data")
        storage = get_event_storage()
        storage.put_scalars(total_loss=total, data_time=data_time)
        for k, v in values.items():
            storage.put_scalar(k, v, smoothing_hint=k not in self.unsmoothed_metrics)

    def state_dict(self) -> dict:
        return {}


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss became NaN or infinite: training diverged (the message names the iteration and the losses)."""


def total_loss(outputs: dict) -> torch.Tensor:
    """The sum of a model output's ``loss_*`` entries."""
    losses = [v for k, v in outputs.items() if k.startswith("loss_")]
    if not losses:
        raise ValueError(f"the model returned no loss (no key starting with 'loss_'): got {sorted(outputs)}")
    return sum(losses)


def backward_and_step(loss: torch.Tensor, optimizer, grad_scaler=None, before_step=None) -> None:
    """One optimizer step on ``loss``: the gradients cleared, the backward pass, ``before_step()``, the step.

    The step of :class:`SimpleTrainer` and :class:`AMPTrainer`, and of anything that must train exactly as
    they do (``tools/benchmark.py`` times it).

    Args:
        loss: the scalar to minimise (e.g. :func:`total_loss` of a model's outputs).
        optimizer: the optimizer of the parameters that ``loss`` depends on.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 autocast: the loss is scaled before the
            backward pass, and the step unscales the gradients (skipping the step on overflow) and
            updates the scale. None: a plain backward pass and step.
        before_step: called after the backward pass, before the parameters change (the trainers log
            their metrics there, and stop on a non-finite loss); None: nothing.
    """
    optimizer.zero_grad(set_to_none=True)
    if grad_scaler is None:
        loss.backward()
    else:
        grad_scaler.scale(loss).backward()
    if before_step is not None:
        before_step()
    if grad_scaler is None:
        optimizer.step()
    else:
        grad_scaler.step(optimizer)
        grad_scaler.update()


_AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class AMPTrainer(SimpleTrainer):
    """:class:`SimpleTrainer` with the forward pass under ``torch.autocast``.

    bfloat16 needs no loss scaling; float16 uses a ``torch.amp.GradScaler`` whose state travels in
    checkpoints.

    Args:
        dtype: "bfloat16" or "float16" (or the torch dtype).
        grad_scaler: a GradScaler to use with float16 (default: a new one for the model's device).
        Others as :class:`SimpleTrainer`.
    """

    def __init__(self, model, data_loader, optimizer, dtype="bfloat16", check_finite_loss: bool = True,
                 grad_scaler=None, preprocess=None):
        super().__init__(model, data_loader, optimizer, check_finite_loss, preprocess)
        if isinstance(dtype, str):
            if dtype not in _AMP_DTYPES:
                raise InvalidValueError(f"SOLVER.AMP.DTYPE must be one of {sorted(_AMP_DTYPES)}, got '{dtype}'")
            dtype = _AMP_DTYPES[dtype]
        self.dtype = dtype
        if dtype == torch.float16 and grad_scaler is None:
            grad_scaler = torch.amp.GradScaler(self.device.type)
        self.grad_scaler = grad_scaler

    def run_step(self):
        if not self.model.training:
            raise RuntimeError("AMPTrainer.run_step needs the model in training mode (call model.train())")
        images, labels, data_time = self.next_batch()
        with torch.autocast(self.device.type, dtype=self.dtype):
            outputs = self.model(images, labels)
            loss = total_loss(outputs)
        backward_and_step(loss, self.optimizer, self.grad_scaler,
                          before_step=lambda: self.write_metrics(outputs, loss, data_time))

    def state_dict(self) -> dict:
        return {"grad_scaler": self.grad_scaler.state_dict()} if self.grad_scaler is not None else {}

    def load_state_dict(self, state: dict):
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
