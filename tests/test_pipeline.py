"""`ray-sft run` end to end on the tiny model: train (or tune) -> serve -> a sample completion over HTTP -> end."""

from __future__ import annotations

import socket

import pytest

from ray_sft import cli, generate, pipeline, spec
from tests.conftest import FAST, QUICKSTART

pytestmark = pytest.mark.slow
QUICKSTART_TUNE = QUICKSTART.with_name("quickstart-tune.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_trains_serves_prints_a_sample_and_ends(tmp_path, capsys):
    port = _free_port()
    code = cli.main(["run", str(QUICKSTART), f"output.dir={tmp_path}", *FAST, "generation.max_new_tokens=16",
                     f"serve.port={port}"])
    out = capsys.readouterr().out
    assert code == 0, out
    adapter = tmp_path / "quickstart" / "adapter"
    assert f"adapter: {adapter.resolve()}" in out
    assert f"serving quickstart on http://127.0.0.1:{port}/v1" in out
    sample = out.split("sample completion: ", 1)[1].split("\nstopped serving", 1)[0]
    # The served answer is the recipe's local inference for the same prompt: same adapter, same decoding.
    loaded = generate.load(adapter)
    settings = generate.with_overrides(loaded.spec.generation, max_new_tokens=16)
    assert sample == generate.generate(loaded, loaded.spec.generation.sample_prompts[0], settings).text
    with socket.socket() as s:  # the app and its cluster are gone: nothing listens on the port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_run_tunes_when_the_spec_searches_and_no_serve_stops_after(tmp_path, capsys):
    code = cli.main(["run", str(QUICKSTART_TUNE), f"output.dir={tmp_path}", "--no-serve", "tune.num_samples=2",
                     "training.max_steps=2", "training.eval_steps=1", "training.save_steps=1",
                     "training.logging_steps=1", "data.max_rows=48", "data.eval_rows=8",
                     "training.gradient_accumulation_steps=1"])
    out = capsys.readouterr().out
    assert code == 0, out
    best = tmp_path / "quickstart-tune" / "best" / "adapter"
    assert "best: trial" in out and f"adapter: {best}" in out
    assert (best / "adapter_model.safetensors").is_file() and "serving" not in out


def test_run_checks_before_starting_anything(tmp_path):
    job = spec.load(QUICKSTART, [f"output.dir={tmp_path}", "generation.sample_prompts=[]"])
    with pytest.raises(spec.SpecError, match="generation.sample_prompts"):
        pipeline.run(job)
    assert not (tmp_path / "quickstart").exists()


def test_the_readme_quickstart_searches_serves_the_winner_and_prints_a_sample(tmp_path, capsys):
    import re

    from tests.conftest import REPO

    (spec_file,) = re.findall(r"ray-sft run (jobs/\S+\.yaml)", (REPO / "scripts" / "quickstart.sh").read_text())
    assert f"ray-sft run {spec_file}" in (REPO / "README.md").read_text()
    code = cli.main(["run", str(REPO / spec_file), f"output.dir={tmp_path}", f"serve.port={_free_port()}"])
    out = capsys.readouterr().out
    assert code == 0, out
    run_dir = tmp_path / spec.load(REPO / spec_file).output.name
    assert len((run_dir / "trials.csv").read_text().splitlines()) == 1 + 4
    assert (run_dir / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert "stopped_early" in out and "[ray-sft tune] table: " in out
    assert re.search(r"sample completion: .+", out)
