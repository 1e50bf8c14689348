"""User modules without a copied train_net.py: ``--import MODULE`` and the config key ``IMPORTS``, run
from the command line on the registration tutorial's own module (``my_project/tiny.py``, the python
block of "Registering your own backbone"), in the main process, in spawned ranks and in data-loader
workers; a module that cannot be imported is one line with exit status 2."""
import os
import subprocess
import sys

import pytest

from test_user_backbone import readme_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train_net.py")
QUICK = os.path.join(ROOT, "configs", "quickstart.yaml")
SHORT = ["MODEL.BACKBONE.NAME", "tiny", "SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "2", "SOLVER.CHECKPOINT_PERIOD",
         "2", "SOLVER.WARMUP_ITERS", "0"]


@pytest.fixture
def project(tmp_path):
    """A folder holding my_project/tiny.py, the tutorial's module as written."""
    code, _ = readme_block("### Registering your own backbone")
    (tmp_path / "my_project").mkdir()
    (tmp_path / "my_project" / "__init__.py").write_text("")
    (tmp_path / "my_project" / "tiny.py").write_text(code)
    return tmp_path


def train(cwd, *args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_import_flag_trains_a_backbone_of_the_users_module(project):
    proc = train(project, "--import", "my_project.tiny", "--config-file", QUICK, *SHORT, "OUTPUT_DIR", "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (project / "out" / "model_final.pth").is_file() and (project / "out" / "metrics.json").is_file()
    assert "val/top1" in (project / "out" / "metrics.json").read_text()


def test_the_config_key_through_base_imports_it_too(project):
    (project / "base.yaml").write_text(f"_BASE_: {QUICK}\nIMPORTS: [my_project.tiny]\n")
    (project / "my.yaml").write_text("_BASE_: base.yaml\n")
    proc = train(project, "--config-file", "my.yaml", *SHORT, "OUTPUT_DIR", "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (project / "out" / "model_final.pth").is_file()


def test_spawned_ranks_and_their_data_workers_import_it(project):
    """Two CPU ranks (gloo) spawned by msgc's launch, each with a data-loader worker: the backbone that
    only my_project.tiny registers is built in every process."""
    proc = train(project, "--import", "my_project.tiny", "--num-gpus", "2", "--config-file", QUICK, *SHORT,
                 "DATALOADER.NUM_WORKERS", "1", "OUTPUT_DIR", "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (project / "out" / "model_final.pth").is_file()


def test_a_worker_started_by_spawn_imports_the_owners_modules(project, monkeypatch):
    """A "spawn" worker inherits no import: it gets the owner's modules and imports them first."""
    import multiprocessing as mp

    from msgc.utils.imports import import_modules, import_pairs, imported_modules

    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    import_modules(["my_project.tiny"], "--import")
    assert ("my_project.tiny", "--import") in imported_modules()
    env_path = os.pathsep.join([str(project), ROOT, os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", env_path)
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_registered_after, (imported_modules(),)) == (False, True)
    assert import_pairs is not None


def _registered_after(pairs):
    """In a fresh process: whether ``tiny`` is registered before and after importing ``pairs``."""
    from msgc.modeling import BACKBONE_REGISTRY
    from msgc.utils.imports import import_pairs

    before = "tiny" in BACKBONE_REGISTRY
    import_pairs(pairs)
    return before, "tiny" in BACKBONE_REGISTRY


def test_a_missing_module_is_one_line_naming_it(project):
    proc = train(project, "--import", "my_project.nope", "--config-file", QUICK, *SHORT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "my_project.nope" in lines[0] and "--import" in lines[0], proc.stderr


def test_a_module_that_raises_is_one_line_naming_it_and_the_config_file(project):
    (project / "my_project" / "broken.py").write_text("raise RuntimeError('the weights folder is not mounted')\n")
    (project / "my.yaml").write_text(f"_BASE_: {QUICK}\nIMPORTS: [my_project.broken]\n")
    proc = train(project, "--config-file", "my.yaml", *SHORT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "my_project.broken" in lines[0] and "my.yaml" in lines[0] and "not mounted" in lines[0]
