#!/usr/bin/env bash
# Run the test suite in .venv (set up by scripts/bootstrap.sh). Arguments go to pytest.
#   bash scripts/test.sh                      # everything
#   bash scripts/test.sh tests/test_base_model.py -k embedded
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/bootstrap.sh

# Tests never reach the Hugging Face hub: fail fast on a cache miss instead of waiting on
# network timeouts. Export HF_HUB_OFFLINE=0 to override.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

status=0
.venv/bin/python -m pytest -q -ra "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: ERROR: pytest collected no tests (exit code 5); treating that as a failure" >&2
    exit 1
fi
exit "$status"
