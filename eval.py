"""Ask a trained VLM about images and videos, and score it on a benchmark file.

One question:
    python eval.py out/run1 --image photo.jpg --prompt "What is in the image?"
    python eval.py out/video --video clip.mp4 --prompt "Which way does the shape move?"
A benchmark (one JSON object per line: {"id", "image" or "video", "question", "answer", "choices"?, "category"?}):
    python eval.py out/run1 --data bench/gqa.jsonl --image_folder bench/images --batch_size 16

Read top to bottom, this is the path of a record from the JSONL file to its score:
  1. load_model        - CKPT is a training run, a small-vlm folder, a native LLaVA or LLaVA-NeXT
                         folder, a remote-code folder or a Hub repo id; each loads with its own classes.
  2. the prompt        - question (+ lettered options) + LLaVA's answer-format suffix, rendered
                         by the processor's chat template: exactly the prompt the model trained on.
  3. generation        - batched, left-padded, KV-cached; greedy unless --temperature > 0; never
                         <image> (the checkpoint's generation_config suppresses it).
  4. scoring           - VQA answer normalization; exact match, VQAv2 soft accuracy, multiple choice.
  5. the data file     - every record is checked (fields, image files) before the model runs.
  6. evaluate          - answers every record and averages scores, overall and per category.
  7. main              - the command line; a user's mistake raises UserError, which run.exit_after
                         prints as one `error: ...` line, exit code 2.
"""
import argparse
import contextlib
import json
import os
import re
import string
import sys

import torch
from jinja2 import TemplateError

import run
from data import MULTIPLE_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX, is_hub_repo_id, load_image, load_video
from model import IMAGE_TOKEN, VLMForCausalLM, VLMProcessor, inference_folder, to_rgb
from run import UserError, first_line


# ----------------------------------------------------------------------------------------------
# 1. Loading a checkpoint


def read_checkpoint_config(ckpt):
    """(folder or repo id to load from, its config.json as a dict). A training run's output folder
    holds the model in final/; a path that does not exist is tried as a Hub repo id."""
    if os.path.isdir(ckpt):
        folder = inference_folder(ckpt)
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path) and os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise UserError(f"{ckpt} holds LoRA adapters (push.py --format adapters), not a whole model; evaluate the "
                            "run they came from (out/<run>), or its export with --format llava")
        if not os.path.isfile(config_path):
            raise UserError(
                f"{ckpt} is not a model: found no config.json in {folder}. Pass a training output folder "
                "(with final/), a folder written by save_pretrained or push.py, or a Hub repo id."
            )
        with run.reading(config_path, "copy or save the checkpoint again"), open(config_path) as f:
            return folder, json.load(f)
    if not is_hub_repo_id(ckpt):
        raise UserError(f"checkpoint not found: {ckpt} is not a folder (nor a Hub repo id, owner/name)")
    from huggingface_hub import hf_hub_download

    try:
        config_path = hf_hub_download(ckpt, "config.json")
    except (OSError, ValueError) as e:  # not found, no network, gated repo, ...
        raise UserError(f"{ckpt} is not a local folder, and fetching it from the Hub failed: {first_line(e)}") from None
    with run.reading(config_path, "the Hub copy is damaged; try again, or ask its owner"), open(config_path) as f:
        return ckpt, json.load(f)


# Native folders (push.py --format llava) -> transformers' class for them, by config model_type.
NATIVE_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                  "llava_next_video": "LlavaNextVideoForConditionalGeneration"}


