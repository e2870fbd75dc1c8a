"""Instruction rows in, training texts out: reading, validation, prompt templates, EOS, train/eval split.

Knows nothing about Ray workers: `load_examples` returns plain lists that `train` puts in Ray's object store.
"""

from __future__ import annotations

import json
import logging
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ray_sft.spec import DataSpec, JobSpec, PromptSpec
from ray_sft.templates import CONTEXT_FALLBACK, INFERENCE_TEMPLATES, TRAIN_TEMPLATES

log = logging.getLogger(__name__)

LOCAL_FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
REQUIRED_COLUMNS = ("instruction", "response")
# owner/name or name, as the Hub accepts them (letters, digits, '-', '_', '.').
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class DataError(ValueError):
    """Input data that cannot be used as asked; the message names the source, row and column."""


@dataclass
class Examples:
    train: list[dict]  # {"text": str, "row": int} with row = index in the source after max_rows
    eval: list[dict]
    skipped: Counter = field(default_factory=Counter)  # reason -> count, for rows dropped by on_bad_rows=skip
    lengths: list[int] = field(default_factory=list)  # tokens of every kept row before truncation (train + eval)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_rows(data: DataSpec) -> list[dict]:
    """Rows of a local file or a Hub dataset, first `max_rows` only."""
    if is_local(data.source):
        rows = read_file(Path(data.source))
    else:
        rows = _read_hub(data.source, data.split, data.max_rows)
    return rows[: data.max_rows] if data.max_rows else rows


def is_local(source: str) -> bool:
    """A file path (a known suffix, or anything that exists) rather than a Hub dataset id."""
    path = Path(source)
    return path.suffix.lower() in LOCAL_FORMATS or path.exists()


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
    lengths: list[int] = []
    skipped: Counter = Counter()
    errors: list[str] = []
    for index, row in enumerate(rows):
        problem = row_problem(row)
        if problem is None:
            text = render_train(prompt.template, row) + eos
            length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if length <= max_length or data.on_bad_rows == "truncate":
                kept.append({"text": text, "row": index})
                lengths.append(length)
                continue
            problem = ("response", f"too long: {length} tokens with the template > training.max_length {max_length}")
        column, reason = problem
        if data.on_bad_rows == "skip":
            skipped[f"{column} {reason.split(':')[0]}"] += 1
        else:
            errors.append(f"row {index}, column {column!r}: {reason}")
    if errors:
        raise _bad_rows_error(data.source, errors)
    if skipped:
        log.warning("skipped %d bad row(s): %s", sum(skipped.values()),
                    ", ".join(f"{n} x {why}" for why, n in skipped.most_common()))
    if not kept:
        raise DataError(f"data.source: no usable rows in {data.source}")
    examples = split_examples(kept, data.eval_rows, data.seed, skipped)
    examples.lengths = lengths
    return examples


def _bad_rows_error(source: str, errors: list[str]) -> DataError:
    more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
    return DataError(f"data.source: {len(errors)} bad row(s) in {source} "
                     "(data.on_bad_rows: skip drops them):\n  " + "\n  ".join(errors[:20]) + more)


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


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight: what can be known about the data before any cluster starts


def check_source(data: DataSpec) -> list[dict] | None:
    """The rows of a local source after the checks that need no tokenizer (it exists, parses, is not empty, has
    the template's columns; with on_bad_rows error/truncate, no malformed row); None for a Hub id, which is only
    checked for form here (downloading it is the run's job)."""
    if not is_local(data.source):
        if not HUB_ID.match(data.source):
            raise DataError(f"data.source: {data.source!r} is neither an existing file nor a Hub dataset id "
                            "(owner/name)")
        return None
    rows = read_rows(data)
    if not rows:
        raise DataError(f"data.source: {data.source}: no rows (the file is empty)")
    found = sorted({column for row in rows for column in row})
    missing = [column for column in REQUIRED_COLUMNS if column not in found]
    if missing:
        raise DataError(f"data.source: {data.source}: no {', '.join(map(repr, missing))} column in any row; "
                        f"the file has columns {', '.join(found)}; the templates need {', '.join(REQUIRED_COLUMNS)} "
                        "(context optional): rename the columns")
    if data.on_bad_rows != "skip":
        errors = [f"row {i}, column {p[0]!r}: {p[1]}" for i, row in enumerate(rows) if (p := row_problem(row))]
        if errors:
            raise _bad_rows_error(data.source, errors)
    return rows


def describe(examples: Examples, max_length: int) -> str:
    """One line: usable rows, the split, and the token lengths against max_length."""
    lengths = examples.lengths
    over = sum(length > max_length for length in lengths)
    skipped = sum(examples.skipped.values())
    return (f"{len(examples.train) + len(examples.eval)} usable rows ({len(examples.train)} train, "
            f"{len(examples.eval)} eval{f', {skipped} skipped' if skipped else ''}); tokens per row "
            f"min {min(lengths)} / median {statistics.median(lengths):g} / max {max(lengths)}, "
            f"{over} over training.max_length {max_length}{' (truncated)' if over else ''}")


def load_examples(spec: JobSpec, tokenizer) -> Examples:
    return format_rows(read_rows(spec.data), spec.data, spec.prompt, tokenizer, spec.training.max_length)


def count_tokens(texts: list[str], tokenizer) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
