"""The job spec: one typed, validated description of a run, loaded from YAML.

Every default lives here, in the dataclasses below. A YAML file only states what differs from them; `k=v`
overrides are applied to the YAML before validation, so a field is validated once, whatever set it. Validation
collects every error (dotted path and reason) before failing. This module imports neither torch nor ray.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ray_sft.templates import INFERENCE_TEMPLATES, TRAIN_TEMPLATES
from ray_sft.typed import build


class SpecError(ValueError):
    """A spec that failed validation; `errors` holds one 'dotted.path: reason' line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid job spec:\n" + "\n".join(f"  {e}" for e in errors))


def _check(predicate, reason: str):
    return {"check": (predicate, reason)}


POSITIVE = _check(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = _check(lambda v: v >= 0, "must be >= 0")
PROBABILITY = _check(lambda v: 0 <= v < 1, "must be in [0, 1)")


def is_hub_id(ref: str) -> bool:
    """Whether `ref` names a Hub repo (NAME or OWNER/NAME, as the Hub spells them) rather than a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(ref, str) or not ref or Path(ref).exists():
        return False
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


@dataclass
class ModelSpec:
    # Hub id, local HF folder, or "tiny" for the offline tiny model built from the bundled data.
    name_or_path: str = "llm-jp/llm-jp-3-1.8b"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # "auto": varlen (flash attention per packed row, see modeling.attention) for padding-free training on CUDA,
    # sdpa otherwise; or any transformers attention name.
    attn_implementation: str = "auto"


@dataclass
class DataSpec:
    # Hub dataset id, or a local .json/.jsonl/.csv/.parquet file (relative paths: to the spec file's folder).
    source: str = "llm-jp/databricks-dolly-15k-ja"
    split: str = "train"
    max_rows: Optional[int] = field(default=None, metadata=POSITIVE)
    eval_rows: int = field(default=0, metadata=NON_NEGATIVE)
    seed: int = 42
    # error: fail naming each bad row; skip: drop and count them; truncate: fail on malformed rows as `error`
    # does, but keep over-long rows cut at training.max_length (what the recipe's SFTTrainer did silently).
    on_bad_rows: Literal["error", "skip", "truncate"] = "error"


@dataclass
class PromptSpec:
    template: str = "recipe"
    inference_template: str = "recipe"
    append_eos: bool = True


@dataclass
class QuantizationSpec:
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


@dataclass
class LoraSpec:
    r: int = field(default=8, metadata=POSITIVE)
    alpha: float = field(default=16, metadata=POSITIVE)
    dropout: float = field(default=0.05, metadata=PROBABILITY)
    bias: Literal["none", "all", "lora_only"] = "none"
    # "all-linear": every 4-bit (or, unquantized, every nn.Linear) module name except lm_head; or explicit names.
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    modules_to_save: list[str] = field(default_factory=lambda: ["embed_tokens"])


@dataclass
class TrainingSpec:
    epochs: float = field(default=3, metadata=POSITIVE)
    max_steps: int = -1  # > 0 overrides epochs
    per_device_batch_size: int = field(default=4, metadata=POSITIVE)
    gradient_accumulation_steps: int = field(default=16, metadata=POSITIVE)
    learning_rate: float = field(default=2e-4, metadata=POSITIVE)
    lr_scheduler: str = "cosine"
    weight_decay: float = field(default=0.01, metadata=NON_NEGATIVE)
    # An int counts steps; a float below 1 is a fraction of the run (transformers' own rule).
    warmup_steps: float = field(default=100, metadata=NON_NEGATIVE)
    optimizer: str = "adamw_torch_fused"
    # "auto": bf16 where the device supports it (CUDA with bf16, or a CPU with AVX512-BF16 never: fp32 there).
    bf16: Union[bool, Literal["auto"]] = "auto"
    group_by_length: bool = True
    logging_steps: int = field(default=20, metadata=POSITIVE)
    eval_steps: int = field(default=20, metadata=POSITIVE)
    save_steps: int = field(default=20, metadata=POSITIVE)
    save_total_limit: int = field(default=3, metadata=POSITIVE)
    max_length: int = field(default=1024, metadata=POSITIVE)
    packing: bool = False
    neftune_noise_alpha: Optional[float] = field(default=5, metadata=POSITIVE)
    gradient_checkpointing: bool = True
    auto_find_batch_size: bool = False
    seed: int = 42
    # Execution only: how the per_device_batch_size x gradient_accumulation_steps rows of one optimizer step are
    # run, never which rows, their order, the loss normalisation or NEFTune's noise (see README, "Fast settings").
    # Rows per forward pass; None: every row of the step in one pass. A multiple of per_device_batch_size that
    # divides the step (per_device_batch_size itself runs the step as the recipe did).
    micro_batch_size: Optional[int] = field(default=None, metadata=POSITIVE)
    # Concatenate a micro-batch's rows into one sequence with per-row position ids instead of padding them.
    padding_free: bool = True
    # torch.compile each decoder layer (one graph shared by all layers, any packed length) to fuse the LoRA,
    # norm, RoPE and activation element-wise work, rounding to bf16 where eager does (execution.compile_layers).
    # "auto": on CUDA for runs long enough to pay back the compile (execution.COMPILE_PAYS_AFTER_STEPS: sooner on
    # dense weights than on bitsandbytes' 4-bit layers).
    compile: Union[bool, Literal["auto"]] = "auto"
    # Dequantize the frozen 4-bit weights once, at the start, and train against that copy in the compute dtype: the
    # same numbers as dequantizing in every matmul (the 4-bit values), for about 1.5 more bytes per base parameter
    # in memory; bitsandbytes' per-matmul dequantizing and its Python leave the step (modeling.dequantize_base).
    dequantize_base: bool = False


@dataclass
class ScalingSpec:
    num_workers: int = field(default=1, metadata=POSITIVE)
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    cpus_per_worker: float = field(default=1, metadata=POSITIVE)
    gpus_per_worker: float = field(default=1, metadata=POSITIVE)
    max_failures: int = field(default=0, metadata=NON_NEGATIVE)
    # Where Ray Train keeps checkpoints: a local folder or a pyarrow filesystem URI (s3://, gs://, ...).
    # Default: <output.dir>/<output.name>/ray.
    storage_path: Optional[str] = None


@dataclass
class SchedulerSpec:
    type: Literal["asha", "none", "pbt"] = "asha"
    grace_period: int = field(default=1, metadata=POSITIVE)  # in reports (eval steps)
    reduction_factor: float = field(default=2, metadata=_check(lambda v: v > 1, "must be > 1"))
    perturbation_interval: int = field(default=2, metadata=POSITIVE)  # PBT only


@dataclass
class TuneSpec:
    # dotted spec path -> {choice: [...]} | {grid: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]}
    search_space: dict[str, dict[str, list]] = field(default_factory=dict)
    num_samples: int = field(default=1, metadata=POSITIVE)
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search_alg: Literal["random", "optuna"] = "random"
    max_concurrent_trials: Optional[int] = field(default=None, metadata=POSITIVE)
    # Per-trial resources; None: derived from the cluster (see tune.trial_resources).
    gpus_per_trial: Optional[float] = field(default=None, metadata=POSITIVE)
    cpus_per_trial: Optional[float] = field(default=None, metadata=POSITIVE)


@dataclass
class AutoscalingSpec:
    min_replicas: int = field(default=1, metadata=POSITIVE)
    max_replicas: int = field(default=1, metadata=POSITIVE)
    target_ongoing_requests: float = field(default=4, metadata=POSITIVE)
    # Serve's own defaults; exposed so a deployment (and the autoscaling test) can react within seconds.
    upscale_delay_s: float = field(default=30, metadata=NON_NEGATIVE)
    downscale_delay_s: float = field(default=600, metadata=NON_NEGATIVE)
    look_back_period_s: float = field(default=30, metadata=POSITIVE)


@dataclass
class GenerationSpec:
    """The recipe's decoding, shared by `generate` and `serve`."""

    max_new_tokens: int = field(default=100, metadata=POSITIVE)
    do_sample: bool = False
    temperature: float = field(default=1.0, metadata=POSITIVE)
    top_p: float = field(default=1.0, metadata=_check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    repetition_penalty: float = field(default=1.2, metadata=POSITIVE)
    # A merged (dense) model decodes with a static KV cache: on CUDA transformers then compiles the decode step
    # into CUDA graphs, which removes the per-token launch cost that bounds eager decoding (bench/RESULTS.md).
    # "auto": on CUDA only (on CPU nothing is compiled and the full-length cache only costs). Unmerged models
    # (4-bit layers, adapters switched per batch) always keep the dynamic cache.
    static_cache: Union[bool, Literal["auto"]] = "auto"
    sample_prompts: list[str] = field(default_factory=lambda: ["時間管理能力をあげるには?"])


@dataclass
class ServeSpec:
    host: str = "127.0.0.1"
    port: int = field(default=8000, metadata=_check(lambda v: 0 < v < 65536, "must be a TCP port"))
    # Name of the environment variable holding the API key; required when host is not loopback.
    api_key_env: Optional[str] = None
    # Fold the adapter into a dense base (no per-row LoRA work at all: the fast path; see README, "Fast serving").
    # "auto": merged for a single adapter on a GPU replica; several adapters and CPU replicas keep the adapters
    # unmerged, each row of a batch on its own. Resolved at deploy time (serve.resolve).
    merge: Union[bool, Literal["auto"]] = "auto"
    # Unmerged adapters: dequantize a 4-bit base once at load (dense matmuls, a CUDA-graphed decode step; the
    # base's memory at compute dtype) or keep it 4-bit (memory-bound cases). "auto": dense on a GPU replica.
    dequantize_base: Union[bool, Literal["auto"]] = "auto"
    autoscaling: AutoscalingSpec = field(default_factory=AutoscalingSpec)
    cpus_per_replica: float = field(default=1, metadata=POSITIVE)
    # "auto": 1 when the Ray cluster has a GPU at deploy time, else 0 (CPU). A cluster that adds GPU nodes only on
    # demand has none before the first job: give a number there.
    gpus_per_replica: Union[float, Literal["auto"]] = field(
        default="auto", metadata=_check(lambda v: v == "auto" or v >= 0, "must be >= 0 or auto"))
    # The engine's slots: requests decoded together; each holds a KV cache of max_prompt_tokens + max_tokens_limit.
    # "auto": 32 on a GPU replica (a batch of 32 decodes about as fast per step as one), 8 on CPU (where each row
    # costs compute and the cache costs host memory).
    max_batch_size: Union[int, Literal["auto"]] = field(
        default="auto", metadata=_check(lambda v: v == "auto" or v > 0, "must be > 0 or auto"))
    max_prompt_tokens: int = field(default=1024, metadata=POSITIVE)
    max_tokens_limit: int = field(default=512, metadata=POSITIVE)
    max_adapters_per_replica: int = field(default=4, metadata=POSITIVE)
    # Load shedding, by Ray Serve itself: a replica takes 2 x max_batch_size requests (max_batch_size decoding, the
    # rest waiting in its engine for a slot); more wait at Serve's proxy, at most max_queued_requests there (per
    # proxy), and past that the proxy answers 503 with Retry-After: retry_after_s (whole seconds).
    max_queued_requests: int = field(default=64, metadata=POSITIVE)
    retry_after_s: int = field(default=1, metadata=NON_NEGATIVE)
    # A request's whole life, queueing and streaming included: past it Serve's proxy answers 408 (or ends the
    # stream) and cancels the request, freeing its slot. Serve takes it when its proxy starts (one value for every
    # app of that Serve instance). The default lets a CPU replica write max_tokens_limit tokens behind a queue.
    request_timeout_s: float = field(default=300, metadata=POSITIVE)
    # Request bounds, checked before any work on a request (a breach is a 413/400 naming the field). The body is
    # measured raw, before JSON parsing; 1 MiB holds any prompt max_prompt_tokens allows, with room to spare.
    max_request_bytes: int = field(default=1_048_576, metadata=POSITIVE)
    max_json_depth: int = field(default=16, metadata=POSITIVE)  # a chat request needs 3
    max_stop_strings: int = field(default=4, metadata=POSITIVE)  # OpenAI's own limit
    max_stop_chars: int = field(default=256, metadata=POSITIVE)
    max_messages: int = field(default=256, metadata=POSITIVE)


@dataclass
class OutputSpec:
    dir: str = "runs"
    name: Optional[str] = None  # default: the spec file's stem
    hub_repo: Optional[str] = None  # where `ray-sft push` publishes the adapter
    hub_private: bool = True
    # The model card's metadata. The license is the publisher's call; the default follows the recipe's data
    # (databricks-dolly-15k-ja, CC BY-SA 3.0), whose terms carry over to what is trained on it.
    hub_language: list[str] = field(default_factory=lambda: ["ja"])
    hub_license: str = "cc-by-sa-3.0"


@dataclass
class MlflowSpec:
    # The tracking server (http(s)://HOST:PORT) or store URI (sqlite:///..., a folder); required for mlflow. Never
    # put credentials in it: they come from the environment variables named below (MLflow's own names by default).
    uri: Optional[str] = None
    experiment: Optional[str] = None  # default: output.name
    username_env: str = "MLFLOW_TRACKING_USERNAME"
    password_env: str = "MLFLOW_TRACKING_PASSWORD"
    token_env: str = "MLFLOW_TRACKING_TOKEN"
    # Upload the adapter and plots as the run's artifacts (a recipe-sized adapter with modules_to_save is hundreds
    # of MB, once per run and once per finished trial).
    log_artifacts: bool = True


@dataclass
class WandbSpec:
    project: str = "ray_sft"
    entity: Optional[str] = None  # default: the API key's own
    # offline: the run is written to <run>/wandb/ and uploaded later with `wandb sync`; no network, no key.
    mode: Literal["online", "offline"] = "online"
    api_key_env: str = "WANDB_API_KEY"
    base_url: Optional[str] = None  # a self-hosted W&B server; default: W&B's own


@dataclass
class TrackingSpec:
    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    # Seconds a tracker may take to answer (at the start: to be reached at all) before the run goes on without it.
    timeout_s: float = field(default=10, metadata=POSITIVE)
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)
    wandb: WandbSpec = field(default_factory=WandbSpec)


@dataclass
class JobSpec:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    tune: TuneSpec = field(default_factory=TuneSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    serve: ServeSpec = field(default_factory=ServeSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.output.name

    @property
    def storage_path(self) -> str:
        return self.scaling.storage_path or str((self.run_dir / "ray").resolve())


# ---------------------------------------------------------------------------------------------------------------
# Cross-field rules (those a single field's type cannot express)

DISTRIBUTIONS = {"choice", "grid", "uniform", "loguniform", "randint"}


def field_paths(cls=JobSpec, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of the spec as dotted path -> type (what tune may search over)."""
    paths = {}
    for name, tp in typing.get_type_hints(cls).items():
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            paths.update(field_paths(tp, dotted + "."))
        else:
            paths[dotted] = tp
    return paths


def _search_space_errors(space: dict[str, dict[str, list]]) -> list[str]:
    errors = []
    leaves = field_paths()
    for key, dist in space.items():
        where = f"tune.search_space.{key}"
        if key.startswith(("tune.", "tracking.")) or key not in leaves:
            errors.append(f"{where}: not a searchable spec field")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            errors.append(f"{where}: must be one of {{{', '.join(sorted(DISTRIBUTIONS))}: [...]}}")
            continue
        kind, args = next(iter(dist.items()))
        if not args:
            errors.append(f"{where}.{kind}: needs values")
        elif kind in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
                errors.append(f"{where}.{kind}: must be [low, high] with low < high")
            elif kind == "loguniform" and args[0] <= 0:
                errors.append(f"{where}.loguniform: bounds must be > 0")
    return errors


def _cross_field_errors(spec: JobSpec) -> list[str]:
    errors = []
    if spec.prompt.template not in TRAIN_TEMPLATES and "{instruction}" not in spec.prompt.template:
        errors.append(f"prompt.template: {spec.prompt.template!r} is neither a named template "
                      f"({', '.join(TRAIN_TEMPLATES)}) nor a string with {{instruction}} and {{response}}")
    elif spec.prompt.template not in TRAIN_TEMPLATES and "{response}" not in spec.prompt.template:
        errors.append("prompt.template: a custom template needs {response}")
    inference = spec.prompt.inference_template
    if inference not in INFERENCE_TEMPLATES and "{instruction}" not in inference:
        errors.append(f"prompt.inference_template: {inference!r} is neither a named template "
                      f"({', '.join(INFERENCE_TEMPLATES)}) nor a string with {{instruction}}")
    t = spec.training
    if t.save_steps % t.eval_steps != 0:
        errors.append("training.save_steps: must be a multiple of training.eval_steps "
                      "(a checkpoint is ranked by the eval_loss measured at its step)")
    rows_per_step = t.per_device_batch_size * t.gradient_accumulation_steps
    if t.micro_batch_size is not None and (t.micro_batch_size % t.per_device_batch_size
                                           or rows_per_step % t.micro_batch_size):
        errors.append(f"training.micro_batch_size: must be a multiple of training.per_device_batch_size "
                      f"({t.per_device_batch_size}) that divides the {rows_per_step} rows of an optimizer step")
    if t.dequantize_base and not spec.quantization.load_in_4bit:
        errors.append("training.dequantize_base: needs quantization.load_in_4bit: true "
                      "(there is nothing to dequantize)")
    if spec.model.attn_implementation == "varlen" and not t.padding_free:
        errors.append("model.attn_implementation: varlen needs training.padding_free: true")
    if spec.serve.autoscaling.max_replicas < spec.serve.autoscaling.min_replicas:
        errors.append("serve.autoscaling.max_replicas: must be >= serve.autoscaling.min_replicas")
    if spec.tune.search_alg == "optuna" and any("grid" in d for d in spec.tune.search_space.values()):
        errors.append("tune.search_alg: optuna cannot sample grid dimensions")
    errors += _search_space_errors(spec.tune.search_space)
    errors += _tracking_errors(spec.tracking)
    if not errors:  # probed only once the rest is valid, or each probe would repeat the other errors
        errors += _search_value_errors(spec)
    return errors


def _tracking_errors(tracking: TrackingSpec) -> list[str]:
    from urllib.parse import urlsplit

    errors = []
    if len(set(tracking.backends)) != len(tracking.backends):
        errors.append("tracking.backends: names a backend twice")
    if "mlflow" in tracking.backends and not tracking.mlflow.uri:
        errors.append("tracking.mlflow.uri: needed with the mlflow backend (http://HOST:PORT, or a store URI)")
    # The spec is written to spec.yaml, model cards and the trackers themselves: credentials live in the
    # environment only, in the variables the spec names.
    for where, uri, names in (("tracking.mlflow.uri", tracking.mlflow.uri, "tracking.mlflow.*_env"),
                              ("tracking.wandb.base_url", tracking.wandb.base_url, "tracking.wandb.api_key_env")):
        if uri and (urlsplit(uri).username or urlsplit(uri).password):
            errors.append(f"{where}: holds credentials; put them in the environment variables named by {names}")
    return errors


def _search_value_errors(spec: JobSpec) -> list[str]:
    """Every value a trial may draw must give a valid spec: caught before the search, not inside a trial."""
    errors = []
    data = set_values(to_dict(spec), {"tune.search_space": {}})
    for key, dist in spec.tune.search_space.items():
        kind, args = next(iter(dist.items()))
        for value in _probe_values(kind, args):
            try:
                from_dict(set_values(data, {key: value}))
            except SpecError as exc:
                errors += [f"tune.search_space.{key}.{kind}: value {value!r} gives {e}" for e in exc.errors]
    return errors


def _probe_values(kind: str, args: list) -> list:
    """The listed values, or the ends of a range plus an inner point (a float: uniform draws floats)."""
    if kind in ("choice", "grid"):
        return list(args)
    low, high = args
    if kind == "randint":  # Tune's randint excludes `high`
        return [low, high - 1]
    inner = math.sqrt(low * high) if kind == "loguniform" else (low + high) / 2
    return [low, high, float(inner)]


# ---------------------------------------------------------------------------------------------------------------
# Overrides, loading, dumping


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` (no dot) as a float, as YAML 1.2 does; PyYAML's 1.1 rules make it a string,
    which would break numeric ranges such as `{loguniform: [1e-5, 1e-3]}`."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """'training.learning_rate=1e-3' -> ('training.learning_rate', 0.001); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError([f"{text}: overrides look like section.field=value"])
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SpecError([f"{key}: cannot parse {raw!r} ({exc.problem})"]) from None
    return key.strip(), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of `data` with each `a.b.c=value` set (creating sections as needed)."""
    return set_values(data, dict(parse_override(text) for text in overrides))


def set_values(data: dict, values: dict[str, Any]) -> dict:
    """Return a copy of `data` with each dotted path set to its value."""
    data = _deep_copy(data)
    for key, value in values.items():
        # A search-space key is itself dotted: everything after `tune.search_space.` is one key.
        if key.startswith("tune.search_space."):
            parts = ["tune", "search_space", key.removeprefix("tune.search_space.")]
        else:
            parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError([f"{key}: {part} is not a section"])
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data):
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def from_dict(data: dict, default_name: str = "job") -> JobSpec:
    """Validate plain data into a JobSpec, raising SpecError with every problem found."""
    if not isinstance(data, dict):
        raise SpecError(["<spec>: must be a mapping of sections"])
    errors: list[str] = []
    spec = build(JobSpec, data, "", errors)
    if errors:
        # The search space depends on no other field: report its errors now too (all errors at once).
        if spec is not None and not any(e.startswith("tune.search_space") for e in errors):
            errors += _search_space_errors(spec.tune.search_space)
        raise SpecError(errors)
    if spec.output.name is None:
        spec.output.name = default_name
    errors = _cross_field_errors(spec)
    if errors:
        raise SpecError(errors)
    return spec


def load(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Load a YAML job spec, apply overrides, resolve relative data paths against the spec's folder."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"{path}: no such spec file"])
    try:
        data = _load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SpecError([_yaml_error(path, exc)]) from None
    spec = from_dict(apply_overrides(data, list(overrides)), default_name=path.stem)
    spec.data.source = _resolve_local(spec.data.source, path.parent)
    return spec


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """`file:line:column: problem`, as editors and compilers say it (PyYAML counts from 0 and names no file)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start:
        context += f" that starts at line {start.line + 1}, column {start.column + 1}"
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def _resolve_local(source: str, base: Path) -> str:
    candidate = base / source
    if not Path(source).is_absolute() and candidate.exists():
        return str(candidate.resolve())
    return source


def to_dict(spec: JobSpec) -> dict:
    return dataclasses.asdict(spec)


def to_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(to_dict(spec), sort_keys=False, allow_unicode=True)


def with_values(spec: JobSpec, values: dict[str, Any]) -> JobSpec:
    """A new validated spec with dotted-path values set (how tune builds each trial's spec)."""
    return from_dict(set_values(to_dict(spec), values), default_name=spec.output.name)


def with_overrides(spec: JobSpec, overrides: list[str]) -> JobSpec:
    """A new validated spec with `k=v` overrides on top (a spec that comes from a run folder, not a file)."""
    return with_values(spec, dict(parse_override(text) for text in overrides))
