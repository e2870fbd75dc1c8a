"""unsloth on train_speed.py's job (issue 14 item 3): the peer users reach for to make single-GPU QLoRA fast.

The same synthetic llm-jp-3-1.8b-shaped model, tokenizer and rows as train_speed.py's setup() (in --work), the
same job as its run_recipe(): 4-bit NF4 double-quant base with bf16 compute, LoRA r8 / alpha 16 / dropout 0.05 on
q,k,v,o,gate,up,down, embed_tokens trained in full (modules_to_save), NEFTune alpha 5, 64 rows per optimizer step
(group_by_length, seed 42, so the same rows per step), lr 2e-4 cosine with 100 warmup steps, weight decay 0.01,
adamw_torch_fused, max length 1024, the recipe template. Executed the way unsloth recommends for speed:
FastLanguageModel, its fused LoRA kernels, use_gradient_checkpointing="unsloth" and padding-free batches
(unsloth's own default on an H200, see unsloth/utils/padding_choice.py), the 64 rows in one forward pass as
ray_sft's fast spec runs them.

Runs offline, in its own process, with the unsloth bundle (bench/gpu/build_unsloth_bundle.sh) first on PYTHONPATH;
train_speed.py runs it as its configurations `unsloth` and `unsloth-padded`:

    python3 bench/gpu/train_speed.py --out $OUT --configs plain-fast,unsloth,unsloth-padded --repeats 3
    PYTHONPATH=/tmp/unsloth_site:/tmp/site:$PWD python3 bench/gpu/unsloth_job.py --work /tmp/train_speed \
        --steps 12 --result /tmp/o.json [--padded --micro-batch 16]  # one run alone

The result file has train_speed.py's shape ({"steps": [...], "peak_gib": ...}) plus "fetch_attempts" (every
non-loopback host the process tried to resolve or connect to: all are refused, as on the offline H200) and
"environment". If unsloth cannot run, the file says exactly why ({"steps": [], "peak_gib": null, "error":
"<type: message>", "traceback": ..., "fetch_attempts": [...]}) and the exception is re-raised (exit status != 0).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # ray_sft.templates, when run standalone

# Offline, no telemetry. Set before unsloth (or huggingface_hub / transformers) is imported: several are read once.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",  # huggingface_hub: no Hub calls; unsloth's get_statistics() and has_internet() read it
    "TRANSFORMERS_OFFLINE": "1",  # the same for transformers; unsloth's has_internet() returns False on it
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",  # unsloth/models/_utils.py get_statistics(): the Hub "statistics" download
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_ENABLE_HF_TRANSFER": "0",  # hf_transfer is not bundled
    "DO_NOT_TRACK": "1",
    "UNSLOTH_SKIP_TORCHVISION_CHECK": "1",  # torchvision is not needed for a text model (and not bundled)
}


class FetchLog:
    """Every attempt of this process to reach a host other than this machine: name lookups (socket.getaddrinfo,
    which requests, urllib3, httpx and urllib all go through) and raw connects (socket.socket.connect /
    connect_ex, e.g. unsloth's has_internet() probe of 8.8.8.8:53). Each attempt is recorded with the code that
    made it and refused at once (OSError), as the offline H200 would refuse it, so a run here behaves as there."""

    LOCAL = ("localhost", "127.", "::1", "0.0.0.0", "::ffff:127.")

    def __init__(self):
        self.attempts: list[dict] = []

    def local(self, host) -> bool:
        host = host.decode() if isinstance(host, bytes) else str(host if host is not None else "localhost")
        return host == "" or host.startswith(self.LOCAL) or host == os.uname().nodename

    def note(self, kind: str, host, port) -> None:
        # The innermost frames outside this file and the socket module: the HTTP client's, then who called it.
        skip = ("socket.py", "unsloth_job.py")
        caller = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
                  for f in traceback.extract_stack() if Path(f.filename).name not in skip][-8:]
        entry = {"kind": kind, "host": str(host), "port": port, "caller": caller}
        for seen in self.attempts:
            if {k: seen[k] for k in entry} == entry:
                seen["count"] += 1
                return
        self.attempts.append({**entry, "count": 1, "time": time.time()})
        print(f"unsloth_job: refused a network attempt: {kind} {host}:{port} from {caller[-1:]}", file=sys.stderr,
              flush=True)

    def install(self) -> None:
        import socket

        log = self
        getaddrinfo, connect, connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

        def guarded_getaddrinfo(host, port, *args, **kwargs):
            if not log.local(host):
                log.note("resolve", host, port)
                raise socket.gaierror(socket.EAI_NONAME, f"offline benchmark: {host} not resolved")
            return getaddrinfo(host, port, *args, **kwargs)

        def refuse(sock, address) -> bool:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or log.local(address[0]):
                return False
            log.note("connect", address[0], address[1])
            return True

        def guarded_connect(sock, address):
            if refuse(sock, address):
                raise OSError(101, f"offline benchmark: connect to {address[0]}:{address[1]} refused")
            return connect(sock, address)

        def guarded_connect_ex(sock, address):
            return 101 if refuse(sock, address) else connect_ex(sock, address)

        socket.getaddrinfo = guarded_getaddrinfo
        socket.socket.connect = guarded_connect
        socket.socket.connect_ex = guarded_connect_ex


class TokenCount:
    """Trained (non-pad) tokens of every micro-batch the trainer computes a loss on, cumulative: TRL's own
    `num_tokens` log, supplied when a trainer does not log it (unsloth rewrites SFTTrainer). A padded batch counts
    its attention mask; a padding-free batch (one row of the step's rows concatenated) every token."""

    def __init__(self):
        self.total = 0

    def wrap(self, trainer) -> None:
        compute_loss = trainer.compute_loss

        def counted(model, inputs, *args, **kwargs):
            if model.training:
                mask, ids = inputs.get("attention_mask"), inputs.get("input_ids")
                if mask is not None and mask.dim() == 2:
                    self.total += int(mask.sum())
                elif ids is not None:
                    self.total += int(ids.numel())
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = counted

    def callback(self):
        from transformers import TrainerCallback

        counter = self

        class FillTokens(TrainerCallback):
            # Runs before train_speed.step_recorder (callbacks are called in list order, on the same logs dict).
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs is not None and "loss" in logs:
                    logs["counted_tokens"] = counter.total
                    if logs.get("num_tokens") is None:
                        logs["num_tokens"] = counter.total

        return FillTokens()


def run_unsloth(work: Path, steps: int, result: Path, device: str, *, padding_free: bool = True,
                micro_batch: int = 64) -> None:
    """train_speed.py's job trained by unsloth; writes `result` as train_speed.run_recipe() does (plus
    fetch_attempts / environment), or the error and what it tried to fetch, then re-raises."""
    os.environ.update(OFFLINE_ENV)
    # unsloth_zoo writes its generated modules to ./unsloth_compiled_cache by default: keep them out of the checkout.
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(work.resolve() / "unsloth_compiled_cache"))
    fetches = FetchLog()
    fetches.install()
    records: list = []
    environment: dict = {"padding_free": padding_free, "micro_batch": micro_batch}
    try:
        _train(work, steps, result, device, padding_free, micro_batch, records, environment)
    except BaseException as error:
        result.write_text(json.dumps({
            "steps": records, "peak_gib": None, "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc()[-6000:], "fetch_attempts": fetches.attempts,
            "environment": environment}, indent=1))
        print(f"unsloth_job: failed: {type(error).__name__}: {error}\nfetch attempts: "
              f"{json.dumps(fetches.attempts)}", file=sys.stderr, flush=True)
        raise
    from train_speed import peak_gib, write_result

    write_result(result, records, peak_gib(device))
    outcome = json.loads(result.read_text())
    result.write_text(json.dumps({**outcome, "fetch_attempts": fetches.attempts, "environment": environment}))


def _train(work: Path, steps: int, result: Path, device: str, padding_free: bool, micro_batch: int,
           records: list, environment: dict) -> None:
    # unsloth first: it patches transformers, peft and trl on import (and warns if they were imported before it).
    import unsloth
    from unsloth import FastLanguageModel

    import torch
    import datasets
    import transformers
    import trl
    from trl import SFTConfig, SFTTrainer  # unsloth's rewritten UnslothSFTTrainer / UnslothSFTConfig once patched

    from train_speed import recipe_texts, step_recorder

    environment.update({
        "unsloth": unsloth.__version__, "unsloth_zoo": _version("unsloth_zoo"), "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": trl.__version__, "datasets": datasets.__version__,
        "peft": _version("peft"), "bitsandbytes": _version("bitsandbytes"), "xformers": _version("xformers"),
        "flash_attn": _version("flash_attn"), "trainer": f"{SFTTrainer.__module__}.{SFTTrainer.__name__}"})
    with _quiet():
        from unsloth.models import _utils as unsloth_utils

        environment["unsloth_flash_attention"] = getattr(unsloth_utils, "HAS_FLASH_ATTENTION", None)
        from unsloth.utils import attention_dispatch

        environment["unsloth_torch_varlen"] = getattr(attention_dispatch, "_TORCH_VARLEN_ATTN", None) is not None
    print("unsloth_job:", json.dumps(environment), flush=True)

    bf16 = device == "cuda"
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(work / "model"),
        max_seq_length=1024,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        # unsloth's own BitsAndBytesConfig for load_in_4bit: nf4, double quant, compute dtype = dtype (llama.py).
        load_in_4bit=True,
        full_finetuning=False,
        fix_tokenizer=False,  # the bench's word-level tokenizer, as the other configurations use it
        use_gradient_checkpointing="unsloth",
        local_files_only=True,
    )
    tokenizer.padding_side = "right"
    model = FastLanguageModel.get_peft_model(
        model,
        r=8,
        lora_alpha=16,
        # The job's 0.05. Older unsloth patched its fast LoRA kernels only for dropout 0; this release fuses
        # dropout into them (unsloth/kernels/fast_lora.py FUSED_LORA_DROPOUT, on unless
        # UNSLOTH_FUSED_LORA_DROPOUT=0) and warns ("Dropout = 0 is supported for fast patching") only when it
        # cannot. The log says which happened.
        lora_dropout=0.05,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        # Trained in full as the recipe's modules_to_save=["embed_tokens"]; unsloth accepts embed_tokens and
        # lm_head here ("Unsloth: Training embed_tokens in mixed precision to save VRAM").
        modules_to_save=["embed_tokens"],
        use_gradient_checkpointing="unsloth",
        random_state=42,
        max_seq_length=1024,
        # With "unsloth" checkpointing and embed_tokens trained, the frozen original embedding is offloaded to this
        # folder (default: ./_unsloth_temporary_saved_buffers, i.e. the checkout).
        temporary_location=str(work.resolve() / "_unsloth_temporary_saved_buffers"),
    )
    counter = TokenCount()

    texts = recipe_texts(work, tokenizer)
    rows_per_step = 64
    if rows_per_step % micro_batch:
        raise ValueError(f"micro_batch {micro_batch} does not divide the step's {rows_per_step} rows")
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=datasets.Dataset.from_dict({"text": texts}),
        args=SFTConfig(
            output_dir=str(work / "runs" / result.stem), num_train_epochs=3, max_steps=steps,
            # 64 rows per optimizer step; length grouping works on whole steps (train batch x accumulation), so
            # the rows of each step are the recipe's whatever the micro-batch (see ray_sft.train.sft_config).
            per_device_train_batch_size=micro_batch, gradient_accumulation_steps=rows_per_step // micro_batch,
            learning_rate=2e-4, lr_scheduler_type="cosine", weight_decay=0.01, warmup_steps=100,
            optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", bf16=bf16, fp16=False,
            train_sampling_strategy="group_by_length", logging_steps=1, save_strategy="no",
            # With padding-free, unsloth moves max_length to its own tokenization (rows cut at 1024 there):
            # TRL alone refuses padding_free with max_length (unsloth/models/rl.py).
            max_length=1024, packing=False, padding_free=padding_free,
            neftune_noise_alpha=5,  # unsloth injects its own NEFTune hook (tokenizer_utils.py / rl.py)
            dataset_text_field="text", seed=42, data_seed=42, report_to="none", disable_tqdm=True,
            use_cpu=device == "cpu", dataset_num_proc=1),
        callbacks=[counter.callback(), step_recorder(records, result)])
    counter.wrap(trainer)
    environment["padding_free_effective"] = getattr(trainer.args, "padding_free", None)
    environment["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    environment["trainable_embed_tokens"] = any(
        p.requires_grad for n, p in model.named_parameters() if "embed_tokens" in n)
    print("unsloth_job: trainer", json.dumps({k: environment[k] for k in (
        "padding_free_effective", "trainable_params", "trainable_embed_tokens")}), flush=True)
    trainer.train()


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


class _quiet:
    """Diagnostics only: a missing attribute in another unsloth release must not fail the run."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], Exception)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_speed"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--padded", action="store_true", help="padded micro-batches instead of padding-free")
    parser.add_argument("--micro-batch", type=int, default=64)
    args = parser.parse_args()
    run_unsloth(args.work, args.steps, args.result, args.device, padding_free=not args.padded,
                micro_batch=args.micro_batch)


if __name__ == "__main__":
    main()
