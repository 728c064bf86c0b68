#!/usr/bin/env bash
# Creates .venv with the pinned dependencies (constraints.txt) and this package, editable.
# `--test` also brings what the tests need beyond Python: Debian's chromium for the report test.
# Idempotent: a second call only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'

if [[ "${1:-}" == "--test" ]] && ! command -v chromium >/dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
        echo "setup: chromium not found; the report's browser test will be skipped" >&2
    fi
fi
