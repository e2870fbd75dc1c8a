#!/usr/bin/env bash
# Create .venv and install ray_sft with the exact CPU versions we test with. Idempotent: re-runs only when
# pyproject.toml or constraints-cpu.txt changed. torch==2.13.0 is named first so pip never picks a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.ray_sft-installed
want=$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints-cpu.txt torch==2.13.0 -e '.[test]'
echo "$want" > "$stamp"
