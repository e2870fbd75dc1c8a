#!/usr/bin/env bash
# The README's Quickstart line: set up, then train the tiny quickstart job on a private local Ray cluster (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ray-sft train jobs/quickstart.yaml "$@"
