"""User modules imported by name (``--import``, the config key ``IMPORTS``) in every process of a run:
the command line, msgc's spawned ranks and data-loader workers started by "spawn"; and the one-line
errors of a module that is missing or raises, naming where it was asked for."""
import os
import subprocess
import sys

import pytest

from msgc.config import load_cfg
from msgc.engine import import_user_modules
from msgc.utils.errors import UserError
from msgc.utils.imports import ModuleImportError
from test_user_backbone import train_net, write_project

# A dataset whose images are drawn by a painter looked up by name when an item is read; another module
# registers the painter. A worker that only unpickles the dataset imports my_project.data, not that one.
DATA_MODULE = '''
import torch
from torch.utils.data import Dataset
from msgc.data import DATASET_REGISTRY
from msgc.utils.registry import Registry

PAINTERS = Registry("PAINTER")  # filled by other modules


class Painted(Dataset):
    classes = ["even", "odd"]

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return PAINTERS.get("stripes")(i), i % 2


@DATASET_REGISTRY.register("painted")
def painted(cfg, split, transform):
    return Painted()
'''

STRIPES_MODULE = '''
import torch
from my_project.data import PAINTERS


@PAINTERS.register("stripes")
def stripes(i):
    return torch.full((3, 16, 16), 10 * i, dtype=torch.uint8)
'''

# Imported fine by the launching process, refused by every process it starts.
CHILD_ONLY_MODULE = '''
import multiprocessing

if multiprocessing.parent_process() is not None:
    raise RuntimeError("this module refuses to be imported in a child process")
'''

BROKEN_MODULE = '''
import torch

SIZE = 1 // 0
'''

