"""QLoRA SFT: one training code path for a plain run, a tune trial, 1 or N workers, CPU or GPU.

Read top-down: `sft_config` maps the spec onto TRL's SFTConfig, `build_trainer` makes the SFTTrainer every
process uses, `train_worker` is what each Ray Train worker runs, and `fit` (driver side) builds the TorchTrainer,
runs it and exports the adapter. The driver-side pieces that touch the run folder live in `ray_sft.run_files`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray_sft import run_files, tracking
from ray_sft.execution import (RecipeNeftune, compile_layers, compile_seconds, compile_wanted, micro_batching,
                               truncate_rows)
from ray_sft.spec import JobSpec, from_dict, to_dict

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"  # per-rank audit of the rows each worker was given and trained on
CRASH_MARKER = ".crash-injected"


class TrainError(RuntimeError):
    """A run that could not start or did not finish; the message says why and what was kept."""


@dataclass(frozen=True)
class InjectedCrash:
    """A test hook, never part of a job spec: worker `rank` exits its process at optimizer step `step`, once per run
    folder (recovery and resume tests pass it to `fit`)."""

    rank: int
    step: int


# ---------------------------------------------------------------------------------------------------------------
# Spec -> TRL


def use_bf16(spec: JobSpec, device_type: str) -> bool:
    import torch

    if spec.training.bf16 == "auto":
        return device_type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(spec.training.bf16)


def sft_config(spec: JobSpec, output_dir: str, device_type: str, has_eval: bool, max_steps: int | None = None):
    """The spec's training section as TRL's SFTConfig (current TRL names for the recipe's arguments)."""
    from trl import SFTConfig

    import torch.distributed as dist

    t = spec.training
    cpu = device_type == "cpu"
    distributed = dist.is_available() and dist.is_initialized()
    micro, accumulation = micro_batching(spec)
    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=t.epochs,
        max_steps=max_steps if max_steps is not None else t.max_steps,
        # Same rows per optimizer step either way; transformers normalises the loss by the step's token count, and
        # length grouping works on whole steps (train_batch_size x accumulation), so the rows and order match too.
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        warmup_steps=int(t.warmup_steps) if t.warmup_steps >= 1 else t.warmup_steps,
        optim=t.optimizer,
        bf16=use_bf16(spec, device_type),
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        auto_find_batch_size=t.auto_find_batch_size,
        # TRL refuses max_length with padding_free (it would not cut the rows): build_trainer cuts them instead.
        max_length=None if t.padding_free else t.max_length,
        packing=t.packing,
        padding_free=t.padding_free,
        neftune_noise_alpha=t.neftune_noise_alpha,
        gradient_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing avoids DDP's "marked ready twice" error with LoRA.
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        dataset_text_field="text",
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        # Without use_cpu, accelerate sees a CPU process group as "not distributed": no DDP wrapper, no gradient
        # sync, and every rank silently trains its own copy.
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and distributed else None,
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=not cpu,
        disable_tqdm=True,
        save_only_model=False,
    )


def _sharded_trainer_class():
    """SFTTrainer whose train loader keeps this rank's Ray shard whole and records the rows it yields.

    Each worker already took its own disjoint shard (shard_rows); accelerate would shard it again under DDP and
    each rank would silently train on half of its rows. Making the prepared batch sampler a passthrough is
    the same fix transformers applies to its own rank-aware sampler.
    """
    from trl import SFTTrainer

    from ray_sft.couplings import drift, require

    require("transformers", SFTTrainer, "_get_train_sampler", ("train_dataset",))

    class _Trainer(SFTTrainer):
        def __init__(self, *args, presharded: bool, **kwargs):
            self.presharded = presharded
            self.trained_indices: list[list[int]] = []  # one list per pass over the loader (epoch)
            super().__init__(*args, **kwargs)

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            return None if sampler is None else _RecordingSampler(sampler, self.trained_indices)

        def get_train_dataloader(self):
            loader = super().get_train_dataloader()
            if self.presharded:
                shard = getattr(loader, "batch_sampler", None)
                if not (hasattr(shard, "num_processes") and hasattr(shard, "process_index")):
                    # Leaving accelerate's split in place would train each rank on half its shard, silently.
                    raise drift("accelerate", f"the prepared train loader's batch sampler ({type(shard).__name__}) "
                                "has no num_processes/process_index to turn its per-rank split off")
                shard.num_processes, shard.process_index = 1, 0
            return loader

    return _Trainer


