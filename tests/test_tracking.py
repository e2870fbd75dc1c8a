"""Experiment tracking against the trackers' own readers: TensorBoard's EventAccumulator, a real `mlflow server` read
back through MlflowClient, and a W&B offline run's transaction log read with W&B's own protobuf records."""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import struct
import time
from pathlib import Path

import pandas as pd
import pytest

from ray_sft import run_files, spec, tracking
from ray_sft.spec import SpecError
from tests.conftest import ABSURD_LR, PLANTED_SECRETS, QUICKSTART, free_port


# ---------------------------------------------------------------------------------------------------------------
# The spec section


def test_tensorboard_is_the_default_and_mlflow_needs_a_uri_without_credentials():
    assert spec.load(QUICKSTART).tracking.backends == ["tensorboard"]
    with pytest.raises(SpecError) as caught:
        spec.load(QUICKSTART, ["tracking.backends=[mlflow, wandb, comet]", "tracking.wandb.mode=offline"])
    assert any("tracking.backends[2]: 'comet' is not one of" in e for e in caught.value.errors)
    with pytest.raises(SpecError) as caught:
        spec.load(QUICKSTART, ["tracking.backends=[mlflow]"])
    assert caught.value.errors == ["tracking.mlflow.uri: needed with the mlflow backend (http://HOST:PORT, "
                                   "or a store URI)"]
    with pytest.raises(SpecError, match="tracking.mlflow.uri: holds credentials"):
        spec.load(QUICKSTART, ["tracking.backends=[mlflow]", "tracking.mlflow.uri=https://me:pw@mlflow.example"])
    with pytest.raises(SpecError, match="tracking.backends.mlflow: not a searchable spec field"):
        spec.load(QUICKSTART, ["tune.search_space={tracking.backends.mlflow: {choice: [1]}}"])


