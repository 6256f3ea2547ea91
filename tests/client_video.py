"""The video export asked through transformers' own classes: LlavaNextVideoForConditionalGeneration,
the exported LlavaNextVideoProcessor, and transformers' own PyAV reader sampling num_frames frames of
each clip (its processor reads paths only with torchcodec, which needs a system FFmpeg). Its answers
must be eval.py's. Run it in a venv with torchvision (transformers' video
processors need it; the CPU build of torch in requirements.txt cannot import PyPI's):

    python push.py out/demo_video --repo me/demo-video --format llava --local-dir export/demo_video
    python eval.py out/demo_video --data data/demo/video/eval.jsonl
    VENV/bin/python tests/client_video.py export/demo_video data/demo/video/eval.jsonl \\
        data/demo/video/eval-demo_video/answers.jsonl
"""
import json
import os
import sys

import torch
from transformers import AutoProcessor, LlavaNextVideoForConditionalGeneration
from transformers.video_utils import load_video

from client_answers import SUFFIX, normalize_answer


def main(folder, questions_path, answers_path):
    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(folder).eval()
    expected = {row["id"]: row["prediction"] for row in map(json.loads, open(answers_path))}
    same, right, records = 0, 0, [json.loads(line) for line in open(questions_path)]
    for record in records:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": record["question"] + SUFFIX}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        clip = os.path.join(os.path.dirname(os.path.abspath(questions_path)), record["video"])
        frames, _ = load_video(clip, num_frames=processor.video_processor.num_frames, backend="pyav")
        inputs = processor(text=prompt, videos=[frames], do_sample_frames=False, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        same += answer == expected[record["id"]]
        right += normalize_answer(answer) == normalize_answer(record["answer"])
    print(f"{same}/{len(records)} answers equal eval.py's; accuracy {100 * right / len(records):.2f}%")


if __name__ == "__main__":
    main(*sys.argv[1:4])