class _RecordingSampler:
    """Yields the wrapped sampler's indices unchanged, recording each epoch's order."""

    def __init__(self, sampler, record: list[list[int]]):
        self.sampler, self.record = sampler, record

    def __iter__(self):
        epoch: list[int] = []
        self.record.append(epoch)
        for index in self.sampler:
            epoch.append(index)
            yield index

    def __len__(self):
        return len(self.sampler)

    def set_epoch(self, epoch: int):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def build_trainer(spec: JobSpec, model_path: str, tokenizer, train_rows: list[dict], eval_rows: list[dict],
                  device, output_dir: str, callbacks=(), presharded: bool = False):
    """Model on `device` (4-bit per the spec), LoRA from the spec, and the SFTTrainer that trains it."""
    import datasets
    import torch

    from ray_sft import modeling

    model = modeling.load_model(model_path, spec, device, training=True)
    targets = modeling.lora_targets(model, spec.lora)
    texts = lambda rows: datasets.Dataset.from_dict({"text": [r["text"] for r in rows]})  # noqa: E731
    trainer = _sharded_trainer_class()(
        model=model,
        args=sft_config(spec, output_dir, torch.device(device).type, has_eval=bool(eval_rows)),
        train_dataset=texts(train_rows),
        eval_dataset=texts(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=modeling.lora_config(spec.lora, targets),
        callbacks=list(callbacks),
        presharded=presharded,
    )
    if spec.training.padding_free:
        trainer.train_dataset = truncate_rows(trainer.train_dataset, spec.training.max_length)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = truncate_rows(trainer.eval_dataset, spec.training.max_length)
    micro, _ = micro_batching(spec)
    if trainer.neftune_noise_alpha is not None and (spec.training.padding_free
                                                    or micro != spec.training.per_device_batch_size):
        # TRL's hook scales the noise by the batch tensor's length: a packed row of a whole step, or 64 padded
        # rows, would get far less noise than the recipe's 4-row batches. RecipeNeftune keeps the recipe's scale.
        RecipeNeftune(trainer.neftune_noise_alpha, spec.training.per_device_batch_size).attach(trainer.model)
        trainer.neftune_noise_alpha = None  # Trainer.train would add its own hook on top
    if spec.training.dequantize_base:
        log.info("training against a dequantized copy of %d 4-bit layers (training.dequantize_base)",
                 modeling.dequantize_base(trainer.model))
    if spec.training.compile:  # true or "auto": settled when training starts and its step count is known
        four_bit_layers = spec.quantization.load_in_4bit and not spec.training.dequantize_base
        trainer.add_callback(_compile_callback_class()(spec.training.compile, torch.device(device).type,
                                                       four_bit_layers))
    return trainer


def _compile_callback_class():
    from transformers import TrainerCallback

    class CompileLayers(TrainerCallback):
        """Compiles the decoder layers as training starts, when the run's optimizer steps are known."""

        def __init__(self, setting, device_type: str, four_bit_layers: bool):
            self.setting, self.device_type, self.four_bit_layers = setting, device_type, four_bit_layers
            self.compiled = False

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.compiled = compile_wanted(self.setting, self.device_type, state.max_steps, self.four_bit_layers)
            if self.compiled:
                log.info("compiling %d decoder layers for %d steps (training.compile: %s; the first steps include "
                         "the compile)", compile_layers(model), state.max_steps, self.setting)

        def on_train_end(self, args, state, control, **kwargs):
            if self.compiled:
                log.info("torch.compile took %.1f s of this run", compile_seconds())

    return CompileLayers


# ---------------------------------------------------------------------------------------------------------------
# Worker side


def _report_callback_class():
    from transformers import TrainerCallback

    class RayReport(TrainerCallback):
        """Reports each step's logs, eval metrics and checkpoint to Ray Train as one report, and injects test crashes.

        Every rank must call ray.train.report the same number of times. A step's reports are therefore not sent from
        the log/eval/save hooks themselves (that would depend on the order HF calls them in) but collected and sent
        once, when the next step begins or training ends; the end-of-training summary goes in a report of its own.
        """

        def __init__(self, run_dir: str, crash, rank: int):
            self.run_dir, self.crash, self.rank = run_dir, crash, rank
            self.pending: dict = {}
            self.step, self.max_steps, self.checkpoint_dir, self.saved = 0, 0, None, False
            self.logged_at = self.last_time = time.time()
            self.last_tokens = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "train_runtime" in logs:  # the summary after the last step
                self._flush()
            if "loss" in logs:
                self.logged_at = time.time()
            self.step, self.max_steps = state.global_step, state.max_steps
            self.pending.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})

        def on_save(self, args, state, control, **kwargs):
            self.step, self.max_steps, self.saved = state.global_step, state.max_steps, True
            if state.is_world_process_zero:
                self.checkpoint_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"

        def on_step_begin(self, args, state, control, **kwargs):
            self._flush()

        def on_train_end(self, args, state, control, **kwargs):
            self._flush()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:  # the final step always evaluates and saves
                control.should_save = True
                control.should_evaluate = args.eval_strategy != "no"
            if self.crash and self.rank == self.crash.rank and state.global_step == self.crash.step:
                marker = Path(self.run_dir) / CRASH_MARKER
                if not marker.exists():
                    marker.write_text(f"rank {self.rank} exited at step {state.global_step}\n")
                    # Die after the controller has collected the last report (it polls every
                    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): the injected crash is then reproducibly mid-run.
                    time.sleep(1.0)
                    os._exit(17)

        def _flush(self):
            import ray.train
            import torch

            if not self.pending and not self.saved:
                return
            metrics = {k: v for k, v in self.pending.items() if k != "total_flos"}
            tokens = metrics.get("num_tokens", self.last_tokens)
            if tokens > self.last_tokens:
                metrics["tokens_per_s"] = (tokens - self.last_tokens) / max(self.logged_at - self.last_time, 1e-9)
                self.last_time, self.last_tokens = self.logged_at, tokens
            # The worker's wall clock when the step's loss was logged: step times without reporting delays.
            metrics.update(step=self.step, max_steps=self.max_steps, timestamp=self.logged_at)
            if torch.cuda.is_available():  # the worker's peak so far: what a run needs on its GPU
                metrics["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            directory, self.pending, self.checkpoint_dir, self.saved = self.checkpoint_dir, {}, None, False
            checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
            ray.train.report(metrics, checkpoint=checkpoint)

    return RayReport


def train_worker(config: dict) -> None:
    """Runs in every Ray Train worker: its device, its shard, the shared SFTTrainer, checkpoints to Ray."""
    import ray.train
    import torch

    from ray_sft import modeling

    spec = from_dict(config["spec"])
    crash = InjectedCrash(**config["crash"]) if config["crash"] else None
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if context.get_world_size() == 1:
        leave_single_rank_group()
    # One compute thread per CPU granted: oversubscribing 2 cores made one step 80x slower.
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)

    tokenizer = modeling.load_tokenizer(config["model_path"], spec.model)
    rows = ray.get(config["rows"])
    train_rows = shard_rows(rows["train"], rank, context.get_world_size())
    eval_rows = rows["eval"]

    with tempfile.TemporaryDirectory(prefix="ray_sft-worker-") as output_dir:
        resume_from = _restore_checkpoint(output_dir)
        trainer = build_trainer(
            spec, config["model_path"], tokenizer, train_rows, eval_rows, device, output_dir,
            callbacks=[_report_callback_class()(config["run_dir"], crash, rank)],
            presharded=context.get_world_size() > 1)
        trainer.train(resume_from_checkpoint=resume_from)
        _write_shard_audit(config["run_dir"], rank, train_rows, trainer.trained_indices, trainer.model)


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
                      "MASTER_PORT")


