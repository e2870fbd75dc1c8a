#!/bin/bash
# Build unsloth_site.tar.xz: unsloth and what it needs beyond the GPU image and ray_sft's train bundle, for
# bench/gpu/unsloth_job.py (issue 14 item 3: unsloth on the same job as train_speed.py, in the same device call).
# Run on your own machine (it downloads wheels through pip), from the project root:
#   bash bench/gpu/build_unsloth_bundle.sh .gpu/unsloth    # -> .gpu/unsloth/unsloth_site.tar.xz (git-ignored)
# A subfolder of .gpu, so it travels with `carry: [".gpu"]` while the usual loop that unpacks ray_sft's bundles
# (`for b in .gpu/*.tar.xz ... /tmp/site`) leaves it alone: its trl 1.15.0 and datasets 4.8.5 must not replace
# the train bundle's trl 1.16.0 / datasets 5.2.0. On the GPU machine, unpack it into its own site dir; train_speed.py
# puts that dir first on PYTHONPATH for the unsloth process only:
#   python3 -c "import sys,tarfile;tarfile.open(sys.argv[1]).extractall('/tmp/unsloth_site')" .gpu/unsloth/unsloth_site.tar.xz
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
# or falls back without them): xformers (PyPI's 0.0.35 is built for torch 2.10 + CUDA 12.8 and needs
# libcudart.so.12, which a cu130 torch lacks; unsloth catches the failed load and uses torch SDPA), torchvision
# (only for vision models; unsloth skips its check when absent),
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

# Where each requirement of the bundled wheels (their METADATA, markers evaluated for CPython 3.12 on Linux x86_64,
# no extras) is satisfied: this bundle, ray_sft's train bundle (/tmp/site, after this one on PYTHONPATH) or the GPU
# image. The image's versions are those named in ../shared/gpu/README.md; "implied" packages are not listed there
# but are required by something that runs there (ray_site without requests/protobuf/click, datasets 5.2.0 without
# xxhash/fsspec, huggingface_hub's httpx, accelerate's psutil, transformers' own requirements, matplotlib's pillow).
python3 - "$work/site" <<'PY'
import email.parser, pathlib, sys
try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

site = pathlib.Path(sys.argv[1])
norm = lambda name: name.lower().replace("_", "-").replace(".", "-")
bundle = {}
for info in site.glob("*.dist-info"):
    meta = email.parser.Parser().parsestr((info / "METADATA").read_text())
    bundle[norm(meta["Name"])] = (meta["Version"], meta.get_all("Requires-Dist") or [])
train = {"bitsandbytes": "0.50.2", "trl": "1.16.0", "datasets": "5.2.0", "dill": "0.4.1", "multiprocess": "0.70.19"}
image = {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0", "accelerate": "1.15.0", "pyarrow": "25.0.0",
         "triton": "with torch 2.11", "pandas": "?", "numpy": "?", "safetensors": "?", "tokenizers": "?",
         "huggingface-hub": "1.x (transformers 5.17 needs <2)"}
implied = {"pyyaml": "transformers", "regex": "transformers", "tqdm": "transformers", "packaging": "transformers",
           "typer": "transformers", "filelock": "torch", "jinja2": "torch", "typing-extensions": "torch",
           "psutil": "accelerate", "httpx": "huggingface_hub 1.x", "requests": "ray (ray_site runs without it)",
           "protobuf": "ray (ray_site runs without it)", "click": "ray / typer", "xxhash": "datasets 5.2.0",
           "fsspec": "datasets 5.2.0 / torch", "pillow": "matplotlib", "rich": "typer", "certifi": "requests / httpx",
           "aiohttp": "ray's dashboard (ray_site runs without it)", "pydantic": "serve bundle (Ray Serve only)"}
left_out = {"xformers": "PyPI's wheel is built for torch 2.10 + CUDA 12.8 (needs libcudart.so.12); unsloth catches "
                        "the failed load and uses torch SDPA", "torchvision": "vision models only; unsloth skips its "
                        "check when absent", "torchao": "FP8 / QAT / saving only (lazy imports)", "diffusers":
            "not imported on the text path", "tyro": "CLI only", "hf-transfer": "only with HF_HUB_ENABLE_HF_TRANSFER",
            "msgspec": "vLLM LoRA requests only", "sentencepiece": "SentencePiece tokenizers only (lazy)",
            "wheel": "not imported", "json5": "Studio/CLI", "structlog": "Studio/CLI", "nest-asyncio": "OpenEnv only "
            "(guarded import)", "mlx": "Apple only", "mlx-lm": "Apple only", "mlx-vlm": "Apple only",
            "triton-windows": "Windows only", "einops": "bundled"}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix", "extra": ""}
missing = 0
for owner in ("unsloth", "unsloth-zoo", "trl", "datasets", "cut-cross-entropy"):
    version, requires = bundle[owner]
    print(f"\n{owner} {version}:")
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = norm(req.name)
        found = None
        if name in bundle:
            found = f"bundle {bundle[name][0]}"
            ok = Version(bundle[name][0]) in req.specifier
        elif name in train:
            found = f"train bundle {train[name]}"
            ok = Version(train[name]) in req.specifier
        elif name in image:
            found = f"image {image[name]}"
            try:
                ok = Version(image[name].split()[0]) in req.specifier
            except Exception:  # version not known here
                ok = True
        elif name in implied:
            found, ok = f"image (implied by {implied[name]}; version not checked)", True
        if found is None:
            print(f"  {str(req):60s} LEFT OUT: {left_out.get(name, 'no reason recorded')}")
            missing += name not in left_out
        else:
            print(f"  {str(req):60s} {found}{'' if ok else '  <-- VERSION OUTSIDE THE SPEC'}")
print(f"\nunexplained missing requirements: {missing}")
PY
