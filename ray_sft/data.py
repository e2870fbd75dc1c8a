"""Instruction rows in, training texts out: reading, validation, prompt templates, EOS, train/eval split.

Knows nothing about Ray workers: `load_examples` returns plain lists that `train` hands to Ray Data.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ray_sft.spec import DataSpec, JobSpec, PromptSpec
from ray_sft.templates import CONTEXT_FALLBACK, INFERENCE_TEMPLATES, TRAIN_TEMPLATES

log = logging.getLogger(__name__)

LOCAL_FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
REQUIRED_COLUMNS = ("instruction", "response")


class DataError(ValueError):
    """Input data that cannot be used as asked; the message names the source, row and column."""


@dataclass
class Examples:
    train: list[dict]  # {"text": str, "row": int} with row = index in the source after max_rows
    eval: list[dict]
    skipped: Counter = field(default_factory=Counter)  # reason -> count, for rows dropped by on_bad_rows=skip


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_rows(data: DataSpec) -> list[dict]:
    """Rows of a local file or a Hub dataset, first `max_rows` only."""
    path = Path(data.source)
    if path.suffix.lower() in LOCAL_FORMATS or path.exists():
        rows = read_file(path)
    else:
        rows = _read_hub(data.source, data.split, data.max_rows)
    return rows[: data.max_rows] if data.max_rows else rows


def read_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"data.source: {path}: no such file")
    kind = LOCAL_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"data.source: {path}: unknown format (use one of {', '.join(LOCAL_FORMATS)})")
    try:
        if kind in ("json", "jsonl"):
            return _read_json(path)
        import pandas as pd

        if kind == "csv":  # empty cells stay "" (dolly's empty `context`), not NaN
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            frame = pd.read_parquet(path)
        return frame.to_dict(orient="records")
    except DataError:
        raise
    except Exception as exc:  # parser errors from pandas/pyarrow: say which file
        raise DataError(f"data.source: {path}: cannot read {kind}: {exc}") from None


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"data.source: {path}: invalid JSON ({exc})") from None
    else:  # JSON lines, which is also what datasets' to_json writes for a .json file
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"data.source: {path}: line {number}: invalid JSON ({exc.msg})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"data.source: {path}: every record must be a JSON object")
    return rows


def _read_hub(dataset_id: str, split: str, max_rows: int | None) -> list[dict]:
    import datasets

    split_expr = f"{split}[:{max_rows}]" if max_rows else split
    try:
        return datasets.load_dataset(dataset_id, split=split_expr).to_list()
    except Exception as exc:  # DatasetNotFoundError, offline ConnectionError, bad split, ...
        raise DataError(f"data.source: cannot load dataset {dataset_id!r} split {split!r}: "
                        f"{type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Templates


def render_train(template: str, row: dict) -> str:
    """The training text of one row (without EOS): a named template or a custom format string."""
    has_context = bool(str(row.get("context") or "").strip())
    if template in CONTEXT_FALLBACK and not has_context:
        template = CONTEXT_FALLBACK[template]
    text = TRAIN_TEMPLATES.get(template, template)
    return text.format(instruction=row["instruction"], response=row["response"], context=row.get("context") or "")


def render_prompt(template: str, instruction: str) -> str:
    """The inference prompt for one instruction."""
    return INFERENCE_TEMPLATES.get(template, template).format(instruction=instruction)


# ---------------------------------------------------------------------------------------------------------------
# Validation and formatting


def row_problem(row: dict) -> tuple[str, str] | None:
    """(column, reason) why a row cannot be trained on, or None."""
    for column in REQUIRED_COLUMNS:
        value = row.get(column)
        if column not in row:
            return column, "missing"
        if not isinstance(value, str):
            return column, f"must be a string, got {type(value).__name__}"
        if not value.strip():
            return column, "empty"
    context = row.get("context")
    if context is not None and not isinstance(context, str):
        return "context", f"must be a string, got {type(context).__name__}"
    return None


def format_rows(rows: list[dict], data: DataSpec, prompt: PromptSpec, tokenizer, max_length: int) -> Examples:
    """Validate every row, render it with the template + EOS, enforce max_length, split train/eval."""
    eos = tokenizer.eos_token if prompt.append_eos else ""
    kept: list[dict] = []
    skipped: Counter = Counter()
    errors: list[str] = []
    for index, row in enumerate(rows):
        problem = row_problem(row)
        if problem is None:
            text = render_train(prompt.template, row) + eos
            length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if length <= max_length or data.on_bad_rows == "truncate":
                kept.append({"text": text, "row": index})
                continue
            problem = ("response", f"too long: {length} tokens with the template > training.max_length {max_length}")
        column, reason = problem
        if data.on_bad_rows == "skip":
            skipped[f"{column} {reason.split(':')[0]}"] += 1
        else:
            errors.append(f"row {index}, column {column!r}: {reason}")
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"data.source: {len(errors)} bad row(s) in {data.source} "
                        "(data.on_bad_rows: skip drops them):\n  " + "\n  ".join(errors[:20]) + more)
    if skipped:
        log.warning("skipped %d bad row(s): %s", sum(skipped.values()),
                    ", ".join(f"{n} x {why}" for why, n in skipped.most_common()))
    if not kept:
        raise DataError(f"data.source: no usable rows in {data.source}")
    return split_examples(kept, data.eval_rows, data.seed, skipped)


def split_examples(examples: list[dict], eval_rows: int, seed: int, skipped: Counter | None = None) -> Examples:
    """Deterministic split: a seeded shuffle of the row order picks `eval_rows` rows for eval."""
    if eval_rows >= len(examples):
        raise DataError(f"data.eval_rows: {eval_rows} leaves no training rows (only {len(examples)} usable)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    eval_ids = set(order[:eval_rows])
    return Examples(
        train=[e for i, e in enumerate(examples) if i not in eval_ids],
        eval=[e for i, e in enumerate(examples) if i in eval_ids],
        skipped=skipped or Counter(),
    )


def load_examples(spec: JobSpec, tokenizer) -> Examples:
    return format_rows(read_rows(spec.data), spec.data, spec.prompt, tokenizer, spec.training.max_length)


def count_tokens(texts: list[str], tokenizer) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
