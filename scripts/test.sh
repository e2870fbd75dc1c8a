#!/usr/bin/env bash
# The README's Test line and .ci/run: set up, then run the whole pytest suite (extra args go to pytest).
# pytest exits 5 when it collected no test: that is a failure here, as is any other non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
