"""DreamerV3: learn the representation by reconstructing the observation (the baseline)."""

from __future__ import annotations

import torch

from wm.model.decoder import MultiDecoder
from wm.objectives.base import ModelDims, Objective, ObjectiveInputs


class Reconstruction(Objective):
    """Image decoder on the posterior state; squared error summed over pixels, scale `scale`.
    Its decoder is also the one inspection uses (it needs no probe)."""

    def __init__(self, scale: float = 1.0, augment: bool = False):
        super().__init__(augment=augment)
        self.scale = scale

    def build(self, dims: ModelDims) -> None:
        s = dims.size
        self.decoder = MultiDecoder(dims.observation_shapes, s.deter, s.stoch * s.classes, s.depth, s.units)
        self.scales = {f"recon_{k}": self.scale for k in dims.observation_shapes}

    def forward(self, inputs: ObjectiveInputs) -> dict[str, torch.Tensor]:
        post = inputs.posterior
        losses = self.decoder.losses(post.deter, post.stoch.flatten(-2), inputs.obs)
        return {f"recon_{k}": v for k, v in losses.items()}

    def image_decoder(self) -> MultiDecoder:
        return self.decoder
