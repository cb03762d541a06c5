"""MLflow logging against environment frames, the x axis of every published learning curve, and
where a run is tracked.

One tracking store per run root by default: `<run.root>/mlflow.db`, shared by single runs and
sweeps, so that `wm.report` finds every run of an experiment in one place. `run.tracking_uri`, or
else the `MLFLOW_TRACKING_URI` environment variable, names another store (a tracking server for a
cluster). Runs made before the shared store keep their own `<run folder>/mlflow.db`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_warn
from mlflow import MlflowClient
from mlflow.entities import Metric

from wm.run.files import fsync_dir, temporary_sibling

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


UNSENT_FILE = "mlflow_unsent.jsonl"  # metric points a store never took, in the run folder
WRITER_THREAD = "mlflow-metrics"


class _QuietWriter(logging.Filter):
    """MLflow logs each failed store access with its traceback; the writer's attempts during an
    outage are said once in one line instead (`MetricWriter`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != WRITER_THREAD


logging.getLogger("mlflow.store.db.utils").addFilter(_QuietWriter())


class MetricWriter:
    """Writes metric points to the store from a thread of its own, in order, and keeps those the
    store does not take (sqlite locked by another process, a server down, a full disk) to try them
    again, every `retry` seconds at most, until it answers: training never waits for the store or
    fails with it. An outage is said once when it starts and once when it ends."""

    def __init__(self, client: MlflowClient, run_id: str, retry: float = 30.0):
        self.client, self.run_id, self.retry = client, run_id, retry
        self.pending: deque[list[Metric]] = deque()
        self.condition = threading.Condition()
        self.failing: str | None = None  # the error of an outage in progress
        self.late = 0  # points written after an outage
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=WRITER_THREAD, daemon=True)
        self.thread.start()

    def put(self, points: list[Metric]) -> None:
        with self.condition:
            self.pending.append(points)
            self.condition.notify()

    def _run(self) -> None:
        delay = 1.0
        while True:
            with self.condition:
                while not self.pending and not self.closed:
                    self.condition.wait()
                if not self.pending:
                    return
                batch = self.pending[0]
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception as error:  # noqa: BLE001 - any store error: keep the points, try again
                if self.failing is None:
                    self.failing = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                    rank_zero_warn(f"the MLflow store did not take metrics ({self.failing}); training goes on, and the "
                                   "metrics are kept and written when it answers")
                with self.condition:
                    if self.closed:
                        return
                    self.condition.wait(delay)
                delay = min(delay * 2, self.retry)
                continue
            with self.condition:
                self.pending.popleft()
            if self.failing is not None:
                self.late += len(batch)
                if not self.pending:
                    rank_zero_warn(f"the MLflow store answers again: {self.late} metric points written late")
                    self.failing, self.late = None, 0
            delay = 1.0

    def close(self, timeout: float) -> list[Metric]:
        """Wait up to `timeout` seconds for the pending points; return those still unsent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.condition:
                if not self.pending:
                    break
                self.condition.notify()
            time.sleep(0.05)
        with self.condition:
            self.closed = True
            self.condition.notify()
            unsent = [point for batch in self.pending for point in batch]
            self.pending.clear()
        self.thread.join(timeout=5)
        return unsent


class EnvStepMLFlowLogger(MLFlowLogger):
    """MLFlowLogger whose step is the run's environment-frame count, which the env-interaction
    callback keeps in `env_steps`; the update count is logged as the metric `train/updates`.

    The run's status stays true: KILLED after an interrupt (`interrupted`), and untouched by a
    command that only reads a run (`keep_status`: validate, test, predict). A resumed fit replays
    the stretch between its checkpoint and the kill; `skip_logged_steps` drops the points of that
    stretch that the run already holds, so no metric gets two points at one step.
    """

    env_steps: int | None = None
    flush_timeout = 60.0  # seconds the end of a run waits for a store that does not answer

    def __init__(self, *args, keep_status: bool = False, run_dir: str | os.PathLike | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_status = keep_status
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.interrupted = False
        self.logged_until: dict[str, int] = {}
        self.writer: MetricWriter | None = None

    def skip_logged_steps(self) -> None:
        """Remember, per metric, the last step the run already holds."""
        client, run_id = self.experiment, self.run_id
        for key in client.get_run(run_id).data.metrics:
            self.logged_until[key] = max(m.step for m in client.get_metric_history(run_id, key))

    def log_metrics(self, metrics, step=None) -> None:
        """The points go to `MetricWriter`, which writes them in the background and keeps them
        through an outage of the store (Lightning's MLFlowLogger writes them itself)."""
        step = step if self.env_steps is None else self.env_steps
        stamp = int(time.time() * 1000)
        points = [Metric(re.sub("[^a-zA-Z0-9_/. -]+", "", k), float(v), stamp, step or 0) for k, v in metrics.items()
                  if step > self.logged_until.get(k, -1) and not isinstance(v, str)]
        if not points:
            return
        if self.writer is None:
            self.writer = MetricWriter(self.experiment, self.run_id)
        self.writer.put(points)

    def guarded(self, what: str, write: Callable[[], object]) -> None:
        """A write to the store besides metrics (an artifact, a tag) that must not end the run if
        the store or the disk fails: said in one line, and skipped."""
        try:
            write()
        except Exception as error:  # noqa: BLE001 - the store's or the disk's error; the run goes on
            rank_zero_warn(f"{what} was not logged to the MLflow store ({type(error).__name__}: "
                           f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}); the run goes on")

    def finalize(self, status: str = "success") -> None:
        """Write what is pending (waiting up to `flush_timeout` for the store), keep what it never
        took in the run folder's `mlflow_unsent.jsonl`, then set the run's status."""
        if self.writer is not None:
            unsent = self.writer.close(self.flush_timeout)
            self.writer = None
            if unsent:
                where = (self.run_dir or Path(".")) / UNSENT_FILE
                with open(where, "a") as f:
                    for point in unsent:
                        f.write(json.dumps({"key": point.key, "value": point.value, "step": point.step,
                                            "timestamp": point.timestamp}) + "\n")
                rank_zero_warn(f"the MLflow store did not answer for {self.flush_timeout:.0f} s at the end of the run: "
                               f"{len(unsent)} metric points are in {where} instead")
        if self.keep_status:
            return
        self.guarded("the run's status and checkpoint", lambda: super(EnvStepMLFlowLogger, self).finalize(
            "KILLED" if self.interrupted else status))


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
    """The database file of a `sqlite:///` tracking URI (`sqlite:////abs/x.db` is absolute,
    `sqlite:///x.db` relative, as SQLAlchemy reads them); None for other stores."""
    prefix = "sqlite:///"
    if urlparse(uri).scheme != "sqlite" or not uri.startswith(prefix) or len(uri) == len(prefix):
        return None
    return Path(unquote(uri[len(prefix):].split("?")[0]))


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside it, in `artifacts/`; a tracking server keeps its own."""
    db = sqlite_file(uri)
    return (db.parent / "artifacts").resolve().as_uri() if db is not None else None


def ui_address(experiment_id: str, run_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """The run's metric charts in `mlflow ui`, on the model-training view: MLflow 3.17 opens a page
    on its GenAI view unless the address asks for `workflowType=machine_learning` (docs/mlflow-run.png)."""
    return f"{host}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?workflowType=machine_learning"
