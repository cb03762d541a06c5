"""Linear probes: ridge regression in closed form, its penalty chosen by cross-validation.

Features and targets are standardised with the train split's statistics (a dimension that does not
vary there is left unscaled), so one grid of penalties fits any feature set and state group, and
R² is comparable across groups. The penalty is the one with the best R² over K folds of the train
split, folds made of whole episodes (consecutive steps of one episode are far from independent).
Each fold's Gram matrix is eigendecomposed once, so every penalty costs a matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PENALTIES = tuple(10.0**k for k in range(-4, 4))  # per sample: lambda = penalty x n (features are standardised)


def standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) of the columns of x; scale 1 where a column is constant."""
    mean, std = x.mean(0), x.std(0)
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def r2_score(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """R² pooled over the columns: 1 - sum of squared errors / sum of squares around the column
    means; NaN when no column varies beyond rounding (a mean square under 1e-8 of the standardised
    targets: a contact group that is 0 at every step of a subset would otherwise divide by 1e-33)."""
    total = ((target - target.mean(0)) ** 2).sum()
    error = ((target - prediction) ** 2).sum()
    varies = total > 1e-8 * target.numel()
    return 1.0 - error / total if varies else torch.tensor(float("nan"), dtype=target.dtype)


def _solve(gram_values: torch.Tensor, gram_vectors: torch.Tensor, xty: torch.Tensor, lam: float) -> torch.Tensor:
    """W = (X'X + lam I)^-1 X'Y from the eigendecomposition of X'X."""
    return gram_vectors @ ((gram_vectors.T @ xty) / (gram_values + lam)[:, None])


@dataclass
class RidgeProbe:
    """A fitted probe: standardisation of features and targets, weights, and the penalty chosen."""

    x_mean: torch.Tensor
    x_scale: torch.Tensor
    y_mean: torch.Tensor
    y_scale: torch.Tensor
    weights: torch.Tensor  # (features + 1, targets), the last row the intercept
    penalty: float
    cv_r2: float

    def predict_standardised(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions in the targets' standardised units (the train split's)."""
        z = (x.double() - self.x_mean) / self.x_scale
        return z @ self.weights[:-1] + self.weights[-1]

    def standardise(self, y: torch.Tensor) -> torch.Tensor:
        return (y.double() - self.y_mean) / self.y_scale

    def score(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """R² of the probe on (x, y), in standardised units."""
        return float(r2_score(self.standardise(y), self.predict_standardised(x)))


def episode_folds(is_first: torch.Tensor, folds: int) -> torch.Tensor:
    """Fold of every step: episodes dealt to the folds in turn (episode i to fold i mod folds)."""
    episode = torch.cumsum(is_first.long(), 0) - 1
    return episode.clamp(min=0) % folds


def fit_ridge(x: torch.Tensor, y: torch.Tensor, is_first: torch.Tensor, folds: int = 5,
              penalties: tuple[float, ...] = PENALTIES) -> RidgeProbe:
    """The ridge probe from features x (N, F) to targets y (N, D) of a train split whose episodes
    start where `is_first` (N,) is set, with the penalty of the best cross-validated R²."""
    return fit_ridges(x, {"y": y}, is_first, folds, penalties)["y"]


def fit_ridges(x: torch.Tensor, targets: dict[str, torch.Tensor], is_first: torch.Tensor, folds: int = 5,
               penalties: tuple[float, ...] = PENALTIES) -> dict[str, RidgeProbe]:
    """`fit_ridge` for several targets from the same features, each with its own penalty; the
    features' eigendecompositions (the cost) are computed once for all of them."""
    x = x.double()
    x_mean, x_scale = standardiser(x)
    z = torch.cat([(x - x_mean) / x_scale, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # a column for the intercept
    scaled = {}
    for name, y in targets.items():
        y = y.double()
        y_mean, y_scale = standardiser(y)
        scaled[name] = (y_mean, y_scale, (y - y_mean) / y_scale)
    fold = episode_folds(is_first, folds)
    present = [k for k in range(folds) if (fold == k).any() and (fold != k).any()]
    scores = {name: torch.zeros(len(penalties), dtype=torch.float64) for name in targets}
    for k in present:
        train, held = fold != k, fold == k
        values, vectors = torch.linalg.eigh(z[train].T @ z[train])
        for name, (_, _, t) in scaled.items():
            xty = z[train].T @ t[train]
            for i, penalty in enumerate(penalties):
                scores[name][i] += r2_score(t[held], z[held] @ _solve(values, vectors, xty, penalty * int(train.sum())))
    values, vectors = torch.linalg.eigh(z.T @ z)
    probes = {}
    for name, (y_mean, y_scale, t) in scaled.items():
        best = int(torch.argmax(scores[name])) if present else 0
        weights = _solve(values, vectors, z.T @ t, penalties[best] * len(z))
        probes[name] = RidgeProbe(x_mean, x_scale, y_mean, y_scale, weights, penalties[best],
                                  float(scores[name][best] / max(len(present), 1)))
    return probes
