"""Verse-by-verse character language modelling on the King James Bible: real text of variable length."""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch

from ._common import check_batch_size, check_positive_int, check_split, eval_slices, take, train_index_stream
from .base import Batch, Task, register_task
from .kjv import VOCAB, char_lm_loss, char_lm_metrics, check_kjv, load_kjv

__all__ = ["KJVVersesTask"]

_SPANS: List[Tuple[int, int]] = []


def verse_spans() -> List[Tuple[int, int]]:
    """``(start, end)`` character offsets of every verse in the decoded text (``end`` is the offset of its
    newline), in order; computed once per process."""
    if not _SPANS:
        _, ids = load_kjv()
        ends = (ids == VOCAB.index("\n")).nonzero().flatten().tolist()
        _SPANS.extend(zip([0] + [e + 1 for e in ends[:-1]], ends))
    return _SPANS


@register_task
class KJVVersesTask(Task):
    """Character-level language modelling of single verses of the King James Bible: one verse per sequence.

    Source: the decoded KJV text of ``kjv_chars`` (Debian ``bible-kjv-text`` + ``bible-kjv``): 31,102
    verses over 63 symbols, 132 characters long on average (5% to 95%: 58 to 240). Each sequence is one
    verse followed by its newline, cut to ``max_len + 1`` characters; the model reads characters
    ``0 .. L-1`` and predicts characters ``1 .. L`` (the last prediction of an uncut verse is its newline),
    so the lengths vary from sequence to sequence and every batch carries ``lengths`` and zero padding
    (token id 0). This is the variable-length real-text task for masked against padded statistics.

    Splits by verse, contiguous: the first 90% of the verses train, the next 5% valid, the last 5% test;
    ``train_verses``, ``eval_verses`` (default 1000) take the first verses of a split (None: all).
    ``"train"`` is an endless stream of epochs of shuffled verses seeded with ``seed``; ``"valid"`` and
    ``"test"`` are one ordered pass.

    Metric ``"bpc"``: bits per predicted character over the valid positions (lower is better); ``"loss"``
    is the same in nats. Trivial predictors: uniform over the 63 symbols, log2(63) ~ 5.98 bpc; unigram
    frequencies ~ 4.4 bpc.
    """

    name = "kjv_verses"
    kind = "per_step"
    metric = "bpc"
    higher_is_better = False

    def __init__(self, max_len: int = 200, train_verses: Optional[int] = None, eval_verses: Optional[int] = 1000):
        check_positive_int("max_len", max_len, minimum=2)
        check_positive_int("train_verses", train_verses, allow_none=True)
        check_positive_int("eval_verses", eval_verses, allow_none=True)
        self.options = {"max_len": max_len, "train_verses": train_verses, "eval_verses": eval_verses}
        self.max_len = max_len
        self.seq_len = max_len
        self.vocab_size = len(VOCAB)
        self.input_size = len(VOCAB)
        self.num_outputs = len(VOCAB)
        check_kjv()

    def split_verses(self, split: str) -> List[Tuple[int, int]]:
        """The ``(start, end)`` spans of the split's verses."""
        check_split(split)
        spans = verse_spans()
        n = len(spans)
        b1, b2 = n * 9 // 10, n * 19 // 20
        part = {"train": spans[:b1], "valid": spans[b1:b2], "test": spans[b2:]}[split]
        cap = self.options["train_verses"] if split == "train" else self.options["eval_verses"]
        return part[:take(len(part), cap, "train_verses" if split == "train" else "eval_verses")]

    def num_examples(self, split: str) -> int:
        return len(self.split_verses(split))

    def _batch(self, spans: List[Tuple[int, int]]) -> Batch:
        _, ids = load_kjv()
        # A verse of n characters plus its newline gives n predictions (inputs: its first n characters).
        lengths = torch.tensor([min(end - start, self.max_len) for start, end in spans], dtype=torch.int64)
        width = int(lengths.max())
        x = torch.zeros(width, len(spans), dtype=torch.int64)
        y = torch.zeros(width, len(spans), dtype=torch.int64)
        for j, (start, _end) in enumerate(spans):
            n = int(lengths[j])
            x[:n, j] = ids[start:start + n]
            y[:n, j] = ids[start + 1:start + n + 1]
        return Batch(x, y, lengths)

    def batches(self, split: str, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        check_split(split)
        check_batch_size(batch_size)
        spans = self.split_verses(split)
        if split == "train":
            return (self._batch([spans[i] for i in idx.tolist()])
                    for idx in train_index_stream(len(spans), batch_size, seed))
        return (self._batch(spans[s]) for s in eval_slices(len(spans), batch_size))

    loss = char_lm_loss
    metrics = char_lm_metrics
