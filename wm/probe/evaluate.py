"""`python -m wm.probe eval`: what a world model's latent state holds about the true state.

For any world-model or agent checkpoint (`python -m wm.probe train`, or a fit's) and a probe
dataset (`wm.probe.dataset`):

1. Observe: the posterior states of every step of both splits, each split filtered as one stream
   from its first step (episodes reset the state where they start), no augmentation, BatchNorm on
   its running statistics.
2. Probe: ridge regression (`wm.probe.ridge`) fitted on the train split from each feature set
   (`embed`, the encoder's embedding of the one frame: the image pathway alone; `deter` h, which
   integrates the actions; `stoch` z flattened; `both` as the heads read them) to each
   standardised true-state group, scored on the held-out episodes: R² per group, and overall as
   the mean over the distinct groups (below).
3. Roll out: from held-out posterior states that have observed at least `observe` steps of their
   episode, imagine `horizon` steps with the recorded actions and apply the same probes (`both`
   features) to the imagined states: R² against the horizon (0: the posterior itself), and the
   squared error of the predicted reward.

Anchors put the numbers in scale: the true state itself as the features (R² 1), an untrained model
of the same architecture (the floor a random network gives), Gaussian noise features (R² 0), and
the recorded actions (the last K actions of the episode and the time step, K chosen by
cross-validation): the RSSM integrates the actions into h, so what they alone tell comes for free.

Overall is the mean over distinct groups: a group that a linear map of another group gives (on
the train split, R² above 0.999; cheetah's `position` is its `qpos` without x) is shown but not
counted, and of groups that give each other, the first counts.

Results go to a CSV and a figure, and into the checkpoint's MLflow run: `probe/<group>/r2` (and
`_deter`, `_stoch`), `probe/overall/r2`, `probe/rollout/<group>/r2` and `probe/rollout/reward_mse`
with the horizon as the step.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wm.probe.dataset import ProbeDataset
from wm.probe.ridge import RidgeProbe, fit_ridges, r2_score
from wm.model.rssm import State
from wm.agent.world_model import WorldModel

FEATURES = ("embed", "deter", "stoch", "both")  # the encoder's embedding of one frame, h, z, (h, z)


def blind_keys_of(checkpoint: dict) -> list[str]:
    """The images a blind offline world model (`OfflineWorldModel(blind=True)`) was trained without."""
    hparams = checkpoint["hyper_parameters"]
    return [k for k, shape in hparams["observation_shapes"].items() if len(shape) == 3] if hparams.get("blind") else []


def load_world_model(path: str | Path) -> tuple[WorldModel, dict]:
    """The world model of an agent or offline checkpoint, in evaluation mode, and the checkpoint."""
    from wm.agent.agent import Agent, rebuild
    from wm.probe.offline import OfflineWorldModel
    from wm.run.command import read_checkpoint

    checkpoint = read_checkpoint(Path(path))  # a damaged file is refused in one line
    cls = Agent if "actor_critic" in checkpoint["hyper_parameters"] else OfflineWorldModel
    return rebuild(cls, checkpoint).world_model.eval(), checkpoint


@torch.no_grad()
def observe(world_model: WorldModel, steps: Mapping[str, torch.Tensor], chunk: int = 256) -> tuple[State, torch.Tensor]:
    """Posterior states (N, ...) of a split's steps, filtered in order as one stream, and the
    encoder's embedding of every frame (N, E)."""
    state, deters, stochs, embeds = None, [], [], []
    for start in range(0, len(steps["reward"]), chunk):
        window = {k: v[start : start + chunk][None] for k, v in steps.items()}
        embed = world_model.encoder(world_model.encoder.select(window))
        post, _, _ = world_model.rssm.observe(embed, window["action"], window["is_first"], state)
        state = State(post.deter[:, -1], post.stoch[:, -1])
        deters.append(post.deter[0])
        stochs.append(post.stoch[0])
        embeds.append(embed[0].float())
    return State(torch.cat(deters), torch.cat(stochs)), torch.cat(embeds)


def features(state: State, embed: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"embed": embed, "deter": state.deter, "stoch": state.stoch.flatten(1), "both": state.feat}


@dataclass
class ProbeResult:
    """R² of every (feature set, group) on the held-out split, the probes, the rollout curves, and
    the groups the overall mean leaves out (group -> the group it is a linear map of)."""

    r2: dict[tuple[str, str], float]
    probes: dict[tuple[str, str], RidgeProbe]
    not_counted: dict[str, str] = field(default_factory=dict)
    action_lags: int | None = None  # the action anchor's K
    rollout_r2: dict[str, list[float]] = field(default_factory=dict)  # group -> R² at horizon 0..K
    reward_mse: list[float] = field(default_factory=list)  # at horizon 0..K
    reward_variance: float = float("nan")  # of the held-out rewards: the error of predicting their mean

    def overall(self, feature: str = "both") -> float:
        """The mean R² over the distinct groups."""
        return float(np.nanmean([r2 for (f, g), r2 in self.r2.items() if f == feature and g not in self.not_counted]))


