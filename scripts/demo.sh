#!/usr/bin/env bash
# The main job: install into .venv if needed, then run the whole ReflectEvo loop on the embedded default model.
# Extra arguments go to `reflectevo demo` (e.g. --out DIR).
source "$(dirname "$0")/_venv.sh" ""  # no extra; a bare `source` would hand it this script's own arguments
exec "$PY" -m reflectevo demo "$@"
