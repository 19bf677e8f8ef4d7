#!/usr/bin/env bash
# Run the test suite in .venv (set up by scripts/bootstrap.sh). Arguments go to pytest.
#   bash scripts/test.sh                      # everything
#   bash scripts/test.sh tests/models/test_base_model.py -k embedded
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/bootstrap.sh

# The shared-registry tests start a throwaway PostgreSQL server (tests/registry/
# cluster_services.py). Install the server binaries once when they are missing and we may
# (root with apt-get); otherwise those tests skip and say why.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null \
    && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "test.sh: installing PostgreSQL for the shared-registry tests" >&2
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1; }) \
        || echo "test.sh: could not install PostgreSQL; the shared-registry tests will skip" >&2
fi

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
