"""The configuration of one training run: a typed dataclass passed whole to the trainer.

A :class:`RunConfig` is validated in one place (:meth:`RunConfig.validate`) before any data is loaded or any
training starts, and every error names the field, the expected value and the actual value. The config is
the identity of a run: :attr:`RunConfig.run_id` is a readable prefix plus a hash of every field that can
change the result, so a sweep can tell a finished run from a new one by name alone.

Example::

    >>> from recnorm.experiments.config import RunConfig
    >>> cfg = RunConfig(task="digits", norm="batch", norm_kwargs={"gain_init": 0.1}, steps=300, seed=1)
    >>> cfg.validate()
    >>> RunConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import typing
from typing import Any, Dict, List, Optional

__all__ = ["RunConfig", "ConfigError", "EXECUTION_FIELDS", "OPTIMIZERS", "FEEDS", "is_batch_norm", "uses_batch_statistics",
           "cell_options"]

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
#: How variable-length batches reach the recurrent stack (``RunConfig.feed``).
FEEDS = ("packed", "padded")
#: Fields that describe how a run is executed, not what it computes: left out of the run hash, of a tuned
#: arm's identity, and of the factors a report compares.
EXECUTION_FIELDS = ("threads", "kernel", "chunk_floor")
# Fields added after runs were first committed: left out of the run hash while they hold these defaults, so
# the run ids (and the finished runs on disk) of configs that do not use them stay what they were.
_HASHED_UNLESS_DEFAULT = {"feed": "packed", "sort_by_length": 0, "between_layers": None,
                          "train_eval_examples": None, "patience": None}


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field, the expected and the actual value."""


def is_batch_norm(norm: Optional[str]) -> bool:
    """Whether ``norm`` keeps batch statistics (and so population statistics for evaluation): its
    :attr:`~recnorm.nn.norms.NormSpec.batch_statistics` in the norm registry."""
    from recnorm.nn.norms import NORMS

    return norm is not None and norm in NORMS and NORMS.get(norm).batch_statistics


def uses_batch_statistics(config: "RunConfig") -> bool:
    """Whether a run's model keeps batch statistics anywhere: its ``norm`` or a norm between its layers."""
    return is_batch_norm(config.norm) or config.between_layers is not None


