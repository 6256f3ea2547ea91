"""The small-vlm data pipeline: from LLaVA JSON records to padded training batches.

Read top to bottom, this is the path of one record to a batch:
  1. render_pieces         - a conversation -> prompt text as (text, supervised) pieces, per template.
  2. tokenize_conversation - the pieces -> input_ids and labels, built together from one tokenization.
  3. chat_template_for     - the same prompt format as a Jinja chat template, for inference.
  4. VLMDataset            - record -> {input_ids, labels, pixel_values}; bad records raise or skip.
  5. collate               - samples -> a right-padded (or packed) batch with all images stacked.
  6. LengthGroupedSampler  - LLaVA's modality-aware length grouping, sharded across ranks.
At its boundary, below one banner:
  7. load_records          - JSON / JSONL / Hub records -> a memory-mapped Arrow `datasets.Dataset`, every
                             record normalised; load_image - an image file, checked before and while decoding.
  8. show_samples          - `python data.py --show CONFIG`: samples as the model gets them, labels audited.
The demo data and the tiny backbones the demo and the tests build: data/demo/prepare.py.
"""
import argparse
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys

import av
import datasets
import numpy as np
import torch
from jinja2 import TemplateError
from PIL import Image

from model import (IGNORE_INDEX, IMAGE_TOKEN, build_processor, count_anyres_tokens, image_text_separator,
                   parse_pinpoints, to_rgb, writes_own_bos)
from run import CHOICES, UserError, bad_record, check_config, exit_after, first_line, load_config

TEMPLATES = CHOICES["template"]  # rendered below: plain (stage 1), vicuna_v1 (stage 2), chat (the tokenizer's)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# LLaVA-1.5's answer-format suffixes: its VQA training questions end with them, and evaluation
# (eval.py, lmms-eval) appends them to ask for the format the benchmarks score.
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}  # LLaVA's "from" -> chat role


# ----------------------------------------------------------------------------------------------
# 1. Rendering a conversation as prompt text


NO_CHAT_TEMPLATE = "template='chat' needs a tokenizer with a chat template; use vicuna_v1 or plain"


def unknown_template(template):
    return ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")


def render_pieces(conversations, template, tokenizer):
    """The prompt as [(text, supervised), ...]; "".join(texts) is the full prompt text. Supervised
    pieces are what the model must generate: the assistant answers with their end-of-turn marker."""
    turns = check_turns(conversations)
    if template == "plain":
        pieces = plain_pieces(turns)
    elif template == "vicuna_v1":
        pieces = vicuna_pieces(turns, tokenizer.eos_token)
    elif template == "chat":
        pieces = chat_pieces(turns, tokenizer)
    else:
        raise unknown_template(template)
    return separate_images(pieces, image_text_separator(tokenizer))


def check_turns(conversations):
    """[(role, text)] with role user/assistant, alternating from a user turn to an assistant turn."""
    if not conversations:
        raise ValueError("the record has no conversations")
    turns = []
    for i, turn in enumerate(conversations):
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"turn {i} has unknown role from={turn['from']!r}; valid: {', '.join(ROLES)}")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"turn {i} is from {turn['from']!r} but a {expected} turn was expected "
                             "(turns alternate human, gpt, human, gpt, ...)")
        if role == "assistant" and not turn["value"].strip():
            raise ValueError(f"turn {i} is an empty assistant turn")
        if role == "assistant" and IMAGE_TOKEN in turn["value"]:
            raise ValueError(f"turn {i} is an answer holding {IMAGE_TOKEN}; images belong in human turns")
        turns.append((role, move_images_to_front(turn["value"]) if role == "user" else turn["value"]))
    if turns[-1][0] != "assistant":
        raise ValueError("the conversation ends with a human turn; it must end with a gpt answer")
    return turns


def move_images_to_front(text):
    """LLaVA puts every <image> at the start of its turn: "<image>\\n" + the rest of the text, and
    a turn that is only an image becomes "<image>" (the whole turn is stripped)."""
    n = text.count(IMAGE_TOKEN)
    return ((IMAGE_TOKEN + "\n") * n + text.replace(IMAGE_TOKEN, "").strip()).strip() if n else text


def plain_pieces(turns):
    """Stage 1: the human turn is replaced by its image(s); the caption and "\\n" are supervised."""
    if len(turns) != 2:
        raise ValueError(f"the plain template takes one human and one gpt turn, got {len(turns)} turns")
    pieces = [(IMAGE_TOKEN * turns[0][1].count(IMAGE_TOKEN), False), (turns[1][1] + "\n", True)]
    return [piece for piece in pieces if piece[0]]


def vicuna_pieces(turns, eos):
    """LLaVA-1.5: "{system} USER: {q} ASSISTANT: {a}</s>USER: ...". The space before each answer
    belongs to the answer: the inference prompt ends at "ASSISTANT:" and the model writes " {a}</s>"."""
    pieces = [(VICUNA_SYSTEM + " ", False)]
    for (_, question), (_, answer) in zip(turns[0::2], turns[1::2]):
        pieces += [(f"USER: {question} ASSISTANT:", False), (f" {answer}{eos}", True)]
    return pieces


def chat_pieces(turns, tokenizer):
    """The tokenizer's chat template. The model's answer k starts where messages[:k] rendered with
    the generation prompt ends, and runs to the end of the answer as the template writes it (some
    templates trim answers) plus its end-of-turn token, the first special token after it: what the
    model must generate to answer and stop. Nothing the template writes after that is supervised
    (Llama-3's first template opens the next assistant header even without a generation prompt).
    Finding the starts needs a template whose shorter renderings are prefixes of the full one.

    Example: the ChatML template of make_tiny_tokenizer (Qwen2.5's writes the same after its default
    system turn) and the turns [("user", "<image>\\nColour?"), ("assistant", "Red."), ("user", "Shape?"),
    ("assistant", "A square.")]. `full`, all four rendered, is 156 characters; the pieces are

        [  0,  65) "<|im_start|>user\\n<image>\\nColour?<|im_end|>\\n<|im_start|>assistant\\n"  masked
        [ 65,  79) "Red.<|im_end|>"                                                             supervised
        [ 79, 136) "\\n<|im_start|>user\\nShape?<|im_end|>\\n<|im_start|>assistant\\n"          masked
        [136, 155) "A square.<|im_end|>"                                                        supervised
        [155, 156) "\\n"                                                                        masked

    Answer 1 starts at 65 = len(render(1, True)), the user turn plus the generation prompt
    "<|im_start|>assistant\\n": all that inference gives the model before it answers. It ends at 79,
    after "Red." and <|im_end|>, the first special token after it: generating that token is how the
    model stops. The "\\n" the template writes after <|im_end|> is never generated (the model has
    stopped), so it is masked, with the next user turn; answer 2 starts at 136 = len(render(3, True))."""
    if not tokenizer.chat_template:
        raise ValueError(NO_CHAT_TEMPLATE)
    messages = [{"role": role, "content": text} for role, text in turns]

    def render(upto, add_generation_prompt):
        try:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except TemplateError as e:  # its syntax, or its raise_exception on this conversation: a bad record
            raise ValueError(f"the tokenizer's chat template fails on this conversation: {e}") from None

    full = render(len(messages), False)
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    pieces, done = [], 0  # done: where the text so far has been cut into pieces
    for k in range(1, len(messages), 2):  # k: each assistant message, answer k // 2 + 1
        # start: answer k begins where its prompt ends (in the example, 65 and 136)
        prompt, turn = render(k, True), render(k + 1, False)
        start, answer = len(prompt), messages[k]["content"].strip()
        stable = full.startswith(prompt) and done <= start
        begin = full.find(answer, start) if stable else -1  # text between prompt and answer is generated too
        answer_end = begin + len(answer)
        if stable and begin < 0:
            raise ValueError(f"the chat template does not write answer {k // 2 + 1} after its prompt (looked for "
                             f"{answer[:40]!r}), so its tokens cannot be found; use template='vicuna_v1'")
        if not stable or turn[:answer_end] != full[:answer_end]:  # Qwen3 drops earlier answers' <think>
            raise ValueError(
                f"the tokenizer's chat template is not prefix-stable: the first {k} messages (with the generation "
                "prompt) or the first answer(s) render differently inside the whole conversation, so the answers "
                "cannot be found; use template='vicuna_v1' or a prefix-stable chat template")
        # end: after the answer and its end-of-turn marker, the first special token after it (79 and 155)
        after = full[answer_end:]
        marker = next((t for t in specials if after.lstrip().startswith(t)), None)
        if marker:
            end = answer_end + len(after) - len(after.lstrip()) + len(marker)
        else:  # a template that ends turns with plain text: the turn as rendered, minus trailing whitespace
            turn = turn.rstrip()
            end = len(turn) if full.startswith(turn) and len(turn) > answer_end else answer_end
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    pieces.append((full[done:], False))
    return [piece for piece in pieces if piece[0]]