# Run from the project folder: a test loader with one worker started by "spawn".
SPAWNED_WORKER = '''
import multiprocessing
import sys

import torch

from msgc.config import load_cfg
from msgc.data import build_test_loader
from msgc.engine import exit_on_user_error, import_user_modules

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    with exit_on_user_error():
        cfg = load_cfg("", ["IMPORTS", sys.argv[1], "DATALOADER.NUM_WORKERS", "1", "MODEL.NUM_CLASSES", "2",
                            "TEST.IMS_PER_BATCH", "6", "INPUT.TEST_RESIZE", "16", "INPUT.TEST_SIZE", "16"])
        import_user_modules(cfg)
        loader = build_test_loader(cfg, "painted")
        images, labels = next(iter(loader))
        print("msgc loader:", images[:, 0, 0, 0].tolist(), labels.tolist())
        plain = torch.utils.data.DataLoader(loader.dataset, batch_size=6, num_workers=1)
        try:
            next(iter(plain))
        except Exception as e:
            print("plain loader:", type(e).__name__, str(e).strip().splitlines()[-1])
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The README's project folder with the modules above and configs naming them in IMPORTS."""
    folder = write_project(tmp_path_factory.mktemp("project"))
    for name, code in (("data", DATA_MODULE), ("stripes", STRIPES_MODULE), ("child_only", CHILD_ONLY_MODULE),
                       ("broken", BROKEN_MODULE)):
        (folder / "my_project" / f"{name}.py").write_text(code)
    (folder / "spawned_worker.py").write_text(SPAWNED_WORKER)
    (folder / "base.yaml").write_text("_BASE_: tiny.yaml\nIMPORTS: [my_project.tiny]\nMODEL:\n  BACKBONE:\n"
                                      "    NAME: tiny\n")
    (folder / "child.yaml").write_text("_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 4\n")
    (folder / "own.yaml").write_text("_BASE_: base.yaml\nIMPORTS: [my_project.broken]\n")
    return folder


def error_lines(proc) -> list:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_the_config_key_through_base_trains_the_user_backbone(project):
    """IMPORTS in base.yaml, inherited by child.yaml: no --import and no NAME on the command line."""
    proc = train_net(project, "--config-file", "child.yaml", "OUTPUT_DIR", "out_key")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = (project / "out_key" / "config.yaml").read_text()
    assert "IMPORTS:\n- my_project.tiny\n" in saved and "NAME: tiny" in saved
    assert (project / "out_key" / "model_final.pth").is_file()
    assert "Evaluation on digits" in proc.stdout + proc.stderr


def test_two_spawned_processes_build_the_user_backbone_in_each_rank(project):
    proc = train_net(project, "--import", "my_project.tiny", "--num-gpus", "2", "--config-file", "tiny.yaml",
                     "MODEL.BACKBONE.NAME", "tiny", "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", "out_ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for log in ("log.txt", "log.txt.rank1"):
        text = (project / "out_ddp" / log).read_text()
        assert "Tiny(" in text and "Block(" in text, log  # each rank logged the model it built
    assert "Rank 1 of 2" in (project / "out_ddp" / "log.txt.rank1").read_text()


def test_a_spawned_data_loader_worker_imports_the_user_modules(project):
    """The worker needs my_project.stripes, which unpickling the dataset does not import: msgc's loader
    gives it the process's modules; torch's own loader, as a check that the test can fail, does not."""
    proc = subprocess.run([sys.executable, "spawned_worker.py", "my_project.data,my_project.stripes"], cwd=project,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "msgc loader: [0, 10, 20, 30, 40, 50] [0, 1, 0, 1, 0, 1]" in proc.stdout
    assert "plain loader: UnknownNameError" in proc.stdout and "no painter named 'stripes'" in proc.stdout


def test_a_module_that_fails_in_a_worker_is_one_line_naming_the_worker(project):
    proc = subprocess.run([sys.executable, "spawned_worker.py", "my_project.data,my_project.stripes,"
                           "my_project.child_only"], cwd=project, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert line.startswith("error: importing module 'my_project.child_only' (IMPORTS on the command line) raised "
                           "RuntimeError: this module refuses to be imported in a child process "
                           f"({os.path.join('my_project', 'child_only.py')}, line 5)")
    assert "DataLoader worker 0" in line and "Traceback" not in proc.stderr


def test_a_module_that_fails_in_a_spawned_rank_is_one_line_naming_the_rank(project):
    proc = train_net(project, "--import", "my_project.tiny", "--import", "my_project.child_only", "--num-gpus", "2",
                     "--config-file", "tiny.yaml", "MODEL.BACKBONE.NAME", "tiny", "OUTPUT_DIR", "out_rank")
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert line.startswith("error: importing module 'my_project.child_only' (--import) raised RuntimeError: "
                           "this module refuses to be imported in a child process")
    assert "(rank 0 of 2" in line or "(rank 1 of 2" in line
    assert "Traceback" not in proc.stderr


def test_a_missing_module_is_one_line_with_exit_status_2(project):
    proc = train_net(project, "--import", "my_project.tiny", "--import", "my_project.tny", "--config-file",
                     "tiny.yaml")
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"error: no module named 'my_project.tny' (--import): 'my_project.tny' is not found from {project} or "
        "sys.path; run from the folder that holds it, or add that folder to PYTHONPATH (MSGC_DEBUG=1 shows the "
        "traceback)"]
    assert "Traceback" not in proc.stderr and not (project / "out").joinpath("last_checkpoint").exists()


def test_a_module_that_raises_is_one_line_naming_its_config_file_and_line(project):
    """own.yaml names my_project.broken in its own IMPORTS, which replaces its base's."""
    proc = train_net(project, "--config-file", "own.yaml", "OUTPUT_DIR", "out_broken")
    assert proc.returncode == 2
    assert error_lines(proc) == [
        "error: importing module 'my_project.broken' (IMPORTS in own.yaml) raised ZeroDivisionError: integer "
        f"division or modulo by zero ({os.path.join('my_project', 'broken.py')}, line 4) (MSGC_DEBUG=1 shows the "
        "traceback)"]
    assert "Traceback" not in proc.stderr


def test_the_other_tools_take_the_flag(project):
    proc = train_net(project, "--import", "my_project.tiny", "--config-file", "tiny.yaml", "--num-images", "0",
                     "--json", "MODEL.BACKBONE.NAME", "tiny", tool="tools/analyze_model.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"res2"' in proc.stdout
    proc = train_net(project, "--import", "my_project.nope", "--config-file", "tiny.yaml", tool="tools/benchmark.py")
    assert proc.returncode == 2 and error_lines(proc)[0].startswith("error: no module named 'my_project.nope' "
                                                                    "(--import)")


# --- in this process: where the config's IMPORTS came from, and the messages --------------------------
def test_the_origin_of_imports_follows_base_files_and_overrides(project):
    assert load_cfg(str(project / "child.yaml")).imports_origin() == f"IMPORTS in {project / 'base.yaml'}"
    assert load_cfg(str(project / "own.yaml")).IMPORTS == ["my_project.broken"]
    assert load_cfg(str(project / "own.yaml")).imports_origin() == f"IMPORTS in {project / 'own.yaml'}"
    cfg = load_cfg(str(project / "child.yaml"), ["IMPORTS", "a.b, c"])
    assert cfg.IMPORTS == ["a.b", "c"] and cfg.imports_origin() == "IMPORTS on the command line"
    assert load_cfg("", ["IMPORTS", "['a', 'b.c']"]).IMPORTS == ["a", "b.c"]
    assert load_cfg(str(project / "child.yaml")).clone().imports_origin() == f"IMPORTS in {project / 'base.yaml'}"
    assert load_cfg().imports_origin() == "IMPORTS of the config"


def test_errors_are_user_errors_that_name_the_module(project, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", list(sys.path))
    cfg = load_cfg("", ["IMPORTS", "my_project.tiny/x"])
    with pytest.raises(ModuleImportError, match=r"^IMPORTS on the command line: 'my_project.tiny/x' is not a "
                       "module name"):
        import_user_modules(cfg)
    with pytest.raises(UserError, match=r"^importing module 'my_project.broken' \(--import\) raised "
                       r"ZeroDivisionError: .* \(my_project/broken.py, line 4\)$"):
        import_user_modules(None, type("Args", (), {"imports": ["my_project.broken"]}))
    assert "my_project.broken" not in sys.modules
    (project / "my_project" / "needs.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(ModuleImportError, match=r"^importing module 'my_project.needs' \(--import\) raised "
                       r"ModuleNotFoundError: No module named 'not_installed_anywhere' "
                       r"\(my_project/needs.py, line 1\)$"):
        import_user_modules(None, type("Args", (), {"imports": ["my_project.needs"]}))
