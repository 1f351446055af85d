"""Compatibility names for the studies' sweeps (:mod:`recnorm.experiments.studies`), under the old
"preset" names: ``get_preset(name, smoke)`` builds a study's sweep, ``list_presets()`` names them, and
``PRESETS`` maps each name to its sweep function (whose docstring gives the command and running time).
"""

from __future__ import annotations

from typing import Callable, Dict, List

from recnorm.experiments.studies import STUDIES, list_studies
from recnorm.experiments.studies.language import LANGUAGE_VARIANTS
from recnorm.experiments.studies.laurent import BETWEEN_LAYERS_VARIANT
from recnorm.experiments.sweep import SweepSpec

__all__ = ["get_preset", "list_presets", "PRESETS", "LANGUAGE_VARIANTS", "BETWEEN_LAYERS_VARIANT"]

PRESETS: Dict[str, Callable[..., SweepSpec]] = {name: STUDIES.get(name).sweep for name in list_studies()}
globals().update(PRESETS)  # presets.default(), presets.laurent(smoke=True), ...


def list_presets() -> List[str]:
    """Names of the presets (the studies), sorted."""
    return sorted(PRESETS)


def get_preset(name: str, smoke: bool = False) -> SweepSpec:
    """Build preset ``name`` (its smoke variant with ``smoke=True``); unknown names raise ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {list_presets()}")
    return PRESETS[name](smoke=smoke)
