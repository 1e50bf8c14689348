"""The default training set-up: command-line arguments, output folder and logging, and ``DefaultTrainer``.

``tools/train_net.py`` shows how they fit together. Research code changes behaviour by subclassing
:class:`DefaultTrainer` and overriding its ``build_*`` class methods, or by registering hooks.
"""
import argparse
import functools
import logging
import os
import random
import shlex
import sys
import weakref

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import MSGCCheckpointer
from ..checkpoint.formats import detect_format, read_checkpoint
from ..data.samplers import skip_batches
from ..evaluation import (ClassificationEvaluator, build_budget_table, calibrate_gates, inference_on_dataset,
                          results_table)
from ..modeling import (BudgetTable, Classifier, build_model, check_budget, fold_gate_thresholds, mask_generators,
                        set_budget, set_budget_table)
from ..modeling.budget import budget_range
from ..modeling.build import check_mac_target
from ..modeling.layers import set_budget_inputs, set_gate_thresholds
from ..solver import build_gate_noise_schedule, build_lr_scheduler, build_mac_scheduler, build_optimizer, check_solver
from ..utils import comm
from ..utils.env import machine_info
from ..utils.errors import ArgumentParser, InvalidValueError, MissingFileError, exit_on_user_error
from ..utils.events import default_writers
from ..utils.file_io import PathManager, is_url, write_json
from ..utils.imports import import_modules
from ..utils.logger import FILE_ONLY, log_files, setup_logger
from . import hooks
from .launch import launch
from .train_loop import AMPTrainer, SimpleTrainer, TrainerBase

__all__ = ["default_argument_parser", "default_setup", "exit_on_user_error", "launch_from_command_line",
           "check_mac_target",
           "add_import_argument", "import_user_modules", "record_dir", "log_model", "EVAL_SUBDIR",
           "resume_command", "create_ddp_model",
           "broadcast_buffers", "skip_batches", "DefaultTrainer"]

logger = logging.getLogger("msgc.engine")

#: the sub-folder of ``OUTPUT_DIR`` where ``--eval-only`` writes its config, log and results, so that an
#: evaluation never replaces the record of the training that made the weights
EVAL_SUBDIR = "eval"


class _TrainArgumentParser(ArgumentParser):
    """One-line errors; an option after the ``KEY VALUE`` overrides is an error saying to put it first.

    Everything after the first override is an override (argparse's REMAINDER), so ``... SOLVER.BASE_LR
    0.1 --resume`` would otherwise read ``--resume`` as a config key.
    """

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        parsed = super().parse_args(argv, namespace)
        options = {o for action in self._actions for o in action.option_strings}
        misplaced = [t for t in parsed.opts if t.split("=")[0] in options]
        if misplaced:
            self.error(f"{misplaced[0]} comes after the KEY VALUE overrides, where it would be read as a config "
                       f"key or value; put the options first: {self.prog} "
                       f"{shlex.join(self._options_first(argv, parsed.opts))}")
        return parsed

    def _options_first(self, argv, opts) -> list:
        """``argv`` with the options found among the overrides (and their values) moved before them."""
        takes = {o: 0 if action.nargs == 0 else 1 for action in self._actions for o in action.option_strings}
        moved, kept, i = [], [], 0
        while i < len(opts):
            n = takes.get(opts[i].split("=")[0])
            if n is None:
                kept.append(opts[i])
                i += 1
            else:
                n = 0 if "=" in opts[i] else n
                moved += opts[i:i + 1 + n]
                i += 1 + n
        return argv[: len(argv) - len(opts)] + moved + kept


def launch_from_command_line(main, load_config, trainer_cls, argv=None, epilog: str = None):
    """A training script's command line: parse ``argv`` (:func:`default_argument_parser`), load the
    config (``load_config(args)``), import the user modules of ``--import`` and ``IMPORTS``
    (:func:`import_user_modules`), check what can be checked before any process starts
    (``trainer_cls.check_config(cfg, args)``), then run ``main(args)`` on every process (:func:`launch`,
    whose spawned ranks import the same modules first).

    Bad input, found here, in any rank or in a data-loader worker, ends the run with one line
    ``error: ...`` and exit status 2; a run stopped by SIGTERM or SIGUSR1 exits with status 143 after
    saving a checkpoint.
    """
    with exit_on_user_error():
        args = default_argument_parser(epilog=epilog).parse_args(argv)
        cfg = load_config(args)
        import_user_modules(cfg, args)
        trainer_cls.check_config(cfg, args)
        return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                      dist_url=args.dist_url, args=(args,), device=cfg.MODEL.DEVICE)


