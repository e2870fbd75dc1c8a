"""Hyperparameter search on Ray Tune: every trial is one `train.fit` run of the spec with the trial's values.

Read top-down: `search` checks the spec, sizes the trials and runs (or restores) the Tuner; `trial_spec` is the spec
a trial trains; `collect` turns the finished experiment into trials.csv/json, trials.png, best.json and
best/adapter/. Ray 2.60's Train V2 cannot hand a TorchTrainer to Tune, so a trial is a function trainable that
calls train.fit(trial=True), which builds the TorchTrainer and forwards its eval reports to Tune.

Per-trial resources (the rule, also in the README):
- A trial is a driver (the function trainable, which only waits on Ray Train) plus the trial spec's
  scaling.num_workers Ray Train workers. The driver reserves DRIVER_CPU (0.01 CPU: Tune refuses 0); the workers
  split the rest of the trial's CPUs and all of its GPUs evenly, replacing scaling.cpus_per_worker and
  scaling.gpus_per_worker. A worker runs one compute thread per whole CPU it holds, at least one, so on CPU
  fractional shares mean one thread per worker.
- GPUs are used as train uses them (scaling.use_gpu; "auto": when the cluster has any).
- Per trial: tune.cpus_per_trial / tune.gpus_per_trial when set; otherwise the cluster's total divided by
  tune.max_concurrent_trials when that is set; otherwise what one plain run of the spec takes
  (num_workers x cpus_per_worker, num_workers x gpus_per_worker). Never more than the cluster has.
  `gpus_per_trial: 0.25` packs 4 trials on one GPU.
- Trials at once: tune.max_concurrent_trials, else as many as fit in the cluster's CPUs (and GPUs), at most the
  number of trials. Tune itself only sees the drivers' slivers, so this limit is always set explicitly.

Tracking (ray_sft.tracking): the search is one parent run and each trial, a plain train.fit, a child of it; at the
end the parent marks each trial's end (ASHA's stops) and the winner.

Stopping: ASHA counts one rung step per eval report (time_attr training_iteration); a trial it stops keeps its
files, and shows `stopped_early` (fewer steps than its max_steps) in the table. PBT is refused: it needs trials
that restore each other's checkpoints with new hyperparameters, which train.fit does not do.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ray_sft import run_files, tracking
from ray_sft.console import show
from ray_sft.spec import JobSpec, SpecError, with_values

DRIVER_CPU = 0.01
TRIALS_DIR = "trials"
# ASHA stops every trial that reaches max_t; a trial must end on its own, after exporting its adapter.
ASHA_MAX_T = 1_000_000


class TuneError(RuntimeError):
    """A search that could not start, or ended without a trial to export."""


@dataclass
class TrialShare:
    """What one trial holds: CPUs and GPUs for its driver and workers together."""

    cpus: float
    gpus: float
    use_gpu: bool
    concurrent: int


@dataclass
class TuneOutcome:
    run_dir: Path
    rows: list[dict]
    best: dict | None
    failed: list[str]


# ---------------------------------------------------------------------------------------------------------------
# Checks and sizing (driver side, before any trial)


def check(spec: JobSpec) -> None:
    """Tune-only spec rules: a spec may carry a tune section that `train` ignores, so these live here."""
    t = spec.tune
    errors = []
    if not t.search_space:
        errors.append("tune.search_space: empty; name at least one spec field to search over")
    if t.metric.startswith("eval_") and spec.data.eval_rows == 0:
        errors.append(f"tune.metric: {t.metric} needs an eval split (data.eval_rows > 0)")
    if t.scheduler.type == "pbt":
        errors.append("tune.scheduler.type: pbt is not supported (trials cannot take over each other's "
                      "checkpoints with new values); use asha or none")
    if t.search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        errors.append("tune.search_alg: optuna is not installed (pip install optuna), or use random")
    if t.cpus_per_trial is not None and t.cpus_per_trial <= DRIVER_CPU:
        errors.append(f"tune.cpus_per_trial: must exceed the trial driver's {DRIVER_CPU} CPU")
    if errors:
        raise SpecError(errors)


def trial_count(spec: JobSpec) -> int:
    """num_samples times the size of the grid (Tune repeats the whole grid num_samples times)."""
    grids = [len(d["grid"]) for d in spec.tune.search_space.values() if "grid" in d]
    return spec.tune.num_samples * math.prod(grids)


def trial_share(spec: JobSpec, cluster: dict) -> TrialShare:
    """Per-trial resources and trials at once, by the rule in the module docstring."""
    from ray_sft.train import worker_resources

    use_gpu, _ = worker_resources(spec, cluster)
    t, s = spec.tune, spec.scaling
    limit = t.max_concurrent_trials
    cpus = _amount(t.cpus_per_trial, cluster.get("CPU", 0), limit, s.num_workers * s.cpus_per_worker)
    gpus = _amount(t.gpus_per_trial, cluster.get("GPU", 0), limit, s.num_workers * s.gpus_per_worker) if use_gpu else 0
    fits = [math.floor(cluster.get("CPU", 0) / cpus + 1e-9)] + ([math.floor(cluster["GPU"] / gpus + 1e-9)]
                                                                if use_gpu else [])
    concurrent = limit or max(1, min(trial_count(spec), *fits))
    if cpus <= DRIVER_CPU or (use_gpu and gpus <= 0):
        raise TuneError(f"the cluster ({_describe(cluster)}) leaves {cpus:g} CPU / {gpus:g} GPU per trial")
    return TrialShare(cpus, gpus, use_gpu, concurrent)


def _amount(explicit: float | None, total: float, limit: int | None, plain_run: float) -> float:
    if explicit is not None:
        return explicit
    return min(total / limit if limit else plain_run, total)


def _describe(cluster: dict) -> str:
    return ", ".join(f"{cluster.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def trial_spec(base: JobSpec, params: dict, trial_id: str, run_dir: Path, share: TrialShare) -> JobSpec:
    """The spec one trial trains: the searched values, its own output folder, its share of the resources."""
    workers = with_values(base, params).scaling.num_workers  # a search may change the worker count
    values = {**params, "output.dir": str(run_dir / TRIALS_DIR), "output.name": trial_id,
              "scaling.use_gpu": share.use_gpu, "scaling.cpus_per_worker": (share.cpus - DRIVER_CPU) / workers}
    if share.use_gpu:
        values["scaling.gpus_per_worker"] = share.gpus / workers
    return with_values(base, values)


# ---------------------------------------------------------------------------------------------------------------
# The search


def search(spec: JobSpec, resume: bool = False) -> TuneOutcome:
    """Run (or with `resume`, continue) the search for `spec` on the connected Ray cluster; write the results."""
    import ray

    from ray_sft import modeling

    check(spec)
    run_dir = spec.run_dir.resolve()
    share = trial_share(spec, ray.cluster_resources())
    modeling.resolve_model_path(spec)  # builds the tiny model once here, not in concurrent trials
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a search refused above leaves no empty folder
    run_name = run_files.ray_run_name(run_dir, resume)
    run_files.write_spec(run_dir, spec)
    show(f"[ray-sft tune] {trial_count(spec)} trial(s), {share.concurrent} at once, each {share.cpus:g} CPU"
         + (f" + {share.gpus:g} GPU" if share.use_gpu else ""))
    with tracking.Tracker.open(spec, run_dir, resume, "search") as tracker:
        grid = _tuner(spec, run_dir, run_name, share, resume, tracker.parent()).fit()
        outcome = collect(spec, run_dir, grid, tracker.links())
        tracker.conclude(outcome.rows, outcome.best, {r["trial_id"]: run_dir / TRIALS_DIR / r["trial_id"]
                                                      for r in outcome.rows})
        tracker.log_artifacts([outcome.best and outcome.best["adapter"], *sorted(run_dir.glob("trials.*")),
                               run_dir / "best.json"])
    return outcome


def _trainable(base: JobSpec, run_dir: Path, share: TrialShare, parent: tracking.Parent):
    from ray import tune

    def trial(params: dict) -> None:
        from ray_sft import train

        job = trial_spec(base, params, tune.get_context().get_trial_id(), run_dir, share)
        # A trial Tune restarts (resume after an interruption or error) continues its own Ray Train run.
        train.fit(job, resume=(job.run_dir / run_files.RAY_RUN).is_file(), trial=True, parent=parent)

    return tune.with_resources(trial, {"CPU": DRIVER_CPU})


def _tuner(spec: JobSpec, run_dir: Path, run_name: str, share: TrialShare, resume: bool, parent: tracking.Parent):
    from ray import tune

    trainable = _trainable(spec, run_dir, share, parent)
    path = f"{spec.storage_path}/{run_name}"
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"--resume: no Tune experiment to restore at {path}")
        # Finished trials stay finished; errored and unfinished ones continue from their Ray Train checkpoint.
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(spec.tune.search_space),
        tune_config=tune.TuneConfig(
            metric=spec.tune.metric, mode=spec.tune.mode, num_samples=spec.tune.num_samples,
            scheduler=_scheduler(spec), search_alg=_search_alg(spec, share.concurrent),
            trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(name=run_name, storage_path=spec.storage_path,
                                  callbacks=[ProgressLines()], verbose=1),
    )


def param_space(space: dict[str, dict[str, list]]) -> dict:
    """The spec's search space (dotted path -> {distribution: args}) as Tune's param_space."""
    from ray import tune

    kinds = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda a: tune.uniform(*a),
             "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {path: kinds[kind](args) for path, dist in space.items() for kind, args in dist.items()}


def _scheduler(spec: JobSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.tune.scheduler
    if s.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, max_t=ASHA_MAX_T)


def _search_alg(spec: JobSpec, concurrent: int):
    """The sampler, capped at `concurrent` trials. The cap is set here because TuneConfig's max_concurrent_trials
    is silently ignored for a BasicVariantGenerator passed in, which then starts every trial at once."""
    if spec.tune.search_alg == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=spec.training.seed), max_concurrent=concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrent, random_state=spec.training.seed)


def _progress_callback_base():
    from ray.tune import Callback

    return Callback


class ProgressLines(_progress_callback_base()):
    """One line per trial report, per finished trial and per failed trial, on the driver's stdout."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        values = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        shown = {k: result[k] for k in ("step", "max_steps", "eval_loss", "loss") if k in result}
        show(f"[ray-sft tune] {trial.trial_id} ({values}) step {shown.get('step', '?')}/{shown.get('max_steps', '?')}"
             + "".join(f" | {k} {v:.4f}" for k, v in shown.items() if k in ("eval_loss", "loss")))

    def on_trial_complete(self, iteration, trials, trial, **info):
        show(f"[ray-sft tune] {trial.trial_id} finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        show(f"[ray-sft tune] {trial.trial_id} FAILED (see {trial.local_path}/error.txt)")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------------------
# Results


def collect(spec: JobSpec, run_dir: Path, grid, links: dict) -> TuneOutcome:
    """The results table, plot, best.json and best/adapter from a finished (or partly failed) experiment; `links`:
    the search's tracking runs (tracking.Tracker.links)."""
    rows = [trial_row(spec, run_dir, result) for result in grid]
    rows.sort(key=lambda r: r["trial_id"])
    write_table(run_dir, rows)
    plot = plot_trials(run_dir, rows, spec.tune.metric)
    show(f"[ray-sft tune] table: {run_dir / 'trials.csv'}; plot: {plot}")
    best = export_best(spec, run_dir, rows, links)
    return TuneOutcome(run_dir, rows, best, [r["trial_id"] for r in rows if r["status"] == "ERROR"])


def trial_row(spec: JobSpec, run_dir: Path, result) -> dict:
    """One trial's line: its values, its best checkpointed metric, how far it ran and how it ended."""
    trial_id = Path(result.path).name
    records = run_files.read_metrics(run_dir / TRIALS_DIR / trial_id)
    metric = spec.tune.metric
    steps = max((r.get("step", 0) for r in records), default=0)
    max_steps = max((r.get("max_steps", 0) for r in records), default=0)
    best = _best_record([r for r in records if "checkpoint" in r], metric, spec.tune.mode)
    status = "ERROR" if result.error else "TERMINATED"
    return {"trial_id": trial_id, **{k: result.config.get(k) for k in spec.tune.search_space},
            f"best_{metric}": best.get(metric) if best else None, "best_step": best.get("step") if best else None,
            "steps": steps, "max_steps": max_steps, "status": status,
            "stopped_early": status != "ERROR" and steps < max_steps,
            "checkpoint": best.get("checkpoint") if best else None}


def _best_record(records: list[dict], metric: str, mode: str) -> dict | None:
    scored = [r for r in records if metric in r and math.isfinite(r[metric])]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: r[metric])


