"""The hooks of a training run: timing, schedules, seeding, checkpoints, evaluation, gate summaries and
writing metrics."""
import datetime
import inspect
import logging
import math
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from ..utils import comm
from ..utils.preemption import EXIT_STATUS, Preempted, StopRequest
from .train_loop import HookBase

__all__ = ["IterationTimer", "LRScheduler", "MACTargetSchedule", "GateNoiseSchedule", "IterationSeed",
           "PeriodicCheckpointer", "PreemptionCheckpointer", "EvalHook", "BestCheckpointer", "PeriodicWriter",
           "GateSummary", "unwrap_model"]

logger = logging.getLogger(__name__)


def unwrap_model(model):
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class IterationTimer(HookBase):
    """Logs each step's duration as ``time`` and the total training time at the end.

    Args:
        warmup_iters: first iterations left out of the reported speed (they include start-up costs).
    """

    def __init__(self, warmup_iters: int = 3):
        self._warmup = warmup_iters
        self._train_start = self._step_start = time.perf_counter()
        self._steady = 0.0
        self._steady_iters = 0

    def before_train(self):
        self._train_start = time.perf_counter()

    def before_step(self):
        self._step_start = time.perf_counter()

    def after_step(self):
        seconds = time.perf_counter() - self._step_start
        if self.trainer.iter >= self.trainer.start_iter + self._warmup:
            self._steady += seconds
            self._steady_iters += 1
        self.trainer.storage.put_scalar("time", seconds)

    def after_train(self):
        total = time.perf_counter() - self._train_start
        if self._steady_iters:
            logger.info("Overall training speed: %d iterations in %s (%.4f s/it)", self._steady_iters,
                        datetime.timedelta(seconds=int(self._steady)), self._steady / self._steady_iters)
        logger.info("Total training time: %s", datetime.timedelta(seconds=int(total)))


class LRScheduler(HookBase):
    """Logs the learning rate of every parameter group (``lr/<group name>``), then steps the scheduler.

    Args:
        optimizer, scheduler: default to the trainer's ``optimizer`` and ``scheduler``.
    """

    def __init__(self, optimizer=None, scheduler=None):
        self._optimizer = optimizer
        self._scheduler = scheduler

    def after_step(self):
        optimizer = self._optimizer or self.trainer.optimizer
        for i, group in enumerate(optimizer.param_groups):
            self.trainer.storage.put_scalar(f"lr/{group.get('name', i)}", group["lr"], smoothing_hint=False)
        (self._scheduler or self.trainer.scheduler).step()


class MACTargetSchedule(HookBase):
    """Sets the model's MAC target for each iteration: ``model.set_mac_target(scheduler.target())``.

    For a model trained for a range of budgets (``MODEL.MSGC.BUDGET_RANGE``) it gives each image of the
    iteration's batch its budget (``scheduler.budgets(images)``) as the generators' input and its target
    to the model (``set_mac_target(targets, groups)``) before the step, and after the step sets the
    generators back to their default (the range's upper end), which evaluations between steps use.

    Args:
        model: the model (DistributedDataParallel is unwrapped); it must have ``set_mac_target``.
        scheduler: a :class:`msgc.solver.MACTargetScheduler`, stepped after each iteration.
        images: the images of one process's training batch (needed with a budget range).
    """

    def __init__(self, model, scheduler, images: int = 0):
        model = unwrap_model(model)
        if not hasattr(model, "set_mac_target"):
            raise TypeError(f"{type(model).__name__} has no set_mac_target(): it cannot follow a MAC-target "
                            "schedule")
        if scheduler.budget_range is not None and "groups" not in inspect.signature(model.set_mac_target).parameters:
            from ..utils.errors import InvalidValueError

            raise InvalidValueError(f"MODEL.MSGC.BUDGET_RANGE: {type(model).__name__} takes no per-image MAC targets "
                                    "(set_mac_target(targets, groups)); train it for one budget (remove the key)")
        self._model = model
        self._scheduler = scheduler
        self._images = images

    def before_step(self):
        budgets = self._scheduler.budgets(self._images)
        if budgets is None:
            self._model.set_mac_target(self._scheduler.target())
            return
        from ..modeling.layers import set_budget_inputs
        from ..solver.mac_scheduler import budget_slots

        set_budget_inputs(self._model, budgets)
        self._model.set_mac_target(self._scheduler.target(budgets=budgets), groups=budget_slots(len(budgets)))

    def after_step(self):
        if self._scheduler.budget_range is not None:
            from ..modeling.layers import set_budget_inputs

            set_budget_inputs(self._model, None)
            self._model.set_mac_target(1.0)
        self._scheduler.step()