def load_model(ckpt, device=None, dtype=None, trust_remote_code=False):
    """(model, processor) in eval mode on `device` (default: cuda when available, else cpu) in
    `dtype` (default: bfloat16 on CUDA, float32 on CPU). The config's model_type picks the classes:
    small_vlm -> model.py's; llava, llava_next -> transformers' own (NATIVE_CLASSES, push.py's
    --format llava of a model without / with anyres); an auto_map -> the folder's own code, which
    is someone else's Python: it runs only with trust_remote_code=True."""
    import transformers
    from transformers import AutoProcessor

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    source, config = read_checkpoint_config(ckpt)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in ("small_vlm", *NATIVE_CLASSES) and os.path.isdir(source):
        run.check_saved_model(source)
    if model_type == "small_vlm":
        with run.loading(source):
            model, loading_info = VLMForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True,
                                                                      ignore_mismatched_sizes=True)
            processor = VLMProcessor.from_pretrained(source)
    elif model_type in NATIVE_CLASSES:
        with run.loading(source):
            model, loading_info = getattr(transformers, NATIVE_CLASSES[model_type]).from_pretrained(
                source, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
            try:
                processor = AutoProcessor.from_pretrained(source)  # LlavaProcessor / LlavaNext(Video)Processor
            except ImportError as e:  # transformers' video processors need torchvision
                raise UserError(f"{ckpt}: {first_line(e)} (LlavaNextVideoProcessor's video processor needs it); "
                                "install the torchvision build that matches your torch") from None
    elif "auto_map" in config:
        if not trust_remote_code:
            raise UserError(f"{ckpt} is a remote-code model: loading it runs the Python files it ships "
                            "(config.json auto_map). Read them, and pass --trust_remote_code if you trust them")
        auto_class = next((name for name in config["auto_map"] if name.startswith("AutoModel")), None)
        if auto_class is None:
            raise UserError(f"{ckpt}: config.json auto_map names no AutoModel class: {config['auto_map']}")
        with run.loading(source):
            model, loading_info = getattr(transformers, auto_class).from_pretrained(
                source, dtype=dtype, trust_remote_code=True, output_loading_info=True, ignore_mismatched_sizes=True)
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    else:
        raise UserError(
            f"{ckpt}: model_type {model_type!r} is not a vision-language model eval.py can load; expected "
            "'small_vlm' (saved by train.py), 'llava' or 'llava_next' (push.py's native export, without / with "
            "anyres) or a remote-code folder (auto_map)"
        )
    run.check_weights_match(source, loading_info)
    return model.to(device).eval(), processor


# ----------------------------------------------------------------------------------------------
# 2. The prompt

LETTERS = string.ascii_uppercase


def format_question(record, suffix=True):
    """The question text: options as "A. ...\\nB. ..." lines after it, then the format suffix."""
    text = record["question"]
    if record.get("choices"):
        text += "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, record["choices"]))
        return text + (MULTIPLE_CHOICE_SUFFIX if suffix else "")
    return text + (SHORT_ANSWER_SUFFIX if suffix else "")


def build_prompt(processor, question, media="image"):
    """One user turn (its image or video first, llava-hf style; media None: text only) rendered by the
    checkpoint's chat template, ending where the assistant's answer starts."""
    if not getattr(processor, "chat_template", None):
        raise UserError(
            "the checkpoint's processor has no chat template, so the training prompt is unknown; "
            "save the processor with its chat_template (train.py and push.py do)"
        )
    content = ([{"type": media}] if media else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    try:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as e:  # the checkpoint's own Jinja: a syntax error, or its raise_exception
        raise UserError(f"the checkpoint's chat template fails to render a question ({e}); fix chat_template.jinja "
                        "in the checkpoint, or save the processor again") from None


# ----------------------------------------------------------------------------------------------
# 3. Generation


def generate_answers(model, processor, prompts, images, batch_size=8, max_new_tokens=32, temperature=0.0,
                     top_p=1.0, names=None, still_frame=False):
    """One answer per prompt. images[i] is a PIL image, an image path, {"video": path} (a clip, decoded
    here into the frames the model was trained with) or None (text-only prompt).
    Prompts are left-padded so that every row's answer starts at the same column, which lets one
    generate() call decode the whole batch with a KV cache. still_frame: each clip is its middle
    frame repeated (the control: a question that needs motion falls to chance). A prompt whose tokens (its image's
    included) and answer would pass the LLM's positions is refused, named by names[i]."""
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    tokenizer = processor.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    names = names or [f"prompt {i}" for i in range(len(prompts))]
    answers = []
    for start in range(0, len(prompts), batch_size):
        media = [(item, name) for item, name in zip(images[start:start + batch_size], names[start:start + batch_size])
                 if item is not None]
        batch_images = [open_image(item) for item, _ in media if not isinstance(item, dict)]
        videos = [open_clip(item["video"], clip_frames(processor), name, still_frame) for item, name in media
                  if isinstance(item, dict)]
        inputs = processor(text=prompts[start:start + batch_size], images=batch_images or None,
                           videos=videos or None, return_tensors="pt", padding=True, padding_side="left")
        check_prompt_lengths(model, inputs["attention_mask"].sum(1), max_new_tokens, names[start:start + batch_size])
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(model.dtype)
        with torch.no_grad():  # the model's generation_config suppresses <image> (build_vlm sets it)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True,
                                    pad_token_id=pad_token_id, **sampling)  # (B, T + new)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]  # (B, new)
        answers += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def check_prompt_lengths(model, lengths, max_new_tokens, names):
    """RoPE LLMs answer past their trained positions without a word, and wrongly: refuse instead."""
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = int(lengths.argmax())
    if positions and int(lengths[longest]) + max_new_tokens > positions:
        raise UserError(f"{names[longest]}: the prompt is {int(lengths[longest])} tokens (its image's included), and with "
                        f"--max_new_tokens {max_new_tokens} it passes the model's {positions} positions; shorten the "
                        "question or lower --max_new_tokens")


def clip_frames(processor):
    """Frames a clip is sampled to: as the model trained (ours: video_frames; LlavaNextVideo's: num_frames)."""
    frames = getattr(processor, "video_frames", 0) or getattr(getattr(processor, "video_processor", None),
                                                              "num_frames", 0)
    if not frames:
        raise UserError("this model takes no video (it was trained without video_frames)")
    return frames


def open_clip(path, n_frames, name, still_frame=False):
    """The clip's n_frames frames (data.load_video's sampling, as in training), or with still_frame
    its middle one n_frames times; a clip that cannot give them (too short, damaged) is a UserError."""
    try:
        frames = load_video(path, n_frames)
    except ValueError as e:
        raise UserError(f"{name}: {e}") from None
    return [frames[n_frames // 2]] * n_frames if still_frame else frames


def open_image(image):
    """A path or a PIL image -> an RGB PIL image (grayscale and RGBA files are common in benchmarks)."""
    return load_image(image) if isinstance(image, str) else to_rgb(image)


# ----------------------------------------------------------------------------------------------
# 4. Scoring

NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a", "an", "the"}


def normalize_answer(text):
    """The usual VQA normalization, so that "Two dogs." == "2 dogs" and "the cat" == "cat":
    lowercase, drop thousands commas and apostrophes, punctuation -> space (a decimal point
    stays), number words -> digits, drop articles, collapse whitespace."""
    text = text.lower().strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = text.replace("'", "")  # dog's -> dogs, don't -> dont
    text = re.sub(r"[^\w\s.]|_|\.(?!\d)|(?<!\d)\.", " ", text)  # punctuation -> space; 3.5 keeps its point
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def score_exact(prediction, answer):
    """1.0 when the normalized prediction equals the (or any listed) normalized answer."""
    answers = answer if isinstance(answer, list) else [answer]
    return float(normalize_answer(prediction) in {normalize_answer(a) for a in answers})


def score_vqa(prediction, answer):
    """VQAv2's official accuracy: for each of the N human answers left out in turn, min(1, matches
    among the other N-1 / 3), averaged. 3 matching answers of 10 score 0.9, 4 or more 1.0 (the
    min(1, matches / 3) shortcut, TextVQA's, would give 3 of 10 full credit). A single answer (a
    string or a list of one) is scored by exact match."""
    if not isinstance(answer, list) or len(answer) == 1:
        return score_exact(prediction, answer)
    prediction = normalize_answer(prediction)
    matches = [normalize_answer(a) == prediction for a in answer]
    return sum(min(1.0, (sum(matches) - match) / 3) for match in matches) / len(matches)


def option_letter(text, choices):
    """The option a text names, as a letter, or None: the option's own text after normalization
    ("The red." names the option "red"; "the red one" names none), or a leading letter:
    "B", "b", "B.", "(B)", "B) red", "B: red"."""
    normalized = normalize_answer(text)
    for letter, option in zip(LETTERS, choices):
        if normalized and normalized == normalize_answer(option):
            return letter
    text = text.strip()
    match = re.match(r"\(?([A-Z])(?:[.:)]|\s|$)", text) or re.fullmatch(r"\(?([a-z])\)?\.?", text)
    if match and match[1].upper() in LETTERS[:len(choices)]:
        return match[1].upper()
    return None


def score_mc(prediction, record):
    """1.0 when the prediction names the same option as the answer (by letter or by option text)."""
    predicted = option_letter(prediction, record["choices"])
    return float(predicted is not None and predicted == option_letter(record["answer"], record["choices"]))


METRICS = ("auto", "exact", "vqa", "mc")


def pick_metric(record, metric="auto"):
    """`auto`: multiple choice when the record has choices, VQA soft accuracy for a list of answers,
    else exact match."""
    if metric != "auto":
        return metric
    if record.get("choices"):
        return "mc"
    return "vqa" if isinstance(record["answer"], list) else "exact"


def score(prediction, record, metric="auto"):
    """The score in [0, 1] of one prediction for one record."""
    metric = pick_metric(record, metric)
    if metric == "mc":
        return score_mc(prediction, record)
    if metric == "vqa":
        return score_vqa(prediction, record["answer"])
    return score_exact(prediction, record["answer"])


# ----------------------------------------------------------------------------------------------
# 5. The data file


def load_questions(path):
    """Records from a JSONL file; a line that is not a JSON object is an error naming file and line."""
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    records = []
    with run.reading(path, "save it as UTF-8 JSON lines"), open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested thousands deep
                raise UserError(f"{path} line {line_number}: not valid JSON ({getattr(e, 'msg', 'nested too deep')}); "
                                "write one JSON object per line (JSON lines; an indented JSON list is not)") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {line_number}: expected a JSON object, got {type(record).__name__}"
                                + ("; eval.py reads JSON lines (one record per line), not a JSON list"
                                   if line.lstrip().startswith("[") else ""))
            record.setdefault("id", str(line_number))
            record["_where"] = f"{path} line {line_number} (id {record['id']!r})"
            records.append(record)
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def where(record):
    """How errors name a record: its file, line and id when it came from load_questions."""
    return record.get("_where") or f"record {record.get('id')!r}"


def is_string_list(items):
    return isinstance(items, list) and len(items) > 0 and all(isinstance(x, str) for x in items)


def check_record(record, metric):
    """Fields a record needs to be asked and scored; errors name the record and what to fix."""
    at = where(record)
    for key in ("id", "question", "answer"):
        if key not in record:
            raise UserError(f"{at}: record has no {key!r}; each record needs 'id', 'question' and 'answer'")
    if not isinstance(record["question"], str) or not record["question"].strip():
        raise UserError(f"{at}: 'question' must be a non-empty string")
    for key in ("image", "video"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise UserError(f"{at}: '{key}' must be one path (a string), got {type(record[key]).__name__}")
    if record.get("image") is not None and record.get("video") is not None:
        raise UserError(f"{at}: the record has both 'image' and 'video'; ask about one of them per record")
    has_media = record.get("image") is not None or record.get("video") is not None
    record["question"] = strip_image_marker(record["question"], has_media, at)
    answer = record["answer"]
    if not (isinstance(answer, str) and answer.strip() or is_string_list(answer)):
        raise UserError(f"{at}: 'answer' must be a non-empty string or a non-empty list of strings")
    choices = record.get("choices")
    if choices is not None:
        if not (is_string_list(choices) and len(choices) <= len(LETTERS)):
            raise UserError(f"{at}: 'choices' must be a list of 1-26 option strings")
        if isinstance(answer, str) and option_letter(answer, choices) is None:
            raise UserError(f"{at}: answer {answer!r} is neither an option letter nor an option's text")
    if pick_metric(record, metric) == "mc" and (not choices or not isinstance(answer, str)):
        raise UserError(f"{at}: metric 'mc' needs 'choices' and a single answer (a letter or an option's text)")


def strip_image_marker(text, has_image, at):
    """LLaVA users write "<image>" where the image goes; the chat template places the image itself."""
    if IMAGE_TOKEN not in text:
        return text
    if not has_image:
        raise UserError(f"{at}: the text holds {IMAGE_TOKEN} but there is no image; give an image or drop the marker")
    return text.replace(IMAGE_TOKEN, "").strip()


def check_image(record, path):
    """Fails early, naming the record, when an image cannot be used: unreadable, truncated, too large
    or floating-point (data.load_image decodes it whole, as training does). A clip ({"video": path})
    is opened and its first frame decoded (its frame count is checked once the model is known)."""
    try:
        load_video(path["video"], 1) if isinstance(path, dict) else load_image(path)
    except ValueError as e:
        raise UserError(f"{where(record)}: {e}") from None


def select_records(records, image_folder, metric="auto", skip_missing=False):
    """Checks every record before any generation. Returns (records to ask, their image paths or
    None for text-only, ids left out because their image is missing (only with skip_missing))."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    asked, paths, missing, seen = [], [], [], {}
    for record in records:
        check_record(record, metric)
        earlier = seen.setdefault(json.dumps(record["id"]), where(record))
        if earlier != where(record):
            raise UserError(f"{where(record)}: its id is also the id of {earlier}; give each record its own id "
                            "(answers.jsonl and the scores name records by it)")
        kind = "video" if record.get("video") is not None else "image"
        path = None if record.get(kind) is None else os.path.join(image_folder, record[kind])
        if path is not None and not os.path.isfile(path):
            if not skip_missing:
                raise UserError(f"{where(record)}: {kind} not found: {path} (set --image_folder, or pass "
                                "--skip_missing to leave such records out)")
            missing.append(record["id"])
            continue
        if kind == "video":
            path = {"video": path}
        if path is not None:
            check_image(record, path)
        asked.append(record)
        paths.append(path)
    if not asked:
        raise UserError(f"no record left to evaluate: the images of all {len(records)} records are missing")
    return asked, paths, missing


# ----------------------------------------------------------------------------------------------
# 6. Evaluate


def evaluate(model, processor, asked, paths, missing=(), metric="auto", suffix=True, batch_size=8,
             max_new_tokens=32, temperature=0.0, top_p=1.0, progress=False, answers_file=None, still_frame=False):
    """Answers and scores the records select_records chose (`asked`, their image `paths`, the
    `missing` ids it left out). Returns {"overall": {"count", "accuracy"}, "categories": {name:
    {"count", "accuracy"}}, "missing": [ids], "answers": one row per answered record: {"id",
    "prompt", "prediction", "answer", "correct"}}. Accuracy is the mean of `correct` (a VQA soft
    score can be 0.3, 0.6 or 0.9). Each batch's rows go to `answers_file` (JSON lines) once scored, so
    an interrupted run keeps every answer it computed."""
    prompts = [build_prompt(processor, format_question(r, suffix), media_kind(p)) for r, p in zip(asked, paths)]
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = slice(start, start + batch_size)
        predictions = generate_answers(model, processor, prompts[batch], paths[batch], batch_size, max_new_tokens,
                                       temperature, top_p, [where(r) for r in asked[batch]], still_frame)
        for record, prompt, prediction in zip(asked[batch], prompts[batch], predictions):
            rows.append({"id": record["id"], "prompt": prompt, "prediction": prediction, "answer": record["answer"],
                         "correct": score(prediction, record, metric)})
        if answers_file:
            with run.writing(answers_file.name, ", then evaluate again"):
                answers_file.writelines(json.dumps(row) + "\n" for row in rows[start:])
                answers_file.flush()
        if progress:
            print(f"\ranswered {len(rows)}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)

    by_category = {}
    for record, row in zip(asked, rows):
        if "category" in record:
            by_category.setdefault(str(record["category"]), []).append(row["correct"])
    return {
        "overall": summarize([row["correct"] for row in rows]),
        "categories": {name: summarize(scores) for name, scores in sorted(by_category.items())},
        "missing": list(missing),
        "answers": rows,
    }


def media_kind(item):
    """What build_prompt puts before the question for a paths entry: "video", "image" or None."""
    return None if item is None else "video" if isinstance(item, dict) else "image"


def summarize(scores):
    return {"count": len(scores), "accuracy": sum(scores) / len(scores)}


def format_table(results):
    """Overall and per-category counts and accuracy (in %), one row each."""
    lines = [f"{'category':<24} {'count':>7} {'accuracy':>9}",
             f"{'overall':<24} {results['overall']['count']:>7} {100 * results['overall']['accuracy']:>8.2f}%"]
    for name, row in results["categories"].items():
        lines.append(f"{name:<24} {row['count']:>7} {100 * row['accuracy']:>8.2f}%")
    if results["missing"]:
        lines.append(f"skipped {len(results['missing'])} records whose image is missing")
    return "\n".join(lines)


def write_results(results, settings, out_dir):
    """results.json (accuracy, counts, skipped ids, settings); evaluate wrote answers.jsonl."""
    summary = {k: v for k, v in results.items() if k != "answers"}
    run.write_json(os.path.join(out_dir, "results.json"), {**summary, "settings": settings})


# ----------------------------------------------------------------------------------------------
# 7. Command line


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="training output folder (uses its final/), a saved model folder "
                                     "(small-vlm, native LLaVA / LLaVA-NeXT or remote code), or a Hub repo id")
    parser.add_argument("--image", help="one image to ask about (with --prompt)")
    parser.add_argument("--video", help="one clip to ask about (with --prompt)")
    parser.add_argument("--still_frame", action="store_true", help="show each clip as its middle frame, repeated: "
                        "the control for questions that need motion (they should fall to chance)")
    parser.add_argument("--prompt", help="one question; prints the answer (no suffix is added)")
    parser.add_argument("--data", help="JSONL benchmark file: {id, image, question, answer, choices?, category?}")
    parser.add_argument("--image_folder", help="folder the records' image paths are relative to "
                                               "(default: the data file's folder)")
    parser.add_argument("--out", help="folder for answers.jsonl and results.json (default: next to the data "
                                      "file, <data folder>/<data name>-<run name>/)")
    parser.add_argument("--metric", default="auto", choices=METRICS,
                        help="auto: mc for records with choices, vqa for a list of answers, else exact")
    parser.add_argument("--no_suffix", action="store_true", help="do not append LLaVA's answer-format suffix")
    parser.add_argument("--skip_missing", action="store_true", help="leave out records whose image is missing "
                                                                    "(counted in the results) instead of failing")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding (LLaVA's evals)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling, used when temperature > 0")
    parser.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow a remote-code checkpoint (config.json auto_map) to run the Python it ships")
    return parser.parse_args(argv)


def check_device(device):
    """--device names a device this machine has: the CPU or one of its accelerators (cuda, mps, xpu)."""
    if device is None:
        return
    try:
        wanted = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device name (cuda, cuda:1, mps, cpu, ...)") from None
    if wanted.type == "cpu":
        return
    have = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if have is None or have.type != wanted.type:
        raise UserError(f"--device {device}: this machine has no {wanted.type} device; use --device "
                        f"{have.type if have else 'cpu'}")
    if wanted.index is not None and wanted.index >= torch.accelerator.device_count():
        raise UserError(f"--device {device}: this machine has {torch.accelerator.device_count()} {have.type} "
                        f"devices, numbered from 0")


def default_out_dir(data, ckpt):
    """<data folder>/<data name>-<run name>: bench/gqa.jsonl + out/run1 (or out/run1/final) -> bench/gqa-run1."""
    data_name = os.path.splitext(os.path.basename(data))[0]
    folder = os.path.normpath(ckpt)
    run_name = os.path.basename(os.path.dirname(folder) if os.path.basename(folder) == "final" else folder)
    return os.path.join(os.path.dirname(os.path.abspath(data)), f"{data_name}-{run_name}")


def checkpoint_identity(ckpt):
    """The model folder a CKPT argument loads, as an absolute path (a Hub id stays as it is)."""
    return os.path.realpath(inference_folder(ckpt)) if os.path.isdir(ckpt) else ckpt


def check_results_folder(out_dir, ckpt):
    """An --out folder is written over only with results of the same checkpoint (a re-run): two runs
    named alike (x/demo, y/demo) share the default folder, and one must not replace the other's."""
    path = os.path.join(out_dir, "results.json")
    if os.path.isdir(out_dir) and os.path.isfile(path):
        with run.reading(path, "delete that folder or pass another --out"), open(path) as f:
            theirs = json.load(f).get("settings", {}).get("ckpt")
        if theirs is not None and theirs != checkpoint_identity(ckpt):
            raise UserError(f"{out_dir} holds the results of another checkpoint, {theirs}; pass --out to write "
                            "these elsewhere, or delete that folder")


def main(argv=None):
    """The command (argv: sys.argv[1:] when None). Every argument and record is checked before the model
    loads; a user's mistake raises UserError."""
    from transformers.utils import logging

    logging.set_verbosity_error()  # keep weight-loading reports out of the answers
    logging.disable_progress_bar()
    args = parse_args(argv)
    if (args.data is None) == (args.prompt is None):
        raise UserError("pass either --data FILE (a benchmark) or --prompt TEXT (one question, with --image or "
                        "--video)")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch_size and --max_new_tokens must be at least 1")
    if not args.temperature >= 0:  # also NaN
        raise UserError(f"--temperature {args.temperature}: must be 0 (greedy) or more (sampling)")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p {args.top_p}: must be above 0 and at most 1 (1 = no nucleus cut)")
    if args.image is not None and args.video is not None:
        raise UserError("pass --image or --video, not both: a question is about one of them")
    media = None if args.image is None and args.video is None else "image" if args.image is not None else "video"
    path = args.image if media == "image" else args.video
    if media and args.prompt is None:
        raise UserError(f"--{media} goes with --prompt (a benchmark's {media}s come from its --data records)")
    if media and not os.path.isfile(path):
        raise UserError(f"--{media} {path} is a folder; give one {media} file" if os.path.isdir(path)
                        else f"{media} not found: {path}")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty; give the question to ask")
    item = {"video": path} if media == "video" else path
    if media:
        check_image({"id": f"--{media}"}, item)
    if args.prompt is not None:
        args.prompt = strip_image_marker(args.prompt, media is not None, "--prompt")
    check_device(args.device)
    if args.data is not None:  # everything is checked before the model loads
        records = load_questions(args.data)
        image_folder = args.image_folder or os.path.dirname(os.path.abspath(args.data))
        selected = select_records(records, image_folder, args.metric, args.skip_missing)
        out_dir = args.out or default_out_dir(args.data, args.ckpt)
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise UserError(f"--out {out_dir} is a file; give a folder for answers.jsonl and results.json")
        check_results_folder(out_dir, args.ckpt)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, processor = load_model(args.ckpt, device=args.device, dtype=dtype, trust_remote_code=args.trust_remote_code)
    generation = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      still_frame=args.still_frame)

    if args.prompt is not None:
        prompt = build_prompt(processor, args.prompt, media)
        print(generate_answers(model, processor, [prompt], [item], names=["--prompt"], **generation)[0])
        return

    with run.writing(out_dir):
        os.makedirs(out_dir, exist_ok=True)
        answers = open(os.path.join(out_dir, "answers.jsonl"), "w")
    try:  # written as they come: none is lost
        results = evaluate(model, processor, *selected, args.metric, not args.no_suffix, args.batch_size,
                           progress=True, answers_file=answers, **generation)
    finally:
        with contextlib.suppress(OSError):  # evaluate flushed every batch, and reported a write that failed
            answers.close()
    settings = dict(ckpt=checkpoint_identity(args.ckpt), data=args.data, image_folder=image_folder, metric=args.metric,
                    suffix=not args.no_suffix, batch_size=args.batch_size, device=str(model.device),
                    dtype=str(model.dtype).removeprefix("torch."), **generation)
    with run.writing(os.path.join(out_dir, "results.json"), ", then evaluate again"):
        write_results(results, settings, out_dir)
    print(format_table(results))
    print(f"wrote {os.path.join(out_dir, 'answers.jsonl')} and results.json")


if __name__ == "__main__":
    run.exit_after(main)
