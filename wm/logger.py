"""MLflow logging against environment frames, the x axis of every published learning curve."""

from __future__ import annotations

from lightning.pytorch.loggers import MLFlowLogger


class EnvStepMLFlowLogger(MLFlowLogger):
    """MLFlowLogger whose step is the run's environment-frame count, which the env-interaction
    callback keeps in `env_steps`; the update count is logged as the metric `train/updates`."""

    env_steps: int | None = None

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(metrics, step=step if self.env_steps is None else self.env_steps)