class GateNoiseSchedule(HookBase):
    """Sets the scale of the gates' training noise for each iteration from a schedule of the training
    progress (``SOLVER.GATE_NOISE``), and logs it as ``gate_noise`` when it is not the paper's 1.0.

    It holds no state: the scale of an iteration is a function of the iteration alone, so a resumed
    run continues the schedule exactly.

    Args:
        model: the model (DistributedDataParallel is unwrapped).
        schedule: progress in [0, 1] -> noise scale.
        max_iter: iterations of the whole training.
    """

    def __init__(self, model, schedule, max_iter: int):
        from ..modeling import set_gate_noise

        self._model, self._schedule, self._max_iter = unwrap_model(model), schedule, max_iter
        self._set = set_gate_noise

    def before_step(self):
        scale = float(self._schedule(min(self.trainer.iter, self._max_iter - 1) / self._max_iter))
        self._set(self._model, scale)
        if scale != 1.0:
            self.trainer.storage.put_scalar("gate_noise", scale, smoothing_hint=False)


class IterationSeed(HookBase):
    """Re-seeds torch's random generators at each iteration from (seed, iteration, rank).

    Random numbers drawn during a step (the gates' noise, dropout) then depend only on the iteration,
    so a run resumed from a checkpoint draws exactly what the uninterrupted run drew. (The training
    loader's augmentations have generators of their own, see :class:`msgc.data.SeededSamples`.)
    """

    def __init__(self, seed: int):
        self._seed = int(seed)

    def before_step(self):
        mixed = (self._seed * 1_000_003 + self.trainer.iter) * 1009 + comm.get_rank()
        torch.manual_seed(mixed % (2 ** 63))


class PeriodicCheckpointer(HookBase):
    """Saves ``<prefix>_<iter>`` every ``period`` iterations and ``model_final`` after the last one.

    Only the main process writes (the checkpointer's ``save_to_disk``). Each save records the finished
    iteration; ``save_kwargs`` (e.g. ``cfg=cfg``) are passed to every save. After each periodic save,
    the periodic checkpoints beyond the newest ``max_to_keep`` are deleted (0 keeps all; see
    ``MSGCCheckpointer.remove_old``: the file named in ``last_checkpoint`` always stays).
    """

    def __init__(self, checkpointer, period: int, max_iter: int = None, file_prefix: str = "model",
                 max_to_keep: int = 0, **save_kwargs):
        self._checkpointer = checkpointer
        self._period = int(period)
        self._max_iter = max_iter
        self._prefix = file_prefix
        self._keep = int(max_to_keep)
        self._kwargs = save_kwargs

    def after_step(self):
        it = self.trainer.iter
        max_iter = self._max_iter or self.trainer.max_iter
        if it + 1 >= max_iter:
            self._checkpointer.save(f"{self._prefix}_final", iteration=it, **self._kwargs)
        elif self._period > 0 and (it + 1) % self._period == 0:
            self._checkpointer.save(f"{self._prefix}_{it:07d}", iteration=it, **self._kwargs)
            if self._keep > 0:
                self._checkpointer.remove_old(self._prefix, self._keep)


