"""The two commands of the README's quick start (``./run compare``, ``./run test``): CI runs exactly the
README's test command, a set-up that is done is skipped, and what is missing is named with the command
that installs it."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(ROOT, "run")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="./run is a bash script")


def test_ci_runs_exactly_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    quick = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["./run compare", "./run test"]
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == "./run test"
    assert os.stat(RUN).st_mode & stat.S_IXUSR and os.stat(os.path.join(ROOT, ".ci", "run")).st_mode & stat.S_IXUSR


def _ready_environment(tmp_path) -> dict:
    """An environment that ./run counts as set up: its python is this one, its stamp matches."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    # A wrapper, not a symlink: a symlinked venv python resolves to the base interpreter, which need not have
    # torch; exec'ing this interpreter by its own path keeps its environment (and so its torch).
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    digest = hashlib.sha256(open(os.path.join(ROOT, "pyproject.toml"), "rb").read()).hexdigest()[:16]
    (venv / ".recnorm-setup").write_text(f"{digest} {ROOT}\n")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(RECNORM_VENV=str(venv), PYTHONPATH=os.path.join(ROOT, "src"))
    return env


def _fake_commands(tmp_path, **scripts) -> str:
    """A folder of stand-in commands to put first on PATH."""
    folder = tmp_path / "fakebin"
    folder.mkdir()
    for name, body in scripts.items():
        path = folder / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return str(folder)


def test_a_finished_setup_is_skipped(tmp_path):
    env = _ready_environment(tmp_path)
    env["PATH"] = _fake_commands(tmp_path, **{"apt-get": "echo apt-get was called >&2; exit 9"}) + os.pathsep + env["PATH"]
    proc = subprocess.run([RUN, "recnorm", "inits"], env=env, capture_output=True, text=True, timeout=120)
    if "recnorm needs these Debian packages" in proc.stderr or "installing Debian packages" in proc.stderr:
        pytest.skip("this machine lacks some of the Debian packages that ./run checks for")
    assert proc.returncode == 0, proc.stderr
    assert "orthogonal" in proc.stdout
    assert "./run:" not in proc.stderr  # nothing created, installed or warned about: straight to the command


def test_missing_data_packages_are_named_with_their_install_command(tmp_path):
    env = _ready_environment(tmp_path)
    fake = _fake_commands(tmp_path,
                          dpkg='[ "$2" = dataset-fashion-mnist ] && exit 1; exit 0',  # one package missing
                          id="echo 1000")  # not root
    env["PATH"] = fake + os.pathsep + env["PATH"]
    proc = subprocess.run([RUN, "recnorm", "inits"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "install them as root with:  apt-get install -y dataset-fashion-mnist" in proc.stderr
    assert re.search(r"stopping: the data", proc.stderr) and proc.stdout == ""


def test_usage_without_a_command(tmp_path):
    proc = subprocess.run([RUN], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "./run test" in proc.stdout + proc.stderr


def test_the_environment_s_programs_come_first_on_path(tmp_path):
    """torch builds the C++ kernels with the `ninja` it finds on PATH: the environment's own (pip's ninja
    package) must be found without activating the environment."""
    env = _ready_environment(tmp_path)
    ninja = tmp_path / "venv" / "bin" / "ninja"
    ninja.write_text("#!/bin/sh\necho 1.11.1\n")
    ninja.chmod(0o755)
    probe = tmp_path / "test_probe.py"
    probe.write_text("import os, shutil\n"
                     f"def test_ninja():\n    assert shutil.which('ninja') == {str(ninja)!r}\n"
                     "    assert os.environ['RECNORM_REQUIRE_FUSED'] == '1'\n")
    env.pop("RECNORM_REQUIRE_FUSED", None)
    proc = subprocess.run([RUN, "test", str(probe), "-p", "no:cacheprovider"], env=env, capture_output=True,
                          text=True, timeout=120)
    if "recnorm needs these Debian packages" in proc.stderr:
        pytest.skip("this machine lacks some of the Debian packages that ./run checks for")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


@pytest.mark.parametrize("isolated", [False, True], ids=["keeps-an-installed-torch", "isolated"])
def test_a_new_environment_sees_the_base_packages_only_when_not_isolated(tmp_path, isolated):
    """Users with a CUDA torch in their base Python keep it: the new .venv sees the base packages. CI sets
    RECNORM_ISOLATED=1: the new environment then sees only what ./run installs, so a missing install step
    fails there too. A stand-in python records how it is asked to make the environment."""
    log = tmp_path / "calls"
    fake_python = tmp_path / "python-with-torch"
    # Every probe (-c ...: the version check, 'import torch', the headers) succeeds; 'venv' is recorded and
    # then fails, which ends ./run before it installs anything.
    fake_python.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n[ "$1 $2" = "-m venv" ] && exit 7\nexit 0\n')
    fake_python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RECNORM_ISOLATED")}
    env.update(RECNORM_VENV=str(tmp_path / "new-venv"), PYTHON=str(fake_python))
    if isolated:
        env["RECNORM_ISOLATED"] = "1"
    proc = subprocess.run([RUN, "recnorm", "inits"], env=env, capture_output=True, text=True, timeout=120)
    if "recnorm needs these Debian packages" in proc.stderr or "installing Debian packages" in proc.stderr:
        pytest.skip("this machine lacks some of the Debian packages that ./run checks for")
    assert proc.returncode == 7, proc.stderr
    venv_calls = [line for line in log.read_text().splitlines() if line.startswith("-m venv")]
    assert len(venv_calls) == 1, log.read_text()
    assert ("--system-site-packages" in venv_calls[0]) is (not isolated)
    assert venv_calls[0].endswith(str(tmp_path / "new-venv"))


def test_ci_builds_an_isolated_environment():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert re.search(r"^export RECNORM_ISOLATED=1$", ci, re.M)