def _f(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None) -> Any:
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class RunConfig:
    """Everything that defines one training run.

    Every field has a default, so ``RunConfig(task="digits", norm="layer")`` is a complete run. Fields with
    a ``*_kwargs``/``*_options`` name are passed through to the task or the normalization.
    """

    # --- task ---
    task: str = _f("digits", help="task name (see `recnorm tasks`)")
    task_options: Dict[str, Any] = _f(help="options of the task as a JSON object, e.g. "
                                           "'{\"train_size\": 5000}' (see `recnorm tasks`)", factory=dict)
    # --- model ---
    cell: str = _f("lstm", help="recurrent cell: lstm, gru, rnn or a registered one (recnorm.nn.register_cell)")
    nonlinearity: str = _f("tanh", help="nonlinearity of cells that take one (rnn: tanh or relu)")
    norm: Optional[str] = _f(None, help="normalization (see `recnorm norms`); None or 'none' for no norm")
    norm_kwargs: Dict[str, Any] = _f(help="options of the norm as a JSON object, e.g. '{\"gain_init\": 0.1}' "
                                          "(see `recnorm norms`)", factory=dict)
    num_layers: int = _f(1, help="number of stacked recurrent layers")
    hidden_size: int = _f(64, help="hidden units per layer")
    bidirectional: bool = _f(False, help="bidirectional recurrent layers")
    dropout: float = _f(0.0, help="dropout between recurrent layers")
    embedding_size: Optional[int] = _f(None, help="embedding width for token tasks (default: hidden_size)")
    h0_noise: float = _f(0.0, help="std of Gaussian noise on the initial hidden state while training "
                                   "(Cooijmans et al. use 0.1 against zero batch variance)")
    between_layers: Optional[str] = _f(None, help="normalization of each layer's output before the next layer "
                                                  "(the literal 'BN on the output of each RNN'); needs layers "
                                                  "with a between_layers option (recnorm.SequenceBatchNorm)")
    feed: str = _f("packed", help="how variable-length batches reach the recurrent stack: 'packed' (a "
                                  "PackedSequence; statistics see valid steps only) or 'padded' (the zero-padded "
                                  "tensor as is, so padding enters the batch statistics)")
    sort_by_length: int = _f(0, help="form training batches from pools of this many batches sorted by sequence "
                                     "length, so a batch holds sequences of similar length (length bucketing, as "
                                     "in Deep Speech 2's SortaGrad); 0: random batches")
    # --- initialization ---
    init: str = _f("default", help="weight init scheme (see `recnorm inits`)")
    init_gain: float = _f(1.0, help="scale of the recurrent layers' weight matrices at init")
    forget_bias: Optional[float] = _f(None, help="LSTM forget-gate bias at init (None: scheme default)")
    # --- optimization ---
    optimizer: str = _f("adam", help="adam, adamw, rmsprop or sgd")
    lr: float = _f(1e-3, help="learning rate")
    weight_decay: float = _f(0.0, help="weight decay")
    momentum: float = _f(0.0, help="momentum (sgd and rmsprop)")
    clip: Optional[float] = _f(1.0, help="max global gradient norm (None: no clipping)")
    batch_size: int = _f(64, help="training batch size")
    steps: Optional[int] = _f(500, help="training steps (exclusive with epochs)")
    epochs: Optional[float] = _f(None, help="training epochs (exclusive with steps; needs a task with a train size)")
    patience: Optional[int] = _f(None, help="early stopping: stop when the validation metric has not improved for "
                                            "this many evaluations and restore the best evaluation's weights "
                                            "(steps or epochs is then the maximum budget); None: the whole budget")
    # --- evaluation and diagnostics ---
    eval_every: int = _f(100, help="evaluate on the valid split every this many steps (and at 0 and the end)")
    eval_batches: Optional[int] = _f(None, help="max valid batches per evaluation (None: whole split)")
    eval_batch_size: int = _f(256, help="batch size for evaluation")
    diag_every: Optional[int] = _f(100, help="gradient-flow diagnostics every this many steps "
                                            "(at init and the end always; None or 0: only those)")
    popstat_batches: int = _f(20, help="train batches for the exact recomputation of BN population statistics")
    train_eval_examples: Optional[int] = _f(None, help="also evaluate the final model on this many training "
                                                       "examples (for the train-test gap); None: skip")
    # --- reproducibility and execution ---
    seed: int = _f(0, help="seed of the initialization, the data order and dropout")
    threads: int = _f(1, help="torch CPU threads (an execution detail: not part of the run id)")
    kernel: str = _f("auto", help="which implementation runs each recurrent layer (not part of the run id; see "
                                  "recnorm.experiments.provenance): 'auto' (the fitted dispatch rule), "
                                  "'legacy' (torch's op first, as 'auto' chose before the rule existed), "
                                  "'reference', 'native', 'fused', or a per-layer pin such as "
                                  "'l0.train=fused,l0.eval=native' (what a run records in provenance.kernel_pin)")
    chunk_floor: Optional[int] = _f(None, help="the fused kernels' smallest weight-gradient chunk in rows (not part of "
                                              "the run id): it fixes the order in which weight gradients are "
                                              "summed, so a replay uses the run's own (provenance.chunk_floor; "
                                              "runs that do not record it used 2048). None: the library's "
                                              "(recnorm.kernels.fused.CHUNK_FLOOR)")

    def __post_init__(self) -> None:
        # Canonical forms, so that equal runs hash equally: "none" is no norm; ints given for float fields
        # (as JSON and the CLI produce them) become floats.
        if isinstance(self.norm, str) and self.norm.lower() == "none":
            self.norm = None
        hints = _hints()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _base_type(hints[f.name]) is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able dict of every field."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: typing.Mapping[str, Any]) -> "RunConfig":
        """Build from a dict; unknown keys raise :class:`ConfigError` listing the valid ones."""
        if not isinstance(data, typing.Mapping):
            raise ConfigError(f"expected a dict of config fields, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; expected a subset of {names}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with some fields changed. Dotted keys such as ``norm_kwargs.gain_init`` set one entry of a
        dict field."""
        data = self.to_dict()
        for key, value in changes.items():
            set_field(data, key, value)
        return RunConfig.from_dict(data)

    # ------------------------------------------------------------------ identity
    @property
    def config_hash(self) -> str:
        """A stable 10-hex-digit hash of every field that can change the result."""
        data = {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS
                and not (k in _HASHED_UNLESS_DEFAULT and v == _HASHED_UNLESS_DEFAULT[k])}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    @property
    def run_id(self) -> str:
        """A readable, stable, file-system-safe id: ``{task}-{cell}{layers}-{norm}-{init}{gain}-s{seed}-{hash}``."""
        gain = f"{self.init_gain:g}"
        layers = f"x{self.num_layers}" if self.num_layers != 1 else ""
        parts = [self.task, f"{self.cell}{layers}", self.norm or "none", f"{self.init}{gain}", f"s{self.seed}",
                 self.config_hash]
        return "-".join(_safe(p) for p in parts)

    # ------------------------------------------------------------------ validation
    def validate(self, check_registries: bool = True) -> "RunConfig":
        """Check every field; raise :class:`ConfigError` ("field: expected X, got Y") on the first problem.

        With ``check_registries`` the cell (with ``nonlinearity`` and ``forget_bias``), the task (and its option
        names), the norm (and its options), the init scheme and ``between_layers`` are checked against the live
        registries, so registered pieces are valid as soon as they are registered; this loads no data. Returns
        ``self`` so calls can chain.
        """
        hints = _hints()
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        if check_registries:
            _check_cell(self)
        self._check_sizes_and_rates()
        self._check_budget_kernel_and_norm_options()
        if check_registries:
            self._check_registered_choices()
        return self

    def _check_sizes_and_rates(self) -> None:
        """Sizes, rates, the optimizer, the feed and the regularizers."""
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _positive("num_layers", self.num_layers)
        _positive("hidden_size", self.hidden_size)
        _positive("batch_size", self.batch_size)
        _positive("eval_every", self.eval_every)
        if self.patience is not None:
            _positive("patience", self.patience)
        _positive("eval_batch_size", self.eval_batch_size)
        _positive("threads", self.threads)
        _positive("lr", self.lr)
        if self.embedding_size is not None:
            _positive("embedding_size", self.embedding_size)
        if self.eval_batches is not None:
            _positive("eval_batches", self.eval_batches)
        if self.diag_every is not None and self.diag_every < 0:
            raise ConfigError(f"diag_every: expected None or an int >= 0, got {self.diag_every!r}")
        if self.popstat_batches < 1:
            raise ConfigError(f"popstat_batches: expected an int >= 1, got {self.popstat_batches!r}")
        _choice("feed", self.feed, FEEDS)
        if self.sort_by_length < 0 or self.sort_by_length == 1:
            raise ConfigError(f"sort_by_length: expected 0 (off) or a pool of >= 2 batches, "
                              f"got {self.sort_by_length!r}")
        if self.train_eval_examples is not None:
            _positive("train_eval_examples", self.train_eval_examples)
        if self.between_layers is not None and self.num_layers < 2:
            raise ConfigError(f"between_layers: expected None for a single layer (it normalizes between stacked "
                              f"layers), got {self.between_layers!r} with num_layers={self.num_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: expected a float in [0, 1), got {self.dropout!r}")
        for name in ("weight_decay", "momentum", "h0_noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}: expected a finite float >= 0, got {value!r}")
        if not (math.isfinite(self.init_gain) and self.init_gain > 0):
            raise ConfigError(f"init_gain: expected a finite float > 0, got {self.init_gain!r}")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip: expected None or a finite float > 0, got {self.clip!r}")

    def _check_budget_kernel_and_norm_options(self) -> None:
        """The step budget, the kernel pin and the form of norm_kwargs."""
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"steps/epochs: expected exactly one of them to be set, got steps={self.steps!r}, "
                              f"epochs={self.epochs!r}")
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"steps: expected an int >= 0, got {self.steps!r}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"epochs: expected a finite float > 0, got {self.epochs!r}")
        if self.chunk_floor is not None and self.chunk_floor < 1:
            raise ConfigError(f"chunk_floor: expected None or an int >= 1, got {self.chunk_floor!r}")
        from recnorm.experiments.provenance import parse_kernel_pin

        try:
            parse_kernel_pin(self.kernel)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.norm is None and self.norm_kwargs:
            raise ConfigError(f"norm_kwargs: expected {{}} when norm is None, got {self.norm_kwargs!r}")
        for key in self.norm_kwargs:
            if not isinstance(key, str):
                raise ConfigError(f"norm_kwargs: expected str keys, got {key!r}")

    def _check_registered_choices(self) -> None:
        """The norm and its options, the init, between_layers, and the task with its options, against the registries."""
        _choice("norm", self.norm, [None, *available_norms()])
        options = norm_options(self.norm) if self.norm is not None else None
        unknown = sorted(set(self.norm_kwargs) - set(options)) if options is not None else []
        if unknown:
            raise ConfigError(f"norm_kwargs: unknown option(s) {unknown} for norm {self.norm!r}; expected a "
                              f"subset of {sorted(options)}")
        _choice("init", self.init, available_inits())
        _choice("between_layers", self.between_layers, _between_layers())
        from recnorm.experiments.tasks.base import get_task

        try:
            cls = get_task(self.task)
        except ValueError as exc:
            raise ConfigError(f"task: {exc}") from None
        valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(self.task_options) - set(valid))
        if unknown:
            raise ConfigError(f"task_options: unknown option(s) {unknown} for task {self.task!r}; "
                              f"expected a subset of {valid}")


# ---------------------------------------------------------------------------------------------- helpers
def available_norms() -> List[str]:
    """The names in the norm registry (``recnorm.list_norms()``)."""
    from recnorm.nn.norms import list_norms

    return list_norms()


def norm_options(norm: str) -> Dict[str, Any]:
    """The ``norm_kwargs`` a registered norm accepts, with their defaults."""
    from recnorm.nn.norms import get_norm

    spec = get_norm(norm)
    return {} if spec is None else dict(spec.options)


def available_inits() -> List[str]:
    """The init scheme names of ``recnorm.init.list_inits()``."""
    from recnorm import init as rinit

    return list(rinit.list_inits())


def _between_layers() -> List[Optional[str]]:
    from recnorm.nn.rnn import BETWEEN_LAYERS

    return list(BETWEEN_LAYERS)


def cell_options(config: "RunConfig") -> Dict[str, Any]:
    """The constructor options of ``config.cell`` that the config sets: ``nonlinearity`` for a cell type
    that takes one (the rnn cell), nothing otherwise."""
    from recnorm.nn.cells import CELLS

    takes = "nonlinearity" in inspect.signature(CELLS.get(config.cell).__init__).parameters
    return {"nonlinearity": config.nonlinearity} if takes else {}


def _check_cell(config: "RunConfig") -> None:
    """``cell`` names a registered cell type; ``nonlinearity`` and ``forget_bias`` fit it."""
    from recnorm.nn.cells import CELLS, LSTMCellType, list_cells

    _choice("cell", config.cell, list_cells())
    options = cell_options(config)
    if not options and config.nonlinearity != "tanh":
        raise ConfigError(f"nonlinearity: expected 'tanh' for cell {config.cell!r} (it takes no nonlinearity), "
                          f"got {config.nonlinearity!r}")
    try:
        CELLS.get(config.cell)(**options)
    except ValueError as exc:
        raise ConfigError(f"nonlinearity: {exc}") from None
    if config.forget_bias is not None and not issubclass(CELLS.get(config.cell), LSTMCellType):
        raise ConfigError(f"forget_bias: expected None for cell {config.cell!r} (only LSTM cells have a forget "
                          f"gate), got {config.forget_bias!r}")


def set_field(data: Dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` in a config dict; ``a.b`` sets entry ``b`` of the dict field ``a``."""
    if "." in key:
        head, sub = key.split(".", 1)
        inner = dict(data.get(head) or {})
        inner[sub] = value
        data[head] = inner
    else:
        data[key] = value


def field_help() -> Dict[str, str]:
    """``{field: help text}`` for the CLI."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(RunConfig)}


def field_types() -> Dict[str, Any]:
    """``{field: base type}`` (``Optional[X]`` -> X) for the CLI's parsers."""
    return {name: _base_type(h) for name, h in _hints().items()}


_HINTS: Optional[Dict[str, Any]] = None


def _hints() -> Dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(RunConfig)
    return _HINTS


def _base_type(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    return origin or hint


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def _check_type(name: str, value: Any, hint: Any) -> None:
    base = _base_type(hint)
    if value is None:
        if _optional(hint):
            return
        raise ConfigError(f"{name}: expected {base.__name__}, got None")
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
    }[base](value)
    if not ok:
        expected = "a JSON object (dict) such as {\"key\": 1}" if base is dict else base.__name__
        raise ConfigError(f"{name}: expected {'None or ' if _optional(hint) else ''}{expected}, "
                          f"got {type(value).__name__} {value!r}")


def _choice(name: str, value: Any, choices: typing.Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if not value > 0:
        raise ConfigError(f"{name}: expected a value > 0, got {value!r}")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in str(text))