# <image> followed by text (not by another <image>, not at the end)
IMAGE_BEFORE_TEXT = re.compile(re.escape(IMAGE_TOKEN) + "(?!" + re.escape(IMAGE_TOKEN) + r"|\Z)")


def separate_images(pieces, separator):
    """Writes `separator` (model.image_text_separator: " " for SentencePiece tokenizers) after every
    <image> that text follows, as LLaVA's separate tokenization of that text does, and as the
    inference chat template (chat_template_for) writes it. A piece that ends in an image gives the
    separator to the next piece: in `plain`, "<image>" + " caption", the caption's first word."""
    if not separator:
        return pieces
    separated, after_image = [], False
    for text, supervised in pieces:
        if not text:
            continue
        if after_image and not text.startswith(IMAGE_TOKEN):
            text = separator + text
        after_image = text.endswith(IMAGE_TOKEN)
        separated.append((IMAGE_BEFORE_TEXT.sub(IMAGE_TOKEN + separator, text), supervised))
    return separated


# ----------------------------------------------------------------------------------------------
# 2. Tokenizing: input_ids and labels from one tokenization


class SampleTooLong(ValueError):
    """The record does not fit max_seq_len without cutting through image tokens (or its answers)."""


def tokenize_conversation(conversations, template, processor, max_seq_len=None, image_token_counts=None,
                          media_id=None):
    """(input_ids, labels) as lists of ints. The full prompt is tokenized once; a token is supervised
    when its characters lie inside a supervised piece, so ids and labels cannot disagree (LLaVA's
    "tokenization mismatch"). The k-th <image> id then becomes image_token_counts[k] image ids
    (label -100): processor.num_image_tokens each unless given (anyres: each image's own count).
    media_id: the id they become instead, processor.video_token_id when the record's marker is its video."""
    tokenizer = processor.tokenizer
    if not tokenizer.is_fast:
        raise ValueError("tokenize_conversation needs a fast tokenizer (for character offsets)")
    pieces = render_pieces(conversations, template, tokenizer)
    text = "".join(piece for piece, _ in pieces)
    supervised_chars = np.zeros(len(text) + 1, dtype=bool)
    start = 0
    for piece, supervised in pieces:
        supervised_chars[start:start + len(piece)] = supervised
        start += len(piece)
    encoding = tokenizer(text, add_special_tokens=not writes_own_bos(tokenizer, text), return_offsets_mapping=True)

    image_id = processor.image_token_id
    media_id = image_id if media_id is None else media_id
    counts = iter(image_token_counts) if image_token_counts else itertools.repeat(processor.num_image_tokens)
    input_ids, labels = [], []
    for token_id, (begin, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        if token_id == image_id:
            count = next(counts)
            input_ids += [media_id] * count
            labels += [IGNORE_INDEX] * count
        else:
            input_ids.append(token_id)  # added tokens such as BOS have an empty span: never supervised
            labels.append(token_id if end > begin and supervised_chars[begin:end].all() else IGNORE_INDEX)
    if all(label == IGNORE_INDEX for label in labels):  # a silent all-masked sample would train on nothing
        raise ValueError(f"no token lies inside an answer (every answer token straddles prompt text): {text!r}")
    return truncate(input_ids, labels, media_id, max_seq_len)


def truncate(input_ids, labels, image_id, max_seq_len):
    """Cuts the tail beyond max_seq_len, but never through an image (its features must all fit)."""
    if max_seq_len is None or len(input_ids) <= max_seq_len:
        return input_ids, labels
    image_positions = [i for i, token in enumerate(input_ids) if token == image_id]
    if image_positions and image_positions[-1] >= max_seq_len:
        raise SampleTooLong(f"{len(input_ids)} tokens, and its {len(image_positions)} image tokens end at position "
                            f"{image_positions[-1] + 1} > max_seq_len={max_seq_len}")
    if all(label == IGNORE_INDEX for label in labels[:max_seq_len]):
        raise SampleTooLong(f"{len(input_ids)} tokens, and no answer token within max_seq_len={max_seq_len}")
    return input_ids[:max_seq_len], labels[:max_seq_len]


# ----------------------------------------------------------------------------------------------
# 3. The same prompt format as a chat template, for inference

# content (a string, or a list of {"type": "image"} / {"type": "video"} / {"type": "text"} items) -> the turn
# text training used: every image as "<image>\n" at the start of the turn (move_images_to_front), an image-only
# turn as "<image>", and SEP after each image (separate_images); a video the same way as "<video>". Plain
# Jinja only (filters, operators, no Python string methods such as .count or .strip, no // operator), so that
# renderers that are not Python (llama.cpp's) give the same prompt.
CONTENT_MACRO = r"""{%- macro marker(text) -%}{{ '<video>' if '<video>' in text else '<image>' }}{%- endmacro -%}
{%- macro media_count(text) -%}
{{ (((text | length) - (text | replace(marker(text), '') | length)) / (marker(text) | length)) | int }}
{%- endmacro -%}
{%- macro vlm_content(content) -%}
{%- if content is string -%}{%- set text = content -%}
{%- else -%}{%- set text = '<image>' * (content | selectattr('type', 'equalto', 'image') | list | length)
 + '<video>' * (content | selectattr('type', 'equalto', 'video') | list | length)
 + (content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}
{%- endif -%}
{%- set n = media_count(text) | int -%}
{%- set rest = text | replace(marker(text), '') | trim -%}
{%- if n == 0 -%}{{ text }}
{%- elif rest -%}{{ (marker(text) + SEP + '\n') * n + rest }}
{%- else -%}{{ (marker(text) + SEP + '\n') * (n - 1) + marker(text) + SEP }}{%- endif -%}
{%- endmacro -%}
"""

PLAIN_TEMPLATE = r"""{%- for m in messages -%}
{%- if m['role'] == 'user' -%}{%- set text = vlm_content(m['content']) -%}{{ marker(text) * (media_count(text) | int) }}
{%- elif m['role'] == 'assistant' -%}{{ vlm_content(m['content']) + '\n' }}{%- endif -%}
{%- endfor -%}"""

VICUNA_TEMPLATE = r"""{%- set system = SYSTEM -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = vlm_content(messages[0]['content']) -%}
{%- endif -%}
{{ system + ' ' }}
{%- for m in messages if m['role'] != 'system' -%}
{%- if m['role'] == 'user' -%}{{ 'USER: ' + vlm_content(m['content']) + ' ' }}
{%- else -%}{{ 'ASSISTANT: ' + vlm_content(m['content']) + EOS }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"""

# The tokenizer's own template, after rewriting each message's content to a string.
CHAT_PREAMBLE = r"""{%- set vlm = namespace(messages=[]) -%}
{%- for m in messages -%}
{%- set vlm.messages = vlm.messages + [{'role': m['role'], 'content': vlm_content(m['content'])}] -%}
{%- endfor -%}
{%- set messages = vlm.messages -%}
"""


def chat_template_for(template, tokenizer):
    """A Jinja chat template that renders, with add_generation_prompt=True, exactly the training
    prompt of render_pieces up to the answer, BOS included (with_bos). Stored on the final processor
    for eval and the Hub."""
    macro = f"{{%- set SEP = {json.dumps(image_text_separator(tokenizer))} -%}}" + CONTENT_MACRO  # Jinja literal
    if template == "plain":
        body = PLAIN_TEMPLATE
    elif template == "vicuna_v1":
        system, eos = json.dumps(VICUNA_SYSTEM), json.dumps(tokenizer.eos_token)
        body = f"{{%- set SYSTEM = {system} -%}}{{%- set EOS = {eos} -%}}" + VICUNA_TEMPLATE
    elif template == "chat":
        if not tokenizer.chat_template:
            raise ValueError(NO_CHAT_TEMPLATE)
        body = CHAT_PREAMBLE + tokenizer.chat_template
    else:
        raise unknown_template(template)
    return with_bos(macro + body, tokenizer)


def with_bos(chat_template, tokenizer):
    """The chat template, made to write first the BOS that the tokenizer adds to every training
    sample (Llama's <s>; Qwen's tokenizer adds none). Clients that tokenize a rendered prompt without
    special tokens (vLLM's chat, apply_chat_template(tokenize=True), llama.cpp) then get training's
    ids, and the exported tokenizer adds none (push.py), so that no client gets two. A SentencePiece
    tokenizer needs a space after it before text: "<s>A chat" gives `<s> A`, training `<s> ▁A` (the
    same rule as image_text_separator). A template that writes the BOS itself (Llama-3's) is kept."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                           add_generation_prompt=True)
    training = tokenizer(prompt, add_special_tokens=not writes_own_bos(tokenizer, prompt))["input_ids"]
    for bos in ["", tokenizer.bos_token, tokenizer.bos_token + " "] if tokenizer.bos_token else [""]:
        if tokenizer(bos + prompt, add_special_tokens=False)["input_ids"] == training:
            return "{{- " + json.dumps(bos) + " -}}" + chat_template if bos else chat_template
    raise ValueError(f"the tokenizer adds {tokenizer.decode(training[:2])!r}... to a prompt, which a chat template "
                     f"cannot write in front of it ({prompt!r}); use an LLM whose tokenizer adds at most a BOS")


# Two turns, an image, and text a template may treat specially (a system-like opening, a second question):
# enough to meet a template's syntax errors, its raise_exception checks and prefix-instability.
PROBE_CONVERSATION = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A cat."},
                      {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Black."}]


def check_chat_template(processor, llm):
    """template=chat renders every sample with the tokenizer's own Jinja template, which may have a
    syntax error, reject conversations (raise_exception) or be missing. Rendered once on a probe
    conversation, for training and for the inference template final/ will hold, so such a template
    stops the run at start-up in one line, not in a DataLoader worker of every rank hours in."""
    try:
        tokenize_conversation(PROBE_CONVERSATION, "chat", processor)
        messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in PROBE_CONVERSATION[:1]]
        processor.tokenizer.apply_chat_template(messages, chat_template=chat_template_for("chat", processor.tokenizer),
                                                tokenize=False, add_generation_prompt=True)
    except (ValueError, TemplateError) as e:
        raise UserError(f"template=chat: the chat template of llm={llm!r} fails on a probe conversation "
                        f"({first_line(e)}); fix the template or use template=vicuna_v1") from None


# ----------------------------------------------------------------------------------------------
# 4. The dataset


class VLMDataset(torch.utils.data.Dataset):
    """Records -> training samples. Records stay in Arrow; images and clips are decoded in __getitem__
    (in the DataLoader's workers). video_frames: frames sampled from each clip (0: no video)."""

    def __init__(self, data_path, image_folder, processor, template, max_seq_len=2048, skip_bad_samples=False,
                 image_paths_outside=False, video_frames=0):
        if template not in TEMPLATES:
            raise unknown_template(template)
        self.records = load_records(data_path)
        self.image_folder, self.processor, self.template = image_folder, processor, template
        self.max_seq_len, self.skip_bad_samples = max_seq_len, skip_bad_samples
        self.image_paths_outside, self.video_frames = image_paths_outside, video_frames
        # LLaVA's modality_lengths: words + image tokens, no tokenizing or image decoding (cached by
        # datasets). With anyres an image's token count depends on its size: read from the file's header.
        # Plain values, not the processor, go to map(): datasets hashes them into its cache key.
        image_processor = processor.image_processor
        anyres = None if image_processor.aspect != "anyres" else {
            "image_folder": image_folder, "paths_outside": image_paths_outside,
            "pinpoints": image_processor.image_grid_pinpoints,
            "tile": image_processor.size, "patch": processor.patch_size}
        video_tokens = processor.video_token_count(video_frames)  # a clip's count is known before decoding
        estimates = self.records.map(estimate_lengths, batched=True, remove_columns=self.records.column_names,
                                     fn_kwargs={"num_image_tokens": processor.num_image_tokens, "anyres": anyres,
                                                "video_tokens": video_tokens})
        estimates = estimates.with_format("numpy")[:]  # {"length": (N,), "n_images": (N,)} arrays
        self.lengths = estimates["length"].tolist()
        self.has_image = (estimates["n_images"] > 0).tolist()  # an image or a video: one modality for grouping
        n_videos = sum(1 for video in self.records["video"] if video)
        if n_videos and (not video_frames or processor.video_token_id < 0):
            raise ValueError(f"{n_videos} records have a 'video', and video_frames={video_frames}; set video_frames "
                             "(frames sampled from each clip; LLaVA-NeXT-Video uses 32) for a model built with it")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        """A sample, or for a bad record {"id", "skipped": reason} with skip_bad_samples (collate
        drops it and lists it) and a UserError naming the record without."""
        record = self.records[i]
        try:
            return self.build_sample(record)
        except ValueError as e:
            if self.skip_bad_samples:
                return {"id": record["id"], "skipped": str(e)}
            raise bad_record(record["id"], e) from None

    def build_sample(self, record):
        if record["problem"]:
            raise ValueError(record["problem"])
        n_markers = sum(turn["value"].count(IMAGE_TOKEN) for turn in record["conversations"])
        if record["video"] and n_markers != 1:
            raise ValueError(f"{n_markers} {IMAGE_TOKEN} markers in the conversation of a video record; "
                             f"it needs one, where the clip goes")
        if record["video"]:
            return self.build_video_sample(record)
        if n_markers != len(record["image"]):
            raise ValueError(f"{n_markers} {IMAGE_TOKEN} markers in the conversation but "
                             f"{len(record['image'])} images {record['image']}")
        images = [self.load_image(path) for path in record["image"]]
        counts = [self.processor.image_token_count(image.height, image.width) for image in images]
        input_ids, labels = tokenize_conversation(record["conversations"], self.template, self.processor,
                                                  self.max_seq_len, counts)
        size = self.processor.image_processor.size
        tiles = [self.processor.image_processor.transform(image) for image in images]  # (tiles, 3, S, S) each
        return {
            "id": record["id"],
            "input_ids": torch.tensor(input_ids, dtype=torch.long),  # (T,)
            "labels": torch.tensor(labels, dtype=torch.long),  # (T,)
            "pixel_values": torch.cat(tiles) if tiles else torch.zeros(0, 3, size, size),  # (tiles, 3, S, S)
            "image_sizes": torch.tensor([[image.height, image.width] for image in images],
                                        dtype=torch.long).view(-1, 2),  # (n, 2)
            "pixel_values_videos": torch.zeros(0, self.video_frames, 3, size, size),
        }

    def build_video_sample(self, record):
        """A video record: its one <image> marker stands for the clip, which becomes
        video_token_count(video_frames) <video> tokens, and its frames pixel_values_videos (1, F, 3, S, S)."""
        path = image_file(self.image_folder, record["video"], self.image_paths_outside, what="video")
        frames = load_video(path, self.video_frames)
        input_ids, labels = tokenize_conversation(record["conversations"], self.template, self.processor,
                                                  self.max_seq_len, [self.processor.video_token_count(len(frames))],
                                                  self.processor.video_token_id)
        size = self.processor.image_processor.size
        return {
            "id": record["id"],
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": torch.zeros(0, 3, size, size),
            "image_sizes": torch.zeros(0, 2, dtype=torch.long),
            "pixel_values_videos": self.processor.image_processor.transform_clip(frames)[None],
        }

    def load_image(self, path):
        return load_image(image_file(self.image_folder, path, self.image_paths_outside))

    def check_first_images(self, every_one=True, sample=100):
        """Before any GPU work: the first `sample` image records' files exist under image_folder (all
        of them with every_one, else at least one: skip_bad_samples skips the others)."""
        indices = [i for i, has in enumerate(self.has_image) if has][:sample]
        if indices and not os.path.isdir(self.image_folder):
            raise ValueError(f"image_folder={self.image_folder!r} is not a folder, and the data has image records")
        missing = []
        for i in indices:
            record = self.records[i]
            for path in record["image"] + ([record["video"]] if record["video"] else []):
                try:
                    image_file(self.image_folder, path, self.image_paths_outside)
                except ValueError as e:
                    missing.append((self.records[i]["id"], e))
        if missing and (every_one or len(missing) == len(indices)):
            record_id, reason = missing[0]
            raise ValueError(f"{len(missing)} of the first {len(indices)} image records have no image file under "
                             f"image_folder={self.image_folder!r} (e.g. record {record_id!r}: {reason}); fix "
                             "image_folder or the records, or set skip_bad_samples=True to skip such records")


def estimate_lengths(batch, num_image_tokens, anyres=None, video_tokens=0):
    """{"length": words + image (or video_tokens) tokens, "n_images"} per record (a video counts as
    an image). anyres: {image_folder, paths_outside,
    pinpoints, tile, patch}; each image's tokens are counted from its size, read from the file
    header (PIL opens lazily: no pixel is decoded). An unreadable file counts num_image_tokens
    here; loading the sample reports it. datasets caches these lengths per data file: an image
    replaced by one of another size keeps its old estimate (only the length grouping uses it)."""
    n_images = [len(images) + bool(video) for images, video in zip(batch["image"], batch["video"])]
    words = [sum(len(turn["value"].split()) for turn in turns) + video_tokens * bool(video)
             for turns, video in zip(batch["conversations"], batch["video"])]
    if anyres is None:
        return {"length": [w + len(paths) * num_image_tokens for w, paths in zip(words, batch["image"])],
                "n_images": n_images}
    lengths = []
    for w, paths in zip(words, batch["image"]):
        for path in paths:
            try:
                with Image.open(image_file(anyres["image_folder"], path, anyres["paths_outside"])) as image:
                    width, height = image.size
                w += count_anyres_tokens(height, width, anyres["pinpoints"], anyres["tile"], anyres["patch"])
            except (OSError, ValueError, Image.DecompressionBombError):
                w += num_image_tokens
        lengths.append(w)
    return {"length": lengths, "n_images": n_images}


# ----------------------------------------------------------------------------------------------
# 5. Batching


def collate(samples, pad_token_id, pack_length=0, one_row=False):
    """A micro-batch as tensors. Skipped samples are dropped and listed in "skipped" (a batch where
    every sample was skipped has no rows); "num_tokens" counts the real (non-pad) tokens.

    pack_length=0: one sample per row, right-padded: input_ids / labels / attention_mask /
    position_ids (B, T).
    pack_length=L: the samples packed into rows of at most L tokens (pack_rows), (R, T) with R <= B
    and less padding. attention_mask is None and position_ids restart at 0 for every sample: from
    that, transformers builds a block-diagonal causal mask, so a token sees only its own sample, and
    the loss equals the unpacked batch's.
    one_row=True (with pack_length): every sample in one row, (1, sum of lengths), no padding at
    all: flash_attention_2 keeps attention per sample only in a batch of one row (train.make_collate).
    Images (tiles, 3, H, W) and their sizes (N, 2) come in the order their <image> tokens appear in
    the rows (row-major), as the model's splice expects; None when the batch has none."""
    kept = [s for s in samples if "skipped" not in s]
    lengths = [len(s["input_ids"]) for s in kept]
    if pack_length and one_row:
        rows = [list(range(len(kept)))] if kept else []  # sample indices
    elif pack_length:
        rows = pack_rows(lengths, pack_length)
    else:
        rows = [[i] for i in range(len(kept))]
    width = max((sum(lengths[i] for i in row) for row in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        begin = 0
        for i in row:
            n = lengths[i]
            input_ids[r, begin:begin + n], labels[r, begin:begin + n] = kept[i]["input_ids"], kept[i]["labels"]
            # A sample's first token is never a target (nothing of its own comes before it); in a
            # packed row the previous sample's last token would otherwise be trained to predict it.
            labels[r, begin] = IGNORE_INDEX
            attention_mask[r, begin:begin + n] = 1
            position_ids[r, begin:begin + n] = torch.arange(n)
            begin += n
        position_ids[r, begin:] = torch.arange(width - begin)  # the padding: a segment of its own

    def in_row_order(key):  # the samples' KEY tensors (a sample without any has none) in row order, or None
        parts = [kept[i][key] for row in rows for i in row if len(kept[i].get(key, ()))]
        return torch.cat(parts) if parts else None
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": None if pack_length else attention_mask,
        "position_ids": position_ids,
        "pixel_values": in_row_order("pixel_values"),  # (tiles, 3, S, S)
        "image_sizes": in_row_order("image_sizes"),  # (N, 2)
        "pixel_values_videos": in_row_order("pixel_values_videos"),  # (V, F, 3, S, S)
        "num_tokens": sum(lengths),
        "ids": [kept[i]["id"] for row in rows for i in row],
        "skipped": [(s["id"], s["skipped"]) for s in samples if "skipped" in s],
    }


def pack_rows(lengths, capacity):
    """[[sample index, ...] per row] for the rows x width (computed positions, padding included)
    that is smallest, every row holding at most `capacity` tokens. For each row count R from the
    fewest possible up to one sample per row, samples go longest first into the emptiest row (the
    rows come out evenly filled); the best R wins. One sample per row is the unpacked batch, so
    packing never computes more positions than padding does."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best, best_cost = [[i] for i in order], len(lengths) * max(lengths, default=0)
    for n_rows in range(max(1, math.ceil(sum(lengths) / capacity)), len(lengths)):
        rows, fill = [[] for _ in range(n_rows)], [0] * n_rows
        for i in order:
            emptiest = fill.index(min(fill))
            rows[emptiest].append(i)
            fill[emptiest] += lengths[i]
        if max(fill) <= capacity and n_rows * max(fill) < best_cost:
            best, best_cost = rows, n_rows * max(fill)
    return best


# ----------------------------------------------------------------------------------------------
# 6. Length-grouped sampling


class LengthGroupedSampler(torch.utils.data.Sampler):
    """LLaVA's "group by modality length": image and text-only records form separate batches,
    records of similar length share a batch (less padding), and the order of batches is shuffled
    (group_by_length=False: a plain shuffle). The exception is the end of an epoch, as in LLaVA: what
    is left of both groups after their full batches goes into the last batch(es), which can then
    hold both kinds (and repeats of the epoch's first samples, to fill the step). One global batch =
    `batch_size` samples = one optimizer step; it is cut into micro-batches of micro_batch_size
    (neighbours in length), and micro-batch j of a step goes to rank j % world_size.

    The order of an epoch's global batches depends only on (seed, epoch, batch_size), not on the
    micro-batch size or the number of processes, so a run resumed with other ones continues with
    the very next samples (skip); only which rank and micro-batch a sample of a step lands in changes."""

    def __init__(self, lengths, has_image, batch_size, micro_batch_size, world_size=1, rank=0, seed=0,
                 group_by_length=True):
        if len(lengths) != len(has_image) or not len(lengths):
            raise ValueError(f"lengths ({len(lengths)}) and has_image ({len(has_image)}) must be equal and non-empty")
        if batch_size % (micro_batch_size * world_size):
            raise ValueError(f"batch_size={batch_size} is not a multiple of micro_batch_size x world_size")
        self.lengths, self.has_image = np.asarray(lengths), np.asarray(has_image, dtype=bool)
        self.batch_size, self.micro_batch_size, self.world_size, self.rank = batch_size, micro_batch_size, world_size, rank
        self.seed, self.group_by_length = seed, group_by_length
        self.epoch, self.to_skip = 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def skip(self, n):
        """The next pass starts after the epoch's first n samples (whole steps: resuming mid-epoch)."""
        if n % self.batch_size:
            raise ValueError(f"can only skip whole steps of {self.batch_size} samples, got {n}")
        self.to_skip = n

    def global_batches(self):
        """[global batch of indices, ...] for this epoch, the same on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        size = self.batch_size
        everything = np.arange(len(self.lengths))
        groups = [everything[self.has_image], everything[~self.has_image]] if self.group_by_length else [everything]
        batches, leftovers = [], []
        for group in groups:
            group = rng.permutation(group)
            # A mega-batch of up to 50 global batches is sorted by length and cut into batches:
            # neighbours in length share a batch, while the mega-batches keep the order random.
            mega = size * max(1, min(50, len(group) // (4 * size)))
            for begin in range(0, len(group), mega):
                chunk = group[begin:begin + mega]
                if self.group_by_length:
                    chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                full = len(chunk) // size * size
                batches += [chunk[b:b + size] for b in range(0, full, size)]
                leftovers += list(chunk[full:])
        batches = [batches[b] for b in rng.permutation(len(batches))]
        # The incomplete remainders of the groups go last, sorted by length (LLaVA does the same).
        # They are padded by repeating indices from the start of the epoch, so that every step is
        # whole (as DistributedSampler does; a few samples are seen twice per epoch).
        if leftovers:
            tail = np.array(leftovers)
            if self.group_by_length:
                tail = tail[np.argsort(-self.lengths[tail], kind="stable")]
            repeat = np.resize(np.concatenate(batches) if batches else tail, -len(tail) % size)
            tail = np.concatenate([tail, repeat])
            batches += [tail[b:b + size] for b in range(0, len(tail), size)]
        return batches

    def __iter__(self):
        skip, self.to_skip = self.to_skip, 0
        for batch in self.global_batches()[skip // self.batch_size:]:
            micro = self.micro_batch_size
            for j in range(self.rank, self.batch_size // micro, self.world_size):  # this rank's micro-batches
                yield from (int(i) for i in batch[j * micro:(j + 1) * micro])

    def __len__(self):
        """Samples the next pass yields on this rank: its share of every step left in the epoch."""
        steps = math.ceil(len(self.lengths) / self.batch_size) - self.to_skip // self.batch_size
        return steps * self.batch_size // self.world_size


# ==============================================================================================
# The boundary: LLaVA files and images read safely (7), then `--show`, a tool to see what the model
# sees (8). The path above calls these by name (load_records, image_file, load_image).
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# 7. Reading LLaVA files safely: records (JSON, JSONL, a Hub data set) and images

# Every record is normalised to these columns, so files that mix records with no "image", one
# image (a string) and several images (a list) load into one schema without inference guesses.
RECORD_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "image": datasets.List(datasets.Value("string")),  # relative paths, [] for text-only records
    "video": datasets.Value("string"),  # a clip's path relative to the image folder, "" for none
    "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
    "problem": datasets.Value("string"),  # why the record cannot train ("" when it can): VLMDataset reports it
})


def load_records(data_path):
    """LLaVA records as an Arrow dataset. data_path: a path, "a.json,b.jsonl", a list of those, or a
    Hub dataset id. The first load converts the files to Arrow in the `datasets` cache; later loads
    memory-map that cache (keyed on the files' paths, sizes and modification times) in seconds."""
    paths = data_path.split(",") if isinstance(data_path, str) else list(data_path)
    parts = [load_one_source(path.strip()) for path in paths if path.strip()]
    if not parts:
        raise ValueError(f"data_path={data_path!r} names no file")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name, as the Hub spells a repo


def is_hub_repo_id(name):
    """owner/name, and no local file or folder of that name (a local path wins)."""
    return bool(HUB_REPO_ID.fullmatch(name or "")) and not os.path.exists(name)


def load_one_source(path):
    if os.path.isfile(path):
        return load_json_file(path)
    if os.path.isdir(path):
        raise ValueError(f"data_path {path!r} is a folder; name the JSON/JSONL file(s) in it, comma-separated")
    if is_hub_repo_id(path) and not path.endswith((".json", ".jsonl")):
        try:
            hub = datasets.load_dataset(path, split="train")
        except Exception as e:  # offline, not found, gated: datasets raises many kinds
            raise ValueError(f"data_path {path!r} is no local file, and loading it as a Hub data set failed: "
                             f"{type(e).__name__}: {first_line(e)}") from None
        return hub.map(lambda batch, rows: normalise_batch(batch, rows, path), batched=True, with_indices=True,
                       remove_columns=hub.column_names, features=RECORD_FEATURES)
    raise FileNotFoundError(f"data file {path!r} does not exist (give a JSON/JSONL file or a Hub dataset id)")


CACHE_VERSION = 3  # part of the Arrow cache key: bump it when read_json_records changes what it writes


def load_json_file(path):
    stat = os.stat(path)
    key = json.dumps([os.path.abspath(path), stat.st_size, stat.st_mtime_ns, CACHE_VERSION])
    try:
        return datasets.Dataset.from_generator(
            read_json_records, features=RECORD_FEATURES, gen_kwargs={"path": path},
            fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
        )
    except datasets.exceptions.DatasetGenerationError as e:  # datasets wraps our own errors: unwrap them
        raise e.__cause__ if isinstance(e.__cause__, ValueError) else e


def read_json_records(path):
    """Yields normalised records from a JSON list or a JSONL file (decided by the first character).
    A list is decoded by json.loads at once (its errors give the line and column); JSONL line by line."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is allowed, and dropped
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start} cannot be decoded: UTF-16 or Latin-1?); "
                         "save it as UTF-8, as JSON requires") from None
    if text.lstrip().startswith("["):
        records = decode_json(text, path)
    elif "\n" in text.strip() and is_one_json_object(text):  # JSONL holds one object per line
        raise ValueError(f"{path} holds one JSON object; expected a JSON list of LLaVA records, or JSONL "
                         "(one record per line)")
    else:
        records = list(iter_jsonl(text, path))
    if not records:
        raise ValueError(f"{path} holds no records (expected a JSON list or JSONL of LLaVA records)")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: the record at index {index} is a {type(record).__name__}, "
                             "expected a JSON object")
        yield normalise_record(record, f"{os.path.basename(path)}:{index}")


def is_one_json_object(text):
    """True for a text that is one JSON object (for JSONL, json.loads stops at the second line)."""
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def iter_jsonl(text, path):
    for line_number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if line.strip():
            yield decode_json(line, f"{path}, line {line_number}")


def decode_json(text, where):
    """json.loads; its error as one ValueError naming `where` and json's line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if "\n" not in text else f"line {e.lineno}, column {e.colno}"
        raise ValueError(f"{where}: malformed JSON at {at}: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"{where}: malformed JSON (nested too deep)") from None


def normalise_record(record, default_id):
    """{"id": str, "image": [str, ...], "video": str, "conversations": [{"from": str, "value": str}, ...],
    "problem": str}. Missing or odd fields become empty values, and "problem" says what is wrong; VLMDataset
    reports it per record, with the id (or skips it with skip_bad_samples=True)."""
    image = record.get("image")
    images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    if not all(isinstance(path, str) for path in images):  # e.g. a Hub data set that embeds decoded images
        raise ValueError(f"record {record.get('id', default_id)!r}: 'image' must be a relative path or a list "
                         f"of them, got {type(images[0]).__name__}; save the images to a folder and list their paths")
    turns = record.get("conversations")
    video, problem = record.get("video") or "", ""
    if not isinstance(video, str):
        video, problem = "", f"'video' is a {type(video).__name__}; it must be one clip's path (under image_folder)"
    if video and images:
        problem = "it has both 'image' and 'video'; a record holds images or one video (split it in two)"
    if not (isinstance(turns, list) and turns):
        what = "missing" if turns is None else "empty" if turns == [] else f"a {type(turns).__name__}"
        problem = f"'conversations' is {what}; it must be a list of turns: [{{\"from\": \"human\", \"value\": ...}}, ...]"
        if turns is None and "messages" in record:
            problem = ("it has 'messages' (chat style); LLaVA records hold 'conversations': "
                       "[{\"from\": \"human\" or \"gpt\", \"value\": text}, ...]")
        turns = []
    turns = [t if isinstance(t, dict) else {} for t in turns]  # a non-object turn fails as an unknown role
    for i, t in enumerate(turns):
        if not isinstance(t.get("value", ""), (str, int, float)) or isinstance(t.get("value"), bool):
            problem = problem or f"turn {i}: 'value' is a {type(t['value']).__name__}; it must be text"
    turns = [{"from": str(t.get("from", "")), "value": "" if t.get("value") is None else str(t["value"])}
             for t in turns]
    return {"id": str(record.get("id", default_id)), "image": images, "video": video, "conversations": turns,
            "problem": problem}


def normalise_batch(batch, rows, source):
    """normalise_record over a batch of Hub records (columns -> rows -> columns); `rows` are their
    row numbers in the data set, the ids of records that have none."""
    rows = [normalise_record({key: values[i] for key, values in batch.items()}, f"{source}:{row}")
            for i, row in enumerate(rows)]
    return {key: [row[key] for row in rows] for key in RECORD_FEATURES}


def image_file(image_folder, path, paths_outside=False, what="image"):
    """The file a record's image (or video) path names, inside image_folder unless paths_outside."""
    if not path.strip():  # joined to the folder it would name the folder itself
        raise ValueError(f"its {what} path is empty; name the {what} file (relative to image_folder) or drop it")
    full_path = os.path.normpath(os.path.join(image_folder, path))
    folder = os.path.abspath(image_folder)
    if not paths_outside and os.path.commonpath([os.path.abspath(full_path), folder]) != folder:
        # data may come from a Hub data set someone else wrote: it reads files of image_folder only
        raise ValueError(f"{what} path {path!r} leads outside image_folder={image_folder!r}; set "
                         "image_paths_outside=True if you trust this data")
    if not os.path.isfile(full_path):
        raise ValueError(f"{what} {full_path} not found (image_folder={image_folder!r})")
    return full_path


# Larger images are refused: a decompression bomb (a small file of 14000x14000 pixels) would take
# gigabytes to decode, and LLaVA's training images are at most a few megapixels.
MAX_IMAGE_PIXELS = 50_000_000  # e.g. 7000 x 7000


def load_image(path):
    """The decoded 8-bit RGB image at `path`; an unreadable, truncated, oversized or
    floating-point file raises ValueError naming it (a bad record: reported, or skipped)."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image {path} has {image.width}x{image.height} pixels, more than the "
                                 f"{MAX_IMAGE_PIXELS:,} small-vlm decodes (data.MAX_IMAGE_PIXELS); downscale it")
            image.load()  # decode now: a corrupt or truncated file fails here, naming its record
            return to_rgb(image)
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path} cannot be read: {e}") from None
    except ValueError as e:
        raise ValueError(str(e) if str(path) in str(e) else f"image {path}: {e}") from None


def load_video(path, n_frames):
    """n_frames RGB frames (PIL) of the clip at `path`, sampled uniformly: frame i * total // n_frames,
    as transformers' video processors sample, so its own processor picks the same frames. Frames are
    decoded one at a time and only the chosen ones kept: a long clip never sits in memory. A clip with
    fewer frames than n_frames is refused, not padded with repeats (transformers refuses it too); a
    still image, a damaged or truncated file, or frames over MAX_IMAGE_PIXELS raise ValueError naming it."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"video {path} holds no video frames (no video stream)")
            if container.format.name.endswith("_pipe") or container.format.name == "image2":
                raise ValueError(f"video {path} is a still image ({container.format.name}); list it under 'image'")
            stream = container.streams.video[0]
            if stream.width * stream.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"video {path} has {stream.width}x{stream.height} frames, more than the "
                                 f"{MAX_IMAGE_PIXELS:,} pixels small-vlm decodes (data.MAX_IMAGE_PIXELS); downscale it")
            # the header's frame count; some containers (webm, mkv) leave it 0: count the packets (no decoding)
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if total < n_frames:
                raise ValueError(f"video {path} has {total} frames, fewer than video_frames={n_frames}; lower "
                                 "video_frames or drop the clip (frames are not repeated)")
            chosen = [i * total // n_frames for i in range(n_frames)]
            container.seek(0)
            frames = []
            for i, frame in enumerate(container.decode(stream)):
                if i in chosen:
                    frames.append(frame.to_image())
                if i == chosen[-1]:
                    break
    except av.FFmpegError as e:
        raise ValueError(f"video {path} cannot be read: {e}") from None
    if len(frames) < n_frames:
        raise ValueError(f"video {path}: only {len(frames)} of its {total} frames decode (damaged or truncated)")
    return frames


DEMO_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo", "prepare.py")


def make_demo_files(data_path, vision_model, llm, video=False):
    """make_demo=True: the demo's data (its video demo with video) and tiny backbones where the config
    names them, made by data/demo/prepare.py on first use (there is no download); nothing when they exist."""
    wanted = {"data_path": data_path.split(",")[0], "vision_model": vision_model, "llm": llm}
    missing = [(key, path) for key, path in wanted.items() if not os.path.exists(path)]
    if not missing:
        return
    data_dir, backbones_dir = os.path.dirname(wanted["data_path"]), os.path.dirname(llm)
    done = subprocess.run([sys.executable, DEMO_SCRIPT, "--out", data_dir, "--backbones", backbones_dir]
                          + (["--video"] if video else []), capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip() or "no output").splitlines()[-1].removeprefix("error: ")
        raise UserError(f"make_demo=True: {missing[0][1]} does not exist, and {why}")
    for key, path in missing:
        if not os.path.exists(path):
            raise UserError(f"make_demo wrote the demo into {data_dir} and {backbones_dir}, which has no {path}; "
                            f"point {key} at the demo's files (see configs/demo.py)")


# ----------------------------------------------------------------------------------------------
# 8. See what the model sees: `python data.py --show CONFIG [key=value ...] [--n N | --id ID]`
#
# A template or tokenizer change that shifts the labels fails silently (LLaVA's "tokenization
# mismatch ... (ignored)"): the run trains on nothing, or on the wrong text. --show prints a
# sample as the model gets it, and audits it with a check that shares no code with the labels:
# the supervised tokens, decoded, must be the record's answers, each with its end-of-turn marker.

SUPERVISED_MARKS = ("[[", "]]")  # around supervised text when the output is not a terminal
TERMINAL_COLOURS = {"answer": "\033[1;32m", "image": "\033[36m"}  # bold green answers, cyan images
RESET = "\033[0m"


def token_runs(input_ids, labels, image_id):
    """[(kind, ids), ...]: the sample cut where the kind of token changes: "image", "answer"
    (supervised) or "prompt" (masked)."""
    runs = []
    for token, label in zip(input_ids, labels):
        kind = "image" if token == image_id else "prompt" if label == IGNORE_INDEX else "answer"
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(token)
        else:
            runs.append((kind, [token]))
    return runs


def decode(tokenizer, ids):
    """The text of ids exactly as the tokenizer writes it back: special tokens shown, no clean-up."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def render_sample(input_ids, labels, processor, image_counts, colour, media_id=None):
    """The sample's text with each image's tokens as one `<image xN>` and the supervised text marked.
    A run's text is the growth of the decoded prefix (a SentencePiece tokenizer decodes a run on its
    own without its leading space), with each image decoded as its one <image> token. media_id:
    processor.video_token_id for a video sample (its clip shown as `<video xN>`)."""
    tokenizer = processor.tokenizer
    media_id = processor.image_token_id if media_id is None else media_id
    marker = tokenizer.convert_ids_to_tokens(media_id)  # "<image>" or "<video>"
    counts, shown, prefix, decoded = iter(image_counts), [], [], ""
    for kind, ids in token_runs(input_ids, labels, media_id):
        if kind == "image":  # one run may hold several images back to back (plain, several <image>)
            left = len(ids)
            while left > 0:
                count = next(counts)
                shown.append(mark(f"{marker[:-1]} x{count}>", kind, colour))
                prefix.append(media_id)
                left -= count
            decoded = decode(tokenizer, prefix)
            continue
        prefix += ids
        text = decode(tokenizer, prefix)
        shown.append(mark(text[len(decoded):] if text.startswith(decoded) else decode(tokenizer, ids), kind, colour))
        decoded = text
    return "".join(shown)


def mark(text, kind, colour):
    if kind == "prompt":
        return text
    if colour:
        return TERMINAL_COLOURS[kind] + text + RESET
    return SUPERVISED_MARKS[0] + text + SUPERVISED_MARKS[1] if kind == "answer" else text


def describe_image(k, height, width, processor):
    """One line: how image k becomes its tokens (for anyres: the tile grid, the rows kept, the newlines)."""
    image_processor, count = processor.image_processor, processor.image_token_count(height, width)
    size = image_processor.size
    if image_processor.aspect != "anyres":
        return f"image {k}: {width}x{height} px -> {image_processor.aspect} to {size}x{size} -> {count} tokens"
    from model import anyres_layout

    (rows, cols), (top, bottom, left, right) = anyres_layout(height, width, image_processor.image_grid_pinpoints,
                                                             size, processor.patch_size)
    base = (size // processor.patch_size) ** 2
    return (f"image {k}: {width}x{height} px -> anyres {rows}x{cols} tiles of {size} px + a base tile -> "
            f"{base} base + {bottom - top} rows x ({right - left} + 1 newline) = {count} tokens, "
            f"{bottom - top} newlines")


def ends_the_turn(after, template, tokenizer):
    """True when `after`, the supervised text after an answer, is the answer's end-of-turn marker
    (whitespace around it allowed): plain ends a caption with "\n", vicuna_v1 an answer with the
    EOS, a chat template with one of the tokenizer's special tokens (<|im_end|>, <|eot_id|>, ...)."""
    if template == "plain":
        return after.endswith("\n") and not after.strip()
    if template == "vicuna_v1":
        return after.strip() == tokenizer.eos_token
    return after.strip() in [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def audit_supervision(answers, input_ids, labels, tokenizer, template, cut):
    """[problem, ...] where the supervised tokens of a sample are not exactly the record's answers,
    each once and followed by its end-of-turn marker (whitespace around them allowed); [] when they
    are. It shares no code with render_pieces / tokenize_conversation: it decodes the supervised
    tokens and compares them with the record's text. cut: the sample fills max_seq_len, so its last
    answer may be cut short and later ones missing."""
    problems = []
    shifted = next((p for p, (token, label) in enumerate(zip(input_ids, labels))
                    if label != IGNORE_INDEX and label != token), None)
    if shifted is not None:
        problems.append(f"token {shifted}: the label is {labels[shifted]} but the input id is {input_ids[shifted]} "
                        "(labels not aligned with the ids)")
    spans, start = [], None  # [(first, last + 1)] of each run of supervised positions
    for p, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = p
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, p))
            start = None
    for k, answer in enumerate(answers):
        if k >= len(spans):
            if not cut:
                problems.append(f"answer {k + 1} ({answer[:40]!r}) is not supervised at all")
            continue
        first, end = spans[k]
        text, answer = decode(tokenizer, input_ids[first:end]), answer.strip()
        if cut and end == len(input_ids) and answer.startswith(text.strip()):
            continue  # cut short by max_seq_len, as training sees it
        at = text.find(answer)
        before, after = text[:max(at, 0)], text[at + len(answer):]
        wrong = []
        if at < 0:
            wrong.append(f"it does not hold the answer {answer!r}")
        elif before.strip():
            wrong.append(f"{before!r} comes before the answer")
        if at >= 0 and not ends_the_turn(after, template, tokenizer):
            marker = {"plain": "'\\n'", "vicuna_v1": repr(tokenizer.eos_token)}.get(template, "a special token")
            wrong.append(f"{after!r} follows the answer where its end-of-turn marker ({marker}) should be")
        if wrong:
            problems.append(f"answer {k + 1}, tokens {first}-{end - 1}: the supervised text is {text!r}: "
                            + ", ".join(wrong))
    for first, end in spans[len(answers):]:
        problems.append(f"tokens {first}-{end - 1}: {decode(tokenizer, input_ids[first:end])!r} is supervised but "
                        "is no answer")
    return problems


def show_samples(config, overrides, n=1, record_id=None):
    """Prints records as training gets them and audits their labels; returns 0, or 1 when the audit fails."""
    if not config.endswith(".py"):
        raise UserError(f"--show {config!r}: give a config file (configs/*.py), then key=value overrides")
    cfg, _ = load_config([config, *overrides])
    check_config(cfg, world_size=1)
    if n < 1:
        raise UserError(f"--n {n}: show at least 1 record")
    if cfg.make_demo:
        make_demo_files(cfg.data_path, cfg.vision_model, cfg.llm, video=cfg.video_frames > 0)
    try:
        processor = build_processor(cfg.vision_model, cfg.llm, cfg.image_aspect, cfg.drop_cls,
                                    parse_pinpoints(cfg.image_grid_pinpoints), video_frames=cfg.video_frames)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot build the processor from vision_model={cfg.vision_model!r}, llm={cfg.llm!r}: "
                        f"{first_line(e)}") from None
    if cfg.template == "chat":
        check_chat_template(processor, cfg.llm)
    datasets.disable_progress_bars()
    try:
        dataset = VLMDataset(cfg.data_path, cfg.image_folder, processor, cfg.template, cfg.max_seq_len,
                             image_paths_outside=cfg.image_paths_outside, video_frames=cfg.video_frames)
    except (ValueError, FileNotFoundError) as e:  # the messages name the file (and line)
        raise UserError(str(e)) from None
    if record_id is None:
        indices = range(min(n, len(dataset)))
    else:
        ids = dataset.records["id"]
        if record_id not in ids:
            raise UserError(f"--id {record_id!r}: no record of data_path={cfg.data_path!r} has this id "
                            f"({len(ids)} records; the first is {ids[0]!r})")
        indices = [ids.index(record_id)]
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    marks = "in colour" if colour else "in " + " ".join(SUPERVISED_MARKS)
    print(f"{cfg.data_path}: {len(dataset)} records; template={cfg.template}, llm={cfg.llm}, "
          f"image_aspect={cfg.image_aspect}, max_seq_len={cfg.max_seq_len}; supervised text {marks}")
    failed = []
    for i in indices:
        record, sample = dataset.records[i], dataset[i]  # dataset[i]: a bad record is one error naming it
        input_ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        sizes = sample["image_sizes"].tolist()
        media = "video" if record["video"] else "image"
        media_id = processor.video_token_id if record["video"] else processor.image_token_id
        n_media = input_ids.count(media_id)
        n_text, n_supervised = len(input_ids) - n_media, sum(label != IGNORE_INDEX for label in labels)
        counts = [n_media] if record["video"] else [processor.image_token_count(h, w) for h, w in sizes]
        print(f"\n--- record {record['id']!r} (index {i})")
        print(render_sample(input_ids, labels, processor, counts, colour, media_id))
        for k, (height, width) in enumerate(sizes, start=1):
            print(describe_image(k, height, width, processor))
        if record["video"]:
            frames = sample["pixel_values_videos"].shape[1]
            print(f"video {record['video']}: {frames} frames sampled, each pooled 2x2 to "
                  f"{n_media // frames} tokens -> {n_media} tokens")
        print(f"{len(input_ids)} tokens: {n_media} {media} + {n_text} text; {n_supervised} supervised = "
              f"{n_supervised / len(input_ids):.1%} of all tokens, {n_supervised / max(n_text, 1):.1%} of the text")
        cut = len(input_ids) >= cfg.max_seq_len
        if cut:
            print(f"the sample fills max_seq_len={cfg.max_seq_len}: training cuts it there, so may its last answer")
        answers = [turn["value"] for turn in record["conversations"][1::2]]
        problems = audit_supervision(answers, input_ids, labels, processor.tokenizer, cfg.template, cut)
        if problems:
            failed.append(record["id"])
            print(f"audit FAILED for record {record['id']!r}: " + "; ".join(problems))
        else:
            print("audit: ok, the supervised text is " + ("the record's answer and its end-of-turn marker"
                  if len(answers) == 1 else f"the record's {len(answers)} answers, each with its end-of-turn marker"))
    print(f"\naudit: {len(indices) - len(failed)} of {len(indices)} samples supervise exactly their answers" +
          (f"; FAILED: {', '.join(map(repr, failed))}" if failed else ""))
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="See what the model sees: python data.py --show configs/demo.py --n 3 "
                                                 "(the demo data itself: python data/demo/prepare.py)")
    parser.add_argument("--show", metavar="CONFIG", required=True,
                        help="print records of CONFIG's data as the model gets them, and audit their labels")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train.py")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--n", type=int, default=1, help="the first N records (default 1)")
    which.add_argument("--id", help="the record with this id")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    return show_samples(args.show, args.overrides, args.n, args.id)


if __name__ == "__main__":
    exit_after(main)
