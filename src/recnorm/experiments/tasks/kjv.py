"""Character-level language modelling on the King James Bible (Debian ``bible-kjv-text``)."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._common import (LN2, _check_outputs, check_batch_size, check_positive_int, check_split, masked_mean,
                      per_step_cross_entropy)
from .base import Batch, DataMissingError, Task, register_task

__all__ = ["KJVCharsTask", "BIBLE_PROGRAM", "BIBLE_DATA", "INSTALL_COMMAND", "VOCAB", "decode_kjv",
           "load_kjv"]

logger = logging.getLogger(__name__)

#: The decoder from Debian's ``bible-kjv`` and the compressed text from ``bible-kjv-text`` (module-level
#: constants so that tests can point them elsewhere).
BIBLE_PROGRAM = "bible"
BIBLE_DATA = "/usr/lib/bible.data"
INSTALL_COMMAND = "apt-get install bible-kjv-text bible-kjv"
#: Environment variable naming the directory of the optional decoded-text cache file (default
#: ``~/.cache/recnorm``; set it to an empty string to disable the file cache).
CACHE_DIR_ENV = "RECNORM_CACHE_DIR"
VERSE_RANGE = "Gen1:1-Rev22:21"
EXPECTED_CHARS = 4_137_850
EXPECTED_VERSES = 31_102
#: The 63 symbols of the decoded text, sorted; token id = index in this string.
VOCAB = "\n !'(),-.:;?ABCDEFGHIJKLMNOPQRSTUVWYZabcdefghijklmnopqrstuvwxyz"

_CACHE: Dict[Tuple[str, str], Tuple[str, Tensor]] = {}
_LOCK = threading.Lock()


def check_kjv() -> Tuple[str, str]:
    """Paths of the ``bible`` program and its data file, or :class:`DataMissingError` naming the install
    command."""
    program = shutil.which(BIBLE_PROGRAM)
    data = os.path.abspath(BIBLE_DATA)
    problems = []
    if program is None:
        problems.append(f"the {BIBLE_PROGRAM!r} program is not on PATH")
    if not os.path.isfile(data):
        problems.append(f"the data file {data} does not exist")
    if problems:
        raise DataMissingError(f"the kjv_chars task needs the King James Bible: {'; '.join(problems)}. "
                               f"Install it with: {INSTALL_COMMAND}")
    return program, data


def decode_kjv() -> str:
    """Decode the whole Bible with the ``bible`` program (~0.5 s): one verse per line with its reference
    stripped, verses joined by newlines, plus a final newline."""
    program, data = check_kjv()
    # -p/-d name the data file explicitly: by default bible looks in the current directory first.
    cmd = [program, "-p", os.path.dirname(data), "-d", os.path.basename(data), "-f", VERSE_RANGE]
    try:
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, encoding="utf-8",
                             check=True).stdout
    except subprocess.CalledProcessError as exc:
        message = f"{' '.join(cmd)} failed with status {exc.returncode}: {exc.stderr.strip()}"
        if "cannot open" in (exc.stderr or "").lower():
            raise DataMissingError(f"{message}. Install the data with: {INSTALL_COMMAND}") from exc
        raise RuntimeError(message) from exc
    lines = out.splitlines()
    if len(lines) != EXPECTED_VERSES:
        logger.warning("bible printed %d verses, expected %d", len(lines), EXPECTED_VERSES)
    return "\n".join(re.sub(r"^\S+ ", "", line, count=1) for line in lines) + "\n"


def _file_md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_dir() -> Optional[str]:
    value = os.environ.get(CACHE_DIR_ENV)
    if value is None:
        return os.path.join(os.path.expanduser("~"), ".cache", "recnorm")
    return value or None


def _text_with_file_cache(data: str) -> str:
    """The decoded text, read from the cache file keyed by the data file's md5 when there is one, else
    decoded (and the cache file written, atomically, best effort)."""
    directory = _cache_dir()
    path = None
    if directory is not None:
        path = os.path.join(directory, f"kjv-{_file_md5(data)}.txt")
        try:
            with open(path, "r", encoding="utf-8", newline="") as f:
                text = f.read()
            logger.info("read the decoded KJV text from %s", path)
            return text
        except OSError:
            pass
    text = decode_kjv()
    if path is not None:
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".kjv-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                    f.write(text)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:
            logger.info("could not write the KJV cache file %s: %s", path, exc)
    return text


def encode(text: str) -> Tensor:
    """Token ids (uint8 tensor) of ``text`` over :data:`VOCAB`; unknown symbols raise ValueError."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab_codes = np.array([ord(c) for c in VOCAB], dtype=np.uint32)
    ids = np.searchsorted(vocab_codes, codes)
    ids = np.minimum(ids, len(VOCAB) - 1)
    bad = vocab_codes[ids] != codes
    if bad.any():
        unknown = sorted({chr(c) for c in codes[bad][:1000]})
        raise ValueError(f"text holds symbols outside the KJV vocabulary: {unknown!r}")
    return torch.from_numpy(ids.astype(np.uint8))


