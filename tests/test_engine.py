"""The trainer, its hooks and writers, with a toy gated backbone registered here and an in-memory loader."""
import json
import logging
import os

import pytest
import torch
import yaml
from torch import nn

from msgc.config import get_cfg
from msgc.data import skip_batches
from msgc.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, TrainerBase, hooks
from msgc.modeling import BACKBONE_REGISTRY, Backbone, Costs
from msgc.solver import build_mac_scheduler
from msgc.utils import comm
from msgc.utils.events import EventStorage, JSONWriter, get_event_storage


@BACKBONE_REGISTRY.register("toy_engine_backbone")
class ToyBackbone(Backbone):
    """A convolution whose output channels are gated per sample by a noisy generator (``maskgen``).

    Its MACs follow the gates, so the sparsity loss and MAC-target schedule act on it as on MSGC.
    ``nan_at_call`` makes the n-th training forward return NaN logits (to test the finite-loss check).
    """

    def __init__(self, grouping=None, attention=None, num_classes=4, width_mult=1.0, stem="cifar"):
        super().__init__(heads=1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.maskgen = nn.Linear(3, 8)
        self.fc = nn.Linear(8, num_classes)
        self.num_classes = num_classes
        self.nan_at_call = None
        self.calls = 0

    def forward_features(self, x):
        logits = self.maskgen(x.mean((2, 3)))
        if self.training:
            logits = logits + torch.randn_like(logits)  # random like MSGC's gate noise
            self.calls += 1
        gate = torch.sigmoid(logits)
        y = torch.relu(self.bn(self.conv(x))) * gate[:, :, None, None]
        macs = 27 * 8 * x.shape[2] * x.shape[3] * gate.mean(1)
        return {"out": y}, macs

    def forward_head(self, features):
        out = self.fc(features["out"].mean((2, 3)))
        if self.training and self.calls == self.nan_at_call:
            out = out * float("nan")
        return out

    def head_macs(self, h, w):
        return 8 * self.num_classes

    def complexity(self, h, w):
        return Costs(main=self.head_macs(h, w), dgc=27 * 8 * h * w)


def toy_data(n=48, size=8, classes=4, seed=0):
    """Images whose class is visible in the mean of a channel: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = torch.randn(n, 3, size, size, generator=g) * 0.5
    images[:, 0] += labels[:, None, None].float() - (classes - 1) / 2
    return images, labels


class ToyLoader:
    """Endless batches of the toy data in a fixed order; restartable at any batch."""

    def __init__(self, batch, start=0):
        self.images, self.labels = toy_data()
        self.batch, self.start = batch, start

    def __iter__(self):
        i = self.start
        while True:
            idx = torch.arange(i * self.batch, (i + 1) * self.batch) % len(self.labels)
            yield self.images[idx], self.labels[idx]
            i += 1


class ToyTrainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg, start_iter=0):
        return ToyLoader(cfg.SOLVER.IMS_PER_BATCH, start_iter)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        images, labels = toy_data(n=21, seed=1)
        return [(images[i:i + 5], labels[i:i + 5]) for i in range(0, 21, 5)]


def toy_cfg(output_dir, **overrides):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "toy_engine_backbone"
    cfg.MODEL.NUM_CLASSES = 4
    cfg.MODEL.LABEL_SMOOTHING = 0.0
    cfg.MODEL.MSGC.LOSS_WEIGHT = 1.0
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = "toy"
    cfg.SOLVER.IMS_PER_BATCH = 8
    cfg.SOLVER.MAX_ITER = 6
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.PRETRAINED_LR_MULT = 1.0
    cfg.SOLVER.CHECKPOINT_PERIOD = 3
    cfg.SOLVER.MAC_TARGET.FINAL = 0.4
    cfg.TEST.EVAL_PERIOD = 3
    cfg.LOG_PERIOD = 2
    cfg.SEED = 3
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.merge_from_list([str(x) for kv in overrides.items() for x in kv])
    return cfg


class Recorder(HookBase):
    def __init__(self, log):
        self.log = log

    def before_train(self):
        self.log.append("before_train")

    def before_step(self):
        self.log.append(f"before_step {self.trainer.iter}")

    def after_step(self):
        self.log.append(f"after_step {self.trainer.iter}")

    def after_train(self):
        self.log.append(f"after_train {self.trainer.iter}")


def _toy_model(**kw):
    from msgc.modeling import Classifier

    torch.manual_seed(0)
    return Classifier(ToyBackbone(), label_smoothing=0.0, mac_loss_weight=1.0, **kw)


def test_simple_trainer_runs_hooks_in_order_and_logs_losses_and_metrics():
    model = _toy_model()
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = SimpleTrainer(model, ToyLoader(8), torch.optim.SGD(model.parameters(), lr=0.1))
    log = []
    trainer.register_hooks([Recorder(log), None])
    trainer.train(2, 5)
    assert log == ["before_train", "before_step 2", "after_step 2", "before_step 3", "after_step 3",
                   "before_step 4", "after_step 4", "after_train 5"]
    hist = trainer.storage.histories()
    assert {"loss_cls", "loss_macs", "total_loss", "mac_ratio", "mac_target", "data_time"} <= set(hist)
    assert [it for _, it in hist["loss_cls"].values()] == [2, 3, 4]
    assert not trainer.storage.smoothing_hints()["mac_target"] and trainer.storage.smoothing_hints()["mac_ratio"]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_trainer_learns_the_toy_task(device):
    model = _toy_model().to(device)
    model.train()
    trainer = SimpleTrainer(model, ToyLoader(8), torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9))
    trainer.train(0, 60)
    losses = [v for v, _ in trainer.storage.history("loss_cls").values()]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_nan_loss_stops_with_iteration_and_losses():
    model = _toy_model()
    model.backbone.nan_at_call = 3  # the third step: iteration 2
    model.train()
    trainer = SimpleTrainer(model, ToyLoader(8), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(FloatingPointError) as e:
        trainer.train(0, 5)
    message = str(e.value)
    assert "\n" not in message
    assert "iteration 2" in message and "loss_cls=nan" in message and "loss_macs=" in message


def test_nan_check_can_be_disabled():
    model = _toy_model()
    model.backbone.nan_at_call = 1
    model.train()
    trainer = SimpleTrainer(model, ToyLoader(8), torch.optim.SGD(model.parameters(), lr=0.1),
                            check_finite_loss=False)
    trainer.train(0, 1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_trainer(dtype, device):
    model = _toy_model().to(device)
    model.train()
    trainer = AMPTrainer(model, ToyLoader(8), torch.optim.SGD(model.parameters(), lr=0.1), dtype=dtype)
    trainer.train(0, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if dtype == "float16":
        assert isinstance(trainer.grad_scaler, torch.amp.GradScaler)
        assert "scale" in trainer.state_dict()["grad_scaler"]
    else:
        assert trainer.grad_scaler is None and trainer.state_dict() == {}
    with pytest.raises(ValueError, match="SOLVER.AMP.DTYPE"):
        AMPTrainer(model, None, trainer.optimizer, dtype="float8")


def test_default_trainer_schedules_checkpoints_evaluation_and_writers(tmp_path, capsys):
    cfg = toy_cfg(tmp_path)
    trainer = ToyTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert set(results) >= {"top1", "top5", "macs", "mac_ratio", "dense_macs", "num_samples"}
    assert results["num_samples"] == 21
    files = set(os.listdir(tmp_path))
    assert {"model_0000002.pth", "model_final.pth", "model_best.pth", "metrics.json", "last_checkpoint"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    train_lines = [d for d in lines if "loss_cls" in d]
    assert [d["iteration"] for d in train_lines] == [1, 3, 5]
    schedule = build_mac_scheduler(cfg)
    # the model holds its target in a float32 buffer
    assert [d["mac_target"] for d in train_lines] == pytest.approx([schedule.target(it) for it in (1, 3, 5)])
    assert all({"lr/gates", "lr/host", "lr/host_norm", "mac_ratio", "time"} <= set(d) for d in train_lines)
    val_lines = [d for d in lines if "val/top1" in d]
    assert [d["iteration"] for d in val_lines] == [2, 5] and val_lines[-1]["val/top1"] == results["top1"]
    out = capsys.readouterr().out
    assert "eta:" in out and "mac_ratio:" in out and "(target " in out and "lr gates:" in out and "img/s:" in out
    assert "top-1 (%)" in out and "MAC ratio" in out
    ckpt = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert ckpt["iteration"] == 5 and yaml.safe_load(ckpt["config"])["SOLVER"]["MAX_ITER"] == 6
    assert {"model", "optimizer", "scheduler", "mac_scheduler", "trainer"} <= set(ckpt)
    assert ckpt["mac_scheduler"] == {"iter": 6}


def _weights(model):
    return {k: v.detach().clone() for k, v in hooks.unwrap_model(model).state_dict().items()}


def test_resume_continues_exactly(tmp_path):
    torch.manual_seed(0)  # the same initial weights for both runs (train_net's default_setup seeds)
    full = ToyTrainer(toy_cfg(tmp_path / "full"))
    full.resume_or_load(resume=False)
    full.train()

    class Interrupt(HookBase):  # after the checkpoint of iteration 2 (test_launch kills a real process)
        def after_step(self):
            if self.trainer.iter == 2:
                raise KeyboardInterrupt

    torch.manual_seed(0)
    first = ToyTrainer(toy_cfg(tmp_path / "part"))
    first.register_hooks([Interrupt()])
    first.resume_or_load(resume=False)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert "model_final.pth" not in os.listdir(tmp_path / "part")

    second = ToyTrainer(toy_cfg(tmp_path / "part"))
    second.resume_or_load(resume=True)
    assert second.start_iter == 3 and second.mac_scheduler.iter == 3 and second.scheduler.last_epoch == 3
    second.train()
    a, b = _weights(full.model), _weights(second.model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_sigterm_saves_the_step_and_stops_and_more_signals_during_the_save_change_nothing(tmp_path, monkeypatch):
    import signal

    from msgc.utils import file_io
    from msgc.utils.preemption import EXIT_STATUS

    settings = {"SOLVER.CHECKPOINT_PERIOD": 0, "TEST.EVAL_PERIOD": 0}
    torch.manual_seed(0)  # the same initial weights (train_net's default_setup seeds)
    full = ToyTrainer(toy_cfg(tmp_path / "full", **settings))
    full.resume_or_load(resume=False)
    full.train()

    class Signal(HookBase):  # registered last: the signal arrives after the check of iteration 1
        def after_step(self):
            if self.trainer.iter == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    def open_and_signal(path, mode="r", *args, **kwargs):  # the save gets a SIGUSR1 and a SIGTERM of its own
        if "model_" in os.path.basename(path):
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
        return open(path, mode, *args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(file_io, "open", open_and_signal, raising=False)
    torch.manual_seed(0)
    first = ToyTrainer(toy_cfg(tmp_path / "part", **settings))
    first.register_hooks([Signal()])
    first.resume_or_load(resume=False)
    with pytest.raises(SystemExit) as e:
        first.train()
    monkeypatch.undo()
    assert e.value.code == EXIT_STATUS and "stopped by SIGTERM after iteration 2" in str(e.value)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    files = {f for f in os.listdir(tmp_path / "part") if not f.startswith("events.out.tfevents")}
    assert files == {"last_checkpoint", "metrics.json", "model_0000002.pth"}  # no temporary file
    assert (tmp_path / "part" / "last_checkpoint").read_text() == "model_0000002.pth"

    second = ToyTrainer(toy_cfg(tmp_path / "part", **settings))
    second.resume_or_load(resume=True)
    assert second.start_iter == 3
    second.train()
    a, b = _weights(full.model), _weights(second.model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_resume_without_checkpoint_says_so_and_starts_fresh(tmp_path, caplog):
    trainer = ToyTrainer(toy_cfg(tmp_path))
    with caplog.at_level(logging.WARNING, logger="msgc"):
        logging.getLogger("msgc").propagate = True
        try:
            trainer.resume_or_load(resume=True)
        finally:
            logging.getLogger("msgc").propagate = False
    assert trainer.start_iter == 0
    assert any("no checkpoint" in r.getMessage() and "starting a new training" in r.getMessage()
               for r in caplog.records)


def test_evaluate_weights_loads_the_last_checkpoint_through_the_overridable_checkpointer(tmp_path):
    trainer = ToyTrainer(toy_cfg(tmp_path))
    trainer.resume_or_load(resume=False)
    trainer.train()
    trained = trainer.test(trainer.cfg, trainer.model)
    built = []

    class Evaluating(ToyTrainer):
        best_metric = "val/top5"

        @classmethod
        def build_checkpointer(cls, cfg, model, **checkpointables):
            built.append(sorted(checkpointables))
            return super().build_checkpointer(cfg, model, **checkpointables)

    assert Evaluating.evaluate_weights(trainer.cfg, resume=True) == trained  # the weights of model_final
    assert built == [[]]  # evaluation loads the model only
    fresh = Evaluating(toy_cfg(tmp_path / "again"))
    assert built[-1] == ["mac_scheduler", "optimizer", "scheduler", "trainer"]
    assert [h._metric for h in fresh._hooks if isinstance(h, hooks.BestCheckpointer)] == ["val/top5"]


def test_eval_only_writes_the_printed_numbers_as_json(tmp_path, device):
    from msgc.evaluation import results_table

    on = {"MODEL.DEVICE": str(device)}
    trainer = ToyTrainer(toy_cfg(tmp_path / "train", **on))
    trainer.resume_or_load(resume=False)
    trainer.train()
    cfg = toy_cfg(tmp_path / "eval", **on)
    cfg.MODEL.WEIGHTS = str(tmp_path / "train" / "model_final.pth")
    results = ToyTrainer.evaluate_weights(cfg)
    saved = json.loads((tmp_path / "eval" / "eval" / "eval_results.json").read_text())
    assert saved.pop("machine")["torch"] == torch.__version__.split("+")[0] and saved.pop("budget") == 0.0
    assert saved == {"dataset": "toy", "weights": cfg.MODEL.WEIGHTS, "results": results}
    assert set(results) >= {"top1", "top5", "macs", "mac_ratio", "num_samples"}
    # the logged table is drawn from the same numbers
    assert results_table(saved["results"], "toy") == results_table(results, "toy")
    resumed = ToyTrainer.evaluate_weights(toy_cfg(tmp_path / "train", **on), resume=True)
    saved = json.loads((tmp_path / "train" / "eval" / "eval_results.json").read_text())
    assert not (tmp_path / "train" / "eval_results.json").exists()  # never beside the training's files
    last = (tmp_path / "train" / "last_checkpoint").read_text()
    assert saved["weights"] == str(tmp_path / "train" / last) and saved["results"] == resumed


def test_batch_that_does_not_divide_over_processes_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(comm, "get_world_size", lambda: 3)
    with pytest.raises(ValueError, match=r"IMS_PER_BATCH=8 does not divide over 3 processes"):
        ToyTrainer(toy_cfg(tmp_path))


def test_best_checkpointer_saves_only_improvements_and_remembers_the_best(tmp_path):
    class FakeCheckpointer:
        saved = []

        def save(self, name, **kw):
            self.saved.append((name, kw["iteration"]))

    scores = iter([50.0, 40.0, 60.0, 55.0])

    class Idle(TrainerBase):
        def run_step(self):
            pass

    trainer = Idle()
    best = hooks.BestCheckpointer(FakeCheckpointer())
    trainer.register_hooks([hooks.EvalHook(2, lambda: {"top1": next(scores)}), best])
    trainer.train(0, 7)  # evaluations after iterations 1, 3, 5 and at the end (6)
    assert FakeCheckpointer.saved == [("model_best", 1), ("model_best", 5)]
    assert trainer.state_dict()["hooks"]["BestCheckpointer"] == {"best": 60.0, "best_iter": 5}


def test_crashed_run_does_not_evaluate_at_the_end():
    calls = []

    class Crash(TrainerBase):
        def run_step(self):
            if self.iter == 2:
                raise RuntimeError("boom")

    trainer = Crash()
    trainer.register_hooks([hooks.EvalHook(0, lambda: calls.append(1) or {"top1": 1.0})])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train(0, 5)
    assert calls == []


def test_event_storage_and_json_writer(tmp_path):
    with pytest.raises(RuntimeError, match="outside an EventStorage"):
        get_event_storage()
    path = tmp_path / "m.json"
    with EventStorage(5) as storage:
        writer = JSONWriter(str(path), window=2)
        for v in (1.0, 3.0, 10.0):
            storage.put_scalar("loss", v)
            storage.put_scalar("lr", v / 10, smoothing_hint=False)
            storage.step()
        writer.write()
        writer.write()  # nothing new: nothing written
        storage.put_scalar("val/top1", 90.0, smoothing_hint=False, cur_iter=7)
        writer.write()
        with pytest.raises(ValueError, match="smoothing_hint"):
            storage.put_scalar("lr", 1.0)
        writer.close()
    lines = [json.loads(line) for line in open(path)]
    assert lines == [{"iteration": 7, "loss": 6.5, "lr": 1.0}, {"iteration": 7, "val/top1": 90.0}]


def test_skip_batches_resumes_a_data_loader_without_reading_skipped_items():
    from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

    class Counting(Dataset):
        reads = 0

        def __len__(self):
            return 20

        def __getitem__(self, i):
            Counting.reads += 1
            return torch.tensor(i)

    loader = DataLoader(Counting(), batch_sampler=BatchSampler(SequentialSampler(range(20)), 4, False))
    resumed = skip_batches(loader, 3)
    assert [b.tolist() for b in resumed] == [[12, 13, 14, 15], [16, 17, 18, 19]]
    assert Counting.reads == 8
    assert skip_batches(loader, 0) is loader


def test_short_run_on_the_real_digits_learns_well_above_chance(tmp_path, one_thread):
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.NUM_CLASSES", "10", "MODEL.BACKBONE.STEM", "cifar",
        "MODEL.BACKBONE.WIDTH_MULT", "0.25", "DATASETS.TRAIN", "digits", "DATASETS.TEST", "digits",
        "DATALOADER.NUM_WORKERS", "0", "INPUT.TRAIN_SIZE", "16", "INPUT.MIN_SCALE", "1.0",
        "INPUT.RANDOM_FLIP", "False", "INPUT.TEST_RESIZE", "16", "INPUT.TEST_SIZE", "16",
        "SOLVER.IMS_PER_BATCH", "32", "SOLVER.MAX_ITER", "40", "SOLVER.BASE_LR", "0.1",
        "SOLVER.PRETRAINED_LR_MULT", "1.0", "SOLVER.MAC_TARGET.FINAL", "0.8", "SOLVER.CHECKPOINT_PERIOD", "0",
        "TEST.IMS_PER_BATCH", "180", "SEED", "0", "LOG_PERIOD", "20", "OUTPUT_DIR", str(tmp_path)])
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert results["num_samples"] == 360
    assert results["top1"] > 50.0  # chance is 10%
    assert 0.0 < results["mac_ratio"] < 1.1