def default_argument_parser(epilog: str = None) -> argparse.ArgumentParser:
    """The arguments of ``tools/train_net.py``: config, resume/eval, processes and machines, overrides.

    Errors are one line (``error: ...``, exit status 2), among them an option placed after the
    ``KEY VALUE`` overrides.
    """
    parser = _TrainArgumentParser(epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a yaml config")
    add_import_argument(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/last_checkpoint (model, optimizer, schedules, iteration)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS and exit")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes per machine: one per GPU, or CPU processes with MODEL.DEVICE cpu")
    parser.add_argument("--num-machines", type=int, default=1, help="number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="this machine's rank (0 .. num-machines-1)")
    parser.add_argument("--dist-url", default="auto",
                        help="tcp://<machine 0 address>:<port> where the processes meet; auto: a free local port")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs, after the options, e.g. SOLVER.BASE_LR 0.1 "
                        "MODEL.DEVICE cpu")
    return parser


def add_import_argument(parser):
    """The repeatable ``--import MODULE`` option (``args.imports``, a list) of the command lines."""
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import this module (e.g. my_project.tiny, found from the working folder) before "
                        "anything is built, in every process, so that its decorators register its backbones, "
                        "datasets, ...; repeat it for several; the config key IMPORTS lists more")
    return parser


def import_user_modules(cfg=None, args=None) -> list:
    """Import the modules of ``args.imports`` (``--import``), then those of ``cfg.IMPORTS``, and return them.

    Command lines call it once the config is loaded and before they build anything; the processes
    they start import the same modules (see :mod:`msgc.utils.imports`). A module that cannot be
    imported is a one-line error naming it and where it was asked for.
    """
    modules = import_modules(getattr(args, "imports", None) or [], "--import")
    if cfg is not None:
        modules += import_modules(cfg.IMPORTS, cfg.imports_origin())
    return modules


def resume_command(argv=None) -> str:
    """The command line that resumes this run: this process's, with ``--resume`` among its options.

    ``argv`` defaults to ``sys.argv`` (which spawned processes share with the command that started
    them). Under torchrun the torchrun options are not known here; the command says where they go.
    """
    argv = list(sys.argv if argv is None else argv)
    script, rest = argv[0], argv[1:]
    try:
        parsed, unknown = default_argument_parser().parse_known_args(rest)
        opts = parsed.opts if not unknown else []
    except SystemExit:  # not train_net's arguments
        opts = []
    head = rest[: len(rest) - len(opts)]
    if "--resume" not in head:
        head.append("--resume")
    launcher = ["torchrun", "<the same torchrun options>"] if "TORCHELASTIC_RUN_ID" in os.environ else ["python"]
    return " ".join(launcher + [shlex.quote(t) for t in [script] + head + opts])


def record_dir(cfg, eval_only: bool = False) -> str:
    """The folder where a run writes its ``config.yaml``, ``log.txt`` and results: ``OUTPUT_DIR`` for a
    training, ``OUTPUT_DIR/eval`` (:data:`EVAL_SUBDIR`) for an evaluation (``--eval-only``); "" when
    ``OUTPUT_DIR`` is empty (nothing is written)."""
    if not cfg.OUTPUT_DIR:
        return ""
    return os.path.join(cfg.OUTPUT_DIR, EVAL_SUBDIR) if eval_only else cfg.OUTPUT_DIR


