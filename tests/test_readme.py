"""The README's set-up commands: the same lines in docs/getting_started.md and in CI (.ci/run runs them in a clean
clone), virtual environments that a PEP 668 system Python accepts, and the detection project's install command."""
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands(page="README.md"):
    """The commands of the "Set-up" code block of ``page`` (comment lines left out)."""
    text = (ROOT / page).read_text()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_setup_commands_verbatim_in_a_fresh_environment():
    commands = _setup_commands()
    assert commands == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
        "python tools/train_net.py --config-file configs/quickstart.yaml",
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && python -m pytest tests -q',
    ]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    run = [line for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert run[-3:-1] == commands  # the last two things CI does before the linter, in this order
    assert run[-1] == "ruff check ."
    assert any(line.startswith("rm -rf .venv") for line in run[:-3])  # from a fresh environment
    assert "set -euo pipefail" in run
    assert _setup_commands("docs/getting_started.md") == commands  # the tutorial shows the same two


def _externally_managed_python():
    """The operating system's python3 if it is marked externally managed (PEP 668), else None."""
    for candidate in ("/usr/bin/python3",):
        if not os.path.exists(candidate):
            continue
        stdlib = subprocess.run([candidate, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                                capture_output=True, text=True).stdout.strip()
        if stdlib and os.path.exists(os.path.join(stdlib, "EXTERNALLY-MANAGED")):
            return candidate
    return None


@pytest.mark.skipif(_externally_managed_python() is None, reason="no externally managed system python3")
def test_the_setup_commands_pass_pep_668_with_the_system_python(tmp_path):
    """The commands' environment part with the OS's own python3: pip installs into the new environment
    (a dry run without the network, from this checkout), where a bare pip install is refused."""
    python = _externally_managed_python()
    refused = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", str(ROOT)],
                             capture_output=True, text=True)
    if "externally-managed-environment" not in refused.stderr:
        pytest.skip("this system python3 has no pip, or pip does not enforce PEP 668")
    prefix = _setup_commands()[0].split(" && pip install")[0]  # "python3 -m venv .venv && . .venv/bin/activate"
    script = (f"{prefix} && pip install --dry-run --no-index --no-deps --no-build-isolation -e {ROOT} "
              f"&& python -c 'import sys; print(sys.prefix)'")
    env = dict(os.environ, PATH=f"{os.path.dirname(python)}:/usr/bin:/bin")
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Would install msgc-0.1.0" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / ".venv")


def test_detection_project_installs_as_a_package(tmp_path):
    """The detection README's install command (into a scratch prefix, from this checkout, no network),
    then ``import msgc_detection`` from anywhere."""
    readme = (ROOT / "projects" / "MSGCDetection" / "README.md").read_text()
    command = re.search(r"^pip install -e projects/MSGCDetection$", readme, re.M)
    assert command, "the detection README must show: pip install -e projects/MSGCDetection"
    args = command.group(0).split()[1:]
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "--prefix", str(tmp_path / "prefix")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    site = sysconfig.get_path("purelib", vars={"base": str(tmp_path / "prefix")})
    code = (f"import site; site.addsitedir({site!r}); import msgc_detection; "
            "from msgc_detection import add_detection_config, build_detector; print(msgc_detection.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == ROOT / "projects" / "MSGCDetection" / "msgc_detection" / "__init__.py"
    assert not (ROOT / "projects" / "MSGCDetection" / "build").exists()
