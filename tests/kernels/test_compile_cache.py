"""recnorm.kernels.compile_cache: torch.compile's disk caches are keyed to this version of recnorm's operators."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from recnorm.kernels import compile_cache


def test_the_fingerprint_follows_the_operators_sources_and_nothing_else(tmp_path):
    root = tmp_path / "kernels"
    shutil.copytree(compile_cache._HERE, root, ignore=shutil.ignore_patterns("__pycache__"))
    first = compile_cache.operator_fingerprint(str(root))
    assert first == compile_cache.operator_fingerprint(str(root)) and len(first) == 16
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "fused.cpython-311.pyc").write_bytes(b"compiled")
    (root / "notes.txt").write_text("not a source")
    assert compile_cache.operator_fingerprint(str(root)) == first
    with open(root / "fused.py", "a") as f:  # the operators' Python: implementation, fake, autograd
        f.write("\n# changed\n")
    second = compile_cache.operator_fingerprint(str(root))
    assert second != first
    with open(root / "csrc" / "fused_common.h", "a") as f:  # the C++ they call
        f.write("\n// changed\n")
    assert compile_cache.operator_fingerprint(str(root)) not in (first, second)


def test_the_tag_is_set_on_import_and_added_after_a_users_own():
    ours = compile_cache._tag()
    assert ours.startswith("recnorm-ops-") and ours in torch.compiler.config.cache_key_tag.split("|")
    # torch's own patch, not pytest's monkeypatch: undoing that deletes the option from torch's config module
    with torch.compiler.config.patch(cache_key_tag="my-job"):
        assert compile_cache.tag_compile_cache() == f"my-job|{ours}"
        assert compile_cache.tag_compile_cache() == f"my-job|{ours}"  # once
    assert ours in torch.compiler.config.cache_key_tag.split("|")


_COMPILE = r"""
import json, sys, torch
import recnorm
from recnorm.kernels import compile_cache
if sys.argv[1] != "-":  # pretend to be another version of the operators
    compile_cache.operator_fingerprint = lambda root=None: sys.argv[1]
    compile_cache._tag.cache_clear()
    torch.compiler.config.cache_key_tag = ""
    compile_cache.tag_compile_cache()
from torch._dynamo.utils import counters
torch.manual_seed(0)
model = recnorm.RNN(3, 4, norm=None, kernel="fused")
x = torch.randn(5, 2, 3)
torch.compile(model)(x)[0].sum().backward()
print(json.dumps({"tag": torch.compiler.config.cache_key_tag, "hit": counters["aot_autograd"]["autograd_cache_hit"],
                  "miss": counters["aot_autograd"]["autograd_cache_miss"]}))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="torch.compile's inductor needs a C++ compiler")
def test_another_version_of_the_operators_never_loads_a_cached_graph(tmp_path):
    """Three processes share one cache directory: the second, same version, loads the first one's graph;
    the third, whose operators differ, compiles afresh (torch alone would load the stale graph)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)

    def run(fingerprint):
        res = subprocess.run([sys.executable, "-c", _COMPILE, fingerprint], capture_output=True, text=True, env=env,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    first, again, other = run("-"), run("-"), run("0123456789abcdef")
    assert first["miss"] >= 1 and first["hit"] == 0
    assert again["hit"] >= 1 and again["tag"] == first["tag"]
    assert other["tag"] == "recnorm-ops-0123456789abcdef" and other["hit"] == 0 and other["miss"] >= 1