def overall_curve(rollout: Mapping[str, Sequence[float]]) -> np.ndarray:
    """The open-loop R² over groups (group -> R² at horizon 0..K): the mean at each horizon all
    groups reach, over the same groups at every horizon. A group without an R² at some horizon
    (constant there, as a contact that never happens late in the rollouts) is left out of the
    whole curve, not from that horizon on, which would make the mean jump."""
    length = min(len(curve) for curve in rollout.values())
    curves = [np.asarray(curve[:length], dtype=float) for curve in rollout.values()]
    scored = [curve for curve in curves if np.isfinite(curve).all()]
    with np.errstate(all="ignore"):
        return np.mean(scored, 0) if scored else np.full(length, np.nan)


DUPLICATE_R2 = 0.999  # a group that a linear map of another explains this well is that group again
NOT_COUNTED_TAG = "wm.probe.not_counted"  # on a probed run, JSON: the groups overall leaves out -> the group each repeats


def linear_fit_r2(x: torch.Tensor, y: torch.Tensor) -> float:
    """R² (pooled, as the probes') of the least-squares linear map with intercept from x to y."""
    x, y = x.double(), y.double()
    design = torch.cat([x - x.mean(0), torch.ones(len(x), 1, dtype=x.dtype)], 1)
    solution = torch.linalg.lstsq(design, y, driver="gelsd").solution
    return float(r2_score(y, design @ solution))


