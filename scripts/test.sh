#!/usr/bin/env bash
# The test suite: install into .venv (with the dev extra: pytest and the reference oracles) if needed, then pytest.
# Extra arguments go to pytest (e.g. -k nf4, -x).
source "$(dirname "$0")/_venv.sh" dev
cd "$ROOT"
exec "$PY" -m pytest -q "$@"
