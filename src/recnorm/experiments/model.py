"""The model the evidence engine trains: input map, a recnorm recurrent stack, a linear head.

The recurrent stack is a single :class:`recnorm.nn.RecurrentBase` of the config's cell, resolved through the
cell registry (``"lstm"`` gives the layer ``recnorm.LSTM`` is, and a registered cell works the same way),
stored as ``self.rnn``, so the diagnostics key its layers ``"rnn.l0"``, ``"rnn.l1"``, ... Everything that is
not the recurrent stack is kept as plain as possible so that differences between runs come from the layer.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from recnorm.experiments.config import RunConfig, cell_options
from recnorm.nn import RecurrentBase, get_cell

__all__ = ["SequenceModel", "build_model"]


class SequenceModel(nn.Module):
    """Embedding (token tasks) or identity input -> recurrent stack -> Linear head.

    Args:
        input_size: features per step (ignored when ``vocab_size`` is given).
        num_outputs: size of the output vector per step.
        config: the run config (cell, norm, sizes, init).
        vocab_size: number of token ids for token tasks; ``None`` for float features.

    Inputs: ``x, lengths``
        * **x**: ``(T, B, input_size)`` float features or ``(T, B)`` int64 token ids.
        * **lengths**: ``(B,)`` valid lengths, or ``None`` when every sequence has length T. Given lengths,
          the batch is packed (``enforce_sorted=False``) and unpacked back to length T; with
          ``config.feed == "padded"`` the padded tensor goes to the recurrent stack as it is instead (the
          common mistake whose padding enters batch statistics; the task still reads valid steps only).

    Outputs: ``(T, B, num_outputs)``; positions past a sequence's length hold the head's output for a zero
    hidden state (the task reads only valid positions).
    """

    def __init__(self, input_size: int, num_outputs: int, config: RunConfig, vocab_size: Optional[int] = None):
        super().__init__()
        self.embed: Optional[nn.Embedding] = None
        if vocab_size is not None:
            input_size = config.embedding_size or config.hidden_size
            self.embed = nn.Embedding(vocab_size, input_size)
        kwargs: Dict[str, Any] = dict(
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            bidirectional=config.bidirectional,
        )
        if config.norm is not None:
            kwargs["norm"] = config.norm
            kwargs["norm_kwargs"] = dict(config.norm_kwargs)
        if config.between_layers is not None:
            kwargs["between_layers"] = config.between_layers
        cell = get_cell(config.cell, **cell_options(config))
        self.rnn = RecurrentBase(cell, input_size, config.hidden_size, **kwargs)
        directions = 2 if config.bidirectional else 1
        self.head = nn.Linear(directions * config.hidden_size, num_outputs)
        self.state_size = cell.state_size
        self.h0_noise = config.h0_noise
        self.feed = config.feed
        self.state_shape = (directions * config.num_layers, config.hidden_size)

    def initial_state(self, batch_size: int, like: Tensor) -> Any:
        """Zero state, plus Gaussian noise of std ``h0_noise`` on h in training mode (None when zero). A cell
        with more state than h (the LSTM's c) gets zeros for the rest."""
        if not (self.training and self.h0_noise > 0):
            return None
        layers, hidden = self.state_shape
        h0 = self.h0_noise * torch.randn(layers, batch_size, hidden, dtype=like.dtype, device=like.device)
        if self.state_size > 1:
            return (h0,) + tuple(torch.zeros_like(h0) for _ in range(self.state_size - 1))
        return h0

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        if self.embed is not None:
            x = self.embed(x)  # (T, B) ids -> (T, B, E)
        T, B = x.shape[0], x.shape[1]
        hx = self.initial_state(B, x)
        if lengths is not None and self.feed == "packed":
            packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
            out, _ = self.rnn(packed, hx)
            out, _ = pad_packed_sequence(out, total_length=T)  # (T, B, D*H)
        else:
            out, _ = self.rnn(x, hx)  # (T, B, D*H)
        return self.head(out)  # (T, B, num_outputs)


def build_model(config: RunConfig, task: Any) -> SequenceModel:
    """Build the model for ``task`` and initialize the recurrent stack with ``recnorm.init``.

    Call after seeding: the Embedding and head use torch's default init; the recurrent stack is
    re-initialized with ``config.init``/``init_gain``/``forget_bias``.
    """
    from recnorm import init as rinit

    model = SequenceModel(task.input_size, task.num_outputs, config, vocab_size=task.vocab_size)
    kwargs: Dict[str, Any] = {"scheme": config.init, "gain": config.init_gain}
    if config.forget_bias is not None:
        kwargs["forget_bias"] = config.forget_bias
    rinit.initialize(model.rnn, **kwargs)
    return model
