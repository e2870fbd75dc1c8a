"""Experiment tracking: TensorBoard (the default), MLflow and Weights & Biases, for runs and for every search trial.

Two sides, one state. The run's driver (`train.fit`: the `ray-sft train` process, or a search's trial) opens each
backend: it reaches the tracker (a warning and no such backend when it cannot, so the run never waits on it),
creates or, on --resume, reuses the run, and records its ids in <run>/tracking.json. Rank 0's reports are logged
by `ReportLogger`, a Ray Train callback in the controller, right after run_files.MetricsCallback has written them
to metrics.jsonl and before a trial forwards them to Tune: what Tune acts on (an ASHA stop ends the trial's
processes) has been logged. Ray Train workers never hold a tracker client. The driver adds the artifacts and ends
the run. A backend is built from its ids alone on either side and opens its client where it is first used.

Searches. The `ray-sft tune` driver opens a parent run (kind "search"); each trial's run is a child of it (MLflow:
the mlflow.parentRunId tag, i.e. a nested run; W&B: the search's group). Ray Tune's MLflowLoggerCallback and
WandbLoggerCallback would log only what reaches Tune (the eval reports), by Tune's iteration rather than the
optimizer step, so a trial logs the way a plain run does; at the end the parent adds what only the search knows:
each trial's status (ASHA's stops), the winner, the results.

Credentials come only from the environment variables the spec names, and are never written anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ray_sft.spec import JobSpec, to_dict, to_yaml

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"  # <run>/tracking.json: the run's ids and links (--resume, best.json, the card)
TB_DIR = "tb"
NOT_METRICS = ("step", "max_steps", "timestamp", "time")  # bookkeeping fields of a report
# How MLflow records a nested run (what mlflow.start_run(nested=True) sets).
PARENT_TAG = "mlflow.parentRunId"
STATUS_TAG, BEST_TAG = "ray_sft.status", "ray_sft.best"


@dataclass(frozen=True)
class Parent:
    """What a trial needs to open its runs as children of the search's (it travels to Tune's trial actors)."""

    backends: tuple[str, ...]  # those the search reached: a trial neither retries nor warns about the others
    links: dict


class Tracker:
    """One run's backends on the driver side: `open`, `callback` for Ray Train, `log_artifacts`, `conclude` (a
    search), then close (`with`: FAILED on an exception)."""

    def __init__(self, run_dir: Path, backends: list):
        self.run_dir, self.backends = run_dir, backends

    @classmethod
    def open(cls, spec: JobSpec, run_dir: Path, resume: bool = False, kind: str = "train",
             parent: Parent | None = None) -> Tracker:
        """kind: "train" (a plain run), "trial" (a child of `parent`) or "search" (a search's parent run)."""
        run_dir = Path(run_dir)
        previous = read_links(run_dir) if resume else {}
        names = [b for b in spec.tracking.backends if parent is None or b in parent.backends]
        if kind == "search":  # each trial writes its own event files; the search has no scalars of its own
            names = [b for b in names if b != "tensorboard"]
        backends = []
        for name in names:
            backend = BACKENDS[name]
            try:
                link = backend.open(spec, run_dir, kind, (parent.links if parent else {}).get(name),
                                    previous.get(name))
            except Exception as exc:  # any failure to reach or open a tracker: the run goes on without it
                log.warning("%s: %s; the run goes on without it (its local files are written as usual)",
                            name, _reason(exc))
                continue
            backends.append(backend(spec, run_dir, kind, link))
        tracker = cls(run_dir, backends)
        (run_dir / TRACKING_FILE).write_text(json.dumps(tracker.links(), indent=2))
        return tracker

    def links(self) -> dict:
        return {b.name: b.link for b in self.backends}

    def parent(self) -> Parent:
        # TensorBoard needs nothing from a parent: each trial's event files are in its own folder.
        return Parent((*self.links(), "tensorboard"), self.links())

    def callback(self) -> ReportLogger:
        return ReportLogger(self.backends)

    def log_artifacts(self, paths: list) -> None:
        """Files and folders (the adapter, plots) as the run's artifacts where the backend keeps them."""
        _each(self.backends, "log_artifacts", [Path(p) for p in paths if p and Path(p).exists()])

    def conclude(self, rows: list[dict], best: dict | None, trial_dirs: dict[str, Path]) -> None:
        """A search's end: each trial's status, the winner tagged, the results on the parent. `trial_dirs`: each
        trial's run folder by trial id."""
        _each(self.backends, "conclude", rows, best, trial_dirs)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        _each(self.backends, "close", status)


def _user_callback_base():
    from ray.train import UserCallback

    return UserCallback


class ReportLogger(_user_callback_base()):
    """Runs in the Ray Train controller: rank 0's report, at its optimizer step, to every backend still working."""

    def __init__(self, backends: list):
        self.backends = backends

    def after_report(self, run_context, metrics, checkpoint):
        record = metrics[0]
        numbers = {k: float(v) for k, v in record.items()
                   if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        _each(self.backends, "log", record.get("step", 0), numbers, time.time())
        if "train_runtime" in record:  # HF's summary, reported after the last step: nothing follows
            _each(self.backends, "end")


def _each(backends: list, method: str, *args) -> None:
    for backend in list(backends):
        try:
            getattr(backend, method)(*args)
        except Exception as exc:  # a tracker failing mid-run is dropped; the run and its local files go on
            log.warning("%s: %s failed (%s); the run goes on without it", backend.name, method, _reason(exc))
            backends.remove(backend)


def read_links(run_dir: Path) -> dict:
    """A run folder's tracking.json: its backends' ids and links (empty when it tracked nothing)."""
    path = Path(run_dir) / TRACKING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _reason(exc: Exception) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def public_links(links: dict) -> list[str]:
    """The model card's lines: ids, not addresses (a tracking server's host name is not for a public card)."""
    lines = []
    if "mlflow" in links:
        m = links["mlflow"]
        lines.append(f"- MLflow: run `{m['run_id']}` in experiment `{m['experiment']}`")
    if "wandb" in links:
        w = links["wandb"]
        where = "/".join(p for p in (w["entity"], w["project"]) if p)
        group = f", group `{w['group']}`" if w["group"] else ""
        lines.append(f"- Weights & Biases: run `{w['id']}` in `{where}`{group} ({w['mode']})")
    if "tensorboard" in links:
        lines.append(f"- TensorBoard: event files in the run folder's `{links['tensorboard']['logdir']}/`")
    return lines


def flat_params(data: dict, prefix: str = "") -> dict[str, str]:
    """The spec as dotted path -> text, the shape MLflow's parameters take (a search space stays one value)."""
    params = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "search_space":
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = (json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list))
                                        else str(value))
    return params


