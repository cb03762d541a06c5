"""A probe's result as a figure a person can read: held-out R² per state group for each feature
set, and R² against the imagination horizon with the reward's squared error."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wm.inspection import new_figure
from wm.probe.evaluate import ProbeResult

R2_FLOOR = -0.5  # lower end of the R² axes: a probe worse than predicting the mean is shown at the floor


def plot_probe(result: ProbeResult, path: Path, title: str) -> None:
    groups = sorted({g for _, g in result.r2})
    names = [f for f in ("embed", "deter", "stoch", "both") if any((f, g) in result.r2 for g in groups)]
    fig = new_figure(12 if result.rollout_r2 else 6.5, 4)
    axes = fig.subplots(1, 2 if result.rollout_r2 else 1, squeeze=False)
    bars = axes[0, 0]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [max(result.r2.get((name, g), np.nan), R2_FLOOR) for g in groups]
        bars.bar(np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    labels = [f"{g}\n(= {result.not_counted[g]})" if g in result.not_counted else g for g in groups]
    bars.set_xticks(np.arange(len(groups)), labels, rotation=30, ha="right")
    bars.set(ylim=(R2_FLOOR, 1.05), ylabel="held-out R²", title="linear probe of the posterior state")
    bars.axhline(0, color="grey", lw=0.8)
    bars.legend(title="features", fontsize=8)
    if result.rollout_r2:
        curves = axes[0, 1]
        for group in groups:
            curve = result.rollout_r2.get(group, [])
            curves.plot(range(len(curve)), np.maximum(curve, R2_FLOOR), marker=".", label=group)
        curves.set(ylim=(R2_FLOOR, 1.05), xlabel="imagined steps (0: the posterior)", ylabel="R² of the probe",
                   title="open loop: probe of imagined states")
        curves.axhline(0, color="grey", lw=0.8)
        curves.legend(fontsize=8, ncol=2)
        if result.reward_mse:
            reward = curves.twinx()
            reward.plot(range(len(result.reward_mse)), result.reward_mse, color="black", ls="--", label="reward MSE")
            reward.axhline(result.reward_variance, color="black", ls=":", lw=0.8, label="reward variance")
            reward.set(ylabel="reward squared error", ylim=(0, None))
            reward.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