def default_setup(cfg, args=None):
    """Prepare a run: output folder, logging, the seed, and a copy of the config.

    - creates the run's record folder (:func:`record_dir`: ``cfg.OUTPUT_DIR``, or ``OUTPUT_DIR/eval``
      with ``args.eval_only``, so that an evaluation leaves the training's files as they are); logs to
      the console (rank 0) and ``log.txt`` there;
    - adds the modules of ``args.imports`` (``--import``) to ``cfg.IMPORTS``, so that the saved config
      reruns as it is;
    - resolves ``SEED``: a negative seed is drawn once and shared by all ranks, and written into cfg so
      that ``config.yaml`` and every checkpoint record it; each rank seeds with ``SEED + rank``;
    - writes ``config.yaml`` there (rank 0), sets ``cudnn.benchmark`` and the CPU threads
      (``NUM_THREADS``).

    Call it before ``cfg.freeze()``.
    """
    rank = comm.get_rank()
    output_dir = record_dir(cfg, bool(getattr(args, "eval_only", False)))
    if output_dir and comm.is_main_process():
        PathManager.mkdirs(output_dir)
    setup_logger(output_dir, distributed_rank=rank)
    logger.info("Rank %d of %d; Python %s; torch %s", rank, comm.get_world_size(), sys.version.split()[0],
                torch.__version__)
    if args is not None:
        logger.info("Command line arguments: %s", args)
    added = [m for m in getattr(args, "imports", None) or [] if m not in cfg.IMPORTS]
    if added:
        cfg.IMPORTS = list(cfg.IMPORTS) + added
    _resolve_seed(cfg)
    seed_all_rng(cfg.SEED + rank)
    logger.info("Seed %d (this process: %d)", cfg.SEED, cfg.SEED + rank)
    if output_dir and comm.is_main_process():
        path = os.path.join(output_dir, "config.yaml")
        with PathManager.open(path, "w") as f:
            f.write(cfg.dump())
        logger.info("Full config saved to %s", path)
    torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
    if cfg.NUM_THREADS > 0:
        torch.set_num_threads(cfg.NUM_THREADS)


def _resolve_seed(cfg):
    if cfg.SEED >= 0:
        return
    drawn = int.from_bytes(os.urandom(4), "little") % (2 ** 31)
    seed = comm.all_gather(drawn)[0]  # rank 0's draw, for everyone
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.SEED = seed
    if frozen:
        cfg.freeze()