def trial_status(row: dict) -> str:
    """A trial's end as the trials table says it: completed, stopped_early (by ASHA) or error."""
    if row["status"] == "ERROR":
        return "error"
    return "stopped_early" if row["stopped_early"] else "completed"


def _reachable(url: str, timeout_s: float, what: str) -> None:
    """Raise unless an HTTP server answers at `url` within timeout_s (any HTTP status counts: it is there)."""
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"cannot reach {what} {url} within {timeout_s:g}s ({reason})") from None


# ---------------------------------------------------------------------------------------------------------------
# Backends. `open` (driver) reaches the tracker and returns the run's link; an instance, built from that link on
# either side, logs (controller), ends its run after the last report (controller), and keeps artifacts, concludes
# a search and closes the run (driver). Live clients are never pickled: each process opens its own.


class _Backend:
    name = ""

    def __init__(self, spec: JobSpec, run_dir: Path, kind: str, link: dict):
        self.spec, self.run_dir, self.kind, self.link = spec, run_dir, kind, link
        self._live = None

    def __getstate__(self):
        return {**self.__dict__, "_live": None}

    def log(self, step: int, metrics: dict, walltime: float) -> None:
        raise NotImplementedError

    def end(self) -> None:
        """After the last report (controller side)."""

    def log_artifacts(self, paths: list[Path]) -> None:
        """Only MLflow keeps files; elsewhere they stay in the run folder."""

    def conclude(self, rows: list[dict], best: dict | None, trial_dirs: dict[str, Path]) -> None:
        """Only for a search's parent."""

    def close(self, status: str) -> None:
        """The driver's end of the run."""


