"""The studies: one file per study, each holding its sweep, its declared claims, its report section and the
questions of the evidence page it answers (:class:`recnorm.experiments.study.Study`).

A new study is one file here plus one registry line below (``_add(module.STUDY)``, with the module
added to the import). ``recnorm studies`` lists them; ``recnorm compare --preset
NAME`` runs one; ``recnorm evidence`` builds docs/evidence.md from their claims and questions, in the order
registered here.
"""

from __future__ import annotations

from typing import List

from recnorm.experiments.studies import (
    cooijmans, default, drawbacks, eval_statistics, horizontal, init_rebuilt, language, laurent, memory, padding,
    regularization, shared_bn, speed, vertical)
from recnorm.experiments.study import Study
from recnorm.registry import Registry

__all__ = ["STUDIES", "ORDER", "get_study", "list_studies"]

STUDIES: Registry[Study] = Registry("study")
ORDER: List[str] = []  # registration order: the evidence page's order


def _add(study: Study) -> None:
    STUDIES.register(study)
    ORDER.append(study.name)


# One line per study (the page shows them in this order); paper-scale variants live in their base study's file.
_add(default.STUDY)
_add(cooijmans.STUDY)
_add(laurent.STUDY)
_add(horizontal.STUDY)
_add(drawbacks.STUDY)
_add(regularization.STUDY)
_add(padding.STUDY)
_add(memory.STUDY)
_add(language.STUDY)
_add(eval_statistics.STUDY)
_add(init_rebuilt.STUDY)
_add(shared_bn.STUDY)
_add(speed.STUDY)
_add(vertical.STUDY)
_add(cooijmans.PAPER)
_add(laurent.PAPER)
_add(language.PAPER)


def get_study(name: str) -> Study:
    """The registered study ``name`` (an unknown name raises ValueError listing the valid ones)."""
    return STUDIES.get(name)


def list_studies() -> List[str]:
    """Names of the registered studies, in registration order."""
    return list(ORDER)