def seed_all_rng(seed: int):
    """Seed Python's, NumPy's and torch's random generators."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def create_ddp_model(model, **kwargs):
    """Wrap ``model`` in DistributedDataParallel when several processes run (else return it).

    GPU models get ``device_ids=[local rank]``; CPU models get none (DDP rejects device ids for them).
    """
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cuda":
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    return DistributedDataParallel(model, **kwargs)


def broadcast_buffers(model):
    """Copy rank 0's buffers (BatchNorm statistics) to every rank; no-op for one process.

    DistributedDataParallel does this at the start of each training forward, so after the last step
    each rank holds the statistics of its own last batch; evaluation and the end of training align them.
    """
    if comm.get_world_size() > 1:
        for buffer in hooks.unwrap_model(model).buffers():
            torch.distributed.broadcast(buffer.data, src=0)


class DefaultTrainer(TrainerBase):
    """The standard training of an msgc classifier, built from a config.

    It builds the model, optimizer, LR and MAC-target schedules, checkpointer, loaders and the
    preprocess of their batches (uint8 to normalised float on the model's device) through the
    ``build_*`` class methods (the override points), wraps the model in DistributedDataParallel when
    several processes run, and trains with a :class:`SimpleTrainer` (or :class:`AMPTrainer` when
    ``SOLVER.AMP.ENABLED``) that it composes. The hooks are listed, in order, in :meth:`build_hooks`.

    Use::

        trainer = DefaultTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()   # the final evaluation
    """

    #: the validation metric that chooses the best checkpoint (``model_best.pth``)
    best_metric = "val/top1"

    def __init__(self, cfg):
        super().__init__()
        if not logging.getLogger("msgc").handlers:  # default_setup was not called: log to the console
            setup_logger(distributed_rank=comm.get_rank())
        check_solver(cfg)
        _check_batch_size(cfg)
        self.cfg = cfg
        model = self.build_model(cfg)
        check_mac_target(cfg, model)
        optimizer = self.build_optimizer(cfg, model)
        model = create_ddp_model(model)
        preprocess = self.build_preprocess(cfg)
        if cfg.SOLVER.AMP.ENABLED:
            self._trainer = AMPTrainer(model, None, optimizer, cfg.SOLVER.AMP.DTYPE, cfg.SOLVER.CHECK_FINITE_LOSS,
                                       preprocess=preprocess)
        else:
            self._trainer = SimpleTrainer(model, None, optimizer, cfg.SOLVER.CHECK_FINITE_LOSS, preprocess=preprocess)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.mac_scheduler = self.build_mac_scheduler(cfg)
        self.checkpointer = self.build_checkpointer(
            cfg, hooks.unwrap_model(model), optimizer=optimizer, scheduler=self.scheduler,
            mac_scheduler=self.mac_scheduler, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.last_eval_results = None
        self.register_hooks(self.build_hooks())

    @property
    def model(self):
        return self._trainer.model

    @property
    def optimizer(self):
        return self._trainer.optimizer

    @property
    def data_loader(self):
        return self._trainer.data_loader

    def resume_or_load(self, resume: bool = True):
        """Continue from ``OUTPUT_DIR/last_checkpoint`` when ``resume`` and one exists (model, optimizer,
        schedules, iteration, hooks, grad scaler); otherwise load only the model from ``MODEL.WEIGHTS``."""
        weights = self.cfg.MODEL.WEIGHTS
        if resume and not self.checkpointer.has_checkpoint():
            logger.warning("--resume: no checkpoint in %s (no last_checkpoint file); starting a new training%s",
                           self.cfg.OUTPUT_DIR, f" from MODEL.WEIGHTS {weights}" if weights else " from scratch")
            resume = False
        extra = self.checkpointer.resume_or_load(weights, resume=resume)
        if resume:
            self.start_iter = int(extra.get("iteration", -1)) + 1
            logger.info("Resuming at iteration %d", self.start_iter)

    def build_hooks(self) -> list:
        """The hooks, in the order they run at each step (see the comments)."""
        cfg = self.cfg
        model = hooks.unwrap_model(self.model)
        out = [
            hooks.IterationTimer(),
            # before anything draws random numbers in the step
            hooks.IterationSeed(cfg.SEED) if cfg.SEED >= 0 else None,
            hooks.MACTargetSchedule(model, self.mac_scheduler, cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
            if hasattr(model, "set_mac_target") else None,
            hooks.GateNoiseSchedule(model, build_gate_noise_schedule(cfg), self.max_iter),
            hooks.LRScheduler(),
            # checkpoint before evaluating: a crash in the evaluation still leaves this iteration's checkpoint
            hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, self.max_iter,
                                       max_to_keep=cfg.SOLVER.CHECKPOINT_MAX_KEEP, cfg=cfg),
            # after that checkpoint (which it reuses) and before the evaluation, which a stopping run skips
            hooks.PreemptionCheckpointer(self.checkpointer, max_to_keep=cfg.SOLVER.CHECKPOINT_MAX_KEEP,
                                         resume_command=resume_command, cfg=cfg),
        ]
        if cfg.DATASETS.TEST:
            out.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self._evaluate))
            # after the evaluation, whose result it reads
            out.append(hooks.BestCheckpointer(self.checkpointer, self.best_metric, cfg=cfg))
            if self._logs_gates(model):
                # after the evaluation, which it follows; before the writer, which sends it to TensorBoard
                loader_fn = functools.partial(self.build_test_loader, cfg, cfg.DATASETS.TEST)
                out.append(hooks.GateSummary(model, loader_fn, cfg.TEST.GATE_SUMMARY_IMAGES,
                                             preprocess=self.build_preprocess(cfg)))
        if comm.is_main_process():
            # last: writes everything the hooks above logged at this iteration, evaluation included
            out.append(hooks.PeriodicWriter(self.build_writers(), period=cfg.LOG_PERIOD))
        return out

    def _logs_gates(self, model) -> bool:
        """TensorBoard gate summaries: for classifiers, on the main process, when OUTPUT_DIR is set."""
        cfg = self.cfg
        return (cfg.TEST.GATE_SUMMARY_IMAGES > 0 and bool(cfg.OUTPUT_DIR) and comm.is_main_process()
                and isinstance(model, Classifier))

    def _evaluate(self) -> dict:
        broadcast_buffers(self.model)  # every rank evaluates with rank 0's BatchNorm statistics
        return self.test(self.cfg, self.model)

    def build_writers(self) -> list:
        """Console, ``metrics.json`` and TensorBoard writers (main process only)."""
        return default_writers(self.cfg.OUTPUT_DIR, self.max_iter, self.cfg.SOLVER.IMS_PER_BATCH)

    def train(self):
        """Train from ``start_iter`` to ``SOLVER.MAX_ITER``; returns the last evaluation's results."""
        if self._trainer.data_loader is None:
            self._trainer.data_loader = self.build_train_loader(self.cfg, start_iter=self.start_iter)
        super().train(self.start_iter, self.max_iter)
        broadcast_buffers(self.model)
        if self.cfg.CALIBRATION.DATASET and mask_generators(self.model):
            if budget_range(self.model) is not None:
                self.calibrate_final_budgets()
            else:
                self.calibrate_final_model()
        return self.last_eval_results

    def calibrate_final_budgets(self, points: int = 5) -> dict:
        """After training a model for a range of budgets (``MODEL.MSGC.BUDGET_RANGE``, with
        ``CALIBRATION.DATASET`` set): its budget table at ``points`` budgets evenly spaced over the range
        (:meth:`calibrate_budgets`), saved with the unchanged model as ``model_budgets.pth``, and
        ``calibration.json``: the table and the evaluation on ``DATASETS.TEST`` at each budget."""
        cfg, model = self.cfg, hooks.unwrap_model(self.model)
        lo, hi = budget_range(model)
        budgets = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
        table = self.calibrate_budgets(cfg, model, budgets)
        self.checkpointer.save("model_budgets", tag_last=False, iteration=self.max_iter - 1, cfg=cfg,
                               budget_table=table.as_dict())
        record = {"budget_table": table.as_dict(), "weights": os.path.join(cfg.OUTPUT_DIR, "model_budgets.pth"),
                  "dataset": cfg.DATASETS.TEST, "before": self.last_eval_results, "at_budgets": {}}
        if cfg.DATASETS.TEST:
            for entry in table.entries:  # at the threshold found (its MAC ratio may sit beyond the table's reach)
                set_budget_inputs(model, entry.budget)
                set_gate_thresholds(model, entry.threshold)
                record["at_budgets"][f"{entry.budget:g}"] = self.test(cfg, model)
            set_budget(model, None)
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            write_json(os.path.join(cfg.OUTPUT_DIR, "calibration.json"), record, indent=1, sort_keys=True)
        return record

    def calibrate_final_model(self) -> dict:
        """After training (``CALIBRATION.DATASET`` set): calibrate the final model's gates to
        ``SOLVER.MAC_TARGET.FINAL`` on that dataset (:meth:`calibrate`), save it as
        ``model_calibrated.pth`` (``last_checkpoint`` keeps naming the final checkpoint), evaluate it
        on ``DATASETS.TEST`` and write ``calibration.json``: the calibration and both evaluations."""
        cfg, model = self.cfg, hooks.unwrap_model(self.model)
        result = self.calibrate(cfg, model)
        self.checkpointer.save("model_calibrated", tag_last=False, iteration=self.max_iter - 1, cfg=cfg,
                               calibration=result.as_dict())
        record = {"calibration": result.as_dict(), "weights": os.path.join(cfg.OUTPUT_DIR, "model_calibrated.pth"),
                  "dataset": cfg.DATASETS.TEST, "before": self.last_eval_results}
        if cfg.DATASETS.TEST:
            record["after"] = self.test(cfg, model)
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            write_json(os.path.join(cfg.OUTPUT_DIR, "calibration.json"), record, indent=1, sort_keys=True)
        return record

    @classmethod
    def calibrate(cls, cfg, model, budget: float = None, dataset: str = None):
        """Calibrate ``model``'s gates (:func:`msgc.evaluation.calibrate_gates`) on the test split of
        ``dataset`` (default ``CALIBRATION.DATASET``) to ``budget`` (default
        ``SOLVER.MAC_TARGET.FINAL``), fold the threshold into the generators' biases and return the
        :class:`~msgc.evaluation.CalibrationResult`."""
        dataset = _calibration_dataset(cfg, dataset)
        budget = cfg.SOLVER.MAC_TARGET.FINAL if budget is None else budget
        model = hooks.unwrap_model(model)
        result = calibrate_gates(model, cls.build_test_loader(cfg, dataset), budget, cls.build_preprocess(cfg),
                                 tolerance=cfg.CALIBRATION.TOLERANCE)
        fold_gate_thresholds(model)
        return result

    @classmethod
    def calibrate_budgets(cls, cfg, model, budgets, dataset: str = None) -> BudgetTable:
        """The budget table of ``model`` (:func:`msgc.evaluation.build_budget_table`): one calibration per
        budget of ``budgets`` on the test split of ``dataset`` (default ``CALIBRATION.DATASET``), attached
        to ``model`` (whose gates end at threshold 0, as trained) and returned."""
        dataset = _calibration_dataset(cfg, dataset)
        model = hooks.unwrap_model(model)
        table = build_budget_table(model, cls.build_test_loader(cfg, dataset), budgets, cls.build_preprocess(cfg),
                                   tolerance=cfg.CALIBRATION.TOLERANCE, dataset=dataset)
        set_budget_table(model, table)
        return table

    def run_step(self):
        self._trainer.iter = self.iter
        self._trainer.run_step()

    def after_train(self):
        super().after_train()
        self._trainer.drop_data_iterator()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(self._trainer.state_dict())
        return state

    def load_state_dict(self, state: dict):
        super().load_state_dict(state)
        self._trainer.load_state_dict(state)

    @classmethod
    def build_model(cls, cfg):
        """The model (on ``MODEL.DEVICE``, weights not loaded). Override to use another model."""
        model = build_model(cfg)
        log_model(model, cfg)
        return model

    @classmethod
    def build_checkpointer(cls, cfg, model, **checkpointables):
        """The checkpointer of ``model`` (and of ``checkpointables``, the training state): saves to
        ``OUTPUT_DIR`` from the main process, loads ``MODEL.WEIGHTS``. Override to load other layouts."""
        return MSGCCheckpointer(model, cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process(), **checkpointables)

    @classmethod
    def evaluate_weights(cls, cfg, resume: bool = False) -> dict:
        """``--eval-only``: build the model, load ``MODEL.WEIGHTS`` (or, with ``resume``, the last
        checkpoint of ``OUTPUT_DIR``) and :meth:`test` it. The main process also writes the results
        (the numbers of the logged table, unrounded) to ``OUTPUT_DIR/eval_results.json``."""
        model = cls.build_model(cfg)
        checkpointer = cls.build_checkpointer(cfg, model)
        found = resume and checkpointer.has_checkpoint()
        if resume and not found:
            logger.warning("--resume: no checkpoint in %s; evaluating MODEL.WEIGHTS instead", cfg.OUTPUT_DIR)
        if not cfg.MODEL.WEIGHTS and not found:
            logger.warning("--eval-only without MODEL.WEIGHTS: evaluating a randomly initialised model")
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
        if cfg.TEST.BUDGET:
            set_budget(model, cfg.TEST.BUDGET)
            logger.info("Evaluating at the MAC budget %.4g (TEST.BUDGET): gate threshold %.5g%s", cfg.TEST.BUDGET,
                        mask_generators(model)[0].gate.threshold,
                        "" if budget_range(model) is None else ", the budget an input of the generators")
        results = cls.test(cfg, model)
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            weights = checkpointer.get_checkpoint_file() if found else cfg.MODEL.WEIGHTS
            write_json(os.path.join(record_dir(cfg, eval_only=True), "eval_results.json"),
                       {"dataset": cfg.DATASETS.TEST, "weights": weights, "results": results, "machine": machine_info(),
                        "budget": cfg.TEST.BUDGET}, indent=1, sort_keys=True)
        return results

    @classmethod
    def build_optimizer(cls, cfg, model):
        """The optimizer; the default is :func:`msgc.solver.build_optimizer` (the paper's groups)."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """The per-iteration LR scheduler: :func:`msgc.solver.build_lr_scheduler`."""
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_mac_scheduler(cls, cfg):
        """The MAC-target scheduler: :func:`msgc.solver.build_mac_scheduler`."""
        return build_mac_scheduler(cfg)

    @classmethod
    def build_preprocess(cls, cfg):
        """``(images, device) -> images``: the loaders' batches to the model's input, on its device.

        The training step and :meth:`test` apply it to every batch. The default,
        :func:`msgc.data.build_normalizer`, converts uint8 batches to float and normalises them with
        ``INPUT.PIXEL_MEAN``/``STD`` on the device (channels-last on CUDA); float batches are only moved.
        """
        from ..data import build_normalizer

        return build_normalizer(cfg)

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0):
        """The endless training loader of this process, positioned at iteration ``start_iter``.

        A resumed run then sees the batches, augmentations included, that the uninterrupted run would
        have seen, with any number of DataLoader workers (see :func:`msgc.data.build_train_loader`).
        An override must honour ``start_iter`` the same way (:func:`skip_batches` does it for any
        DataLoader with a batch sampler).
        """
        from ..data import build_train_loader

        return build_train_loader(cfg, start_iter=start_iter)

    @classmethod
    def check_config(cls, cfg, args):
        """Check what can be checked before any process starts; raise a one-line error otherwise.

        ``tools/train_net.py`` calls it in the launching process with its command-line ``args``, so
        that bad input stops the run before processes are spawned: schedule values
        (:func:`msgc.solver.check_solver`), the batch sizes against the number of processes, the
        datasets' folders (:func:`msgc.data.check_dataset`) and ``MODEL.WEIGHTS`` (it must exist and
        read as a checkpoint of a known format; a URL is fetched now, once, into iopath's cache), unless
        ``--resume`` finds a checkpoint to continue from. Nothing is written before these checks pass.
        Override it to add a project's checks.
        """
        from ..data import check_dataset
        from .launch import launched_world_size

        if not args.eval_only:
            check_solver(cfg)
            if cfg.DATASETS.TRAIN:
                check_dataset(cfg, cfg.DATASETS.TRAIN, "train")
        _check_batch_size(cfg, launched_world_size(args.num_gpus, args.num_machines))
        for key, value in (("TEST.EVAL_PERIOD", cfg.TEST.EVAL_PERIOD),
                           ("DATALOADER.NUM_WORKERS", cfg.DATALOADER.NUM_WORKERS)):
            if value < 0:
                raise InvalidValueError(f"{key} must be >= 0, got {value}")
        if cfg.DATASETS.TEST:
            check_dataset(cfg, cfg.DATASETS.TEST, "test")
        if cfg.CALIBRATION.DATASET and not args.eval_only:
            check_dataset(cfg, cfg.CALIBRATION.DATASET, "test")
        if cfg.TEST.BUDGET:
            _check_test_budget(cfg, args)
        weights = cfg.MODEL.WEIGHTS
        if not weights or (args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
            return
        if not is_url(weights) and not os.path.isfile(weights):
            raise MissingFileError(f"MODEL.WEIGHTS: checkpoint {weights} does not exist")
        checkpoint = read_checkpoint(weights)
        detect_format(checkpoint, weights)  # a truncated or foreign file, before anything is written
        if (cfg.TEST.BUDGET and not cfg.MODEL.MSGC.BUDGET_RANGE
                and not (isinstance(checkpoint, dict) and "budget_table" in checkpoint)):
            raise InvalidValueError(f"TEST.BUDGET {cfg.TEST.BUDGET:g}: MODEL.WEIGHTS {weights} has no budget table; "
                                    "make one with tools/calibrate_gates.py --budgets 0.3 0.4 ... (or evaluate as "
                                    "trained: TEST.BUDGET 0)")

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        """The loader of this process's exact shard of a test dataset."""
        from ..data import build_test_loader

        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, model):
        """The evaluator of a test dataset: top-1/top-5 and MACs against ``model.dense_macs``."""
        return ClassificationEvaluator(getattr(model, "dense_macs", None))

    @classmethod
    def test(cls, cfg, model, evaluator=None) -> dict:
        """Evaluate ``model`` on ``DATASETS.TEST``; logs a table on the main process.

        The evaluation runs on the module inside DistributedDataParallel: each process sees a shard of a
        different size, which a DDP forward (it synchronises buffers) would not allow.
        """
        model = hooks.unwrap_model(model)
        name = cfg.DATASETS.TEST
        loader = cls.build_test_loader(cfg, name)
        evaluator = evaluator or cls.build_evaluator(cfg, name, model)
        results = inference_on_dataset(model, loader, evaluator, preprocess=cls.build_preprocess(cfg))
        if comm.is_main_process():
            logger.info("Evaluation on %s:\n%s", name, results_table(results, name))
        return results


