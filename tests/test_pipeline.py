"""`ray-sft run` end to end on the tiny model: train (or tune) -> serve -> a sample completion over HTTP -> end.

The two runs are the session's shared ones (tests/conftest.py: `trained_run`, `searched_run`), which other modules'
tests read too.
"""

from __future__ import annotations

import pytest

from ray_sft import generate, pipeline, spec
from tests.conftest import QUICKSTART


def test_run_trains_serves_prints_a_sample_and_ends(trained_run):
    from ray import serve

    out = trained_run.out
    assert f"adapter: {trained_run.adapter_dir.resolve()}" in out
    assert f"serving shared on http://127.0.0.1:{trained_run.port}/v1" in out
    sample = out.split("sample completion: ", 1)[1].split("\nstopped serving", 1)[0]
    # The served answer is the recipe's local inference for the same prompt: same adapter, same decoding.
    loaded = generate.load(trained_run.adapter_dir)
    settings = generate.with_overrides(loaded.spec.generation, max_new_tokens=16)
    assert sample == generate.generate(loaded, loaded.spec.generation.sample_prompts[0], settings).text
    assert "ray_sft" not in serve.status().applications  # the run removed its app when it ended


@pytest.mark.slow
def test_run_tunes_when_the_spec_searches_and_no_serve_stops_after(searched_run):
    code, out, run = searched_run
    assert code == 0, out
    best = run / "best" / "adapter"
    assert "best: trial" in out and f"adapter: {best}" in out
    assert (best / "adapter_model.safetensors").is_file() and "serving" not in out


def test_run_checks_before_starting_anything(tmp_path):
    job = spec.load(QUICKSTART, [f"output.dir={tmp_path}", "generation.sample_prompts=[]"])
    with pytest.raises(spec.SpecError, match="generation.sample_prompts"):
        pipeline.run(job)
    assert not (tmp_path / "quickstart").exists()


@pytest.mark.slow
def test_the_readme_quickstart_searches_serves_the_winner_and_prints_a_sample(ray_cluster, tmp_path):
    import re

    from ray import serve

    from tests.conftest import REPO, free_port, run_cli

    (spec_file,) = re.findall(r"ray-sft run (jobs/\S+\.yaml)", (REPO / "scripts" / "quickstart.sh").read_text())
    assert f"ray-sft run {spec_file}" in (REPO / "README.md").read_text()
    code, out = run_cli("run", str(REPO / spec_file), f"output.dir={tmp_path}", f"serve.port={free_port()}")
    serve.shutdown()  # the run removed its app; its HTTP proxy would hold the port of later servers
    assert code == 0, out
    run_dir = tmp_path / spec.load(REPO / spec_file).output.name
    assert len((run_dir / "trials.csv").read_text().splitlines()) == 1 + 4
    assert (run_dir / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert "stopped_early" in out and "[ray-sft tune] table: " in out
    assert re.search(r"sample completion: .+", out)
