"""Building the C++ extensions never hangs: a build left unfinished by a killed process is recovered from, a
build held by a live process is waited for with a time limit, a changed source or build command builds in
its own directory, and a published library is never rebuilt or replaced (two environments alternating)."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from recnorm.kernels import _build


@pytest.fixture
def fake_load(monkeypatch, tmp_path):
    """Replace torch's compiler driver: record each call (and whether torch's lock file existed in its build
    directory then) and write a stand-in library; importing a published library returns its path."""
    from torch.utils import cpp_extension

    calls = []

    def load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        calls.append({"name": name, "dir": build_directory, "lock_present": os.path.exists(os.path.join(build_directory, "lock")),
                      "sources": list(sources), "copies": sorted(os.listdir(os.path.dirname(sources[0])))})
        with open(os.path.join(build_directory, f"{name}.so"), "w") as f:
            f.write(f"built by call {len(calls)}\n")
        return "module"

    monkeypatch.setenv("RECNORM_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(_build, "_import_library", lambda name, path: ("published", path))
    source = tmp_path / "k.cpp"
    source.write_text("// v1\n")
    return calls, source


def test_an_unfinished_build_of_a_killed_process_is_removed(fake_load):
    calls, source = fake_load
    directory = _build.build_directory("k", [str(source)], ["-O2", "|"])
    stale = os.path.join(directory, "build-123-abc")
    os.makedirs(stale)
    open(os.path.join(stale, "lock"), "w").close()  # what a build killed half-way leaves behind
    assert _build.load("k", [str(source)], ["-O2"], []) == "module"
    assert [(c["name"], os.path.dirname(c["dir"]), c["lock_present"]) for c in calls] == [("k", directory, False)]
    assert sorted(os.listdir(directory)) == ["k.so", "recnorm.lock"]  # staging gone, library published
    assert _build.load("k", [str(source)], ["-O2"], []) == ("published", os.path.join(directory, "k.so"))
    assert len(calls) == 1


def test_changed_source_header_or_flags_build_in_their_own_directory(fake_load):
    calls, source = fake_load
    _build.load("k", [str(source)], ["-O2"], [])
    _build.load("k", [str(source)], ["-O3"], [])
    source.write_text("// v2\n")
    _build.load("k", [str(source)], ["-O2"], [])
    (source.parent / "k_common.h").write_text("// a header beside the source\n")
    _build.load("k", [str(source)], ["-O2"], [])
    assert len({c["dir"] for c in calls}) == 4


def test_a_live_builder_is_waited_for_with_a_time_limit(fake_load, monkeypatch):
    import fcntl

    calls, source = fake_load
    directory = _build.build_directory("k", [str(source)], ["|"])
    os.makedirs(directory)
    monkeypatch.setenv("RECNORM_BUILD_TIMEOUT", "0.5")
    with open(os.path.join(directory, "recnorm.lock"), "a") as held:  # another open file: conflicts like another process
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match="building"):
            _build.load("k", [str(source)], [], [])
    assert calls == []
    _build.load("k", [str(source)], [], [])  # released: goes ahead
    assert len(calls) == 1
    _build.load("k", [str(source)], [], [])  # published: imported, not built again
    assert len(calls) == 1


def test_a_killed_builder_releases_its_lock(fake_load, monkeypatch):
    calls, source = fake_load
    directory = _build.build_directory("k", [str(source)], ["|"])
    os.makedirs(directory)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, sys, time
            f = open({os.path.join(directory, 'recnorm.lock')!r}, 'a')
            fcntl.flock(f, fcntl.LOCK_EX)
            open({os.path.join(directory, 'lock')!r}, 'w').close()
            print('held', flush=True)
            time.sleep(600)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        monkeypatch.setenv("RECNORM_BUILD_TIMEOUT", "30")
        assert _build.load("k", [str(source)], [], []) == "module"
        assert calls[0]["lock_present"] is False
    finally:
        if holder.poll() is None:
            holder.kill()


def test_real_extension_loads_despite_a_stale_build():
    """End to end, in a fresh process: the regression that hung a CI run for its whole time limit."""
    from recnorm.kernels import fused

    assert fused.available(), f"the fused C++ extension could not be built here: {fused.EXTENSIONS['lstm'].error}"
    tag, flags = fused.build_flags()
    source = os.path.join(os.path.dirname(fused.__file__), "csrc", "fused_lstm.cpp")
    name = f"recnorm_fused_lstm_{tag}"
    directory = _build.build_directory(name, [source], flags + ["|", "-fopenmp"])
    assert os.path.isfile(_build.library_path(name, directory)), \
        "the build directory naming in the test and in recnorm.kernels.fused disagree"
    stale = os.path.join(directory, "build-1-stale")
    os.makedirs(stale, exist_ok=True)
    open(os.path.join(stale, "lock"), "w").close()
    try:
        code = "from recnorm.kernels import fused; import sys; sys.exit(0 if fused.available() else 3)"
        result = subprocess.run([sys.executable, "-c", code], timeout=600, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "compiling" not in result.stderr  # the published library is imported as it is
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def test_build_extensions_reports_each_kernel_and_then_counts_as_built():
    from recnorm import kernels

    status = kernels.build_extensions()
    assert set(status) == {"LSTM", "GRU/RNN"}
    if any(status.values()):
        pytest.skip(f"the fused C++ extensions could not be built here: {status}")
    assert kernels.extensions_built()


def test_each_torch_installation_builds_in_its_own_directory(fake_load, monkeypatch):
    """Two environments with the same torch version but their own torch installation must not share (and
    so rebuild) one build directory."""
    import torch

    calls, source = fake_load
    here = _build.build_directory("k", [str(source)], ["|"])
    assert _build.build_directory("k", [str(source)], ["|"]) == here  # stable
    monkeypatch.setattr(torch, "__file__", "/other/venv/lib/python3/site-packages/torch/__init__.py")
    elsewhere = _build.build_directory("k", [str(source)], ["|"])
    assert elsewhere != here
    monkeypatch.setenv("CXX", "clang++")
    assert _build.build_directory("k", [str(source)], ["|"]) not in (here, elsewhere)


def test_checkouts_with_the_same_sources_share_one_build(fake_load, tmp_path):
    """The build key holds the sources' text, not their paths, so a second checkout of the same sources
    imports the published build instead of rebuilding it."""
    calls, source = fake_load
    other = tmp_path / "other_checkout"
    other.mkdir()
    (other / "k.cpp").write_text(source.read_text())
    (source.parent / "k.h").write_text("// header\n")
    (other / "k.h").write_text("// header\n")
    _build.load("k", [str(source)], [], [])
    directory = os.path.dirname(calls[0]["dir"])
    assert calls[0]["sources"] == [os.path.join(calls[0]["dir"], "src", "k.cpp")]
    assert calls[0]["copies"] == ["k.cpp", "k.h"]  # copies were compiled
    assert _build.load("k", [str(other / "k.cpp")], [], []) == ("published", os.path.join(directory, "k.so"))
    assert len(calls) == 1


def test_a_build_is_announced_as_a_warning(fake_load, caplog):
    calls, source = fake_load
    with caplog.at_level("WARNING", logger="recnorm.kernels._build"):
        _build.load("k", [str(source)], [], [])
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "compiling the C++ extension k" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="recnorm.kernels._build"):  # built: loading it says nothing
        _build.load("k", [str(source)], [], [])
    assert caplog.records == []


def test_the_build_command_is_part_of_the_key(fake_load, monkeypatch):
    """Environments whose build commands differ (here: the same torch reached through another path, which
    changes the include and library paths torch writes) build side by side, and alternating between them
    never rebuilds or replaces either library."""
    from torch.utils import cpp_extension

    calls, source = fake_load
    real_include_paths = cpp_extension.include_paths

    def through(alias):
        monkeypatch.setattr(cpp_extension, "include_paths",
                            lambda *a, **k: [p.replace(os.path.dirname(os.path.dirname(cpp_extension.__file__)), alias)
                                             for p in real_include_paths(*a, **k)])

    through("/env-a/torch")
    a = _build.build_directory("k", [str(source)], ["|"])
    through("/env-b/torch")
    b = _build.build_directory("k", [str(source)], ["|"])
    assert a != b
    assert "/env-b/torch/include" in _build.build_command("k", [], [])
    published = {}
    for alias in ["/env-a/torch", "/env-b/torch"] * 4:
        through(alias)
        _build.load("k", [str(source)], [], [])
        directory = a if alias == "/env-a/torch" else b
        library = _build.library_path("k", directory)
        published.setdefault(library, os.stat(library).st_ino)
        assert os.stat(library).st_ino == published[library]  # never replaced
    assert len(calls) == 2 and {os.path.dirname(c["dir"]) for c in calls} == {a, b}


def test_the_compiler_found_on_path_is_part_of_the_key(fake_load, monkeypatch, tmp_path):
    calls, source = fake_load
    here = _build.build_directory("k", [str(source)], ["|"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "c++"
    wrapper.write_text("#!/bin/sh\nexec /usr/bin/c++ \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert f"compiler={wrapper}" in _build.build_command("k", [], [])
    assert _build.build_directory("k", [str(source)], ["|"]) != here


def _pytest_with_required_kernels(tmp_path, **env):
    """One quick test of this file, run by pytest in a fresh process with RECNORM_REQUIRE_FUSED=1."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
    env = dict(os.environ, RECNORM_REQUIRE_FUSED="1", **env)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    node = f"{os.path.abspath(__file__)}::test_an_unfinished_build_of_a_killed_process_is_removed"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=600)