def assert_series(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """(step, value) pairs: the same steps, the same values (a tracker may store them as float32)."""
    logged = sorted(logged)
    assert [s for s, _ in logged] == [s for s, _ in expected] and expected
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_the_model_card_names_the_tracking_runs_by_id_and_never_a_server_address():
    job = spec.load(QUICKSTART, ["tracking.backends=[mlflow, wandb]", "tracking.mlflow.uri=http://mlflow.internal:5000"])
    links = {"mlflow": {"uri": "http://mlflow.internal:5000", "experiment": "quickstart", "experiment_id": "3",
                        "run_id": "r123", "url": "http://mlflow.internal:5000/#/experiments/3/runs/r123"},
             "wandb": {"project": "ray_sft", "entity": "team", "id": "w9", "group": None, "mode": "online"}}
    card = run_files.model_card(job, "llm-jp/llm-jp-3-1.8b", {"loss": 1.5}, links)
    assert "- MLflow: run `r123` in experiment `quickstart`" in card
    assert "- Weights & Biases: run `w9` in `team/ray_sft` (online)" in card
    assert "mlflow.internal" not in card and "\ntracking:" not in card


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard (the shared runs track with the default)


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_the_quickstart_run_leaves_tensorboard_events_with_every_logged_metric(trained_run):
    logged = scalars(trained_run.run_dir / tracking.TB_DIR)
    assert [s for s, _ in logged["loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in logged["eval_loss"]] == [2, 4]
    assert [s for s, _ in logged["learning_rate"]] == [s for s, _ in logged["tokens_per_s"]] == [1, 2, 3, 4]
    records = run_files.read_metrics(trained_run.run_dir)
    assert_series(logged["eval_loss"], [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r])
    assert "step" not in logged and "max_steps" not in logged
    links = json.loads((trained_run.run_dir / tracking.TRACKING_FILE).read_text())
    assert links == {"tensorboard": {"logdir": "tb"}}
    assert "TensorBoard: event files in the run folder's `tb/`" in (trained_run.adapter_dir / "README.md").read_text()


@pytest.mark.slow
def test_every_trial_of_the_search_has_its_own_tensorboard_events(searched_run):
    code, out, run = searched_run.code, searched_run.out, searched_run.run_dir
    assert code == 0, out
    for trial in (run / "trials").iterdir():
        evals = [(r["step"], r["eval_loss"]) for r in run_files.read_metrics(trial) if "eval_loss" in r]
        assert_series(scalars(trial / tracking.TB_DIR)["eval_loss"], evals)
    assert not (run / tracking.TB_DIR).exists()  # the search itself has no scalars


# ---------------------------------------------------------------------------------------------------------------
# W&B offline runs, read back


def wandb_run(run_file: Path, timeout_s: float = 30) -> tuple[dict, dict, list[dict]]:
    """(run metadata, config, history rows) from a W&B transaction log (.wandb), once W&B has written it whole.

    W&B's writer process can still be appending when the run's finish() has returned (seen on a fast CPU: the last
    record half written), so the log is read again until it ends with W&B's closing `exit` record."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(DecodeError):
            meta, config, rows, ended = _read_wandb_log(run_file)
            if ended:
                return meta, config, rows
        assert time.monotonic() < deadline, f"{run_file} has no exit record after {timeout_s}s"
        time.sleep(0.5)


def _read_wandb_log(run_file: Path) -> tuple[dict, dict, list[dict], bool]:
    """W&B's own protobuf records, in LevelDB's log framing (W&B ships no Python reader for it)."""
    from wandb.proto import wandb_internal_pb2

    raw, block, offset, pending = run_file.read_bytes(), 32768, 7, b""
    meta, config, rows, ended = {}, {}, [], False
    assert raw.startswith(b":W&B")
    while offset + 7 <= len(raw):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[offset:offset + 7])
        pending += raw[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind not in (1, 4):  # not yet a full record, or its last piece
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        if record.WhichOneof("record_type") == "run":
            meta = {"group": record.run.run_group, "job_type": record.run.job_type,
                    "display_name": record.run.display_name, "tags": list(record.run.tags)}
            config.update(_items(record.run.config.update))
        elif record.WhichOneof("record_type") == "history":
            rows.append(_items(record.history.item))
        ended = record.WhichOneof("record_type") == "exit"
    return meta, config, rows, ended


def _items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


# ---------------------------------------------------------------------------------------------------------------
# A tracker that cannot be reached


def test_an_unreachable_tracker_is_a_warning_and_the_others_log_every_report(tmp_path, caplog, trained_run):
    """The tracking side of a run fed the shared run's real reports through its Ray Train callback, pickled as Ray
    ships it to the controller: MLflow at a port nothing listens on is dropped at once with a warning, and the
    run's other trackers log every report."""
    closed = free_port()
    job = spec.load(QUICKSTART, [f"output.dir={tmp_path}", "output.name=offline", "tracking.backends=[tensorboard, "
                                 "mlflow, wandb]", f"tracking.mlflow.uri=http://127.0.0.1:{closed}",
                                 "tracking.wandb.mode=offline"])
    run = job.run_dir
    run.mkdir(parents=True)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ray_sft.tracking"):
        tracker = tracking.Tracker.open(job, run)
    assert time.monotonic() - started < 10  # refused at once: no retries, no waiting out a timeout
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"mlflow: ConnectionError: cannot reach the tracking server http://127.0.0.1:{closed}")
    assert "the run goes on without it" in warning
    records = run_files.read_metrics(trained_run.run_dir)
    with tracker:
        controller_side = pickle.loads(pickle.dumps(tracker.callback()))
        for record in records:
            controller_side.after_report(None, [record], None)
    assert set(json.loads((run / tracking.TRACKING_FILE).read_text())) == {"tensorboard", "wandb"}

    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    _, config, history = wandb_run(run_file)
    assert config["training"]["learning_rate"] == job.training.learning_rate
    for key in ("loss", "eval_loss", "learning_rate", "tokens_per_s"):
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert_series([(h["_step"], h[key]) for h in history if key in h], expected)
        assert_series(scalars(run / tracking.TB_DIR)[key], expected)


# ---------------------------------------------------------------------------------------------------------------
# MLflow: a real server


@pytest.mark.slow
def test_a_search_is_one_parent_run_with_a_child_per_trial_on_a_real_mlflow_server(searched_run, mlflow_uri):
    """The shared search (tests/conftest.py: `searched_run`) tracked to a real MLflow server and W&B offline."""
    from mlflow import MlflowClient

    code, out, run = searched_run.code, searched_run.out, searched_run.run_dir
    assert code == 0, out
    assert "warning" not in out
    table = pd.read_csv(run / "trials.csv").set_index("trial_id")
    best = json.loads((run / "best.json").read_text())
    assert table.loc[table["training.learning_rate"] == ABSURD_LR, "stopped_early"].all()  # ASHA may stop others

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(run.name).experiment_id])
    (parent,) = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
    assert parent.data.tags["ray_sft.kind"] == "search" and parent.info.status == "FINISHED"
    assert parent.data.tags["ray_sft.best_trial"] == best["trial_id"]
    assert best["tracking"]["search"]["mlflow"]["run_id"] == parent.info.run_id
    children = {r.info.run_name: r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id}
    assert set(children) == set(table.index) and len(runs) == 1 + len(children)

    for trial_id, child in children.items():
        row = table.loc[trial_id]
        assert float(child.data.params["training.learning_rate"]) == row["training.learning_rate"]
        records = [r for r in run_files.read_metrics(run / "trials" / trial_id) if "eval_loss" in r]
        assert_series([(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "eval_loss")],
                      [(r["step"], r["eval_loss"]) for r in records])
        stopped = bool(row["stopped_early"])
        assert (child.data.tags[tracking.STATUS_TAG], child.info.status) == (
            ("stopped_early", "KILLED") if stopped else ("completed", "FINISHED"))
        assert (child.data.tags.get(tracking.BEST_TAG) == "true") is (trial_id == best["trial_id"])

    winner = children[best["trial_id"]].info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"adapter", "trials.csv", "trials.png", "best.json"} <= artifacts
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(parent.info.run_id,
                                                                                          "adapter")}
    assert {"adapter", "loss.png"} <= {a.path for a in client.list_artifacts(winner)}  # a finished trial's own
    card = (run / "best" / "adapter" / "README.md").read_text()
    assert f"MLflow: run `{winner}` in experiment `{run.name}`" in card and mlflow_uri not in card

    # W&B offline, in the same search: each trial's run folder holds its run, in the search's group.
    group = json.loads((run / tracking.TRACKING_FILE).read_text())["wandb"]["group"]
    assert best["tracking"]["search"]["wandb"]["group"] == group
    for trial_id in table.index:
        trial = run / "trials" / trial_id
        (run_file,) = (trial / "wandb").glob("offline-run-*/run-*.wandb")
        meta, config, history = wandb_run(run_file)
        assert (meta["group"], meta["job_type"], meta["display_name"]) == (group, "trial", trial_id)
        # A stopped trial's process died with its W&B run unwritten: the search wrote it again, tagged.
        assert meta["tags"] == (["stopped_early"] if table.loc[trial_id, "stopped_early"] else [])
        assert config["training"]["learning_rate"] == table.loc[trial_id, "training.learning_rate"]
        records = run_files.read_metrics(trial)
        for key in ("loss", "eval_loss", "learning_rate"):
            assert_series([(h["_step"], h[key]) for h in history if key in h],
                          [(r["step"], r[key]) for r in records if key in r])
    for path in (p for p in run.rglob("*") if p.is_file()):
        for secret in PLANTED_SECRETS.values():
            assert secret.encode() not in path.read_bytes(), path
