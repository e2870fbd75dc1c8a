#!/bin/bash
# Build unsloth_site.tar.xz: unsloth and what it needs beyond the GPU image and ray_sft's train bundle, for
# bench/gpu/unsloth_job.py (issue 14 item 3: unsloth on the same job as train_speed.py, in the same device call).
# Run on your own machine (it downloads wheels through pip), from the project root:
#   bash bench/gpu/build_unsloth_bundle.sh .gpu            # -> .gpu/unsloth_site.tar.xz (the folder is git-ignored)
# On the GPU machine, unpack it into its OWN site dir and put that dir first on PYTHONPATH for the unsloth process
# only (it carries trl 1.15.0 and datasets 4.8.5, which shadow the train bundle's trl 1.16.0 / datasets 5.2.0):
#   python3 -c "import sys,tarfile;tarfile.open(sys.argv[1]).extractall('/tmp/unsloth_site')" .gpu/unsloth_site.tar.xz
#   PYTHONPATH=/tmp/unsloth_site:/tmp/site:$PWD python3 bench/gpu/train_speed.py --one unsloth ...
#
# Versions (checked 2026-12-01 against each wheel's METADATA):
# - unsloth / unsloth_zoo 2026.10.9, the newest release: torch<2.15, transformers<=5.17.0 (the image has 5.17.0),
#   peft>=0.18, accelerate>=0.34.1, bitsandbytes>=0.45.5 (train bundle: 0.50.2), trl<=1.15.0, datasets<5.0.0.
# - trl 1.15.0: the newest trl unsloth allows (ray_sft's bundle has 1.16.0); needs datasets>=4.7.0.
# - datasets 4.8.5: the newest below 5.0 (unsloth: datasets<5.0.0, not 4.4.*/4.5.0); it needs
#   huggingface-hub<2.0 (transformers 5.17 pins <2.0 too, so the image's hub fits), httpx<1, dill<0.4.2 and
#   multiprocess<0.70.20 (train bundle: 0.4.1 / 0.70.19) and fsspec<=2026.2.0, so fsspec 2026.2.0 comes along.
# - cut_cross_entropy 25.1.1 (unsloth_zoo's fused LM-head loss; pure Python + Triton), einops (unsloth_zoo).
# Left out, deliberately (unsloth's METADATA lists them; its code imports none of them on the Llama QLoRA path,
# or falls back without them; see the lead's report): xformers (no wheel built for torch 2.11; unsloth falls back
# to torch SDPA / flash-attn), torchvision (only for vision models; unsloth skips its check when absent),
# torchao (FP8/QAT/saving only), diffusers, tyro, hf_transfer, msgspec (vLLM only), sentencepiece, the CLI/Studio
# stack (typer, rich, pydantic, structlog, json5, nest-asyncio, click, certifi), wheel.
# unsloth's wheel also carries its Studio web app (studio/, ~82 MB unpacked) and CLI: dropped.
# PYVER=311 builds the same bundle for CPython 3.11 (the CPU sanity check here); the image is 3.12.
set -euo pipefail
out=${1:?usage: build_unsloth_bundle.sh OUT_DIR}
pyver=${PYVER:-312}
mkdir -p "$out"; out=$(cd "$out" && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$work/whl" \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 fsspec==2026.2.0 \
  cut_cross_entropy==25.1.1 einops==0.8.2
mkdir -p "$work/site"
for w in "$work"/whl/*.whl; do unzip -q -o "$w" -d "$work/site"; done
# unsloth's Studio web app and CLI are not needed to train from Python.
rm -rf "$work/site/studio" "$work/site/unsloth_cli"
find "$work/site" -name '__pycache__' -type d -prune -exec rm -rf {} +
(cd "$work/site" && tar -cf - . | xz -6 -T0 > "$out/unsloth_site.tar.xz")
ls -la "$out/unsloth_site.tar.xz"
