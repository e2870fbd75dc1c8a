"""The recipe's publish phase and the hand-off to other servers.

push: the adapter, its tokenizer and its model card to a Hub repo (token from HF_TOKEN only). `stage` builds the
exact folder that is uploaded; --dry-run writes that folder and uploads nothing.
export: the base loaded unquantized (its original weights, not the 4-bit ones) with the adapter merged in, saved
as a plain transformers model; `check` lists adapter features other servers refuse, before a deployment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ray_sft import generate, modeling, run_files

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
TOKEN_ENV = "HF_TOKEN"
# vLLM's default --max-lora-rank; servers started with a larger limit accept more.
DEFAULT_MAX_RANK = 16


class PublishError(ValueError):
    """Bad input for push/export (no token, not an adapter, bad repo id): exit 2."""


# ---------------------------------------------------------------------------------------------------------------
# push


def stage(adapter: str | Path, out: str | Path, repo: str | None = None) -> list[str]:
    """Write exactly what `push` uploads into `out`; returns the file names, sorted.

    The adapter and tokenizer files as train exported them, and the model card (README.md), whose usage snippet
    names `repo` (default: the run's output.hub_repo). A local base path in adapter_config.json is replaced by the
    run's Hub id when the run trained on one: a path on this machine means nothing to the repo's users.
    """
    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_model.safetensors").is_file() or not (adapter / "adapter_config.json").is_file():
        raise PublishError(f"{adapter}: not an adapter folder (needs adapter_config.json and "
                           "adapter_model.safetensors)")
    if out.exists() and any(out.iterdir()):
        raise PublishError(f"{out}: exists and is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in run_files.ADAPTER_FILES + run_files.TOKENIZER_FILES:
        if (adapter / name).is_file():
            shutil.copy2(adapter / name, out / name)
    spec = generate.run_spec(adapter)
    _write_card(adapter, out / "README.md", spec, repo or spec.output.hub_repo)
    _hub_base(out / "adapter_config.json", spec.model.name_or_path)
    return sorted(p.name for p in out.iterdir())


def _write_card(adapter: Path, card: Path, spec, repo: str | None) -> None:
    """The card train wrote (it holds the run's final metrics), else a new one, with the usage snippet's repo."""
    source = adapter / "README.md"
    text = source.read_text(encoding="utf-8") if source.is_file() else \
        run_files.model_card(spec, generate.base_of(adapter), {})
    if repo:
        text = text.replace(repr(run_files.USAGE_REPO), repr(repo))
    card.write_text(text, encoding="utf-8")


def _hub_base(config_path: Path, named_base: str) -> None:
    config = json.loads(config_path.read_text())
    if Path(config["base_model_name_or_path"]).is_absolute() and REPO_ID.match(named_base) \
            and not Path(named_base).exists():
        config["base_model_name_or_path"] = named_base
        config_path.write_text(json.dumps(config, indent=2))


def hub_token() -> str:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise PublishError(f"push: no Hugging Face token: set {TOKEN_ENV} (a write token; it is read from the "
                           "environment only, never from a file or the command line)")
    return token


def push(adapter: str | Path, repo: str, private: bool, api=None) -> tuple[str, list[str]]:
    """Upload the staged folder to `repo` (created if missing, made `private` or public before anything is
    uploaded); returns (the repo URL, the files uploaded). `api`: an HfApi (default: one with HF_TOKEN)."""
    from huggingface_hub import HfApi

    if not REPO_ID.match(repo):
        raise PublishError(f"--repo {repo!r}: use OWNER/NAME")
    api = api or HfApi(token=hub_token())
    with tempfile.TemporaryDirectory(prefix="ray-sft-push-") as staging:
        files = stage(adapter, Path(staging) / "upload", repo)
        url = api.create_repo(repo, private=private, exist_ok=True)
        _enforce_visibility(api, repo, private)
        api.upload_folder(repo_id=repo, folder_path=str(Path(staging) / "upload"),
                          commit_message="Upload QLoRA adapter (ray_sft)")
    return str(url), files


def _enforce_visibility(api, repo: str, private: bool) -> None:
    """create_repo(exist_ok=True) leaves an existing repo as it was: a public one would stay public."""
    from huggingface_hub.errors import HfHubHTTPError

    if api.repo_info(repo).private == private:
        return
    wanted = "private" if private else "public"
    try:
        api.update_repo_settings(repo, private=private)
    except HfHubHTTPError as exc:
        raise PublishError(f"push: {repo} exists and is not {wanted}, and this token cannot change that ({exc}); "
                           "nothing was uploaded") from None
    if api.repo_info(repo).private != private:
        raise PublishError(f"push: {repo} is still not {wanted} after asking the Hub to make it so; "
                           "nothing was uploaded")


def default_private(adapter: str | Path) -> bool:
    """The run's output.hub_private (private unless the spec says otherwise)."""
    return generate.run_spec(adapter).output.hub_private


# ---------------------------------------------------------------------------------------------------------------
# export


@dataclass
class Problem:
    feature: str
    why: str


def check(adapter: str | Path, max_rank: int = DEFAULT_MAX_RANK) -> list[Problem]:
    """Adapter features that LoRA-serving engines (vLLM, TGI, ...) reject or silently drop.

    Each is fine for `ray-sft serve` and for a merged export (`export --merge` folds all of them in).
    """
    config_path = Path(adapter) / "adapter_config.json"
    if not config_path.is_file():
        raise PublishError(f"{adapter}: not an adapter folder (no adapter_config.json)")
    config = json.loads(config_path.read_text())
    problems = []
    if config.get("modules_to_save"):
        problems.append(Problem(f"modules_to_save={config['modules_to_save']}",
                                "fully trained copies of whole modules; LoRA servers load only the low-rank "
                                "weights and reject the adapter or serve it without these copies"))
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    heads = [t for t in targets if t in ("lm_head", "embed_tokens", "wte", "embed_in")]
    if heads:
        problems.append(Problem(f"target_modules includes {heads}",
                                "LoRA on the embedding or output head is unsupported by most servers"))
    if config.get("r", 0) > max_rank:
        problems.append(Problem(f"r={config['r']}", f"above the server's max LoRA rank ({max_rank}; vLLM's "
                                                      "default, raise it with --max-lora-rank)"))
    if config.get("use_dora"):
        problems.append(Problem("use_dora=true", "DoRA adapters are not servable as plain LoRA"))
    if config.get("bias", "none") != "none":
        problems.append(Problem(f"bias={config['bias']}", "trained biases are not loaded by LoRA servers"))
    return problems


def export_merged(adapter: str | Path, out: str | Path, base: str | None = None, dtype: str = "bfloat16",
                  trust_remote_code: bool = False) -> Path:
    """Base (unquantized, original weights) + adapter, merged in float32 and saved in `dtype` with the tokenizer.

    Merging into the original weights rather than the dequantized 4-bit ones gives the full-precision model with
    the learned update, which is what other servers expect to load; the 4-bit forward the adapter was evaluated
    with differs from it by the quantization error.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PublishError(f"{out}: exists and is not empty; give a new folder")
    base = base or generate.base_of(adapter)
    spec = generate.run_spec(adapter, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(base, revision=spec.model.revision, dtype=torch.float32,
                                                 trust_remote_code=spec.model.trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer = modeling.load_tokenizer(base, spec.model)
    tokenizer.padding_side = "left"  # what generation wants; a training user sets their own
    tokenizer.save_pretrained(out)
    _merged_card(out, adapter, base, dtype)
    return out


def _merged_card(out: Path, adapter: str | Path, base: str, dtype: str) -> None:
    source = Path(adapter) / "README.md"
    body = source.read_text(encoding="utf-8").split("---", 2)[-1] if source.is_file() else ""
    hub_base = run_files.hub_base_id(generate.run_spec(adapter), base)
    header = ["---", *([f"base_model: {hub_base}"] if hub_base else []), "library_name: transformers",
              "tags: [merged-lora, sft, ray_sft]", "---",
              f"Merged model: the base's original weights plus the LoRA update, saved in {dtype}.", ""]
    (out / "README.md").write_text("\n".join(header) + body, encoding="utf-8")