def load_kjv() -> Tuple[str, Tensor]:
    """The decoded text and its token ids (uint8), cached per process (and in an optional cache file)."""
    program, data = check_kjv()
    key = (program, data)
    with _LOCK:
        if key not in _CACHE:
            start = time.perf_counter()
            text = _text_with_file_cache(data)
            if len(text) != EXPECTED_CHARS:
                logger.warning("decoded KJV text has %d characters, expected %d", len(text), EXPECTED_CHARS)
            _CACHE[key] = (text, encode(text))
            logger.info("loaded the KJV text (%d chars) in %.2f s", len(text), time.perf_counter() - start)
    return _CACHE[key]


def char_lm_loss(task: Task, outputs: Tensor, batch: Batch) -> Tensor:
    """Mean next-character cross-entropy over the valid steps (a task method of the KJV tasks)."""
    _check_outputs(outputs, batch, task.num_outputs)
    ce, mask = per_step_cross_entropy(outputs, batch)
    return masked_mean(ce, mask)


@torch.no_grad()
def char_lm_metrics(task: Task, outputs: Tensor, batch: Batch) -> Dict[str, Tuple[float, float]]:
    """Bits per character and cross-entropy (nats), as sums with their counts of valid steps."""
    _check_outputs(outputs, batch, task.num_outputs)
    ce, mask = per_step_cross_entropy(outputs, batch)
    if mask is not None:
        ce = ce.masked_select(mask)
    nats, n = ce.sum().item(), float(ce.numel())
    return {"bpc": (nats / LN2, n), "loss": (nats, n)}