def leave_single_rank_group() -> None:
    """Make a one-worker run a plain process again: no process group, none of torchrun's variables.

    Ray Train sets up a process group even for one worker, and accelerate then takes the run as distributed:
    every metric TRL gathers becomes a collective, on a communicator with its own watchdog thread. One worker has
    nothing to exchange, and this way it runs the very program the benchmarks compare it with. (The group was
    measured to cost nothing itself on the H200: README, "Notes on the stack".)
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for name in TORCHRUN_VARIABLES:
        os.environ.pop(name, None)


def shard_rows(rows: list[dict], rank: int, world_size: int) -> list[dict]:
    """This rank's rows: disjoint strided shards of equal size, so every rank runs the same number of steps.

    Every worker reads the whole train set from the object store and takes its own stride; at most
    world_size - 1 rows are left out. (Ray Data's streaming split with equal=True dropped rows at block granularity,
    4 of 80 measured here.)
    """
    per_rank = len(rows) // world_size
    return rows[rank::world_size][:per_rank]


def _restore_checkpoint(output_dir: str) -> str | None:
    """Copy Ray's latest checkpoint (after a worker failure or --resume) where HF's Trainer resumes from it."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as source:
        state = json.loads((Path(source) / "trainer_state.json").read_text())
        target = Path(output_dir) / f"checkpoint-{state['global_step']}"
        shutil.copytree(source, target)
    return str(target)