class PreemptionCheckpointer(HookBase):
    """On SIGTERM or SIGUSR1: finish the step, save it, and stop with exit status 143.

    Schedulers send SIGTERM before they kill a job (SLURM's ``--signal=USR1@<seconds>`` sends SIGUSR1
    ahead of the end). The handler only records the signal (:class:`msgc.utils.preemption.StopRequest`,
    installed from ``before_train`` to ``after_train``). After every ``check_period``-th step the
    processes agree whether any of them received one (one tiny all-reduce over gloo, see
    :func:`msgc.utils.comm.any_process`), so that all stop after the same iteration; then the main
    process saves ``<prefix>_<iter>`` (unless this iteration's checkpoint was just saved), deletes
    periodic checkpoints beyond ``max_to_keep``, logs the command that resumes the run, and every
    process raises :class:`~msgc.utils.preemption.Preempted` once the save is done. More signals
    during the save are recorded and change nothing; the save itself is atomic.

    Register it after :class:`PeriodicCheckpointer` (it reuses that save) and before
    :class:`EvalHook` (a stopping run does not start an evaluation; a signal during one takes effect
    after it).

    Args:
        checkpointer: the trainer's checkpointer.
        file_prefix, max_to_keep: as :class:`PeriodicCheckpointer`'s.
        resume_command: () -> the command line that resumes the run, for the log.
        check_period: steps between two checks (1: every step).
        save_kwargs: passed to the save (e.g. ``cfg=cfg``).
    """

    def __init__(self, checkpointer, file_prefix: str = "model", max_to_keep: int = 0, resume_command=None,
                 check_period: int = 1, **save_kwargs):
        self._checkpointer = checkpointer
        self._prefix = file_prefix
        self._keep = int(max_to_keep)
        self._command = resume_command
        self._period = max(1, int(check_period))
        self._kwargs = save_kwargs
        self.request = StopRequest()

    def before_train(self):
        if not self.request.install():
            logger.warning("Training runs outside the main thread: SIGTERM and SIGUSR1 cannot be caught, "
                           "a signal ends the run without a checkpoint")

    def after_train(self):
        self.request.uninstall()

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self._period and it + 1 < self.trainer.max_iter:
            return
        if not comm.any_process(self.request.requested):
            return
        received = self.request.names() or "a stop signal (in another process)"
        logger.warning("%s received: stopping after iteration %d", received, it)
        name = f"{self._prefix}_final" if it + 1 >= self.trainer.max_iter else f"{self._prefix}_{it:07d}"
        if getattr(self._checkpointer, "last_saved_iteration", None) != it:
            self._checkpointer.save(name, iteration=it, **self._kwargs)
            if self._keep > 0:
                self._checkpointer.remove_old(self._prefix, self._keep)
        comm.synchronize()  # nobody leaves before the checkpoint is on disk
        message = f"stopped by {received} after iteration {it}"
        if comm.is_main_process():
            logger.warning("Stopped after iteration %d with a checkpoint (exit status %d). Resume with:\n  %s",
                           it, EXIT_STATUS, self._command() if self._command else "the same command with --resume")
        raise Preempted(message)


class EvalHook(HookBase):
    """Evaluates every ``period`` iterations and after the last one; logs results as ``val/<metric>``.

    The results of the latest evaluation are kept in ``trainer.last_eval_results``.

    Args:
        period: iterations between evaluations; 0 evaluates only at the end.
        eval_function: () -> {metric: number}; called on every process (it gathers across them).
    """

    def __init__(self, period: int, eval_function):
        self._period = int(period)
        self._func = eval_function

    def _do_eval(self):
        results = self._func()
        for name, value in results.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"evaluation returned a non-finite or non-number '{name}': {value!r}")
        self.trainer.storage.put_scalars(smoothing_hint=False, **{f"val/{k}": v for k, v in results.items()})
        self.trainer.last_eval_results = results
        comm.synchronize()

    def after_step(self):
        done = self.trainer.iter + 1
        if self._period > 0 and done % self._period == 0 and done < self.trainer.max_iter:
            self._do_eval()

    def after_train(self):
        if self.trainer.iter >= self.trainer.max_iter:  # only after a complete run, not after a crash
            self._do_eval()


