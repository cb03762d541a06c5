"""MLflow logging against environment frames, the x axis of every published learning curve, and
where a run is tracked.

One tracking store per run root by default: `<run.root>/mlflow.db`, shared by single runs and
sweeps, so that `wm.report` finds every run of an experiment in one place. `run.tracking_uri`, or
else the `MLFLOW_TRACKING_URI` environment variable, names another store (a tracking server for a
cluster). Runs made before the shared store keep their own `<run folder>/mlflow.db`.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient

from wm.files import fsync_dir, temporary_sibling

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


class EnvStepMLFlowLogger(MLFlowLogger):
    """MLFlowLogger whose step is the run's environment-frame count, which the env-interaction
    callback keeps in `env_steps`; the update count is logged as the metric `train/updates`.

    The run's status stays true: KILLED after an interrupt (`interrupted`), and untouched by a
    command that only reads a run (`keep_status`: validate, test, predict). A resumed fit replays
    the stretch between its checkpoint and the kill; `skip_logged_steps` drops the points of that
    stretch that the run already holds, so no metric gets two points at one step.
    """

    env_steps: int | None = None

    def __init__(self, *args, keep_status: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_status = keep_status
        self.interrupted = False
        self.logged_until: dict[str, int] = {}

    def skip_logged_steps(self) -> None:
        """Remember, per metric, the last step the run already holds."""
        client, run_id = self.experiment, self.run_id
        for key in client.get_run(run_id).data.metrics:
            self.logged_until[key] = max(m.step for m in client.get_metric_history(run_id, key))

    def log_metrics(self, metrics, step=None) -> None:
        step = step if self.env_steps is None else self.env_steps
        fresh = {k: v for k, v in metrics.items() if step > self.logged_until.get(k, -1)}
        if fresh:
            super().log_metrics(fresh, step=step)

    def finalize(self, status: str = "success") -> None:
        if self.keep_status:
            return
        super().finalize("KILLED" if self.interrupted else status)


def create_store(db: Path) -> None:
    """Create a sqlite MLflow store whole or not at all: its tables are made in a temporary file
    that is fsynced and renamed into place, so that a kill while they are made leaves no half-made
    store, and runs that start together on a new store (a sweep) do not race to create its tables
    (the loser fails with "table ... already exists")."""
    if db.exists():
        return
    temporary = temporary_sibling(db)
    MlflowClient(f"sqlite:///{temporary}").search_experiments()  # creates the schema
    with open(temporary, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(temporary, db)
    fsync_dir(db.parent)


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment `name` in store `uri`, made if it is missing (its artifacts beside a
    sqlite store) and marked as model training: MLflow 3's UI opens an experiment on its GenAI
    overview unless so marked. Runs that start together (a parallel sweep) may all find it missing;
    those whose create loses read the winner's, which was made with its tag (no second write)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri),
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except Exception:  # noqa: BLE001 - another run created it first (a unique-name error)
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:  # made by an older wm or by hand
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return found.experiment_id


def tracking_uri(configured: str, root: Path, run_dir: Path) -> str:
    """The store a run logs to: `run.tracking_uri`, else $MLFLOW_TRACKING_URI, else the run
    folder's own `mlflow.db` where an older run has one, else `<root>/mlflow.db`."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    own = run_dir / "mlflow.db"
    return sqlite_uri(own if own.exists() else root / "mlflow.db")


def sqlite_uri(db: Path) -> str:
    return f"sqlite:///{Path(db).resolve()}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI; None for other stores."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "sqlite" else None


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside it, in `artifacts/`; a tracking server keeps its own."""
    db = sqlite_file(uri)
    return (db.parent / "artifacts").resolve().as_uri() if db is not None else None


def ui_address(experiment_id: str, run_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """The run's metric charts in `mlflow ui`, on the model-training view: MLflow 3.17 opens a page
    on its GenAI view unless the address asks for `workflowType=machine_learning` (docs/mlflow-run.png)."""
    return f"{host}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?workflowType=machine_learning"
