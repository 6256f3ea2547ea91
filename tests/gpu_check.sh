#!/usr/bin/env bash
# The GPU test suite in one call on the device machine, from the project root (6-8 minutes on an H200):
#
#     bash tests/gpu_check.sh
#
# The device has torch, but not deepspeed, datasets or transformers 5.23: first the wheels in
# shared/gpu/wheels are installed (the line from shared/gpu/README.md), then tests/test_gpu.py runs.
# Written into $OUT (out/gpu_check when unset): gpu_tests.log, the whole output as it comes, and
# figures.jsonl, one line per figure (losses, memory, samples/s) as soon as a test has measured it, so
# a run cut short still brings back what it measured.
set -o pipefail
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"

W=$(ls -d ../shared/gpu/wheels shared/gpu/wheels 2>/dev/null | head -1); python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH || exit

export SMALL_VLM_FIGURES="$OUT/figures.jsonl" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_tests.log"
# -vv: test names (pytest.ini adds -q); -s: the figures as they come; -rs: why each skip
python3 -m pytest tests/test_gpu.py -vv -s -rs 2>&1 | tee -a "$OUT/gpu_tests.log"
