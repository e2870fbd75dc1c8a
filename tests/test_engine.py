"""`ray_sft.engine` (and `multi_lora`) on the tiny model in fp32 on CPU: the engine's greedy text equals
`generate.complete` one prompt at a time, whatever joins, leaves or shares the batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from ray_sft import engine, generate, modeling, multi_lora
from tests.adapters import random_adapter
from tests.conftest import quick_spec

PROMPTS = ["時間管理能力をあげるには?", "猫", "日本で一番高い山はどこですか? 理由も説明してください。", "水",
           "東京"]
DENSE = ("quantization.load_in_4bit=false",)
NEW = 24


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return quick_spec(tmp_path_factory.mktemp("engine"), *DENSE)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path, spec):
    return modeling.load_tokenizer(tiny_model_path, spec.model)


@pytest.fixture(scope="module")
def base(tiny_model_path, spec):
    return modeling.load_model(tiny_model_path, spec, "cpu", training=False)


@pytest.fixture(scope="module")
def settings(spec):
    return generate.with_overrides(spec.generation, max_new_tokens=NEW, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_path, spec):
    """Three random adapters whose modules_to_save embedding differs from the base's (and from each other's)."""
    folders = []
    for seed in (1, 2, 3):
        out = tmp_path_factory.mktemp(f"adapter{seed}")
        folder = random_adapter(spec, tiny_model_path, out, seed=seed)
        weights = load_file(folder / "adapter_model.safetensors")
        embedding = [k for k in weights if "embed_tokens" in k]
        assert embedding  # the recipe's modules_to_save
        generator = torch.Generator().manual_seed(seed)
        for k in embedding:
            weights[k] = weights[k] + 0.5 * torch.randn(weights[k].shape, generator=generator)
        save_file(weights, folder / "adapter_model.safetensors")
        folders.append(folder)
    return folders


def ids(tokenizer, prompt: str, spec) -> list[int]:
    return tokenizer(generate.prompt_for(prompt, spec), add_special_tokens=False)["input_ids"]


@pytest.fixture(params=[False, True], ids=["eager", "static"])
def static(request):
    """Every test runs on both decode paths: eager (only live rows) and the bucketed static-shape steps that CUDA
    captures as graphs (here run uncaptured, with idle slots in the batch)."""
    return request.param


def new_engine(model, tokenizer, static, slots=4, adapters=None, route=None, length=128) -> engine.Engine:
    e = engine.Engine(tokenizer, slots, length=length, static=static)
    e.load(model, adapters or {None: 0}, route)
    return e


def alone(model, tokenizer, spec, prompt, settings, stops=None):
    return generate.complete(model, tokenizer, [generate.prompt_for(prompt, spec)], settings,
                             stops=[stops or []])[0]


def test_greedy_text_equals_generate_one_by_one(static, base, tokenizer, spec, settings):
    e = new_engine(base, tokenizer, static, slots=3)  # fewer slots than prompts: some wait for a free slot
    got = e.complete([engine.Request(ids(tokenizer, p, spec), settings) for p in PROMPTS])
    assert got == [alone(base, tokenizer, spec, p, settings) for p in PROMPTS]
    assert all(c.completion_tokens == NEW or c.finish_reason == "stop" for c in got)


def test_request_joining_mid_decode_gets_its_text_alone(static, base, tokenizer, spec, settings):
    e, results = new_engine(base, tokenizer, static), {}
    for index, prompt in enumerate(PROMPTS[:3]):
        e.submit(engine.Request(ids(tokenizer, prompt, spec), settings,
                                on_done=lambda c, index=index: results.__setitem__(index, c)))
        for _ in range(5 + 3 * index):  # the others are mid-decode when the next one arrives
            e.step()
    while e.busy():
        e.step()
    assert [results[i] for i in range(3)] == [alone(base, tokenizer, spec, p, settings) for p in PROMPTS[:3]]


def test_limits_stops_and_streaming_per_request(static, base, tokenizer, spec, settings):
    full = alone(base, tokenizer, spec, PROMPTS[0], settings).text
    stop = full[8:10]
    deltas: list[str] = []
    requests = [engine.Request(ids(tokenizer, PROMPTS[0], spec), dataclasses.replace(settings, max_new_tokens=5)),
                engine.Request(ids(tokenizer, PROMPTS[0], spec), settings, stops=[stop], on_delta=deltas.append),
                engine.Request(ids(tokenizer, PROMPTS[0], spec), settings, on_delta=deltas.append)]
    short, stopped, streamed = new_engine(base, tokenizer, static).complete(requests)
    assert short.completion_tokens == 5 and short.finish_reason == "length" and full.startswith(short.text)
    assert stopped.text == full[: full.index(stop)] and stopped.finish_reason == "stop"
    assert stopped.completion_tokens < NEW  # the slot was freed at the stop, not at max_tokens
    assert streamed.text == full
    # deltas of both streaming rows interleave; each row's own deltas join to a prefix of its text
    assert len(deltas) > 2 and "".join(deltas).startswith(full[: full.index(stop)][:1])


def test_streamed_deltas_join_to_the_final_text(static, base, tokenizer, spec, settings):
    for stops in ([], ["。", "ます"]):
        deltas: list[str] = []
        request = engine.Request(ids(tokenizer, PROMPTS[2], spec), settings, stops=stops, on_delta=deltas.append)
        final = new_engine(base, tokenizer, static).complete([request])[0]
        assert final.text.startswith("".join(deltas)) and len(deltas) > 2
        expected = alone(base, tokenizer, spec, PROMPTS[2], settings, stops)
        # a stop string ends decoding early: fewer tokens than generate, which cuts only after max_tokens
        assert (final.text, final.finish_reason) == (expected.text, expected.finish_reason)


def test_cancelled_requests_free_their_slot_and_report_what_they_decoded(static, base, tokenizer, spec, settings):
    e, done = new_engine(base, tokenizer, static, slots=1), []
    first, second, third = (engine.Request(ids(tokenizer, p, spec), settings, on_done=done.append)
                            for p in PROMPTS[:3])
    for request in (first, second, third):
        e.submit(request)
    e.step()
    e.step()
    assert e.rows[0].request is first and list(e.waiting) == [second, third]
    first.cancel()
    third.cancel()  # still waiting: it never takes a slot
    e.step()
    assert e.rows[0].request is second and not e.waiting
    while e.busy():
        e.step()
    # first decoded 3 tokens in two steps (the first step prefills and decodes); third none
    cancelled = [generate.Completion("", len(r.ids), n, engine.CANCELLED) for r, n in ((first, 3), (third, 0))]
    assert done == cancelled + [alone(base, tokenizer, spec, PROMPTS[1], settings)]


def test_mixed_adapters_in_one_batch_give_each_row_its_own_text(static, tiny_model_path, tokenizer, spec, settings,
                                                                 adapters):
    names = ["a", "b", "c"]
    peft_model = modeling.load_model(tiny_model_path, spec, "cpu", training=False)
    for name, folder in zip(names, adapters):
        peft_model = generate.add_adapter(peft_model, folder, name)
    jobs = [(None, PROMPTS[0])] + [(n, p) for n in names for p in PROMPTS[:2]] + [("b", PROMPTS[2])]
    expected = []
    for name, prompt in jobs:
        if name is None:
            with peft_model.disable_adapter():
                expected.append(alone(peft_model, tokenizer, spec, prompt, settings))
        else:
            peft_model.set_adapter(name)
            expected.append(alone(peft_model, tokenizer, spec, prompt, settings))
    assert len({c.text for c in expected}) == len(expected)  # every adapter (and the base) writes its own text

    model, route = multi_lora.attach(peft_model, names, torch.float32)
    e = new_engine(model, tokenizer, static, slots=8, adapters={None: 0, **{n: i + 1 for i, n in enumerate(names)}},
                   route=route)
    got = e.complete([engine.Request(ids(tokenizer, p, spec), settings, adapter=n) for n, p in jobs])
    assert got == expected
    multi_lora.detach(route)  # PEFT's own layers are back: the PeftModel serves as before
    peft_model.set_adapter("c")
    assert alone(peft_model, tokenizer, spec, PROMPTS[0], settings) == expected[5]


def test_unknown_adapter_fails_only_its_request(static, base, tokenizer, spec, settings):
    e = new_engine(base, tokenizer, static)
    results = []
    for adapter in ("gone", None):
        e.submit(engine.Request(ids(tokenizer, "猫", spec), settings, adapter=adapter, on_done=results.append))
    while e.busy():
        e.step()
    assert isinstance(results[0], engine.UnknownAdapter) and results[1] == alone(base, tokenizer, spec, "猫", settings)


def test_free_slots_run_for_longer_than_the_cache(static, base, tokenizer, spec, settings):
    """A slot left free while another row decodes for many steps keeps decoding unread tokens inside its cache."""
    e = new_engine(base, tokenizer, static, slots=2, length=64)
    for prompt in PROMPTS[:3]:  # one after another, so slot 1 idles through more steps than the cache holds
        limited = dataclasses.replace(settings, max_new_tokens=64 - len(ids(tokenizer, prompt, spec)))
        got = e.complete([engine.Request(ids(tokenizer, prompt, spec), limited)])
        assert got == [alone(base, tokenizer, spec, prompt, limited)]


def test_sampled_and_greedy_rows_share_a_batch(static, base, tokenizer, spec, settings):
    sampled = dataclasses.replace(settings, do_sample=True, temperature=1.5, top_p=0.9)
    e = new_engine(base, tokenizer, static, slots=4)  # two slots never used: their rows must not break sampling
    greedy, drawn = e.complete([engine.Request(ids(tokenizer, PROMPTS[0], spec), settings),
                                engine.Request(ids(tokenizer, PROMPTS[0], spec), sampled)])
    assert greedy == alone(base, tokenizer, spec, PROMPTS[0], settings)
    assert drawn.completion_tokens == NEW or drawn.finish_reason == "stop"


def test_decode_buckets_cover_every_batch_and_length():
    assert engine.powers_of_two(32, 1) == [1, 2, 4, 8, 16, 32]
    assert engine.powers_of_two(1536, 64) == [64, 128, 256, 512, 1024, 1536]
    assert engine.powers_of_two(3, 1) == [1, 2, 3] and engine.powers_of_two(40, 64) == [40]
    assert [engine.fitting([1, 2, 4], n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
