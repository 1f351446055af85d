"""Layers, cells and normalizations."""

from recnorm.nn.cells import CELLS, CellType, get_cell, list_cells, register_cell
from recnorm.nn.norms import (
    NORMS,
    GroupedLayerNorm,
    NormSpec,
    RecurrentBatchNorm,
    SequenceBatchNorm,
    convert_sync_batchnorm,
    create_norm,
    get_norm,
    list_norms,
    norm_label,
    register_norm,
    resolve_norm_kwargs,
)
from recnorm.nn.rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RecurrentBase, RNNCell

__all__ = [
    "CELLS", "CellType", "get_cell", "list_cells", "register_cell",
    "NORMS", "GroupedLayerNorm", "NormSpec", "RecurrentBatchNorm", "SequenceBatchNorm", "convert_sync_batchnorm", "create_norm", "get_norm", "list_norms",
    "norm_label", "register_norm", "resolve_norm_kwargs",
    "GRU", "LSTM", "RNN", "GRUCell", "LSTMCell", "RecurrentBase", "RNNCell",
]