class TensorBoard(_Backend):
    """Event files in <run>/tb/ (TensorBoard's own writer, as torch ships it), the spec as text."""

    name = "tensorboard"

    @staticmethod
    def open(spec, run_dir: Path, kind: str, parent: dict | None, previous: dict | None) -> dict:
        if previous is None:  # a fresh run replaces the event files of an earlier one in the same folder
            shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
        return {"logdir": TB_DIR}

    def _writer(self):
        if self._live is None:
            from torch.utils.tensorboard import SummaryWriter

            self._live = SummaryWriter(str(self.run_dir / TB_DIR))
            # Four-space indentation: TensorBoard renders text as Markdown; this keeps the YAML as it is.
            self._live.add_text("spec", "\n".join("    " + line for line in to_yaml(self.spec).splitlines()))
        return self._live

    def log(self, step: int, metrics: dict, walltime: float) -> None:
        writer = self._writer()
        for key, value in metrics.items():
            writer.add_scalar(key, value, step, walltime=walltime)
        writer.flush()  # a trial ASHA stops ends without a close: what was logged is on disk

    def end(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None


MLFLOW_STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "error": "FAILED"}


class Mlflow(_Backend):
    """A run on the spec's tracking server or store; a trial's run is nested under the search's."""

    name = "mlflow"

    @staticmethod
    def open(spec, run_dir: Path, kind: str, parent: dict | None, previous: dict | None) -> dict:
        settings = spec.tracking.mlflow
        if urlsplit(settings.uri).scheme in ("http", "https"):
            _reachable(f"{settings.uri.rstrip('/')}/health", spec.tracking.timeout_s, "the tracking server")
        client = _mlflow_client(spec)
        if previous:
            client.update_run(previous["run_id"], status="RUNNING")
            return previous
        experiment = parent["experiment"] if parent else settings.experiment or spec.output.name
        experiment_id = parent["experiment_id"] if parent else _experiment_id(client, experiment)
        tags = {"ray_sft.kind": kind, **({PARENT_TAG: parent["run_id"]} if parent else {})}
        run_id = client.create_run(experiment_id, tags=tags, run_name=spec.output.name).info.run_id
        _log_params(client, run_id, flat_params(to_dict(spec)))
        link = {"uri": settings.uri, "experiment": experiment, "experiment_id": experiment_id, "run_id": run_id}
        if urlsplit(settings.uri).scheme in ("http", "https"):
            link["url"] = f"{settings.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return link

    @property
    def client(self):
        if self._live is None:
            self._live = _mlflow_client(self.spec)
        return self._live

    def log(self, step: int, metrics: dict, walltime: float) -> None:
        from mlflow.entities import Metric

        stamp = int(walltime * 1000)
        self.client.log_batch(self.link["run_id"], metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])

    def log_artifacts(self, paths: list[Path]) -> None:
        if not self.spec.tracking.mlflow.log_artifacts:
            return
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.link["run_id"], str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.link["run_id"], str(path))

    def conclude(self, rows: list[dict], best: dict | None, trial_dirs: dict[str, Path]) -> None:
        """Each trial's status (a trial ASHA stops ends without closing its run: KILLED here), the winner's tag."""
        children = {trial_id: read_links(folder) for trial_id, folder in trial_dirs.items()}
        for row in rows:
            child = children[row["trial_id"]].get(self.name)
            if child:
                status = trial_status(row)
                self.client.set_tag(child["run_id"], STATUS_TAG, status)
                if self.client.get_run(child["run_id"]).info.status != MLFLOW_STATUS[status]:
                    self.client.set_terminated(child["run_id"], MLFLOW_STATUS[status])
        if not best:
            return
        winner = children[best["trial_id"]].get(self.name)
        if winner:
            self.client.set_tag(winner["run_id"], BEST_TAG, "true")
            self.client.set_tag(self.link["run_id"], "ray_sft.best_run_id", winner["run_id"])
        self.client.set_tag(self.link["run_id"], "ray_sft.best_trial", best["trial_id"])
        self.log(best["step"] or 0, {f"best_{best['metric']}": float(best["value"])}, time.time())

    def close(self, status: str) -> None:
        self.client.set_terminated(self.link["run_id"], status)


def _mlflow_client(spec: JobSpec):
    settings, timeout = spec.tracking.mlflow, spec.tracking.timeout_s
    # MLflow reads credentials from its own variables: copied from those the spec names, in this process only.
    for named, own in ((settings.username_env, "MLFLOW_TRACKING_USERNAME"),
                       (settings.password_env, "MLFLOW_TRACKING_PASSWORD"),
                       (settings.token_env, "MLFLOW_TRACKING_TOKEN")):
        if named != own and os.environ.get(named):
            os.environ[own] = os.environ[named]
    # MLflow retries a failed call 7 times with exponential backoff (minutes): a server that dies mid-run would stall
    # the run. The user's own settings of these variables win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout))))
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.uri)


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another run
        return client.get_experiment_by_name(name).experiment_id


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    items = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + MAX_PARAMS_TAGS_PER_BATCH])


