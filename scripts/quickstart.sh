#!/usr/bin/env bash
# The README's Quickstart line: set up, then the whole pipeline on the tiny quickstart job with a private local Ray
# cluster (CPU): a small ASHA search, serve the winning adapter, print its URL and one sample completion over HTTP,
# shut down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ray-sft run jobs/quickstart-tune.yaml "$@"
