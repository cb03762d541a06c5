"""R2-Dreamer: Barlow Twins redundancy reduction between the latent state and the embedding."""

from __future__ import annotations

import torch

from wm.objectives.base import ObjectiveInputs, ProjectedLatent


def standardize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean and unit (unbiased) standard deviation per column."""
    return (x - x.mean(0)) / (x.std(0) + eps)


def barlow_twins_loss(a: torch.Tensor, b: torch.Tensor, off_diagonal: float) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + off_diagonal * sum_{i != j} C_ij^2 with C = std(a)^T std(b) / N.

    `a` and `b` are (N, D) samples of two views of the same thing. Computed in float32 even under
    autocast: the diagonal terms are 1 - C_ii, where bfloat16 keeps only 3 significant digits.
    """
    with torch.autocast(a.device.type, enabled=False):
        a, b = standardize(a.float()), standardize(b.float())
        c = a.T @ b / a.shape[0]
    diagonal = torch.diagonal(c)
    on = (1.0 - diagonal).square().sum()
    off = c.square().sum() - diagonal.square().sum()
    return on + off_diagonal * off


class Barlow(ProjectedLatent):
    """k_t = W feat_t (bias-free projector to the embedding size), loss BT(k_t, sg(e_t)).

    The embedding is a detached target: the encoder learns only through the posterior.
    No decoder and, by default, no augmentation.
    """

    def __init__(self, scale: float = 0.05, off_diagonal: float = 5e-4, augment: bool = False, probe_decoder: bool = False):
        super().__init__(augment=augment, probe_decoder=probe_decoder)
        self.scale, self.off_diagonal = scale, off_diagonal
        self.scales = {"barlow": scale}

    def forward(self, inputs: ObjectiveInputs) -> dict[str, torch.Tensor]:
        projected, target = self.projected_and_target(inputs)
        return {"barlow": barlow_twins_loss(projected, target, self.off_diagonal)}
