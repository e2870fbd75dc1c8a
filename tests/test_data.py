"""Data: the recipe's template byte for byte, bad rows (error / skip / truncate), local formats, Hub errors, split."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from ray_sft import data as data_mod
from ray_sft.data import DataError, format_rows, read_rows, render_prompt, render_train, split_examples
from ray_sft.spec import DataSpec, PromptSpec

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "jobs" / "data" / "dolly-ja-mini.jsonl"

# The recipe's training prompt, written out from seed-recipe.md (not imported from ray_sft.templates).
RECIPE_TRAIN = ("\nあなたは優秀なアシスタントです。指示に対して適切な回答を行なってください。"
                "\n### 指示\n{instruction}\n### 回答\n{response}")
RECIPE_INFERENCE = "\n### 指示\n{input}\n### 回答:\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    # The tiny model's tokenizer, loaded without importing torch (AutoTokenizer / modeling.load_tokenizer pull it
    # in, seconds on this machine); test_tiny checks load_tokenizer gives the same token ids.
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def bundled_rows():
    return [json.loads(line) for line in BUNDLED.read_text(encoding="utf-8").splitlines() if line.strip()]


def row(instruction="質問です", response="回答です", context="", category="open_qa"):
    return {"instruction": instruction, "context": context, "response": response, "category": category}


def fmt(rows, tokenizer, max_length=1024, prompt=None, **data_kwargs):
    return format_rows(rows, DataSpec(source="test-rows", **data_kwargs), prompt or PromptSpec(), tokenizer, max_length)


# ---------------------------------------------------------------------------------------------------------------
# Templates


def test_recipe_template_byte_for_byte(tokenizer, bundled_rows):
    first = bundled_rows[0]
    examples = fmt([first], tokenizer)
    (example,) = examples.train
    expected = ("\nあなたは優秀なアシスタントです。指示に対して適切な回答を行なってください。\n### 指示\n"
                + first["instruction"] + "\n### 回答\n" + first["response"] + tokenizer.eos_token)
    assert example["text"] == expected
    assert example["text"].encode("utf-8") == expected.encode("utf-8")
    assert example["text"] == RECIPE_TRAIN.format(instruction=first["instruction"], response=first["response"]) + "</s>"
    assert example["row"] == 0


def test_recipe_template_ignores_context(tokenizer):
    (example,) = fmt([row(context="参考文")], tokenizer).train
    assert "参考文" not in example["text"]
    assert example["text"] == RECIPE_TRAIN.format(instruction="質問です", response="回答です") + "</s>"


def test_append_eos_off(tokenizer):
    (example,) = fmt([row()], tokenizer, prompt=PromptSpec(append_eos=False)).train
    assert example["text"] == RECIPE_TRAIN.format(instruction="質問です", response="回答です")


def test_recipe_context_uses_context_only_when_non_empty():
    with_context = render_train("recipe_context", row(context="東京は日本の首都です。"))
    assert with_context == ("\nあなたは優秀なアシスタントです。指示に対して適切な回答を行なってください。\n### 指示\n質問です"
                            "\n### 入力\n東京は日本の首都です。\n### 回答\n回答です")
    plain = RECIPE_TRAIN.format(instruction="質問です", response="回答です")
    assert render_train("recipe_context", row(context="")) == plain
    assert render_train("recipe_context", row(context="   ")) == plain
    no_column = {"instruction": "質問です", "response": "回答です"}
    assert render_train("recipe_context", no_column) == plain
    assert render_train("recipe", row(context="東京は日本の首都です。")) == plain


def test_custom_template():
    assert render_train("Q: {instruction}\nA: {response}", row()) == "Q: 質問です\nA: 回答です"


def test_inference_template():
    assert render_prompt("recipe", "時間管理能力をあげるには?") == RECIPE_INFERENCE.format(input="時間管理能力をあげるには?")
    assert render_prompt("recipe", "x") == "\n### 指示\nx\n### 回答:\n"
    # The train-matching variant is the training text up to where the response starts.
    train_text = RECIPE_TRAIN.format(instruction="x", response="y")
    assert train_text == render_prompt("train_match", "x") + "y"


# ---------------------------------------------------------------------------------------------------------------
# Bad rows


BAD_ROWS = [
    ({"context": "", "response": "回答です"}, "instruction", "missing"),
    (row(instruction=""), "instruction", "empty"),
    (row(instruction="  \n "), "instruction", "empty"),
    (row(instruction=7), "instruction", "must be a string, got int"),
    ({"instruction": "質問です", "context": ""}, "response", "missing"),
    (row(response=None), "response", "must be a string, got NoneType"),
    (row(response=3.5), "response", "must be a string, got float"),
    (row(response=["a"]), "response", "must be a string, got list"),
    (row(context=12), "context", "must be a string, got int"),
]


@pytest.mark.parametrize("bad, column, reason", BAD_ROWS)
def test_bad_row_error_names_row_and_column(tokenizer, bad, column, reason):
    rows = [row(), row(), bad, row()]
    with pytest.raises(DataError) as info:
        fmt(rows, tokenizer)
    message = str(info.value)
    assert f"row 2, column {column!r}: {reason}" in message
    assert "data.source" in message and "test-rows" in message
    assert "row 0" not in message and "row 1" not in message and "row 3" not in message


def test_over_long_row_error(tokenizer):
    long_response = "とても長い回答です。" * 50
    length = len(tokenizer(render_train("recipe", row(response=long_response)) + "</s>",
                           add_special_tokens=False)["input_ids"])
    assert length > 64
    with pytest.raises(DataError) as info:
        fmt([row(), row(response=long_response)], tokenizer, max_length=64)
    assert f"row 1, column 'response': too long: {length} tokens" in str(info.value)
    assert "training.max_length 64" in str(info.value)


def test_row_exactly_at_max_length_is_kept(tokenizer):
    text = render_train("recipe", row()) + tokenizer.eos_token
    length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert len(fmt([row()], tokenizer, max_length=length).train) == 1
    with pytest.raises(DataError):
        fmt([row()], tokenizer, max_length=length - 1)


def test_every_bad_row_is_reported(tokenizer):
    rows = [row(instruction=""), row(), row(response=1), row()]
    with pytest.raises(DataError) as info:
        fmt(rows, tokenizer)
    message = str(info.value)
    assert "2 bad row(s)" in message
    assert "row 0, column 'instruction': empty" in message and "row 2, column 'response'" in message


def test_skip_drops_and_counts(tokenizer, caplog):
    rows = [row(instruction="一"), {"response": "x"}, row(instruction="二"), row(response=""),
            row(instruction="三", response="長い" * 200), row(instruction="四")]
    with caplog.at_level(logging.WARNING, logger="ray_sft.data"):
        examples = fmt(rows, tokenizer, max_length=64, on_bad_rows="skip")
    kept = sorted(e["row"] for e in examples.train + examples.eval)
    assert kept == [0, 2, 5]
    assert sum(examples.skipped.values()) == 3
    assert examples.skipped["instruction missing"] == 1
    assert examples.skipped["response empty"] == 1
    assert examples.skipped["response too long"] == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "ray_sft.data"]
    assert any(m.startswith("skipped 3 bad row(s)") for m in messages), messages


def test_no_log_line_when_nothing_skipped(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="ray_sft.data"):
        fmt([row(), row()], tokenizer, on_bad_rows="skip")
    assert not [r for r in caplog.records if "skipped" in r.getMessage()]


def test_skip_everything_is_an_error(tokenizer):
    with pytest.raises(DataError, match="no usable rows"):
        fmt([row(instruction=""), row(response="")], tokenizer, on_bad_rows="skip")


def test_truncate_keeps_over_long_rows(tokenizer):
    long_row = row(response="長い" * 200)
    examples = fmt([row(), long_row], tokenizer, max_length=64, on_bad_rows="truncate")
    texts = {e["row"]: e["text"] for e in examples.train}
    assert set(texts) == {0, 1}
    assert texts[1].endswith("長い" * 200 + "</s>")  # kept whole here; the trainer cuts it at max_length
    # truncate still fails on malformed rows, as `error` does.
    with pytest.raises(DataError, match="row 1, column 'instruction': empty"):
        fmt([row(), row(instruction="")], tokenizer, max_length=64, on_bad_rows="truncate")


# ---------------------------------------------------------------------------------------------------------------
# Local formats


@pytest.fixture(scope="module")
def sample(bundled_rows):
    rows = bundled_rows[:30]
    assert any(r["context"] == "" for r in rows) and any(r["context"] for r in rows)
    assert any("\n" in r["response"] for r in rows)  # multi-line cells must survive CSV quoting
    return rows


def write_format(folder: Path, kind: str, rows: list[dict]) -> Path:
    import pandas as pd

    if kind == "json-array":
        path = folder / "rows.json"
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    elif kind == "json-lines":
        path = folder / "rows.json"
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    elif kind == "jsonl":
        path = folder / "rows.jsonl"
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    elif kind == "csv":
        path = folder / "rows.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
    elif kind == "parquet":
        path = folder / "rows.parquet"
        pd.DataFrame(rows).to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("kind", ["json-array", "json-lines", "jsonl", "csv", "parquet"])
def test_local_formats_load_the_same_rows(tmp_path, sample, kind):
    path = write_format(tmp_path, kind, sample)
    rows = read_rows(DataSpec(source=str(path)))
    assert rows == sample
    assert all(isinstance(r["context"], str) for r in rows)
    assert [r["context"] for r in rows] == [r["context"] for r in sample]  # empty context stays ""


def test_csv_empty_context_is_empty_string(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("instruction,context,response,category\n質問,,回答,open_qa\n", encoding="utf-8")
    (loaded,) = read_rows(DataSpec(source=str(path)))
    assert loaded == {"instruction": "質問", "context": "", "response": "回答", "category": "open_qa"}


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_max_rows_takes_the_first_n(tmp_path, sample, kind):
    path = write_format(tmp_path, kind, sample)
    assert read_rows(DataSpec(source=str(path), max_rows=7)) == sample[:7]
    assert read_rows(DataSpec(source=str(path), max_rows=1000)) == sample


def test_missing_file_names_data_source(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        read_rows(DataSpec(source=str(missing)))
    assert str(info.value).startswith("data.source:")
    assert "nope.jsonl" in str(info.value) and "no such file" in str(info.value)


def test_unknown_format(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="data.source: .*unknown format"):
        read_rows(DataSpec(source=str(path)))


@pytest.mark.parametrize("name, content, match", [
    ("bad.jsonl", '{"instruction": "a", "response": "b"}\n{not json}\n', "line 2: invalid JSON"),
    ("bad.json", '[{"instruction": "a"},', "invalid JSON"),
    ("list.jsonl", '["a", "b"]\n', "every record must be a JSON object"),
    ("bad.parquet", "this is not parquet", "cannot read parquet"),
])
def test_corrupt_files_are_data_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match) as info:
        read_rows(DataSpec(source=str(path)))
    assert name in str(info.value)


def test_unknown_hub_dataset_is_a_data_error_and_fast():
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        read_rows(DataSpec(source="ray-sft-tests/no-such-dataset-xyz"))
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert message.startswith("data.source: cannot load dataset 'ray-sft-tests/no-such-dataset-xyz'")
    assert "Traceback" not in message


# ---------------------------------------------------------------------------------------------------------------
# Split


def examples(n):
    return [{"text": f"t{i}", "row": i} for i in range(n)]


def test_split_is_deterministic_disjoint_and_sized():
    first = split_examples(examples(50), 10, seed=7)
    again = split_examples(examples(50), 10, seed=7)
    assert first.train == again.train and first.eval == again.eval
    assert len(first.eval) == 10 and len(first.train) == 40
    train_rows = {e["row"] for e in first.train}
    eval_rows = {e["row"] for e in first.eval}
    assert not train_rows & eval_rows
    assert train_rows | eval_rows == set(range(50))
    # The eval rows are a seeded sample, not simply the tail (or head) of the file.
    assert eval_rows != set(range(40, 50)) and eval_rows != set(range(10))
    other = split_examples(examples(50), 10, seed=8)
    assert {e["row"] for e in other.eval} != eval_rows
    # Source order is kept within each side.
    assert [e["row"] for e in first.train] == sorted(train_rows)


def test_split_without_eval():
    split = split_examples(examples(5), 0, seed=1)
    assert split.eval == [] and len(split.train) == 5


@pytest.mark.parametrize("eval_rows", [5, 6])
def test_eval_rows_must_leave_training_rows(eval_rows):
    with pytest.raises(DataError, match="data.eval_rows"):
        split_examples(examples(5), eval_rows, seed=1)


def test_eval_rows_counts_after_skipped_rows(tokenizer):
    with pytest.raises(DataError, match="data.eval_rows: 2 leaves no training rows"):
        fmt([row(), row(), row(instruction="")], tokenizer, eval_rows=2, on_bad_rows="skip")


def test_load_examples_on_quickstart(tmp_path, tokenizer, bundled_rows):
    from ray_sft import spec

    job = spec.load(REPO / "jobs" / "quickstart.yaml", [f"output.dir={tmp_path}"])
    result = data_mod.load_examples(job, tokenizer)
    assert len(result.eval) == job.data.eval_rows
    assert len(result.train) + len(result.eval) == len(bundled_rows)
    again = data_mod.load_examples(job, tokenizer)
    assert [e["row"] for e in again.eval] == [e["row"] for e in result.eval]
    assert all(e["text"].endswith("</s>") and e["text"].startswith("\nあなたは") for e in result.train)


def test_count_tokens(tokenizer):
    counts = data_mod.count_tokens(["", "質問です", "質問です質問です"], tokenizer)
    assert counts[0] == 0 and 0 < counts[1] < counts[2]


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight (no tokenizer, no Ray)


def test_check_source_names_found_and_expected_columns(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(DataError, match="has columns answer, question; the templates need instruction, response"):
        data_mod.check_source(DataSpec(source=str(path)))


def test_check_source_skip_leaves_malformed_rows_to_the_policy(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row()) + "\n" + json.dumps({"instruction": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 1, column 'response': missing"):
        data_mod.check_source(DataSpec(source=str(path)))
    assert len(data_mod.check_source(DataSpec(source=str(path), on_bad_rows="skip"))) == 2


def test_check_source_hub_id_is_checked_for_form_only():
    assert data_mod.check_source(DataSpec(source="llm-jp/databricks-dolly-15k-ja")) is None
    with pytest.raises(DataError, match="neither an existing file nor a Hub dataset id"):
        data_mod.check_source(DataSpec(source="two words"))


def test_describe_counts_rows_and_token_lengths(tokenizer):
    examples = fmt([row(), row(response="長い" * 50), row()], tokenizer, max_length=20, eval_rows=1,
                   on_bad_rows="truncate")
    line = data_mod.describe(examples, 20)
    assert line.startswith("3 usable rows (2 train, 1 eval); tokens per row min ")
    assert line.endswith("over training.max_length 20 (truncated)")