@register_task
class KJVCharsTask(Task):
    """Character-level language modelling on the King James Bible.

    Source: Debian ``bible-kjv-text`` (/usr/lib/bible.data, compressed) decoded by the ``bible`` program
    of ``bible-kjv``; verse references stripped, one verse per line: 4,137,850 characters over 63
    symbols (:data:`VOCAB`; token id = index). Splits: contiguous 90/5/5 (train: chars [0, 3724065),
    valid: [3724065, 3930957), test: [3930957, 4137850)); :meth:`split_bounds` gives them. Inputs ``x``
    are ``(T, B)`` int64 token ids (``vocab_size = 63``), targets ``y`` the next characters ``(T, B)``.

    Batches: ``"train"`` draws windows of ``seq_len`` (default 100) at uniformly random offsets from a
    generator seeded with ``seed`` (``train_chars`` caps the part of the train split used; None: all).
    ``"valid"``/``"test"`` run consecutive non-overlapping windows over the first ``eval_chars`` (default
    200000; None: the whole split) characters of the split, every window starting from a fresh state; a
    shorter final window is zero-padded and its batch carries ``lengths``.

    Metric ``"bpc"``: bits per character, mean cross-entropy in nats over the predicted characters / ln 2
    (lower is better); ``"loss"`` is the same in nats. Trivial predictors: uniform over the 63 symbols,
    log2(63) ~ 5.98 bpc; the train unigram distribution ~ 4.38 bpc on valid; good character LSTMs reach
    ~1.5 or less.
    """

    name = "kjv_chars"
    kind = "per_step"
    metric = "bpc"
    higher_is_better = False

    def __init__(self, seq_len: int = 100, eval_chars: Optional[int] = 200_000,
                 train_chars: Optional[int] = None):
        check_positive_int("seq_len", seq_len)
        check_positive_int("eval_chars", eval_chars, allow_none=True, minimum=2)
        check_positive_int("train_chars", train_chars, allow_none=True, minimum=seq_len + 1)
        self.options = {"seq_len": seq_len, "eval_chars": eval_chars, "train_chars": train_chars}
        self.seq_len = seq_len
        self.vocab_size = len(VOCAB)
        self.input_size = len(VOCAB)
        self.num_outputs = len(VOCAB)
        check_kjv()

    @staticmethod
    def split_bounds(split: str, total: int = EXPECTED_CHARS) -> Tuple[int, int]:
        """``[start, end)`` character offsets of a split in a text of ``total`` characters."""
        check_split(split)
        b1, b2 = total * 9 // 10, total * 19 // 20
        return {"train": (0, b1), "valid": (b1, b2), "test": (b2, total)}[split]

    def sizes(self) -> str:
        """Characters per split of the installed text (its expected length; the text is not read)."""
        counts = []
        for split in ("train", "valid", "test"):
            start, end = self.split_bounds(split)
            cap = self.options["train_chars"] if split == "train" else self.options["eval_chars"]
            counts.append(end - start if cap is None else min(end - start, cap))
        return "/".join(f"{n:,}" for n in counts) + " characters of the KJV text"

    def split_ids(self, split: str) -> Tensor:
        """Token ids (uint8) of the split, cut to ``train_chars``/``eval_chars``."""
        _, ids = load_kjv()
        start, end = self.split_bounds(split, ids.numel())
        cap = self.options["train_chars"] if split == "train" else self.options["eval_chars"]
        if cap is not None:
            end = min(end, start + cap)
        return ids[start:end]

    def batches(self, split: str, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        check_split(split)
        check_batch_size(batch_size)
        ids = self.split_ids(split)
        if split == "train":
            if ids.numel() < self.seq_len + 1:
                raise ValueError(f"the train split ({ids.numel()} chars) is shorter than seq_len + 1")
            return self._train_stream(ids, batch_size, seed)
        return self._eval_pass(ids, batch_size)

    def _train_stream(self, ids: Tensor, batch_size: int, seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(int(seed))
        T = self.seq_len
        offsets = torch.arange(T + 1)
        n_starts = ids.numel() - T
        while True:
            starts = torch.randint(0, n_starts, (batch_size,), generator=gen)
            windows = ids[starts.unsqueeze(0) + offsets.unsqueeze(1)].long()  # (T + 1, B)
            yield Batch(windows[:-1].contiguous(), windows[1:].contiguous(), None)

    def _eval_pass(self, ids: Tensor, batch_size: int) -> Iterator[Batch]:
        T = self.seq_len
        n_pred = ids.numel() - 1  # characters predicted: every one but the first
        n_windows = math.ceil(n_pred / T)
        ids = ids.long()
        for first in range(0, n_windows, batch_size):
            windows = range(first, min(first + batch_size, n_windows))
            lengths = torch.tensor([min(T, n_pred - k * T) for k in windows], dtype=torch.int64)
            width = int(lengths.max())
            x = torch.zeros(width, len(windows), dtype=torch.int64)
            y = torch.zeros(width, len(windows), dtype=torch.int64)
            for j, k in enumerate(windows):
                n = int(lengths[j])
                x[:n, j] = ids[k * T:k * T + n]
                y[:n, j] = ids[k * T + 1:k * T + n + 1]
            full = bool((lengths == T).all())
            yield Batch(x, y, None if full else lengths)

    loss = char_lm_loss
    metrics = char_lm_metrics
