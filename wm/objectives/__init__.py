"""Representation objectives: the one component that differs between the three agents.

Pick one in a config by class path, e.g. `objective: {class_path: wm.objectives.Barlow}`.
A new objective is one new file with a subclass of `Objective`. Imports wm.model only: the agent
builds on the objectives, never the other way round.
"""

from wm.objectives.barlow import Barlow
from wm.objectives.base import ModelDims, Objective, ObjectiveInputs, ObservedViews
from wm.objectives.dreamerpro import DreamerPro
from wm.objectives.infonce import InfoNCE
from wm.objectives.mudreamer import MuDreamer
from wm.objectives.none import NoObjective
from wm.objectives.reconstruction import Reconstruction

OBJECTIVES = {"barlow": Barlow, "reconstruction": Reconstruction, "mudreamer": MuDreamer, "none": NoObjective,
              "infonce": InfoNCE, "dreamerpro": DreamerPro}
DEFAULT_OBJECTIVE = "barlow"  # R2-Dreamer's; used when a config or an Agent names none


def objective_name(class_path: str | None, variant: str | None = None) -> str:
    """The short name of an objective's class path ("wm.objectives.Barlow" -> "barlow"); a class of
    another package gets its lower-cased class name, and none the default. An ablation's `variant`
    (run.variant, e.g. "barlow_augment") stands for it: runs and report cells go by that name."""
    if variant:
        return variant
    if not class_path:
        return DEFAULT_OBJECTIVE
    class_name = class_path.rsplit(".", 1)[-1]
    return {cls.__name__: name for name, cls in OBJECTIVES.items()}.get(class_name, class_name.lower())


def make_objective(name: str, **kwargs) -> Objective:
    """Objective by its short name (barlow, reconstruction, mudreamer, none, infonce, dreamerpro)."""
    try:
        return OBJECTIVES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}") from None


__all__ = ["Barlow", "DEFAULT_OBJECTIVE", "DreamerPro", "InfoNCE", "ModelDims", "MuDreamer", "NoObjective", "OBJECTIVES",
           "Objective", "ObjectiveInputs", "ObservedViews", "Reconstruction", "make_objective", "objective_name"]
