"""Building the C++ extensions never hangs: a lock left by a killed build is recovered from, a build held
by a live process is waited for with a time limit, and a changed source builds in its own directory."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from recnorm.kernels import _build


@pytest.fixture
def fake_load(monkeypatch, tmp_path):
    """Replace torch's compiler driver: record each call and whether torch's lock file existed then."""
    from torch.utils import cpp_extension

    calls = []

    def load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        calls.append({"name": name, "dir": build_directory, "lock_present": os.path.exists(os.path.join(build_directory, "lock")),
                      "sources": list(sources)})
        return "module"

    monkeypatch.setenv("RECNORM_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpp_extension, "load", load)
    source = tmp_path / "k.cpp"
    source.write_text("// v1\n")
    return calls, source


def test_stale_torch_lock_is_removed_before_building(fake_load):
    calls, source = fake_load
    directory = _build.build_directory("k", [str(source)], ["-O2", "|"])
    os.makedirs(directory)
    open(os.path.join(directory, "lock"), "w").close()  # what a build killed half-way leaves behind
    assert _build.load("k", [str(source)], ["-O2"], []) == "module"
    assert [(c["name"], c["dir"], c["lock_present"]) for c in calls] == [("k", directory, False)]


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


def test_real_extension_loads_despite_a_stale_lock():
    """End to end, in a fresh process: the regression that hung a CI run for its whole time limit."""
    from recnorm.kernels import fused

    assert fused.available(), f"the fused C++ extension could not be built here: {fused.EXTENSIONS['lstm'].error}"
    tag, flags = fused.build_flags()
    source = os.path.join(os.path.dirname(fused.__file__), "csrc", "fused_lstm.cpp")
    directory = _build.build_directory(f"recnorm_fused_lstm_{tag}", [source], flags + ["|", "-fopenmp"])
    assert os.path.isdir(directory), "the build directory naming in the test and in recnorm.kernels.fused disagree"
    open(os.path.join(directory, "lock"), "w").close()
    code = "from recnorm.kernels import fused; import sys; sys.exit(0 if fused.available() else 3)"
    result = subprocess.run([sys.executable, "-c", code], timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not os.path.exists(os.path.join(directory, "lock"))


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
    """The build compiles copies kept in its directory, so a second checkout of the same sources (another
    path in the build commands) reuses the build instead of rebuilding it."""
    calls, source = fake_load
    other = tmp_path / "other_checkout"
    other.mkdir()
    (other / "k.cpp").write_text(source.read_text())
    (source.parent / "k.h").write_text("// header\n")
    (other / "k.h").write_text("// header\n")
    _build.load("k", [str(source)], [], [])
    _build.load("k", [str(other / "k.cpp")], [], [])
    assert calls[0]["dir"] == calls[1]["dir"]
    assert calls[0]["sources"] == calls[1]["sources"] == [os.path.join(calls[0]["dir"], "src", "k.cpp")]
    copies = sorted(os.listdir(os.path.join(calls[0]["dir"], "src")))
    assert copies == ["k.cpp", "k.h"]


def test_a_build_is_announced_as_a_warning(fake_load, caplog):
    calls, source = fake_load
    with caplog.at_level("WARNING", logger="recnorm.kernels._build"):
        _build.load("k", [str(source)], [], [])
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "compiling the C++ extension k" in caplog.records[0].getMessage()
    open(os.path.join(calls[0]["dir"], "k.so"), "w").close()  # built: loading it says nothing
    caplog.clear()
    with caplog.at_level("WARNING", logger="recnorm.kernels._build"):
        _build.load("k", [str(source)], [], [])
    assert caplog.records == []


def _pytest_with_required_kernels(tmp_path, **env):
    """One quick test of this file, run by pytest in a fresh process with RECNORM_REQUIRE_FUSED=1."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
    env = dict(os.environ, RECNORM_REQUIRE_FUSED="1", **env)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    node = f"{os.path.abspath(__file__)}::test_stale_torch_lock_is_removed_before_building"
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
