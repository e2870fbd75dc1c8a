"""`ray-sft run` end to end on the tiny model: train (or tune) -> serve -> a sample completion over HTTP -> end.

The two runs are the session's shared ones (tests/conftest.py: `trained_run`, and `searched_run`, the README's
Quickstart line), which other modules' tests read too.
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


def test_run_checks_before_starting_anything(tmp_path):
    job = spec.load(QUICKSTART, [f"output.dir={tmp_path}", "generation.sample_prompts=[]"])
    with pytest.raises(spec.SpecError, match="generation.sample_prompts"):
        pipeline.run(job)
    assert not (tmp_path / "quickstart").exists()


@pytest.mark.slow
def test_the_readme_quickstart_searches_serves_the_winner_and_prints_a_sample(searched_run):
    """The session's run of the README's Quickstart line (tests/conftest.py: `searched_run`)."""
    import re

    from ray import serve

    from tests.conftest import REPO

    assert f"ray-sft run {searched_run.spec_file}" in (REPO / "README.md").read_text()
    assert searched_run.code == 0, searched_run.out
    out, run = searched_run.out, searched_run.run_dir
    best = run / "best" / "adapter"
    assert len((run / "trials.csv").read_text().splitlines()) == 1 + 4
    assert "best: trial" in out and f"adapter: {best}" in out
    assert (best / "adapter_model.safetensors").is_file()
    assert "stopped_early" in out and "[ray-sft tune] table: " in out
    # The winner is what was served: the sample that came back over HTTP is its local inference; then the app was
    # removed.
    assert re.search(r"serving quickstart-tune on http://127\.0\.0\.1:\d+/v1\n", out)
    sample = out.split("sample completion: ", 1)[1].split("\nstopped serving", 1)[0]
    loaded = generate.load(best)
    assert sample.strip() and sample == generate.generate(loaded, loaded.spec.generation.sample_prompts[0],
                                                          loaded.spec.generation).text
    assert "ray_sft" not in serve.status().applications
