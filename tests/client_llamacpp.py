"""Ask the demo questions of a small-vlm LLaVA export through llama.cpp (xllamacpp) and compare
with the answers of the project's eval.py.

usage: python tests/client_llamacpp.py EXPORT_DIR TEXT_GGUF MMPROJ_GGUF --data eval.jsonl \
           --ref eval-demo/answers.jsonl --out OUTDIR      (writes OUTDIR/llamacpp.jsonl)

Each question goes through llama.cpp's OpenAI-style chat handler, as any client would send it:
the image as a base64 data URL, then the question + eval.py's short-answer suffix; greedy,
16 new tokens, the GGUF's own chat template rendered by llama.cpp's jinja engine. Besides the
answers it checks the prompt: the token ids llama.cpp builds (rebuilt from its own
/apply-template and /tokenize: BOS + text before the image + 64 image embeddings + text after,
which is how mtmd tokenizes a prompt) against the export's processor ids on eval.py's prompt.
Set LLAMA_MEDIA_MARKER='<image>': llama.cpp's server writes each image as a random marker
(<__media_...__>) into the message text, where the chat template cannot recognise it as an image.
"""
import argparse
import json
import re
import urllib.request
from pathlib import Path

import xllamacpp as xlc
from client_answers import SUFFIX, data_url, normalize_answer
from PIL import Image
from transformers import AutoProcessor

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export", help="the native export folder (for the processor's reference ids)")
    ap.add_argument("text_gguf")
    ap.add_argument("mmproj_gguf")
    ap.add_argument("--data", required=True, help="eval.jsonl; images relative to its folder")
    ap.add_argument("--ref", required=True, help="eval.py's answers.jsonl for this export")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the machine is shared)")
    ap.add_argument("--limit", type=int, help="ask only the first N questions")
    args = ap.parse_args()

    params = xlc.CommonParams()
    params.model.path = args.text_gguf
    params.mmproj.path = args.mmproj_gguf
    params.use_jinja = True
    params.n_ctx = 512
    params.n_parallel = 1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = args.threads
    params.sampling.temp = 0
    params.sampling.top_k = 1
    server = xlc.Server(params)

    # /apply-template, /tokenize and /props are only on the server's local HTTP side
    def http(path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(server.listening_address + path, data, {"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(req))

    marker = http("/props")["media_marker"]
    def tokenize(text, add_special):
        return http("/tokenize", {"content": text, "add_special": add_special, "parse_special": True})["tokens"]

    processor = AutoProcessor.from_pretrained(args.export)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    bos_id = processor.tokenizer.bos_token_id
    data_dir = Path(args.data).parent
    records = [json.loads(line) for line in open(args.data) if line.strip()][:args.limit]
    ref = {row["id"]: row for row in map(json.loads, open(args.ref))}

    rows = []
    for rec in records:
        image_path = data_dir / rec["image"]
        url = data_url(image_path)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": rec["question"] + SUFFIX}]}]
        result = server.handle_chat_completions({"messages": messages, "max_tokens": 16, "temperature": 0})
        prediction = result["choices"][0]["message"]["content"].strip()

        prompt = http("/apply-template", {"messages": messages})["prompt"]
        before, after = prompt.split(marker)
        n_text = len(tokenize(before, True)) + len(tokenize(after, False))
        n_image = result["usage"]["prompt_tokens"] - n_text  # what mtmd gave the image
        ids = tokenize(before, True) + [image_id] * n_image + tokenize(after, False)
        r = ref[rec["id"]]
        ref_ids = processor(text=r["prompt"], images=Image.open(image_path).convert("RGB"))["input_ids"][0]
        ref_ids = [int(i) for i in ref_ids]
        rows.append({"id": rec["id"], "prompt": prompt.replace(marker, processor.image_token),
                     "prediction": prediction, "answer": rec["answer"],
                     "correct": float(normalize_answer(prediction) == normalize_answer(rec["answer"])),
                     "eval_prediction": r["prediction"], "same": prediction == r["prediction"].strip(),
                     "same_prompt_text": prompt.replace(marker, processor.image_token) == r["prompt"],
                     "same_prompt_ids": ids == ref_ids, "n_image_tokens": n_image, "n_bos": ids.count(bos_id),
                     "prompt_ids": ids, "eval_ids": ref_ids})

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "llamacpp.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    n = len(rows)
    print(f"{sum(r['same'] for r in rows)}/{n} answers equal to eval.py's")
    accuracy, eval_accuracy = (sum(r["correct"] for r in rows) / n, sum(ref[r["id"]]["correct"] for r in rows) / n)
    print(f"accuracy {accuracy:.4f} (eval.py: {eval_accuracy:.4f})")
    print(f"prompt text equal {sum(r['same_prompt_text'] for r in rows)}/{n}, "
          f"ids equal {sum(r['same_prompt_ids'] for r in rows)}/{n}, BOS count {sorted({r['n_bos'] for r in rows})}, "
          f"image tokens {sorted({r['n_image_tokens'] for r in rows})}")
    first = rows[0]
    if not first["same_prompt_ids"]:
        def show(ids):  # the 64 image tokens as one mark
            return re.sub(r"(<image>)+", "<image>x64", processor.tokenizer.decode(ids))
        print("first prompt, llama.cpp:", repr(show(first["prompt_ids"])), first["prompt_ids"][:3])
        print("first prompt, eval.py:  ", repr(show(first["eval_ids"])), first["eval_ids"][:3])

if __name__ == "__main__":
    main()