def duplicate_groups(states: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The groups the overall mean does not count, each with the group that a linear map of gives it
    (R² > DUPLICATE_R2): a group another group gives and that does not give it back is left out; of
    groups that give each other, the first (in `states`' order) counts."""
    names = list(states)
    gives = {(a, b): a != b and linear_fit_r2(states[a], states[b]) > DUPLICATE_R2 for a in names for b in names}
    duplicates = {}
    for i, group in enumerate(names):
        for other in names:
            if gives[other, group] and (not gives[group, other] or names.index(other) < i):
                duplicates[group] = other
                break
    return duplicates


def fit_probes(train: Mapping[str, torch.Tensor], held_out: Mapping[str, torch.Tensor], dataset: ProbeDataset,
               names: tuple[str, ...] = FEATURES) -> ProbeResult:
    """Probes from each of the features `train`/`held_out` hold (name -> (N, F)) to each group."""
    train_states, held_states = dataset.states("train"), dataset.states("heldout")
    is_first = dataset.steps("train")["is_first"]
    r2, probes = {}, {}
    for name in names:
        for group, probe in fit_ridges(train[name], train_states, is_first).items():
            probes[name, group] = probe
            r2[name, group] = probe.score(held_out[name], held_states[group])
    return ProbeResult(r2, probes, dataset.not_counted)


def rollout_starts(is_first: torch.Tensor, observe_steps: int, count: int, seed: int) -> torch.Tensor:
    """Up to `count` steps, drawn at random, whose posterior has seen at least `observe_steps`
    steps of its episode and that are not the episode's last."""
    episode = torch.cumsum(is_first.long(), 0)
    starts = torch.nonzero(is_first).flatten()
    since = torch.arange(len(is_first)) - starts[episode - 1]
    last = torch.zeros_like(is_first)
    last[:-1] = is_first[1:]
    last[-1] = True
    candidates = torch.nonzero((since >= observe_steps - 1) & ~last.bool()).flatten()
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    return candidates[order[:count]].sort().values


@torch.no_grad()
def roll_out(world_model: WorldModel, steps: Mapping[str, torch.Tensor], posterior: State, result: ProbeResult,
             dataset: ProbeDataset, observe_steps: int = 5, horizon: int = 15, count: int = 512, seed: int = 0) -> None:
    """Fill `result`'s rollout curves: imagine from held-out posterior states with the recorded
    actions, and score the `both` probes and the reward head on the imagined states."""
    is_first = steps["is_first"]
    starts = rollout_starts(is_first, observe_steps, count, seed)
    states = dataset.states("heldout")
    episode = torch.cumsum(is_first.long(), 0)
    n = len(is_first)
    state = State(posterior.deter[starts], posterior.stoch[starts])
    result.rollout_r2 = {group: [] for group in dataset.groups}
    result.reward_mse, result.reward_variance = [], float(steps["reward"].double().var())
    for k in range(horizon + 1):
        target = (starts + k).clamp(max=n - 1)
        valid = (starts + k < n) & (episode[target] == episode[starts])  # still in the start's episode
        if k:
            state = world_model.rssm.img_step(state, steps["action"][target])
        if not valid.any():
            break
        feat = state.feat[valid]
        for group in dataset.groups:
            probe = result.probes["both", group]
            truth = probe.standardise(states[group][target[valid]])
            result.rollout_r2[group].append(float(r2_score(truth, probe.predict_standardised(feat))))
        reward = world_model.predict_reward(feat).flatten().double()
        result.reward_mse.append(float(((reward - steps["reward"][target[valid]].double()) ** 2).mean()))


def probe_world_model(world_model: WorldModel, dataset: ProbeDataset, observe_steps: int = 5, horizon: int = 15,
                      seed: int = 0, blind_keys: Sequence[str] = ()) -> ProbeResult:
    """Observe both splits, fit and score the probes, and roll out (the whole of `wm.probe eval`).
    `blind_keys`: the images a blind model sees as a constant (`blind_keys_of`)."""
    from wm.probe.offline import blinded

    torch.manual_seed(seed)  # the latents are sampled
    train_steps, held_steps = (blinded(dataset.steps(split), list(blind_keys)) for split in ("train", "heldout"))
    (train_post, train_embed), (held_post, held_embed) = observe(world_model, train_steps), observe(world_model, held_steps)
    result = fit_probes(features(train_post, train_embed), features(held_post, held_embed), dataset)
    roll_out(world_model, held_steps, held_post, result, dataset, observe_steps, horizon, seed=seed)
    return result


def true_state_features(dataset: ProbeDataset, split: str) -> dict[str, torch.Tensor]:
    """The anchor at the top: every true-state group, concatenated, as the features."""
    return {"both": torch.cat(list(dataset.states(split).values()), 1)}


ACTION_LAGS = (1, 2, 4, 8, 16, 32)  # the action anchor's candidate K


def action_history(steps: Mapping[str, torch.Tensor], lags: int) -> torch.Tensor:
    """(N, lags * A + 1): at every step, the recorded actions of the last `lags` steps of its
    episode (newest first, zeros before the episode's start) and the step's index in its episode."""
    action, is_first = steps["action"].double(), steps["is_first"].bool()
    episode = torch.cumsum(is_first.long(), 0)
    index = torch.arange(len(action)) - torch.nonzero(is_first).flatten()[episode - 1]
    columns = []
    for lag in range(lags):
        shifted = torch.zeros_like(action)
        shifted[lag:] = action[: max(len(action) - lag, 0)]
        columns.append(torch.where((index >= lag)[:, None], shifted, torch.zeros_like(shifted)))
    return torch.cat([*columns, index[:, None].double()], 1)


def action_anchor(dataset: ProbeDataset, candidates: tuple[int, ...] = ACTION_LAGS) -> ProbeResult:
    """What the recorded actions alone tell: probes from `action_history`, its K the candidate with
    the best cross-validated R² (mean over the distinct groups) on the train split."""
    train_steps, held_steps = dataset.steps("train"), dataset.steps("heldout")
    counted = [g for g in dataset.groups if g not in dataset.not_counted]

    def cross_validated(lags: int) -> float:
        probes = fit_ridges(action_history(train_steps, lags), dataset.states("train"), train_steps["is_first"])
        return float(np.nanmean([probes[g].cv_r2 for g in counted]))

    lags = max(candidates, key=cross_validated)
    result = fit_probes({"both": action_history(train_steps, lags)}, {"both": action_history(held_steps, lags)},
                        dataset, names=("both",))
    result.action_lags = lags
    return result


def noise_features(dataset: ProbeDataset, split: str, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """The anchor at the bottom: standard normal features that know nothing."""
    n = len(dataset.steps(split)["reward"])
    generator = torch.Generator().manual_seed(seed + (split == "heldout"))
    return {"both": torch.randn(n, dim, generator=generator)}


def rows(result: ProbeResult) -> list[dict]:
    """The result as CSV rows: one per (features, group), the overall R², then the rollout."""
    table = [{"kind": "probe", "features": f, "group": g, "horizon": "", "r2": r2,
              "penalty": result.probes[f, g].penalty, "cv_r2": result.probes[f, g].cv_r2}
             for (f, g), r2 in result.r2.items()]
    features_done = sorted({f for f, _ in result.r2})
    table += [{"kind": "overall", "features": f, "group": "", "horizon": "", "r2": result.overall(f)} for f in features_done]
    for group, curve in result.rollout_r2.items():
        table += [{"kind": "rollout", "features": "both", "group": group, "horizon": k, "r2": r2} for k, r2 in enumerate(curve)]
    table += [{"kind": "reward_mse", "features": "both", "group": "reward", "horizon": k, "r2": "", "mse": mse}
              for k, mse in enumerate(result.reward_mse)]
    return table


def write_csv(path: Path, result: ProbeResult) -> None:
    table = rows(result)
    columns = ["kind", "features", "group", "horizon", "r2", "penalty", "cv_r2", "mse"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in columns} for row in table)


def metrics(result: ProbeResult) -> dict[str, float]:
    """The final numbers, as MLflow metric names."""
    out = {}
    for (feature, group), r2 in result.r2.items():
        out[f"probe/{group}/r2" + ("" if feature == "both" else f"_{feature}")] = r2
    for feature in sorted({f for f, _ in result.r2}):
        out["probe/overall/r2" + ("" if feature == "both" else f"_{feature}")] = result.overall(feature)
    return out
