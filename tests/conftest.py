import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# at most two intra-op threads a test, shared among pytest-xdist's workers (pytest.ini runs one per core)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))))

_TOOLS = {}


def load_tool(name: str, folder: str = "tools"):
    """``<folder>/<name>.py`` (a script, not a package module) as a module, loaded once per test session."""
    if (folder, name) not in _TOOLS:
        # not the script's own name: a project's `import train_net` must still find its own script
        module_name = f"{folder.replace('/', '_')}_{name}_under_test"
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, folder, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TOOLS[folder, name] = module
    return _TOOLS[folder, name]


#: why tests/test_cuda.py and the CUDA side of the ``device`` fixture do not run on this machine
NO_CUDA = "needs a CUDA device: torch.cuda.is_available() is False on this machine"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests: their convolutions are tiny, a second thread only adds
    synchronisation, and two threads on a busy machine wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="where the tests that take the `device` fixture run (default cpu); tests/test_cuda.py "
                     "runs wherever CUDA is available")


def pytest_configure(config):
    if config.getoption("--device") == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--device cuda {NO_CUDA}; run without --device, or on a machine with a GPU")
        # the tests compare float32 results within 1e-4 or so: TF32 convolutions and matmuls round to 1e-3
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    """Mark the tests that take the ``device`` fixture ``device`` (``pytest --device cuda -m device`` runs
    only those: what tools/gpu_selftest.py does)."""
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture
def device(request) -> torch.device:
    """The device of ``pytest --device`` (cpu by default): device-independent tests take it."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture
def cfg():
    """A small CPU config: narrow widths keep forward passes cheap."""
    from msgc.config import get_cfg

    c = get_cfg()
    c.MODEL.DEVICE = "cpu"
    c.MODEL.NUM_CLASSES = 10
    return c


def narrow(cfg, name, grouping="msgc", attention="none"):
    """``cfg`` set to a narrow backbone with the cifar stem (width 0.25 for ResNets, else 0.5)."""
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.BACKBONE.WIDTH_MULT = 0.25 if "resnet" in name else 0.5
    cfg.MODEL.BACKBONE.STEM = "cifar"
    cfg.MODEL.MSGC.GROUPING = grouping
    cfg.MODEL.MSGC.ATTENTION = attention
    return cfg
