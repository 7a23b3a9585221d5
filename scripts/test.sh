#!/usr/bin/env bash
# The tests: set up, then pytest (unit tests, then the end-to-end engine and server tests).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python -m pytest -v -rs --durations=15 "$@"
