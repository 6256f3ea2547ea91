"""Asks the eval questions through one client that small-vlm did not write, and compares what it
fed the model and what it answered with training and with eval.py. tests/client_check.sh runs it once
per client, each in that client's own venv, so this file imports only what the client has:

    python tests/client_answers.py training RUN --data data/demo/eval.jsonl --out DIR   # the project's venv
    python tests/client_answers.py CLIENT EXPORT --data data/demo/eval.jsonl --out DIR
    python tests/client_answers.py report DIR

CLIENT is transformers (processor(text=apply_chat_template(...)) and generate, in whatever transformers
the venv has) or pipeline (pipeline("image-text-to-text")); tests/client_vllm.py and
tests/client_llamacpp.py do the same for vLLM and llama.cpp. Each writes DIR/<client>.jsonl: per
question its answer and, where the client shows them, the prompt ids it fed the model; `report`
compares them with each run of image tokens as one (clients expand an image differently)."""
import argparse
import base64
import json
import os
import re
import sys

SUFFIX = "\nAnswer the question using a single word or phrase."  # eval.py's, as LLaVA's VQA evals
MAX_NEW_TOKENS = 16  # the demo's answers are one word


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def questions(data):
    """(id, image path, question as eval.py asks it) for each record of an eval.py JSONL file."""
    folder = os.path.dirname(os.path.abspath(data))
    return [(r["id"], os.path.join(folder, r["image"]), r["question"] + SUFFIX) for r in read_jsonl(data)]


def messages_for(question, image=None):
    """One user turn, image first, as eval.py builds it (image=None: the template's image placeholder)."""
    item = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [item, {"type": "text", "text": question}]}]


def data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def normalize_answer(text):
    """eval.py's normalize_answer (its `exact` metric), here so that the clients' venvs need no project code."""
    text = text.lower().strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text).replace("'", "")
    text = re.sub(r"[^\w\s.]|_|\.(?!\d)|(?<!\d)\.", " ", text)
    return " ".join(NUMBER_WORDS.get(w, w) for w in text.split() if w not in {"a", "an", "the"})


def one_image_token(ids, image_id):
    return [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]


# ----------------------------------------------------------------------------------------------
# What training fed the model (the project's venv)


def training_ids(run, data):
    """The training ids of each question's prompt: data.tokenize_conversation on the question and its
    answer with the run's own template and processor, up to the first supervised token."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from data import tokenize_conversation
    from model import VLMProcessor, inference_folder

    folder = inference_folder(run)
    processor = VLMProcessor.from_pretrained(folder)
    with open(os.path.join(folder, "train_config.json")) as f:
        template = json.load(f)["template"]
    answers = {r["id"]: r["answer"] for r in read_jsonl(data)}
    rows = []
    for name, _, question in questions(data):
        conversation = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answers[name]}]
        ids, labels = tokenize_conversation(conversation, template, processor)
        prompt = ids[:next(i for i, label in enumerate(labels) if label != -100)]
        rows.append({"id": name, "prompt_ids": one_image_token(prompt, processor.image_token_id)})
    return rows


# ----------------------------------------------------------------------------------------------
# transformers


def transformers_answers(export, data):
    """What the model card's usage does: the export's chat template, then its processor and generate()."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(export)
    model = AutoModelForImageTextToText.from_pretrained(export).eval()
    image_id = model.config.image_token_id
    rows = []
    for name, path, question in questions(data):
        prompt = processor.apply_chat_template(messages_for(question), add_generation_prompt=True)
        inputs = processor(images=Image.open(path), text=prompt, return_tensors="pt")
        # apply_chat_template(tokenize=True) must feed the same ids (it decides itself whether to add a BOS)
        tokenized = processor.apply_chat_template(messages_for(question, Image.open(path)), add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"][0]
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        ids = inputs["input_ids"][0].tolist()
        rows.append({"id": name, "prediction": processor.decode(output[0, len(ids):], skip_special_tokens=True).strip(),
                     "prompt_ids": one_image_token(ids, image_id),
                     "tokenize_true_same": list(tokenized) == ids})
    return rows


def pipeline_answers(export, data):
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=export)
    rows = []
    for name, path, question in questions(data):
        reply = pipe(text=messages_for(question, Image.open(path)), max_new_tokens=MAX_NEW_TOKENS,
                     do_sample=False)[0]["generated_text"][-1]["content"]
        rows.append({"id": name, "prediction": reply.strip()})
    return rows


CLIENTS = {"transformers": transformers_answers, "pipeline": pipeline_answers}


# ----------------------------------------------------------------------------------------------
# The report


def report(folder):
    """One line per client: its answers equal to eval.py's, accuracy, prompt ids equal to training's."""
    reference = {r["id"]: r for r in read_jsonl(os.path.join(folder, "eval", "answers.jsonl"))}
    with open(os.path.join(folder, "export", "config.json")) as f:
        image_id = json.load(f)["image_token_index"]  # LlavaConfig saves image_token_id under this name
    training = {r["id"]: r["prompt_ids"] for r in read_jsonl(os.path.join(folder, "training.jsonl"))}
    print(f"{'client':<28} {'same answers as eval.py':>24} {'accuracy':>9} {'prompt ids = training':>22}")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jsonl") or name == "training.jsonl":
            continue
        rows = read_jsonl(os.path.join(folder, name))
        same = sum(r["prediction"] == reference[r["id"]]["prediction"] for r in rows)
        correct = sum(normalize_answer(r["prediction"]) == normalize_answer(reference[r["id"]]["answer"]) for r in rows)
        with_ids = [r for r in rows if r.get("prompt_ids")]
        same_ids = sum(one_image_token(r["prompt_ids"], image_id) == training[r["id"]] for r in with_ids)
        ids = f"{same_ids}/{len(rows)}" if with_ids else "not shown"
        print(f"{name[:-6]:<28} {f'{same}/{len(reference)}':>24} {correct / len(rows):>9.2%} {ids:>22}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("client", choices=["training", "report", *CLIENTS])
    parser.add_argument("folder", help="the run (training), the export (a client) or the output folder (report)")
    parser.add_argument("--data", help="eval.py's JSONL file")
    parser.add_argument("--out", help="folder for <client>.jsonl")
    parser.add_argument("--name", help="the file's name (default: the client's)")
    args = parser.parse_args()
    if args.client == "report":
        return report(args.folder)
    ask = training_ids if args.client == "training" else CLIENTS[args.client]
    rows = ask(args.folder, args.data)
    with open(os.path.join(args.out, f"{args.name or args.client}.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
