"""Model size presets of docs/algorithm.md §1 (stoch = 32 categorical latents, GRU split into 8 blocks),
and the parameter counts a model reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelSize:
    deter: int
    hidden: int
    classes: int
    depth: int
    units: int
    stoch: int = 32
    blocks: int = 8

    @property
    def feat_dim(self) -> int:
        """Width of feat = concat(deter, flattened stoch) that every head reads."""
        return self.deter + self.stoch * self.classes


SIZES: dict[str, ModelSize] = {
    "size1M": ModelSize(deter=512, hidden=64, classes=4, depth=4, units=64),
    "size12M": ModelSize(deter=2048, hidden=256, classes=16, depth=16, units=256),
    "size25M": ModelSize(deter=3072, hidden=384, classes=24, depth=24, units=384),
    "size50M": ModelSize(deter=4096, hidden=512, classes=32, depth=32, units=512),
    "size100M": ModelSize(deter=6144, hidden=768, classes=48, depth=48, units=768),
    "size200M": ModelSize(deter=8192, hidden=1024, classes=64, depth=64, units=1024),
}


def model_size(name: str) -> ModelSize:
    """The preset called `name`, or a ValueError listing the valid ones."""
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(SIZES)}") from None


def trainable_counts(modules: Mapping[str, nn.Module | nn.Parameter]) -> dict[str, int]:
    """Trainable parameters of each named module or parameter; those with none are left out."""
    counts = {name: sum(p.numel() for p in ([m] if isinstance(m, nn.Parameter) else m.parameters()) if p.requires_grad)
              for name, m in modules.items()}
    return {name: n for name, n in counts.items() if n}


def parameter_table(counts: Mapping[str, int]) -> str:
    """One line per module (millions of parameters) and the total."""
    rows = [f"{name:<12}{n / 1e6:>9.3f}M" for name, n in counts.items()]
    rows.append(f"{'total':<12}{sum(counts.values()) / 1e6:>9.3f}M")
    return "\n".join(rows)