def write_table(run_dir: Path, rows: list[dict]) -> None:
    """trials.csv and trials.json, and the same table on stdout."""
    import pandas as pd

    table = pd.DataFrame(rows)
    table.to_csv(run_dir / "trials.csv", index=False)
    (run_dir / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    show(table.drop(columns=["checkpoint"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def plot_trials(run_dir: Path, rows: list[dict], metric: str) -> Path:
    """trials.png: every trial's metric against step (dashed: stopped early; x: failed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in rows:
        points = [(r["step"], r[metric]) for r in run_files.read_metrics(run_dir / TRIALS_DIR / row["trial_id"])
                  if metric in r]
        if points:
            style = "--" if row["stopped_early"] else ("x:" if row["status"] == "ERROR" else "o-")
            ax.plot(*zip(*points), style, markersize=3, label=row["trial_id"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"{run_dir.name}: {len(rows)} trial(s)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    path = run_dir / "trials.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def export_best(spec: JobSpec, run_dir: Path, rows: list[dict], links: dict) -> dict | None:
    """The winner's best checkpoint as <run>/best/adapter (train's PEFT export) and <run>/best.json, both naming the
    winner's tracking runs (best.json also the search's)."""
    import ray.train

    from ray_sft import modeling
    from ray_sft.spec import load

    metric = f"best_{spec.tune.metric}"
    ranked = [r for r in rows if r["checkpoint"]]
    if not ranked:
        return None
    winner = (min if spec.tune.mode == "min" else max)(ranked, key=lambda r: r[metric])
    trial_dir = run_dir / TRIALS_DIR / winner["trial_id"]
    trial = load(trial_dir / "spec.yaml")
    record = next(r for r in run_files.read_metrics(trial_dir) if r.get("checkpoint") == winner["checkpoint"])
    tracked = tracking.read_links(trial_dir)
    adapter = run_files.export_adapter(ray.train.Checkpoint(winner["checkpoint"]), run_dir, trial,
                                       modeling.resolve_model_path(trial), record, target=run_dir / "best" / "adapter",
                                       tracking=tracked)
    best = {"trial_id": winner["trial_id"], "params": {k: winner[k] for k in spec.tune.search_space},
            "metric": spec.tune.metric, "value": winner[metric], "step": winner["best_step"],
            "metrics": record, "checkpoint_path": winner["checkpoint"], "adapter": str(adapter),
            "tracking": {"search": links, "trial": tracked}}
    (run_dir / "best.json").write_text(json.dumps(best, indent=2, default=str))
    return best
