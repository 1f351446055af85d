"""Keep torch.compile's on-disk caches from replaying graphs built against another version of recnorm's
operators.

torch.compile caches compiled graphs on disk (AOTAutogradCache, FXGraphCache) under a key that covers the
graph it traced, but not what a registered custom operator does inside: its implementation, its fake
(the shapes it promises) and its autograd formula are not part of the key (pytorch/pytorch#144344,
#160472). A graph compiled with one version of recnorm's ``recnorm::fused_lstm``, ``fused_gru_rnn``,
``native_rnn`` or ``reverse_packed`` is therefore loaded again after recnorm changes them, and runs with
the old promises about the new operator. recnorm met this itself: after the fused Elman RNN stopped
saving its two gate terms, a cache warmed by the previous version failed at (28, 128, 28, 128) with
"wrong number of dimensions1 for op: torch.ops.recnorm.fused_gru_rnn.default"; a change that kept the
shapes would have replayed silently.

:func:`tag_compile_cache` (run when :mod:`recnorm.kernels` is imported) adds a fingerprint of the sources
that define the operators -- every ``.py`` file of this package and the C++ under ``csrc/`` -- to
``torch.compiler.config.cache_key_tag``, after any tag already set. Another version of the operators
then gives other keys: one cold compile after an upgrade, and never a stale graph. Graphs that do not
involve recnorm get other keys too while recnorm is imported; that costs one compile each, once per
version of recnorm. A tag set later by assigning ``torch.compiler.config.cache_key_tag`` replaces
recnorm's: call :func:`tag_compile_cache` again after setting it.
"""

from __future__ import annotations

import functools
import hashlib
import os

import torch

__all__ = ["operator_fingerprint", "tag_compile_cache"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def operator_fingerprint(root: str = _HERE) -> str:
    """A short hash of the sources that define recnorm's registered operators: every ``.py`` file of the
    package at ``root`` and every file under its ``csrc/`` (names and contents, in a sorted order)."""
    paths = []
    for d, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            if name.endswith(".py") or rel.split(os.sep)[0] == "csrc":
                paths.append(rel)
    digest = hashlib.sha256()
    for rel in sorted(paths):
        digest.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(f.read())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _tag() -> str:
    return f"recnorm-ops-{operator_fingerprint()}"


def tag_compile_cache() -> str:
    """Add recnorm's operator fingerprint to ``torch.compiler.config.cache_key_tag`` (after a tag already
    there; once) and return the tag now in effect."""
    tag, current = _tag(), torch.compiler.config.cache_key_tag
    if tag not in current.split("|"):
        torch.compiler.config.cache_key_tag = f"{current}|{tag}" if current else tag
    return torch.compiler.config.cache_key_tag
