"""Every checkpoint records its run: the resolved config and the MLflow run (wm.run.identity).

With the record a resume can refuse a changed config before anything is touched, and `test` or
`predict` can rebuild the run's env, model and tracking from the checkpoint alone.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

from wm.run.identity import RECORD_KEY


class RunRecord(L.Callback):
    """Writes `{"config": the resolved config, "run_id": the MLflow run}` into each checkpoint."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        checkpoint[RECORD_KEY] = {"config": self.config, "run_id": logger.run_id if logger is not None else None}
