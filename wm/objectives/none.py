"""No representation loss: the collapsing "Dreamer without reconstruction" ablation."""

from __future__ import annotations

from wm.objectives.base import Objective


class NoObjective(Objective):
    """Adds nothing: the representation learns only from reward, continue and KL terms."""