def _check_test_budget(cfg, args):
    """TEST.BUDGET: a ratio in (0, 1], for --eval-only of a model with gates and MODEL.WEIGHTS."""
    budget = cfg.TEST.BUDGET
    if not args.eval_only:
        raise InvalidValueError(f"TEST.BUDGET {budget:g} sets the budget of an --eval-only evaluation (training "
                                "evaluates the model as it trains); add --eval-only or remove it")
    check_budget(budget, "TEST.BUDGET")
    cpu = cfg.clone()
    cpu.defrost()
    cpu.MODEL.DEVICE = "cpu"
    model = build_model(cpu)
    if not mask_generators(model):
        raise InvalidValueError(f"TEST.BUDGET {budget:g}: this model has no gates (grouping "
                                f"'{cfg.MODEL.MSGC.GROUPING}', backbone '{cfg.MODEL.BACKBONE.NAME}'): its MACs are "
                                "fixed; remove TEST.BUDGET")
    if not cfg.MODEL.WEIGHTS:
        raise InvalidValueError(f"TEST.BUDGET {budget:g} needs MODEL.WEIGHTS: a checkpoint with a budget table "
                                "(tools/calibrate_gates.py --budgets writes one)")


def _calibration_dataset(cfg, dataset: str = None) -> str:
    dataset = dataset or cfg.CALIBRATION.DATASET
    if not dataset:
        raise InvalidValueError("gate calibration needs a dataset of held-out images: set CALIBRATION.DATASET "
                                "(e.g. fashion_mnist_val)")
    return dataset


