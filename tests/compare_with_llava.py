"""Ids and labels of small-vlm's data.py next to LLaVA-1.5's own preprocessing, on the real Vicuna
tokenizer (../shared/real/). Not a test (it needs LLaVA's pinned libraries in a side venv); run by hand:

    python -m venv /tmp/llava-ref && /tmp/llava-ref/bin/pip install torch==2.13.0 transformers==4.37.2 \\
        tokenizers==0.15.1 sentencepiece==0.1.99 protobuf
    python tests/compare_with_llava.py /tmp/llava-ref/bin/python

It prints each record that differs and "N of M identical"."""
import json
import os
import subprocess
import sys

from conftest import ROOT  # the repository (conftest puts it and data/demo on sys.path)
REAL = os.path.join(os.path.dirname(ROOT), "shared", "real")
TOKENIZER = os.path.join(REAL, "tokenizers", "vicuna-7b-v1.5")


def human(v):
    return {"from": "human", "value": v}


def gpt(v):
    return {"from": "gpt", "value": v}


# 558K-style (plain) and 665K-style (vicuna_v1) records written for this comparison
PLAIN = [[human("Render a clear and concise summary of the photo.\n<image>"),
          gpt("select luxury furniture 3 - inch gel memory foam mattress topper")],
         [human("<image>\nWrite a terse but informative summary of the picture."),
          gpt("olympic athlete in action during the men's 100m final")],
         [human("<image>\nShare a concise interpretation of the image provided."),
          gpt("the view from the top of the mountain  at sunset")],
         [human("Give a brief description of the image.\n<image>"), gpt("1950s vintage car — parked near café in São Paulo")],
         [human("<image>\nDescribe the image concisely."), gpt("A dog (golden retriever) runs on the beach, 2019.")],
         [human("<image>\nSummarize the visual content of the image."), gpt("   leading spaces and tabs\there")],
         [human("<image>"), gpt("portrait of a young woman with red hair")],
         [human("<image>\nProvide a brief description."), gpt("東京タワー at night, 12345 lights")]]
VICUNA = [(True, [human("<image>\nWhat is the man holding?"), gpt("The man is holding an umbrella.")]),
          (True, [human("What color is the bus?\n<image>"), gpt("Red"), human("How many people are visible?"),
                  gpt("There are three people visible in the image."), human("Is it raining?"), gpt("No, it is not raining.")]),
          (True, [human("<image>\nWhat is on the table?\nAnswer the question using a single word or phrase."), gpt("Laptop"),
                  human("Which color is the chair?\nAnswer the question using a single word or phrase."), gpt("Brown")]),
          (False, [human("Write a Python function that adds two numbers."),
                   gpt("Sure! Here is one:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nCall it as `add(1, 2)`.")]),
          (False, [human("hi"), gpt("Hello! How can I help you today?"), human("Tell me a joke  please"),
                   gpt("Why did the chicken cross the road?  To get to the other side.")]),
          (True, [human("<image>"), gpt("This book is titled \"The Art of War\".")]),
          (True, [human("<image>\nWhat number is on the jersey?\nReference OCR token: 23, NIKE"), gpt("23")]),
          (True, [human("<image>\nPlease provide the bounding box coordinate of the region this sentence describes: "
                        "man in blue shirt."), gpt("[0.12, 0.34, 0.56, 0.78]")]),
          (True, [human("<image>\nDescribe the image in detail."),
                  gpt("The image shows a kitchen.\n\nThere are    several appliances:\n- a fridge\n- an oven\n\n  Overall, it is tidy.")]),
          (False, [human("Translate to French: I love you"), gpt("Je t'aime.")]),
          (True, [human("<image>\nWhat is the man holding?"), gpt("A man holding an umbrella in the rain. ")]),
          (False, [human("Count: 1 2 3"), gpt(" 4 5 6")])]
RECORDS = ([("plain", {"id": f"plain-{i}", "image": "x.jpg", "conversations": c}) for i, c in enumerate(PLAIN)]
           + [("vicuna_v1", {"id": f"v1-{i}", **({"image": "x.jpg"} if image else {}), "conversations": c})
              for i, (image, c) in enumerate(VICUNA)])

# Runs in LLaVA's side venv: LLaVA's own functions from ../shared/real/llava_reference/llava_ref.py
LLAVA_SIDE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import transformers, llava_ref
tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[2], model_max_length=2048, padding_side="right",
                                                       use_fast=False)
out = {}
for template, record in json.load(sys.stdin):
    llava_ref.set_version(tokenizer, "plain" if template == "plain" else "v1")
    sample = llava_ref.LazySupervisedDataset([record], tokenizer, llava_ref.DataArguments())[0]
    out[record["id"]] = [sample["input_ids"].tolist(), sample["labels"].tolist()]
print(json.dumps(out))
"""


def main(llava_python):
    from data import normalise_record, tokenize_conversation
    from model import VLMImageProcessor, VLMProcessor, add_image_token, load_tokenizer

    llava = json.loads(subprocess.run([llava_python, "-c", LLAVA_SIDE, os.path.join(REAL, "llava_reference"), TOKENIZER],
                                      input=json.dumps(RECORDS), capture_output=True, text=True, check=True).stdout)
    tokenizer = load_tokenizer(TOKENIZER)
    image_id = add_image_token(tokenizer)
    processor = VLMProcessor(VLMImageProcessor(), tokenizer, num_image_tokens=1)  # LLaVA's one -200 per image
    same = 0
    for template, record in RECORDS:
        ids, labels = tokenize_conversation(normalise_record(record, "")["conversations"], template, processor)
        ids = [-200 if token == image_id else token for token in ids]
        if [ids, labels] == llava[record["id"]]:
            same += 1
        else:
            print(f"{record['id']}: ids {'equal' if ids == llava[record['id']][0] else 'DIFFER'}, "
                  f"labels {'equal' if labels == llava[record['id']][1] else 'DIFFER'}")
    print(f"{same} of {len(RECORDS)} identical")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llava-ref/bin/python")