def trainable_digest(model) -> str:
    """SHA-256 of every trainable tensor: equal on all ranks exactly when DDP kept the replicas in sync."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.removeprefix("module.").encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _write_shard_audit(run_dir: str, rank: int, rows: list[dict], trained_indices: list[list[int]], model) -> None:
    """<run>/shards/rank-N.json: the rows this rank was given, the rows it trained on, its final weights' digest."""
    folder = Path(run_dir) / SHARDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    from ray_sft import modeling

    audit = {"assigned": [r["row"] for r in rows],
             "trained_per_epoch": [[rows[i]["row"] for i in epoch] for epoch in trained_indices if epoch],
             "trainable_sha256": trainable_digest(model),
             # (4-bit layers with bitsandbytes' CPU repack disabled, 4-bit layers): see modeling.disable_cpu_repack
             "cpu_repack_disabled": modeling.cpu_repack_disabled(model)}
    (folder / f"rank-{rank}.json").write_text(json.dumps(audit))


# ---------------------------------------------------------------------------------------------------------------
# Driver side


@dataclass
class TrainOutcome:
    run_dir: Path
    adapter_dir: Path
    metrics: dict
    checkpoint_path: str


def worker_resources(spec: JobSpec, cluster: dict) -> tuple[bool, dict]:
    """(use_gpu, resources per worker) from the spec and what the cluster has."""
    s = spec.scaling
    use_gpu = cluster.get("GPU", 0) > 0 if s.use_gpu == "auto" else s.use_gpu
    resources = {"CPU": s.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return use_gpu, resources


def check_fits(spec: JobSpec, resources: dict, cluster: dict) -> None:
    """Fail fast instead of waiting forever for resources the cluster does not have."""
    n = spec.scaling.num_workers
    for name, amount in resources.items():
        need, have = n * amount, cluster.get(name, 0)
        if need > have + 1e-9:
            raise TrainError(f"scaling: {n} worker(s) x {amount:g} {name} = {need:g} {name} needed, "
                             f"but the Ray cluster has {have:g} {name} in total")


def fit(spec: JobSpec, resume: bool = False, trial: bool = False, crash: InjectedCrash | None = None,
        parent: tracking.Parent | None = None) -> TrainOutcome:
    """Run distributed QLoRA SFT for `spec` on the connected Ray cluster and export the final adapter.

    With `trial=True` (inside a Ray Tune trial) each Ray Train report that carries spec.tune.metric is also
    forwarded to Tune, and the run is tracked as a trial of the search whose runs `parent` names.
    """
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_sft import data, modeling

    run_dir = spec.run_dir.resolve()
    model_path = modeling.resolve_model_path(spec)
    tokenizer = modeling.load_tokenizer(model_path, spec.model)
    examples = data.load_examples(spec, tokenizer)
    cluster = ray.cluster_resources()
    use_gpu, resources = worker_resources(spec, cluster)
    check_fits(spec, resources, cluster)

    left_out = len(examples.train) % spec.scaling.num_workers
    if left_out:
        log.warning("%d of %d train rows left out per epoch so %d workers get equal shards",
                    left_out, len(examples.train), spec.scaling.num_workers)
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a run refused above leaves no empty folder
    run_name = run_files.ray_run_name(run_dir, resume)
    run_files.write_spec(run_dir, spec)
    if not resume:
        run_files.reset_run_outputs(run_dir)
    # One copy per node, read again by a restarted worker.
    rows = ray.put({"train": examples.train, "eval": examples.eval})
    with tracking.Tracker.open(spec, run_dir, resume, "trial" if trial else "train", parent) as tracker:
        # In this order: a report is on disk, then tracked, then (a trial) acted on by Tune, which may end it.
        callbacks = [run_files.MetricsCallback(str(run_dir), echo=not trial), tracker.callback()]
        if trial:
            callbacks.append(_tune_report_callback(spec.tune.metric, spec.tune.mode))
        trainer = TorchTrainer(
            train_worker,
            # Every worker reads the whole train set and takes its own stride (shard_rows); every worker evaluates
            # on the whole eval set, which accelerate shards and gathers itself.
            train_loop_config={"spec": to_dict(spec), "model_path": model_path, "run_dir": str(run_dir),
                               "rows": rows, "cpus_per_worker": spec.scaling.cpus_per_worker,
                               "crash": dataclasses.asdict(crash) if crash else None},
            scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=run_name, storage_path=spec.storage_path, callbacks=callbacks,
                failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=spec.training.save_total_limit)),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise TrainError(f"training failed after {spec.scaling.max_failures} allowed restart(s): "
                             f"{_root_cause(exc)}\ncheckpoints written so far are kept under "
                             f"{spec.storage_path}/{run_name}; continue with --resume") from None
        if result.checkpoint is None:
            raise TrainError("training finished without a checkpoint to export")
        adapter_dir = run_files.export_adapter(result.checkpoint, run_dir, spec, model_path, result.metrics,
                                               tracking=tracker.links())
        tracker.log_artifacts([adapter_dir, run_files.plot_loss(run_dir)])
    return TrainOutcome(run_dir, adapter_dir, dict(result.metrics), result.checkpoint.path)


def _tune_report_callback(metric: str, mode: str):
    """Ray Train -> Tune forwarding of only the reports that carry `metric` (the eval steps).

    Tune's strict metric check fails a trial on a result without the metric, and ASHA counts every result as a
    rung step. A diverged (NaN/inf) metric goes to Tune as the worst finite number: ASHA compares with `<`, so a
    NaN would never be pruned, and an infinity would turn the rung's percentile cutoff into NaN.
    """
    import math
    import sys

    from ray.tune.integration.ray_train import TuneReportCallback

    worst = sys.float_info.max if mode == "min" else -sys.float_info.max

    class MetricReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric not in metrics[0]:
                return
            first = dict(metrics[0])
            if not math.isfinite(first[metric]):
                first[metric] = worst
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return MetricReports()


def _root_cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