def log_model(model, cfg):
    """The model's printout to the log file only (:data:`~msgc.utils.logger.FILE_ONLY`); one line to the
    console too: its class, parameters and dense MACs at ``INPUT.TEST_SIZE``, and where the printout is."""
    logger.info("Model:\n%s", model, extra=FILE_ONLY)
    params = sum(p.numel() for p in model.parameters())
    size = cfg.INPUT.TEST_SIZE
    macs = (f", {model.dense_macs(size, size) / 1e6:.2f} M MACs per {size}x{size} image when dense"
            if hasattr(model, "dense_macs") else "")
    files = log_files()
    where = f"; printed whole in {files[0]}" if files else ""
    logger.info("Model: %s, %.3f M parameters%s%s", type(model).__name__, params / 1e6, macs, where)


def _check_batch_size(cfg, world=None):
    world = comm.get_world_size() if world is None else world
    if cfg.SOLVER.IMS_PER_BATCH <= 0 or cfg.SOLVER.IMS_PER_BATCH % world:
        raise InvalidValueError(f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} does not divide over {world} "
                                "processes: make the global batch a positive multiple of the number of "
                                "processes")
    if cfg.TEST.IMS_PER_BATCH <= 0:
        raise InvalidValueError(f"TEST.IMS_PER_BATCH must be positive, got {cfg.TEST.IMS_PER_BATCH}")