class Wandb(_Backend):
    """A W&B run in <run>/wandb/ (offline: uploaded later with `wandb sync`); a trial's run is in the search's group.
    A search's own run (the trials table, the winner) is written when the search ends: a finished W&B run cannot be
    changed offline, so the trials' runs are not tagged afterwards."""

    name = "wandb"

    @staticmethod
    def open(spec, run_dir: Path, kind: str, parent: dict | None, previous: dict | None) -> dict:
        settings = spec.tracking.wandb
        if previous:
            return previous
        if settings.mode == "online":
            if not os.environ.get(settings.api_key_env):
                raise PermissionError(f"no API key in ${settings.api_key_env} (tracking.wandb.api_key_env)")
            import wandb

            _reachable(settings.base_url or wandb.Settings().base_url, spec.tracking.timeout_s, "the W&B server")
        run_id = uuid.uuid4().hex[:8]
        group = parent["group"] if parent else f"{spec.output.name}-{run_id}" if kind == "search" else None
        return {"project": settings.project, "entity": settings.entity, "id": run_id, "group": group,
                "mode": settings.mode}

    def _run(self):
        if self._live is None:
            import wandb

            settings = self.spec.tracking.wandb
            key = os.environ.get(settings.api_key_env) if settings.mode == "online" else None
            self._live = wandb.init(
                project=settings.project, entity=settings.entity, dir=str(self.run_dir), id=self.link["id"],
                name=self.spec.output.name, group=self.link["group"], job_type=self.kind,
                config=to_dict(self.spec), mode=settings.mode, resume="allow", reinit="create_new",
                # git off: a remote's URL may carry a token; console off: the process's output has its own logs.
                settings=wandb.Settings(api_key=key or None, init_timeout=self.spec.tracking.timeout_s,
                                        finish_timeout=self.spec.tracking.timeout_s, disable_git=True,
                                        save_code=False, console="off", silent=True,
                                        **({"base_url": settings.base_url} if settings.base_url else {})))
        return self._live

    def log(self, step: int, metrics: dict, walltime: float) -> None:
        self._run().log(metrics, step=step)

    def end(self) -> None:
        if self._live is not None:
            self._live.finish()
            self._live = None

    def conclude(self, rows: list[dict], best: dict | None, trial_dirs: dict[str, Path]) -> None:
        import wandb

        for row in rows:
            if trial_status(row) != "completed":
                self._rewrite(trial_dirs[row["trial_id"]], trial_status(row))
        run = self._run()
        columns = [k for k in (rows[0] if rows else {}) if k != "checkpoint"]
        run.log({"trials": wandb.Table(columns=[*columns, "end"], data=[
            [_cell(r[c]) for c in columns] + [trial_status(r)] for r in rows])})
        if best:
            run.summary.update({"best_trial": best["trial_id"], f"best_{best['metric']}": best["value"],
                                "best_params": best["params"]})

    def close(self, status: str) -> None:
        if self._live is not None:
            self._live.finish(exit_code=0 if status == "FINISHED" else 1)
            self._live = None

    @staticmethod
    def _rewrite(trial_dir: Path, status: str) -> None:
        """A trial that ASHA stopped (or that failed) died with its W&B run unfinished, and W&B had not yet written
        what it buffered: the run is written again from the trial's metrics.jsonl, which holds every report up to
        the end (online, W&B keeps the steps it already has)."""
        from ray_sft import run_files
        from ray_sft.spec import load

        link = read_links(trial_dir).get(Wandb.name)
        if not link:
            return
        if link["mode"] == "offline":
            for partial in trial_dir.glob(f"wandb/offline-run-*-{link['id']}"):
                shutil.rmtree(partial)
        trial = Wandb(load(trial_dir / "spec.yaml"), trial_dir, "trial", link)
        try:
            trial._run().tags = (status,)
            for record in run_files.read_metrics(trial_dir):
                ReportLogger([trial]).after_report(None, [record], None)
        finally:
            trial.close("FINISHED")


def _cell(value):
    return value if value is None or isinstance(value, (int, float, str, bool)) else str(value)


BACKENDS = {"tensorboard": TensorBoard, "mlflow": Mlflow, "wandb": Wandb}
