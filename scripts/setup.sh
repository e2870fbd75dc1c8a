#!/usr/bin/env bash
# Create .venv and install ray_sft with the exact CPU versions we test with, plus the extras named as arguments
# (`bash scripts/setup.sh test`). Idempotent: re-runs only when pyproject.toml or constraints-cpu.txt changed or an
# extra is asked for that is not installed yet. torch==2.13.0 is named first so pip never picks a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.ray_sft-installed
want=$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)
have=()
if [ -f "$stamp" ] && [ "$(head -1 "$stamp")" = "$want" ]; then read -ra have < <(tail -n +2 "$stamp") || true; fi
missing=0
for extra in "$@"; do [[ " ${have[*]} " == *" $extra "* ]] || missing=1; done
if [ -f "$stamp" ] && [ "$(head -1 "$stamp")" = "$want" ] && [ $missing = 0 ]; then exit 0; fi
extras=$(printf '%s\n' "${have[@]}" "$@" | sort -u | grep -v '^$' | paste -sd, || true)
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -c constraints-cpu.txt torch==2.13.0 -e ".${extras:+[$extras]}"
printf '%s\n%s\n' "$want" "${extras//,/ }" > "$stamp"