def test_required_fused_kernels_fail_the_session_when_they_cannot_be_built(tmp_path):
    """What CI relies on: without a working compiler the README's test command fails, instead of passing with
    the fused kernels' tests skipped."""
    broken = _pytest_with_required_kernels(tmp_path, RECNORM_EXTENSIONS_DIR=str(tmp_path / "ext"),
                                           CXX=str(tmp_path / "no-such-compiler"))
    output = broken.stdout + broken.stderr
    assert broken.returncode == 3, output[-3000:]
    assert "RECNORM_REQUIRE_FUSED=1, but the fused C++ kernels could not be built" in output
    assert "0 passed" not in output and " passed" not in output  # no test ran

    working = _pytest_with_required_kernels(tmp_path)  # the default compiler and cache: the test runs
    assert working.returncode == 0, (working.stdout + working.stderr)[-3000:]
    assert "1 passed" in working.stdout


TINY_EXTENSION = """
#include <Python.h>
static struct PyModuleDef tiny_module = {PyModuleDef_HEAD_INIT, "recnorm_tiny", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_recnorm_tiny(void) { return PyModule_Create(&tiny_module); }
"""


def test_two_virtual_environments_alternating_build_once_each(tmp_path):
    """Two real virtual environments: the shared one, and a second one that reaches the same torch through
    another path (a symlink, so its build command's include and library paths differ while the old key, the
    torch location's real path, did not). Alternating A, B, A, B builds once per environment, each into its
    own directory, and never replaces a published library."""
    import sysconfig

    import torch

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    alias = tmp_path / "alias-site-packages"
    alias.symlink_to(site_packages)
    venv_b = tmp_path / "venv-b"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv_b)], check=True, timeout=300)
    python_b = str(venv_b / "bin" / "python")
    purelib = subprocess.run([python_b, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "shared-torch.pth"), "w") as f:
        f.write(str(alias) + "\n")
    source = tmp_path / "ext" / "recnorm_tiny.cpp"
    source.parent.mkdir()
    source.write_text(TINY_EXTENSION)
    code = ("import os, torch; from recnorm.kernels import _build; "
            f"m = _build.load('recnorm_tiny', [{str(source)!r}], [], []); "
            "print(os.path.dirname(m.__file__) if m.__file__ else '', torch.__file__)")
    env = dict(os.environ, PYTHONPATH=src, RECNORM_EXTENSIONS_DIR=str(tmp_path / "cache"))
    seen = {}
    builds = {"a": 0, "b": 0}
    for which in ["a", "b", "a", "b"]:
        python = sys.executable if which == "a" else python_b
        result = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        builds[which] += result.stderr.count("compiling the C++ extension recnorm_tiny")
        torch_file = result.stdout.split()[-1]
        assert torch_file.startswith(str(alias)) == (which == "b")
        directories = [d for d in os.listdir(tmp_path / "cache")]
        for d in directories:
            library = os.path.join(tmp_path / "cache", d, "recnorm_tiny.so")
            if os.path.exists(library):
                assert seen.setdefault(library, os.stat(library).st_ino) == os.stat(library).st_ino
    assert builds == {"a": 1, "b": 1}
    assert len(seen) == 2  # one published library per environment
