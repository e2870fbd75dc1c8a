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
# uv installs the same versions pip resolves (checked: identical `pip freeze`) faster than pip (a clean clone's
# install: 3.4 min with pip). It reads no pip configuration, so this machine's pip settings (indexes, find-links,
# constraints, CA bundle) are handed to it as flags; like pip it picks the best match over all indexes. Like pip it
# must compile the bytecode at install: where PYTHONDONTWRITEBYTECODE is set (as on CI) nothing writes it later, and
# every fresh process (each Ray worker) would compile torch and transformers from source on import.
.venv/bin/python -m pip install -q uv==0.13.9
uv_flags=()
while IFS= read -r flag; do uv_flags+=("$flag"); done < <(.venv/bin/python - <<'PY'
import shlex, subprocess, sys
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
seen = set()
for line in listed.stdout.splitlines():
    key, _, value = line.partition("=")
    name = key.rsplit(".", 1)[-1]
    for item in (shlex.split(value)[0].split() if name in flags and value else []):
        if (name, item) not in seen:
            seen.add((name, item))
            print(flags[name], item, sep="\n")
PY
)
cert=$(.venv/bin/python -m pip config get global.cert 2>/dev/null || true)
if [ -n "$cert" ] && [ -z "${SSL_CERT_FILE:-}" ]; then export SSL_CERT_FILE=$cert; fi
.venv/bin/python -m uv pip install -q --python .venv/bin/python --compile-bytecode \
  --index-strategy unsafe-best-match "${uv_flags[@]}" -c constraints-cpu.txt torch==2.13.0 -e ".${extras:+[$extras]}"
printf '%s\n%s\n' "$want" "${extras//,/ }" > "$stamp"
