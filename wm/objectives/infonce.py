"""InfoNCE: the latent state must pick out its own step's image embedding among the batch's.

A contrastive alternative to R2-Dreamer's Barlow Twins (the official R2-Dreamer code's `infonce`
representation loss): the projector maps each latent feature s_t to the embedding size, and the
logits are the dot products of the B x T projections with the B x T detached embeddings; the loss
is the cross-entropy with each step's own embedding as the label (the diagonal).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from wm.objectives.base import ObjectiveInputs, ProjectedLatent


def info_nce_loss(queries: torch.Tensor, keys: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """Cross-entropy of logits `queries @ keys^T` (N, N), each row shifted by its maximum, with
    row i's label i; with `temperature`, the vectors are L2-normalised first and the logits divided
    by it. Computed in float32 (a softmax over N logits)."""
    with torch.autocast(queries.device.type, enabled=False):
        queries, keys = queries.float(), keys.float()
        if temperature is not None:
            queries, keys = F.normalize(queries, dim=-1), F.normalize(keys, dim=-1)
        logits = queries @ keys.T
        if temperature is not None:
            logits = logits / temperature
        logits = logits - logits.max(-1, keepdim=True).values.detach()
        return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


class InfoNCE(ProjectedLatent):
    """k_t = W s_t (a bias-free projector to the embedding size, as Barlow's); InfoNCE between the
    B x T projections and the detached embeddings sg(e_t), scale 1, no augmentation.

    Temperature: the official code has none; its logits are raw dot products (`normalize=False`,
    the default). `normalize=True` L2-normalises both sides and divides by `temperature`, the
    usual SimCLR/CLIP form, whose logits cannot grow without bound (docs/algorithm.md §2).
    """

    def __init__(self, scale: float = 1.0, normalize: bool = False, temperature: float = 0.1, augment: bool = False,
                 probe_decoder: bool = False):
        super().__init__(augment=augment, probe_decoder=probe_decoder)
        self.scale, self.normalize, self.temperature = scale, normalize, temperature
        self.scales = {"infonce": scale}

    def forward(self, inputs: ObjectiveInputs) -> dict[str, torch.Tensor]:
        projected, target = self.projected_and_target(inputs)
        return {"infonce": info_nce_loss(projected, target, self.temperature if self.normalize else None)}
