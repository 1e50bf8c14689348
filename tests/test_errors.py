"""Bad input at every entry point: the exact first line of stderr and exit status 2, in this process (the
command lines' own code, run in-process to stay fast); a full disk during a save; checkpoint retention;
URLs on a machine without internet access; models without gates."""
import errno
import io
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from msgc.checkpoint import MSGCCheckpointer
from msgc.config import get_cfg
from msgc.data import read_image
from msgc.modeling import build_model
from msgc.utils import file_io
from msgc.utils.errors import InvalidValueError, UserError, error_line, exit_on_user_error

from conftest import load_tool, narrow

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
HINT = " (MSGC_DEBUG=1 shows the traceback)"


@pytest.fixture(scope="module")
def train_net():
    return load_tool("train_net")


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run an entry point; return (exit status, stderr lines)."""
    monkeypatch.delenv("MSGC_DEBUG", raising=False)

    def run(func, *args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            func(*args)
            sys.exit(0)
        return e.value.code, capsys.readouterr().err.splitlines()

    return run


def _train(tmp_path, *overrides):
    """A short quickstart run: argv for train_net.invoke_main."""
    return ["--config-file", QUICKSTART, *overrides, "OUTPUT_DIR", str(tmp_path / "out")]


# ------------------------------------------------------------------------------------------------
# tools/train_net.py: each bad input, its line and its status
# ------------------------------------------------------------------------------------------------
BAD_INPUT = {
    "misspelled key": (["SOLVER.BASE_LRR", "0.1"],
                       "error: unknown config key 'SOLVER.BASE_LRR' in the command-line overrides; did you mean "
                       "SOLVER.BASE_LR, SOLVER.STEPS, SOLVER.MAX_ITER?" + HINT),
    "value of a wrong type": (["SOLVER.MAX_ITER", "abc"],
                              "error: command-line override SOLVER.MAX_ITER abc: SOLVER.MAX_ITER takes an int "
                              "(now 600)" + HINT),
    "odd overrides": (["SOLVER.BASE_LR"],
                      "error: config overrides must be KEY VALUE pairs, got an odd list: ['SOLVER.BASE_LR']" + HINT),
    "MAX_ITER 0": (["SOLVER.MAX_ITER", "0"], "error: SOLVER.MAX_ITER must be a positive number of iterations, got 0"
                   + HINT),
    "warm-up as long as training": (["SOLVER.MAX_ITER", "10", "SOLVER.WARMUP_ITERS", "10"],
                                    "error: SOLVER.WARMUP_ITERS must be in [0, SOLVER.MAX_ITER=10), got 10: for a "
                                    "run this short, also set SOLVER.WARMUP_ITERS (e.g. SOLVER.WARMUP_ITERS 0)"
                                    + HINT),
    "MAC target ramp past the end": (["SOLVER.MAC_TARGET.PSTOP", "1.5"],
                                     "error: SOLVER.MAC_TARGET.PSTART and PSTOP must be 0 <= PSTART < PSTOP <= 1 "
                                     "(fractions of the training), got [0.0, 1.5]" + HINT),
    "negative checkpoint retention": (["SOLVER.CHECKPOINT_MAX_KEEP", "-1"],
                                      "error: SOLVER.CHECKPOINT_MAX_KEEP must be >= 0 (0: keep all), got -1" + HINT),
    "batch over 3 processes": (["--num-gpus", "3"],
                               "error: SOLVER.IMS_PER_BATCH=64 does not divide over 3 processes: make the global "
                               "batch a positive multiple of the number of processes" + HINT),
    "no process": (["--num-gpus", "0"], "error: --num-gpus and --num-machines must be >= 1, got 0 and 1" + HINT),
    "machine rank": (["--num-machines", "2", "--machine-rank", "2"],
                     "error: --machine-rank must be in [0, 2), got 2" + HINT),
    "auto address for two machines": (["--num-machines", "2"],
                                      "error: --dist-url auto works on one machine only; give "
                                      "tcp://<machine 0 address>:<port>" + HINT),
    "not an int": (["--num-gpus", "two"], "error: argument --num-gpus: invalid int value: 'two' (see {prog} --help)"),
    "unknown dataset": (["DATASETS.TRAIN", "imagenett"],
                        "error: no dataset named 'imagenett' is registered; registered: cifar10, cifar100, digits, "
                        "fashion_mnist, fashion_mnist_val, imagefolder, imagenet, synthetic (a name of your own "
                        "module's needs --import MODULE or IMPORTS: [MODULE])" + HINT),
    "missing dataset folder": (["DATASETS.TRAIN", "imagenet", "DATASETS.ROOT", "/nonexistent/imagenet"],
                               "error: dataset folder '/nonexistent/imagenet' (DATASETS.ROOT) does not exist" + HINT),
    "missing weights": (["MODEL.WEIGHTS", "/nonexistent/w.pth"],
                        "error: MODEL.WEIGHTS: checkpoint /nonexistent/w.pth does not exist" + HINT),
    "heads that do not divide": (["MODEL.MSGC.HEADS", "3", "OUTPUT_DIR", "{out}"],
                                 "error: layer1.0: MODEL.MSGC.HEADS=3 does not divide its 16 output channels" + HINT),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_train_net_bad_input_is_one_line_with_status_2(tmp_path, train_net, cli, case):
    overrides, line = BAD_INPUT[case]
    argv = ["--config-file", QUICKSTART, *(x.format(out=tmp_path / "out") for x in overrides)]
    code, err = cli(train_net.invoke_main, argv)
    assert code == 2
    assert err[0] == line.format(prog=os.path.basename(sys.argv[0])), err


def test_gpus_that_are_not_there(tmp_path, train_net, cli):
    found = torch.cuda.device_count()
    wanted = max(2, found + 1)
    code, err = cli(train_net.invoke_main, ["--config-file", QUICKSTART, "--num-gpus", str(wanted), "MODEL.DEVICE",
                                            "cuda"])
    assert code == 2
    assert err[0] == (f"error: --num-gpus {wanted} with MODEL.DEVICE cuda needs {wanted} GPU(s) but this machine has "
                      f"{found}: lower --num-gpus, or add MODEL.DEVICE cpu to the command line to run CPU processes"
                      + HINT)
    code, err = cli(train_net.invoke_main, _train(tmp_path, "MODEL.DEVICE", f"cuda:{found}"))
    assert code == 2
    assert err[0] == (f"error: MODEL.DEVICE is 'cuda:{found}' but this machine has {found} GPU(s) (cuda:0 .. "
                      f"cuda:{found - 1})" + HINT if found else
                      "error: MODEL.DEVICE is 'cuda:0' but this machine has no CUDA device (torch.cuda.is_available() "
                      "is False): use MODEL.DEVICE cpu" + HINT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(tmp_path, train_net, cli):
    code, err = cli(train_net.invoke_main, _train(tmp_path, "MODEL.DEVICE", "cuda"))
    assert code == 2
    assert err == ["error: MODEL.DEVICE is 'cuda' but this machine has no CUDA device (torch.cuda.is_available() is "
                   "False): use MODEL.DEVICE cpu" + HINT]


def test_a_device_torch_does_not_know(tmp_path, train_net, cli):
    code, err = cli(train_net.invoke_main, _train(tmp_path, "MODEL.DEVICE", "gpu"))
    assert code == 2
    assert err == ["error: MODEL.DEVICE must be cpu, cuda or cuda:<index>, got 'gpu'" + HINT]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_decoding_without_a_gpu(tmp_path, train_net, cli):
    code, err = cli(train_net.invoke_main, _train(tmp_path, "INPUT.DECODE_DEVICE", "cuda"))
    assert code == 2
    assert err[0] == ("error: INPUT.DECODE_DEVICE cuda decodes JPEGs on the GPU, but this machine has no CUDA "
                      "device (torch.cuda.is_available() is False): set INPUT.DECODE_DEVICE cpu" + HINT)


def test_option_after_the_overrides_says_to_put_options_first(train_net, cli):
    argv = ["--config-file", "c.yaml", "SOLVER.BASE_LR", "0.1", "--resume", "--num-gpus", "2", "SEED", "3"]
    code, err = cli(train_net.invoke_main, argv)
    prog = os.path.basename(sys.argv[0])
    assert code == 2
    assert err == [f"error: --resume comes after the KEY VALUE overrides, where it would be read as a config key or "
                   f"value; put the options first: {prog} --config-file c.yaml --resume --num-gpus 2 SOLVER.BASE_LR "
                   f"0.1 SEED 3 (see {prog} --help)"]


def test_missing_and_broken_config_files(tmp_path, train_net, cli):
    code, err = cli(train_net.invoke_main, ["--config-file", str(tmp_path / "none.yaml")])
    assert (code, err[0]) == (2, f"error: config file {tmp_path / 'none.yaml'} does not exist" + HINT)
    (tmp_path / "broken.yaml").write_text("SOLVER:\n  BASE_LR: [0.1\n")
    code, err = cli(train_net.invoke_main, ["--config-file", str(tmp_path / "broken.yaml")])
    assert code == 2 and err[0].startswith(f"error: config file {tmp_path / 'broken.yaml'} is not valid YAML: ")


def test_unreadable_weights_and_debug_traceback(tmp_path, train_net, cli, monkeypatch):
    (tmp_path / "bad.pth").write_text("nope")
    argv = _train(tmp_path, "MODEL.WEIGHTS", str(tmp_path / "bad.pth"), "SOLVER.MAX_ITER", "30")
    code, err = cli(train_net.invoke_main, argv)
    assert code == 2
    assert err == [f"error: cannot read checkpoint {tmp_path / 'bad.pth'}: not a PyTorch file, or a truncated one "
                   "(UnpicklingError: Unsupported operand 110)" + HINT]
    monkeypatch.setenv("MSGC_DEBUG", "1")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        train_net.invoke_main(argv)


def test_corrupt_image_in_a_data_loader_worker(tmp_path, train_net, cli):
    for i in range(4):
        folder = tmp_path / "data" / "train" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    bad = tmp_path / "data" / "train" / "a" / "0.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError) as reason:
        read_image(str(bad))
    argv = _train(tmp_path, "DATASETS.TRAIN", "imagefolder", "DATASETS.TEST", "", "DATASETS.ROOT",
                  str(tmp_path / "data"), "DATALOADER.NUM_WORKERS", "1", "SOLVER.IMS_PER_BATCH", "4",
                  "SOLVER.MAX_ITER", "30", "SEED", "1")
    code, err = cli(train_net.invoke_main, argv)
    assert code == 2
    assert err == [f"error: {reason.value} (DataLoader worker 0; MSGC_DEBUG=1 shows the traceback)"]


def test_error_line_names_the_rank_and_the_worker():
    replayed = InvalidValueError("Caught InvalidValueError in DataLoader worker process 3.\nOriginal Traceback "
                                 "(most recent call last):\n  File \"x.py\", line 1, in f\n    raise\n"
                                 "msgc.utils.errors.InvalidValueError: label 12 is out of range\n")
    assert error_line(replayed, ["rank 1 of 4"]) == ("error: label 12 is out of range (rank 1 of 4, DataLoader "
                                                     "worker 3; MSGC_DEBUG=1 shows the traceback)")


# ------------------------------------------------------------------------------------------------
# A full disk during a save
# ------------------------------------------------------------------------------------------------
class _FullDisk:
    """open() whose files for ``victim`` take ``room`` bytes and then raise ENOSPC."""

    def __init__(self, victim: str, room: int):
        self.victim, self.room = victim, room

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if self.victim not in os.path.basename(path):
            return f
        room = self.room

        class Full(io.RawIOBase):
            def writable(self):
                return True

            def write(self, data):
                nonlocal room
                if len(data) > room:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                room -= len(data)
                return f.write(data)

            def flush(self):
                f.flush()

            def fileno(self):
                return f.fileno()

            def close(self):
                f.close()
                super().close()

        return Full()


def test_enospc_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = narrow(get_cfg().clone(), "msgc_resnet18")
    cfg.MODEL.DEVICE, cfg.MODEL.NUM_CLASSES = "cpu", 10
    model = build_model(cfg)
    checkpointer = MSGCCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000000", iteration=0)
    monkeypatch.setattr(file_io, "open", _FullDisk("model_0000001.pth", 5000), raising=False)
    with pytest.raises(OSError) as e:
        checkpointer.save("model_0000001", iteration=1)
    assert str(e.value) == (f"cannot write {tmp_path / 'model_0000001.pth'}: No space left on device (errno 28, "
                            f"ENOSPC); the previous checkpoint {tmp_path / 'model_0000000.pth'}, named in "
                            "last_checkpoint, is intact")
    assert isinstance(e.value, UserError)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]  # no temporary file left
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert MSGCCheckpointer(build_model(cfg), str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 0
    # the pointer itself fails: the new checkpoint is there, the pointer still names the previous one
    monkeypatch.setattr(file_io, "open", _FullDisk("last_checkpoint", 3), raising=False)
    with pytest.raises(OSError, match="cannot write .*last_checkpoint: No space left on device"):
        checkpointer.save("model_0000002", iteration=2)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"


def test_enospc_stops_the_run_with_one_line(tmp_path, train_net, cli, monkeypatch):
    monkeypatch.setattr(file_io, "open", _FullDisk("model_0000001.pth", 20000), raising=False)
    out = tmp_path / "out"
    code, err = cli(train_net.invoke_main, _train(tmp_path, "SOLVER.MAX_ITER", "30", "SOLVER.CHECKPOINT_PERIOD", "1",
                                                  "TEST.EVAL_PERIOD", "0", "SOLVER.WARMUP_ITERS", "0"))
    assert code == 2
    assert err == [f"error: cannot write {out / 'model_0000001.pth'}: No space left on device (errno 28, ENOSPC); the "
                   f"previous checkpoint {out / 'model_0000000.pth'}, named in last_checkpoint, is intact" + HINT]
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    assert not list(out.glob("*.tmp.*"))


# ------------------------------------------------------------------------------------------------
# Retention
# ------------------------------------------------------------------------------------------------
def test_retention_with_period_1_and_keep_2(tmp_path, train_net):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train_net.invoke_main(_train(tmp_path, "SOLVER.MAX_ITER", "6", "SOLVER.WARMUP_ITERS", "0",
                                     "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.CHECKPOINT_MAX_KEEP", "2",
                                     "TEST.EVAL_PERIOD", "1"))
        sys.exit(0)
    assert e.value.code == 0
    checkpoints = sorted(p.name for p in out.glob("*.pth"))
    assert checkpoints == ["model_0000003.pth", "model_0000004.pth", "model_best.pth", "model_final.pth"]
    # the final checkpoint, or the best one if the final evaluation was the best (saved after it)
    assert (out / "last_checkpoint").read_text() in ("model_final.pth", "model_best.pth")


def test_retention_never_deletes_what_last_checkpoint_names(tmp_path):
    checkpointer = MSGCCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    for it in range(5):
        checkpointer.save(f"model_{it:07d}", iteration=it)
    checkpointer.save("model_best")
    checkpointer.save("model_final")
    checkpointer.tag_last_checkpoint("model_0000001.pth")  # e.g. set by hand to go back
    removed = checkpointer.remove_old("model", keep=2)
    assert sorted(os.path.basename(p) for p in removed) == ["model_0000000.pth", "model_0000002.pth"]
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth", "model_0000003.pth",
                                            "model_0000004.pth", "model_best.pth", "model_final.pth"]
    assert checkpointer.remove_old("model", keep=0) == []


# ------------------------------------------------------------------------------------------------
# URLs without internet access
# ------------------------------------------------------------------------------------------------
def test_unreachable_url_names_the_file_to_put_in_the_cache_and_that_file_works(tmp_path, monkeypatch, train_net,
                                                                                 cli):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    url = "http://127.0.0.1:9/models/msgc_r18.pth"  # port 9 (discard): nothing listens there
    expected = tmp_path / "cache" / "models" / "msgc_r18.pth"
    assert file_io.cached_path(url) == str(expected)
    code, err = cli(train_net.invoke_main, _train(tmp_path, "MODEL.WEIGHTS", url))
    assert code == 2
    assert err == [f"error: cannot download {url} ([Errno 111] Connection refused); to work offline, put the file at "
                   f"{expected}, or give a local path instead of the URL" + HINT]
    cfg = get_cfg()
    narrow(cfg, "msgc_resnet18")
    cfg.MODEL.DEVICE, cfg.MODEL.NUM_CLASSES = "cpu", 10
    source = build_model(cfg)
    MSGCCheckpointer(source, str(expected.parent)).save(expected.stem)  # the file, put there by hand
    model = build_model(cfg)
    MSGCCheckpointer(model).load(url)  # no server: read from the cache
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_analyze_model_prints_the_static_tables_when_the_weights_cannot_be_loaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    analyze = load_tool("analyze_model")
    (tmp_path / "c.yaml").write_text("MODEL:\n  DEVICE: cpu\n  NUM_CLASSES: 10\n  WEIGHTS: http://127.0.0.1:9/w.pth\n"
                                     "  BACKBONE:\n    NAME: msgc_resnet18\n    STEM: cifar\n    WIDTH_MULT: 0.25\n"
                                     "INPUT:\n  TEST_SIZE: 16\n")
    result = analyze.main(["--config-file", str(tmp_path / "c.yaml"), "--num-images", "4"])
    out = capsys.readouterr().out
    assert "Static totals" in out and "fvcore FlopCountAnalysis" in out and "measured" not in result
    assert result["skipped"] == ("the measured MACs and open-gate ratios, because MODEL.WEIGHTS could not be loaded: "
                                 "cannot download http://127.0.0.1:9/w.pth ([Errno 111] Connection refused); to work "
                                 f"offline, put the file at {tmp_path / 'cache' / 'w.pth'}, or give a local path "
                                 "instead of the URL")
    assert f"Skipped: {result['skipped']}." in out
    static = analyze.main(["--config-file", str(tmp_path / "c.yaml"), "--num-images", "0"])  # no weights needed
    assert "skipped" not in static and static["totals_macs"] == result["totals_macs"]


# ------------------------------------------------------------------------------------------------
# Tools and the detection project
# ------------------------------------------------------------------------------------------------
def test_tools_report_bad_input_in_one_line(tmp_path, cli):
    analyze = load_tool("analyze_model")
    convert = load_tool("convert_checkpoint")
    benchmark = load_tool("benchmark")

    def guarded(main, argv):
        with exit_on_user_error():
            main(argv)

    code, err = cli(guarded, analyze.main, [])
    assert (code, err) == (2, ["error: the following arguments are required: --config-file (see "
                               f"{os.path.basename(sys.argv[0])} --help)"])
    code, err = cli(guarded, convert.main, [str(tmp_path / "none.pth"), str(tmp_path / "out.pth")])
    assert (code, err) == (2, [f"error: checkpoint {tmp_path / 'none.pth'} does not exist" + HINT])
    code, err = cli(guarded, convert.main, [str(tmp_path / "none.pth"), str(tmp_path / "out.pth"), "SEED", "1"])
    assert code == 2 and err[0].startswith("error: checkpoint")  # the input is checked first
    code, err = cli(guarded, benchmark.main, ["--config-file", QUICKSTART, "MODEL.HEADZ", "2"])
    assert (code, err) == (2, ["error: unknown config key 'MODEL.HEADZ' in the command-line overrides; did you mean "
                               "MODEL.MSGC.HEADS, MODEL.DEVICE?" + HINT])
    if not torch.cuda.is_available():
        code, err = cli(guarded, benchmark.main, ["--config-file", QUICKSTART, "--device", "cuda"])
        assert (code, err) == (2, ["error: --device is 'cuda' but this machine has no CUDA device "
                                   "(torch.cuda.is_available() is False): use --device cpu" + HINT])
        calibrate = load_tool("calibrate_gates")
        code, err = cli(guarded, calibrate.main, ["--config-file", QUICKSTART, "MODEL.DEVICE", "cuda"])
        assert (code, err) == (2, ["error: MODEL.DEVICE is 'cuda' but this machine has no CUDA device "
                                   "(torch.cuda.is_available() is False): use MODEL.DEVICE cpu" + HINT])


def test_detection_train_net_reports_bad_input_in_one_line(tmp_path, cli):
    det = load_tool("train_net", "projects/MSGCDetection")
    config = str(ROOT / "projects" / "MSGCDetection" / "configs" / "toy_faster_rcnn_msgc_R18_FPN.yaml")
    code, err = cli(det.invoke_main, ["--config-file", config, "MODEL.DETECTOR.NAMEE", "x"])
    assert (code, err[0]) == (2, "error: unknown config key 'MODEL.DETECTOR.NAMEE' in the command-line overrides; "
                                 "did you mean MODEL.DETECTOR.NAME, MODEL.DETECTOR.NORM, MODEL.DETECTOR.IN_FEATURES?"
                                 + HINT)
    code, err = cli(det.invoke_main, ["--config-file", config, "DATASETS.TRAIN", "coco_2017_train", "DATASETS.ROOT",
                                      "/nonexistent"])
    assert (code, err[0]) == (2, "error: dataset 'coco_2017_train': annotation file /nonexistent/coco/annotations/"
                                 "instances_train2017.json does not exist (DATASETS.ROOT is '/nonexistent')" + HINT)
    (tmp_path / "bad.pth").write_text("nope")
    code, err = cli(det.invoke_main, ["--config-file", config, "--eval-only", "MODEL.WEIGHTS",
                                      str(tmp_path / "bad.pth"), "DATASETS.ROOT", str(tmp_path / "ds"), "OUTPUT_DIR",
                                      str(tmp_path / "out")])
    assert (code, err[0]) == (2, f"error: cannot read checkpoint {tmp_path / 'bad.pth'}: not a PyTorch file, or a "
                                 "truncated one (UnpicklingError: Unsupported operand 110)" + HINT)


# ------------------------------------------------------------------------------------------------
# Models without gates
# ------------------------------------------------------------------------------------------------
def test_a_model_without_gates_gets_no_sparsity_loss_and_says_so_once():
    cfg = narrow(get_cfg(), "msgc_resnet18", grouping="dense")
    cfg.MODEL.DEVICE, cfg.MODEL.NUM_CLASSES = "cpu", 10
    model = build_model(cfg).train()
    records, handler = [], logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("msgc.modeling.classifier")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        for _ in range(2):
            out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert "loss_macs" not in out and out["mac_ratio"].item() == pytest.approx(1.0)
    said = [r.getMessage() for r in records if "has no gate" in r.getMessage()]
    assert said == ["MSGCResNet has no gate (its MACs depend on no trained parameter): training without the sparsity "
                    "loss loss_macs; MODEL.MSGC.LOSS_WEIGHT and the MAC target have no effect"]
    gated = build_model(narrow(cfg, "msgc_resnet18")).train()
    assert "loss_macs" in gated(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
