"""The files a run leaves in <output.dir>/<output.name>/: spec, metrics, plots, the exported adapter.

Driver-side and controller-side only (no training here): `train` and `tune` call these at their edges.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import yaml

from ray_sft.console import show
from ray_sft.data import render_prompt
from ray_sft.spec import JobSpec, is_hub_id, to_dict, to_yaml
from ray_sft.tracking import public_links

METRICS = "metrics.jsonl"
RAY_RUN = "ray_run.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def write_spec(run_dir: Path, spec: JobSpec) -> None:
    # The spec holds names of environment variables, never their values: it is safe to write as is.
    (run_dir / "spec.yaml").write_text(to_yaml(spec), encoding="utf-8")


def ray_run_name(run_dir: Path, resume: bool) -> str:
    """Ray Train's run name: new for a fresh run, the recorded one for --resume."""
    record = run_dir / RAY_RUN
    if resume:
        if not record.is_file():
            raise FileNotFoundError(f"--resume: {run_dir} has no interrupted run to resume ({RAY_RUN} missing)")
        return json.loads(record.read_text())["name"]
    name = f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1_000_000:06d}"
    record.write_text(json.dumps({"name": name}))
    return name


def reset_run_outputs(run_dir: Path) -> None:
    """A fresh run replaces the metrics and audit files of an earlier run in the same folder."""
    (run_dir / METRICS).unlink(missing_ok=True)
    (run_dir / ".crash-injected").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "shards", ignore_errors=True)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_line(metrics: dict, started: float) -> str:
    step, total = metrics.get("step", 0), metrics.get("max_steps", 0)
    if "train_runtime" in metrics:  # HF's end-of-training summary
        return (f"[ray-sft] done: {step} steps in {metrics['train_runtime']:.0f}s, "
                f"mean train loss {metrics.get('train_loss', math.nan):.4f}")
    elapsed = time.monotonic() - started
    eta = elapsed / step * (total - step) if step else math.nan
    parts = [f"step {step}/{total}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "eval_loss" in metrics:
        parts.append(f"eval_loss {metrics['eval_loss']:.4f}")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    parts.append(f"ETA {eta:.0f}s" if eta == eta else "ETA ?")
    return "[ray-sft] " + " | ".join(parts)


def _user_callback_base():
    from ray.train import UserCallback

    return UserCallback


class MetricsCallback(_user_callback_base()):
    """Runs in the Ray Train controller: appends rank 0's report to metrics.jsonl and prints a progress line."""

    def __init__(self, run_dir: str, echo: bool = True):
        self.run_dir = run_dir
        self.echo = echo  # off in a tune trial, whose progress the search prints per trial
        self.started = time.monotonic()

    def after_report(self, run_context, metrics, checkpoint):
        record = dict(metrics[0])
        record["time"] = time.time()
        if checkpoint is not None:
            record["checkpoint"] = checkpoint.path
        with open(Path(self.run_dir) / METRICS, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        if self.echo:
            show(progress_line(record, self.started))


def export_adapter(checkpoint, run_dir: Path, spec: JobSpec, base_model: str, metrics: dict,
                   target: Path | None = None, tracking: dict | None = None) -> Path:
    """Copy the adapter + tokenizer out of a Ray checkpoint into `target` (default <run>/adapter) with a card that
    names the tracking runs in `tracking` (tracking.Tracker.links)."""
    target = Path(target or run_dir / "adapter")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with checkpoint.as_directory() as source:
        source = Path(source)
        missing = [f for f in ADAPTER_FILES if not (source / f).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {checkpoint.path} has no {', '.join(missing)}")
        staging.mkdir(parents=True)
        for name in ADAPTER_FILES + TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
    _point_adapter_at_base(staging / "adapter_config.json", spec, base_model)
    (staging / "README.md").write_text(model_card(spec, base_model, metrics, tracking), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # readers never see a half-written adapter
    return target


def _point_adapter_at_base(config_path: Path, spec: JobSpec, base_model: str) -> None:
    """Record the base the adapter was trained on (Hub id, or the resolved local path for tiny/local models)."""
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model
    config["revision"] = spec.model.revision
    config_path.write_text(json.dumps(config, indent=2))


# The usage snippet's repo until `push` knows it (publish.stage puts the real one in).
USAGE_REPO = "OWNER/NAME"


def model_card(spec: JobSpec, base_model: str, metrics: dict, tracking: dict | None = None) -> str:
    """The adapter's README: Hub metadata, what it was trained on and how to use it.

    A path on this machine means nothing to the card's readers and tells them about the machine: the base and
    the data are named by Hub id, else by file or folder name, and so are local paths in the spec it shows.
    """
    hub_base = hub_base_id(spec, base_model)
    shown_base = hub_base or Path(base_model).name
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "max_steps"}
    lines = [
        "---",
        _card_metadata(spec, hub_base).rstrip(),
        "---",
        f"# {spec.output.name}",
        "",
        f"QLoRA adapter trained by ray_sft on `{public_ref(spec.data.source)}`"
        + (f" (first {spec.data.max_rows} rows)" if spec.data.max_rows else "") + ".",
        "",
        f"- Base model: `{shown_base}`" + ("" if hub_base else " (a local model, not on the Hub)"),
        f"- Quantization: 4-bit {spec.quantization.quant_type}, double quant {spec.quantization.double_quant}, "
        f"compute {spec.quantization.compute_dtype}" if spec.quantization.load_in_4bit else "- Base in full precision",
        f"- LoRA: r={spec.lora.r}, alpha={spec.lora.alpha:g}, dropout={spec.lora.dropout:g}, "
        f"modules_to_save={spec.lora.modules_to_save}",
        f"- Prompt template: `{spec.prompt.template}`; inference template: `{spec.prompt.inference_template}`",
        "",
        "## Usage",
        "",
        "```python",
        _usage(spec, shown_base),
        "```",
        "",
        "## Final metrics",
        "",
        *[f"- {k}: {v:.6g}" for k, v in sorted(shown.items())],
        "",
        *(["## Tracking", "", *public_links(tracking), ""] if tracking else []),
        "## Resolved job spec",
        "",
        "```yaml",
        yaml.safe_dump(_public_paths(_made_by(to_dict(spec))), sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def hub_base_id(spec: JobSpec, base_model: str) -> str | None:
    """The base's Hub id (the spec's name, else the resolved one), or None for a model that is only local."""
    named = spec.model.name_or_path
    if named != "tiny" and is_hub_id(named):
        return named
    return base_model if is_hub_id(base_model) else None


def public_ref(ref: str) -> str:
    """A model or data reference as a published file may show it: a Hub id as is, a local path by its name."""
    return ref if is_hub_id(ref) else Path(ref).name


def _made_by(spec: dict) -> dict:
    """The spec without its tracking section: where a run was tracked is not how the adapter was made, and a
    tracking server's address is not for a public card (the Tracking section names the runs by id)."""
    return {k: v for k, v in spec.items() if k != "tracking"}


def _public_paths(value):
    if isinstance(value, dict):
        return {k: _public_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public_paths(v) for v in value]
    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    return value


def _card_metadata(spec: JobSpec, hub_base: str | None) -> str:
    # The Hub rejects a card whose base_model is not a Hub model: a local base is left out.
    meta = {**({"base_model": hub_base} if hub_base else {}), "library_name": "peft",
            "license": spec.output.hub_license, "language": spec.output.hub_language,
            "tags": ["qlora", "sft", "ray_sft"]}
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=None)


def _usage_instruction(spec: JobSpec) -> str:
    return spec.generation.sample_prompts[0] if spec.generation.sample_prompts else "YOUR INSTRUCTION"


def _usage(spec: JobSpec, base: str) -> str:
    g = spec.generation
    sampling = (f"do_sample=True, temperature={g.temperature}, top_p={g.top_p}" if g.do_sample
                else "do_sample=False")
    return "\n".join([
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "# Trained on the base loaded in 4-bit; `ray-sft generate --adapter` reproduces that set-up exactly.",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        f"model = PeftModel.from_pretrained(base, {USAGE_REPO!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({USAGE_REPO!r})",
        f"prompt = {render_prompt(spec.prompt.inference_template, _usage_instruction(spec))!r}",
        'ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")',
        f"out = model.generate(**ids, max_new_tokens={g.max_new_tokens}, {sampling}, "
        f"repetition_penalty={g.repetition_penalty})",
        'print(tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True))',
    ])


def plot_loss(run_dir: Path) -> Path | None:
    """loss.png: train and eval loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(Path(run_dir).name)
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
