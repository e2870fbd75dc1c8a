"""The CLI as a user meets it, in subprocesses: pre-flight data checks before any cluster, help pages, errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import QUICKSTART, REPO


def ray_sft(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ray_sft.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight: bad data is exit 2, names the problem, writes nothing and never imports Ray (so it fails in seconds)


BAD_DATA = {
    "missing.jsonl": (None, "no such file"),
    "qa.csv": ("question,answer\nq1,a1\nq2,a2\n",
               "the file has columns answer, question; the templates need instruction, response"),
    "no-response.jsonl": ('{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n',
                          "row 1, column 'response': missing"),
    "empty.jsonl": ("", "no rows"),
    "broken.jsonl": ('{"instruction": "a",\n', "line 1: invalid JSON"),
}


# The CLI once per argument list, all in one fresh process (each process spends seconds importing on 2 cores):
# per call its exit code, its stderr (logging's handler rebound to it) and whether Ray had been imported by then.
BATCH_PROBE = """
import contextlib, io, json, logging, sys, traceback
from ray_sft.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    logging.root.handlers.clear()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = None
    results.append({"code": code, "stderr": err.getvalue(), "ray_imported": "ray" in sys.modules})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def preflight(tmp_path_factory) -> dict:
    """Every pre-flight call of the tests below, in one process: {case: call's result, with its output.dir}."""
    folder = tmp_path_factory.mktemp("preflight")
    for name, (content, _) in BAD_DATA.items():
        if content is not None:
            (folder / name).write_text(content, encoding="utf-8")
    quickstart = ["validate", str(QUICKSTART)]
    calls = {(name, verb): [verb, str(QUICKSTART), f"data.source={folder / name}"]
             for name in BAD_DATA for verb in ("validate", "train")}
    calls |= {"hub-id": [*quickstart, "data.source=not a dataset id!"], "validate": quickstart,
              "too-long": [*quickstart, "training.max_length=128"],
              "truncated": [*quickstart, "training.max_length=128", "data.on_bad_rows=truncate"]}
    outputs = [folder / f"runs-{i}" for i in range(len(calls))]
    argvs = [[*argv, f"output.dir={runs}"] for argv, runs in zip(calls.values(), outputs)]
    done = subprocess.run([sys.executable, "-c", BATCH_PROBE, json.dumps(argvs)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    return {case: {**result, "output_dir": runs} for case, result, runs in zip(calls, results, outputs, strict=True)}


@pytest.mark.parametrize("verb", ["validate", "train"])
@pytest.mark.parametrize("name", list(BAD_DATA))
def test_bad_data_fails_before_ray(preflight, name, verb):
    result = preflight[name, verb]
    assert result["code"] == 2, result["stderr"]
    assert BAD_DATA[name][1] in result["stderr"]
    assert "Traceback" not in result["stderr"]
    # Ray cannot start in a process that never imported it (other sessions' clusters come and go in /tmp, so
    # counting Ray's folders or raylets would be racy).
    assert not result["ray_imported"]
    assert not result["output_dir"].exists()


def test_hub_id_must_be_well_formed(preflight):
    result = preflight["hub-id"]
    assert result["code"] == 2 and "neither an existing file nor a Hub dataset id" in result["stderr"]
    assert not result["ray_imported"]


def test_validate_reports_rows_and_token_lengths(preflight):
    result = preflight["validate"]
    assert result["code"] == 0, result["stderr"]
    (line,) = [line for line in result["stderr"].splitlines() if line.startswith("[ray-sft] data:")]
    assert "336 usable rows (304 train, 32 eval)" in line
    assert "tokens per row min 86 / median 150 / max 340, 0 over training.max_length 512" in line
    assert not result["ray_imported"] and not result["output_dir"].exists()


def test_too_long_rows_fail_validate_unless_truncated(preflight):
    result = preflight["too-long"]
    assert result["code"] == 2 and "row 0, column 'response': too long: 300 tokens" in result["stderr"]
    result = preflight["truncated"]
    assert result["code"] == 0 and "245 over training.max_length 128 (truncated)" in result["stderr"]


# ---------------------------------------------------------------------------------------------------------------
# A CLI that explains itself


def _verb_parsers():
    from ray_sft import cli

    parser = cli.build_parser()
    (verbs,) = [a for a in parser._actions if a.dest == "verb"]
    return parser, verbs.choices


def test_version():
    from ray_sft import __version__

    result = ray_sft("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ray-sft {__version__}"


def test_top_help_is_for_users():
    result = ray_sft("--help")
    assert result.returncode == 0
    assert "parses argv" not in result.stdout
    assert "ray-sft run jobs/quickstart-tune.yaml" in result.stdout


def test_every_verb_has_a_description_an_example_and_help_for_every_flag():
    from ray_sft import cli

    _, verbs = _verb_parsers()
    assert set(verbs) == set(cli.VERBS)
    for name, parser in verbs.items():
        assert len(parser.description) > len(name) + 40, name
        assert parser.epilog.startswith("example:\n  ") and f"ray-sft {name} " in parser.epilog, name
        assert parser.epilog in parser.format_help()
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            shown = parser._get_formatter()._get_help_string(action)
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in shown, f"{name} {action.option_strings}: default not shown"


def test_push_help_names_hf_token():
    result = ray_sft("push", "--help")
    assert result.returncode == 0 and "HF_TOKEN" in result.stdout and "--private" in result.stdout


def test_yaml_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: tiny\ntraining:\n   epochs: 1\n  bad: [1\n", encoding="utf-8")
    result = ray_sft("validate", str(bad))
    assert result.returncode == 2
    assert f"{bad}:5:" in result.stderr and "<unicode string>" not in result.stderr


def test_empty_prompt_is_an_error():
    result = ray_sft("generate", "--adapter", "nowhere", "  ")
    assert result.returncode == 2 and "the prompt is empty" in result.stderr


def test_submit_names_the_verbs_it_takes():
    result = ray_sft("submit", str(QUICKSTART), "--address", "http://127.0.0.1:1", "serve")
    assert result.returncode == 2
    assert "'serve' is neither a verb submit takes (train, tune, run)" in result.stderr


@pytest.mark.parametrize("argv", [("submit", str(QUICKSTART)), ("jobs", "list")])
def test_address_without_scheme_is_refused_at_once(argv):
    started = time.monotonic()
    result = ray_sft(*argv, "--address", "127.0.0.1:1", timeout=30)
    assert time.monotonic() - started < 5
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "http://127.0.0.1:1" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# A quiet console


QUIET_PROBE = """
import logging, os, sys, warnings
from pathlib import Path
from ray_sft import console
logging.basicConfig(level=logging.INFO)
with console.quiet(Path(sys.argv[1]), verbose=sys.argv[2] == "1"):
    print("library print")
    os.write(2, b"fd-level noise\\n")
    warnings.warn("old api", FutureWarning)
    logging.getLogger("transformers").info("library info")
    logging.getLogger("ray_sft.train").warning("left out 3 rows")
    console.show("[ray-sft] step 1/2")
print("after")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_console_keeps_only_own_lines(tmp_path, verbose):
    result = subprocess.run([sys.executable, "-c", QUIET_PROBE, str(tmp_path), "1" if verbose else "0"],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    console = result.stdout + result.stderr
    assert "[ray-sft] step 1/2" in console and "left out 3 rows" in console and "after" in console
    noise = ("library print", "fd-level noise", "FutureWarning", "library info")
    if verbose:
        assert all(line in console for line in noise)
        assert not (tmp_path / "logs").exists()
    else:
        assert not any(line in console for line in noise)
        assert f"{tmp_path / 'logs' / 'console.log'}" in console  # says where the rest went
        logged = (tmp_path / "logs" / "console.log").read_text()
        assert all(line in logged for line in noise)


@pytest.mark.slow
def test_quickstart_console_is_short_and_library_output_is_in_the_logs(trained_run):
    """The session's `ray-sft run` of the quickstart job (train, serve, sample): what its console showed. (`-v`
    putting it all back is checked on tests/test_hub.py's recipe run.)"""
    assert trained_run.code == 0, trained_run.out
    assert len(trained_run.out.splitlines()) <= 40, trained_run.out
    assert "sample completion: " in trained_run.out and "[ray-sft] done: " in trained_run.out
    for noise in ("TrainingReport(", "FutureWarning", "Running Dataset", "it/s]", "INFO", "(RayTrainWorker"):
        assert noise not in trained_run.out, noise
    logged = (trained_run.run_dir / "logs" / "console.log").read_text()
    assert "TrainingReport(" in logged and "(RayTrainWorker" in logged