class BestCheckpointer(HookBase):
    """Saves ``model_best`` when a new evaluation beats the best value of ``metric`` so far.

    Register it after :class:`EvalHook`: it reads what the evaluation just logged. The best value
    travels in checkpoints, so a resumed run only saves models better than those before the crash.

    Args:
        checkpointer: the trainer's checkpointer.
        metric: the logged metric (``val/top1`` = validation top-1).
        mode: "max" or "min".
        file_prefix: name of the saved file.
        save_kwargs: passed to the save (e.g. ``cfg=cfg``).
    """

    def __init__(self, checkpointer, metric: str = "val/top1", mode: str = "max", file_prefix: str = "model_best",
                 **save_kwargs):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got '{mode}'")
        self._checkpointer = checkpointer
        self._metric = metric
        self._mode = mode
        self._prefix = file_prefix
        self._kwargs = save_kwargs
        self._seen = 0
        self.best = None
        self.best_iter = None

    def _check(self):
        storage = self.trainer.storage
        count = storage.put_counts().get(self._metric, 0)
        if count == self._seen:
            return
        self._seen = count
        value, it = storage.latest()[self._metric]
        if self.best is None or (value > self.best if self._mode == "max" else value < self.best):
            logger.info("New best %s: %.4f at iteration %d (previous: %s); saving %s", self._metric, value, it,
                        "none" if self.best is None else f"{self.best:.4f}", self._prefix)
            self.best, self.best_iter = value, it
            self._checkpointer.save(self._prefix, iteration=it, **self._kwargs)

    def after_step(self):
        self._check()

    def after_train(self):
        self._check()

    def state_dict(self) -> dict:
        return {} if self.best is None else {"best": self.best, "best_iter": self.best_iter}

    def load_state_dict(self, state: dict):
        self.best, self.best_iter = state.get("best"), state.get("best_iter")


class PeriodicWriter(HookBase):
    """Runs the event writers every ``period`` iterations, after the last iteration and at the end.

    Register it last, so that it writes what every other hook logged at the same iteration.
    """

    def __init__(self, writers, period: int = 20):
        self._writers = list(writers)
        self._period = max(int(period), 1)

    def _write(self):
        for writer in self._writers:
            writer.write()

    def after_step(self):
        done = self.trainer.iter + 1
        if done % self._period == 0 or done == self.trainer.max_iter:
            self._write()

    def after_train(self):
        self._write()
        for writer in self._writers:
            writer.close()


class GateSummary(HookBase):
    """After each evaluation, measures the gates on test images and queues them for TensorBoard.

    It logs, at the evaluation's iteration: a histogram of the per-image MACs (``gates/macs_per_image``),
    each mask's open rate as a scalar (``gates/open/<layer>``, also in ``metrics.json``), and the
    group-wise usage maps (heads x channels, channels ordered shared-first) of ``num_maps`` layers as
    images (``gates/group_wise/<layer>``); see :mod:`msgc.analysis.gates`. Register it after
    :class:`EvalHook` (it notices a new ``trainer.last_eval_results``) and before the writers, on the
    main process only: it runs its own eval-mode pass over the first ``num_images`` test images.

    Args:
        model: the classifier (DistributedDataParallel is unwrapped).
        data_loader_fn: () -> iterable of ``(images, labels)``, built for each summary and dropped after
            it (a loader read only in part would keep its persistent workers' prefetched batches).
        num_images: images measured per evaluation.
        num_maps: layers whose usage maps become images.
        preprocess: ``(images, device) -> images`` (see :func:`msgc.analysis.collect_gate_statistics`).
    """

    def __init__(self, model, data_loader_fn, num_images: int = 256, num_maps: int = 4, preprocess=None):
        self._model = unwrap_model(model)
        self._loader_fn = data_loader_fn
        self._num_images = int(num_images)
        self._num_maps = int(num_maps)
        self._preprocess = preprocess
        self._seen = None

    def _summarize(self):
        from ..analysis import collect_gate_statistics, select_layers
        from ..analysis.figures import usage_image

        results = getattr(self.trainer, "last_eval_results", None)
        if results is None or results is self._seen:
            return
        self._seen = results
        stats, _ = collect_gate_statistics(self._model, self._loader_fn(), self._num_images, keep_extremes=0,
                                           preprocess=self._preprocess)
        storage = self.trainer.storage
        storage.put_histogram("gates/macs_per_image", torch.tensor(stats["images"]["macs"], dtype=torch.float64))
        layers = {layer["name"]: layer for layer in stats["layers"]}
        for name, layer in layers.items():
            storage.put_scalar(f"gates/open/{name}", layer["open"], smoothing_hint=False)
        for name in select_layers(stats, self._num_maps):
            storage.put_image(f"gates/group_wise/{name}", usage_image(layers[name]["usage"], layers[name]["order"]))

    def after_step(self):
        self._summarize()

    def after_train(self):
        self._summarize()
