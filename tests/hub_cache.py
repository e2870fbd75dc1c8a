"""A Hugging Face home pre-populated with the recipe's two Hub repos, built from this project's own assets.

No Hub is reachable here, and no self-hosted Hub server on PyPI serves the current clients (olah 0.5.4 in offline
mode answers 401 "Repository not found" to `GET /api/models/<id>` and to files or folders a repo lacks, where the
Hub answers 200 and 404; tests/test_hub.py's docstring has the details). So the repos go into the caches the
clients themselves read with `HF_HUB_OFFLINE=1`: transformers loads the model through huggingface_hub's hub cache
(refs -> snapshots -> blobs), and datasets loads a Hub id offline from its own prepared-Arrow cache, which
datasets' json builder writes here exactly as a first online `load_dataset` would.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MODEL_ID = "llm-jp/llm-jp-3-1.8b"
DATASET_ID = "llm-jp/databricks-dolly-15k-ja"
# The real dataset repo holds one JSON-lines file with these columns.
DATASET_FILE = "databricks-dolly-15k-ja.jsonl"
DATASET_COLUMNS = ("instruction", "context", "response", "category")


def populate(home: Path, model_dir: Path, rows_file: Path) -> dict[str, str]:
    """Fill `home` (an HF_HOME) with the model and dataset repos; the environment that makes the clients use it."""
    add_repo(home / "hub", "model", MODEL_ID, {f.name: f for f in sorted(model_dir.iterdir()) if f.is_file()})
    snapshot = add_repo(home / "hub", "dataset", DATASET_ID, {DATASET_FILE: rows_file})
    prepare_dataset(home / "datasets", DATASET_ID, snapshot / DATASET_FILE)
    return offline_env(home)


def offline_env(home: Path) -> dict[str, str]:
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def add_repo(hub: Path, repo_type: str, repo_id: str, files: dict[str, Path]) -> Path:
    """One repo in huggingface_hub's cache layout: blobs by content hash, snapshot links, refs/main -> commit."""
    repo_dir = hub / f"{repo_type}s--{repo_id.replace('/', '--')}"
    # The commit id only has to be stable for the same files, as a real one is.
    commit = hashlib.sha1(b"".join(_blob_id(p).encode() + name.encode() for name, p in files.items())).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for name, path in files.items():
        blob = repo_dir / "blobs" / _blob_id(path)
        if not blob.exists():
            blob.write_bytes(path.read_bytes())
        link = snapshot / name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def _blob_id(path: Path) -> str:
    """The blob name the Hub's etag gives: sha256 for large (LFS) files, the git blob sha1 otherwise."""
    data = path.read_bytes()
    if len(data) > 10 * 1024 * 1024 or path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def prepare_dataset(cache: Path, repo_id: str, data_file: Path) -> None:
    """datasets' own prepared cache of `repo_id`'s default config: what load_dataset(repo_id) finds offline.

    The json builder writes it from the snapshot's file into the folder a Hub load of that commit would use
    (`owner___name/default/0.0.0/<commit>`); given the repo id instead, it would insist on fetching hf:// URLs.
    """
    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    builder = Json(cache_dir=str(cache), dataset_name=name, config_name="default",
                   data_files={"train": [str(data_file)]})
    builder.download_and_prepare(str(cache / f"{owner}___{name}" / "default" / "0.0.0" / data_file.parent.name))
