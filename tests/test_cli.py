"""The CLI as a user meets it, in subprocesses: pre-flight data checks before any cluster, help pages, errors."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART, REPO

# Runs the CLI, then says on stderr whether Ray was ever imported: a verb that never imports ray never starts it.
PROBE = ("import sys; from ray_sft.cli import main; code = main(sys.argv[1:]); "
         "print('ray imported' if 'ray' in sys.modules else 'ray never imported', file=sys.stderr); sys.exit(code)")


def ray_sft(*argv: str, timeout: float = 60, probe: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", PROBE, *argv] if probe else [sys.executable, "-m", "ray_sft.cli", *argv]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight: bad data is exit 2 within seconds, names the problem, writes nothing and starts no Ray


BAD_DATA = {
    "missing.jsonl": (None, "no such file"),
    "qa.csv": ("question,answer\nq1,a1\nq2,a2\n",
               "the file has columns answer, question; the templates need instruction, response"),
    "no-response.jsonl": ('{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n',
                          "row 1, column 'response': missing"),
    "empty.jsonl": ("", "no rows"),
    "broken.jsonl": ('{"instruction": "a",\n', "line 1: invalid JSON"),
}


@pytest.mark.parametrize("verb", ["validate", "train"])
@pytest.mark.parametrize("name", list(BAD_DATA))
def test_bad_data_fails_before_ray(tmp_path, name, verb):
    content, message = BAD_DATA[name]
    if content is not None:
        (tmp_path / name).write_text(content, encoding="utf-8")
    clusters_before = set(glob.glob("/tmp/rsft-*"))
    started = time.monotonic()
    result = ray_sft(verb, str(QUICKSTART), f"data.source={tmp_path / name}", f"output.dir={tmp_path / 'runs'}",
                     probe=True)
    assert time.monotonic() - started < 10
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "ray never imported" in result.stderr
    assert not (tmp_path / "runs").exists()
    assert not set(glob.glob("/tmp/rsft-*")) - clusters_before  # no private cluster folder was created


def test_hub_id_must_be_well_formed():
    result = ray_sft("validate", str(QUICKSTART), "data.source=not a dataset id!", probe=True)
    assert result.returncode == 2 and "neither an existing file nor a Hub dataset id" in result.stderr
    assert "ray never imported" in result.stderr


def test_validate_reports_rows_and_token_lengths():
    result = ray_sft("validate", str(QUICKSTART), probe=True)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("[ray-sft] data:")]
    assert "336 usable rows (304 train, 32 eval)" in line
    assert "tokens per row min 86 / median 150 / max 340, 0 over training.max_length 512" in line
    assert "ray never imported" in result.stderr


def test_too_long_rows_fail_validate_unless_truncated():
    result = ray_sft("validate", str(QUICKSTART), "training.max_length=128")
    assert result.returncode == 2 and "row 0, column 'response': too long: 300 tokens" in result.stderr
    result = ray_sft("validate", str(QUICKSTART), "training.max_length=128", "data.on_bad_rows=truncate")
    assert result.returncode == 0 and "245 over training.max_length 128 (truncated)" in result.stdout
