"""data.py: loading, rendering, label masks, images, batching, sampling and the demo data."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from conftest import ROOT, exit_code, write_image, write_json
from data import (
    TEMPLATES,
    VICUNA_SYSTEM,
    LengthGroupedSampler,
    SampleTooLong,
    VLMDataset,
    chat_template_for,
    collate,
    load_records,
    pack_rows,
    render_pieces,
    tokenize_conversation,
)
from model import IGNORE_INDEX, build_vlm
from prepare import make_demo_data
from run import UserError

ONE_TURN = [{"from": "human", "value": "What colour is it?\n<image>"}, {"from": "gpt", "value": "red"}]
TWO_TURNS = ONE_TURN + [{"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a circle"}]


@pytest.fixture(scope="module")
def processor(tiny_backbones):
    """The tiny processor: byte-level BPE with <s>, </s>, ChatML; <image> = 16 image tokens of 32x32 images."""
    return build_vlm(*tiny_backbones)[1]


def supervised_runs(labels):
    """The supervised label ids, as one list per contiguous run."""
    runs, previous = [], IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def expected_answers(template, conversation, tokenizer):
    answers = [turn["value"] for turn in conversation[1::2]]
    if template == "plain":
        return [answers[0] + "\n"]
    if template == "vicuna_v1":  # the space after "ASSISTANT:" is generated with the answer
        return [f" {a}{tokenizer.eos_token}" for a in answers]
    return [f"{a}<|im_end|>" for a in answers]


def expected_text(template, conversation):
    """The prompt text each template writes, by hand (the tiny tokenizer is byte-level: no space after
    <image>), with <image> moved to the front of its turn as LLaVA does."""
    turns = [("<image>\nWhat colour is it?", "red"), ("And the shape?", "a circle")][:len(conversation) // 2]
    if template == "plain":
        return "<image>red\n"
    if template == "vicuna_v1":
        return VICUNA_SYSTEM + " " + "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in turns)
    return "".join(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for q, a in turns)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("conversation", [ONE_TURN, TWO_TURNS], ids=["one-turn", "two-turns"])
def test_labels_supervise_exactly_the_answers(processor, template, conversation):
    if template == "plain" and conversation is TWO_TURNS:
        with pytest.raises(ValueError, match="one human and one gpt turn"):
            tokenize_conversation(conversation, template, processor)
        return
    tokenizer = processor.tokenizer
    input_ids, labels = tokenize_conversation(conversation, template, processor)
    assert len(input_ids) == len(labels)
    decoded = [tokenizer.decode(run) for run in supervised_runs(labels)]
    assert decoded == expected_answers(template, conversation, tokenizer)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, input_ids))

    expected_ids = []  # the whole prompt, written out here, tokenized by the tokenizer alone
    for token in tokenizer(expected_text(template, conversation))["input_ids"]:
        expected_ids += [token] * (processor.num_image_tokens if token == processor.image_token_id else 1)
    assert input_ids == expected_ids
    assert input_ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert input_ids.count(processor.image_token_id) == processor.num_image_tokens == 16


def test_vicuna_renders_the_llava_1_5_prompt(processor):
    pieces = render_pieces(TWO_TURNS, "vicuna_v1", processor.tokenizer)
    assert "".join(piece for piece, _ in pieces) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat colour is it? ASSISTANT: "
        "red</s>USER: And the shape? ASSISTANT: a circle</s>"
    )


def test_plain_renders_image_then_caption(processor):
    pieces = render_pieces(ONE_TURN, "plain", processor.tokenizer)
    assert pieces == [("<image>", False), ("red\n", True)]


@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_template_reproduces_the_training_prompt(processor, template):
    conversation = ONE_TURN if template == "plain" else TWO_TURNS
    pieces = render_pieces(conversation, template, processor.tokenizer)
    prompt = "".join(piece for piece, _ in pieces[:[supervised for _, supervised in pieces].index(True)])
    chat_template = chat_template_for(template, processor.tokenizer)
    as_items = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    as_string = [{"role": "user", "content": "What colour is it?\n<image>"}]
    bos = processor.tokenizer.bos_token  # the tokenizer adds it to training's text; the template writes it
    for messages in (as_items, as_string):
        rendered = processor.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True)
        assert rendered == bos + prompt

    # A whole conversation renders the full training text (answers included).
    full = [{"role": "user" if turn["from"] == "human" else "assistant", "content": turn["value"]}
            for turn in conversation]
    assert processor.apply_chat_template(full, chat_template=chat_template) == bos + "".join(p for p, _ in pieces)


@pytest.mark.parametrize("bos", ["added by the tokenizer", "none", "written by the LLM's template"])
def test_chat_template_writes_the_bos_training_had_once(tiny_backbones, bos):
    """Clients that tokenize the rendered prompt without special tokens (vLLM's chat,
    apply_chat_template(tokenize=True)) get training's ids, BOS and all; a tokenizer that adds none
    (Qwen's) gets none, and a template that writes its own (Llama-3's) is not given a second one."""
    processor = build_vlm(*tiny_backbones)[1]
    tokenizer = processor.tokenizer
    if bos == "none":
        tokenizer.add_bos_token = False  # rebuilds its post-processor without the BOS
    if bos == "written by the LLM's template":
        tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    conversation = [{"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "red"}]
    for template in ("vicuna_v1", "chat"):
        input_ids, labels = tokenize_conversation(conversation, template, processor)
        first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is it?"}],
                                                   chat_template=chat_template_for(template, tokenizer),
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)
        assert prompt_ids == input_ids[:first_answer], template
        assert prompt_ids.count(tokenizer.bos_token_id) == (bos != "none"), template


def test_vicuna_chat_template_takes_a_system_message(processor):
    chat_template = chat_template_for("vicuna_v1", processor.tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = processor.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True)
    assert rendered == "<s>Be brief. USER: Hi ASSISTANT:"


def test_chat_template_that_is_not_prefix_stable_is_refused(processor):
    tokenizer = processor.tokenizer
    original = tokenizer.chat_template
    # Renders only the last message: shorter conversations are not prefixes of longer ones.
    tokenizer.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    try:
        with pytest.raises(ValueError, match="not prefix-stable"):
            render_pieces(TWO_TURNS, "chat", tokenizer)
    finally:
        tokenizer.chat_template = original


def test_chat_template_that_writes_the_bos_gets_no_second_one(processor):
    tokenizer = processor.tokenizer
    original = tokenizer.chat_template
    tokenizer.chat_template = "{{ bos_token }}" + original  # as Llama-3's template does
    try:
        input_ids, labels = tokenize_conversation(ONE_TURN, "chat", processor)
    finally:
        tokenizer.chat_template = original
    assert input_ids.count(tokenizer.bos_token_id) == 1 and input_ids[0] == tokenizer.bos_token_id
    assert [tokenizer.decode(run) for run in supervised_runs(labels)] == ["red<|im_end|>"]


def test_pad_transform_centres_a_wide_image_on_the_mean_colour(processor):
    image_processor = processor.image_processor
    assert image_processor.aspect == "pad" and image_processor.size == 32
    wide = Image.new("RGB", (64, 32), (255, 0, 0))  # becomes 32x16: rows 8-23 are image, the rest border
    pixels, = image_processor.transform(wide)  # one tile, (3, 32, 32), normalized
    mean = torch.tensor(image_processor.image_mean).view(3, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1)
    rgb = (pixels * std.unsqueeze(-1) + mean.unsqueeze(-1)) * 255  # back to 0-255
    border = torch.cat([rgb[:, :6], rgb[:, -6:]], dim=1).reshape(3, -1)
    assert torch.allclose(border, (mean * 255).floor().expand_as(border), atol=1.5)
    inside = rgb[:, 10:22].reshape(3, -1)
    assert torch.allclose(inside, torch.tensor([255.0, 0.0, 0.0]).view(3, 1).expand_as(inside), atol=1.5)


def test_truncation_never_splits_image_tokens(processor):
    image_id = processor.image_token_id
    caption = "The quick brown fox jumps over the lazy dog. " * 3
    conversation = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]
    full_ids, full_labels = tokenize_conversation(conversation, "plain", processor)
    assert len(full_ids) > 30  # BOS + 16 image tokens + the caption

    ids, labels = tokenize_conversation(conversation, "plain", processor, max_seq_len=20)
    assert ids == full_ids[:20] and labels == full_labels[:20]
    assert ids.count(image_id) == 16 and labels[-1] != IGNORE_INDEX

    for too_short in (17, 10):  # 17: the image fits but no answer token does; 10: cuts the image
        with pytest.raises(SampleTooLong):
            tokenize_conversation(conversation, "plain", processor, max_seq_len=too_short)

    # vicuna_v1: the image comes after the system prompt; a cut inside it is refused, a cut after it is not.
    ids, _ = tokenize_conversation(ONE_TURN, "vicuna_v1", processor)
    first_image = ids.index(image_id)
    with pytest.raises(SampleTooLong, match="image tokens end"):
        tokenize_conversation(ONE_TURN, "vicuna_v1", processor, max_seq_len=first_image + 8)
    assert tokenize_conversation(ONE_TURN, "vicuna_v1", processor, max_seq_len=len(ids) - 1)[0] == ids[:-1]


# ----------------------------------------------------------------------------------------------
# Files, records and images




def test_load_records_normalises_mixed_records(tmp_path):
    records = [
        {"id": "text", "conversations": TWO_TURNS},
        {"id": "one", "image": "a.png", "conversations": ONE_TURN, "extra": 1},
        {"id": "two", "image": ["a.png", "b.png"], "conversations": ONE_TURN},
        {"id": "clip", "video": "c.mp4", "conversations": ONE_TURN},
    ]
    json_path = write_json(tmp_path / "a.json", records[:2])
    jsonl_path = tmp_path / "b.jsonl"
    jsonl_path.write_text(json.dumps(records[2]) + "\n\n" + json.dumps({"conversations": ONE_TURN}) + "\n"
                          + json.dumps(records[3]) + "\n")
    dataset = load_records(f"{json_path},{jsonl_path}")
    assert dataset.column_names == ["id", "image", "video", "conversations", "problem"]
    assert dataset["id"][:] == ["text", "one", "two", "b.jsonl:1", "clip"]  # a record without id gets file:index
    assert dataset["image"][:] == [[], ["a.png"], ["a.png", "b.png"], [], []]
    assert dataset["video"][:] == ["", "", "", "", "c.mp4"]
    assert dataset[0]["conversations"] == TWO_TURNS
    assert dataset.cache_files  # memory-mapped Arrow, not Python objects
    assert load_records([json_path])["id"][:] == ["text", "one"]


def test_malformed_files_name_the_file_and_line(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n {"id": "a", "conversations": []},\n {"id": "b" "conversations": []}\n]')
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON at line 3"):
        load_records(str(bad_json))

    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(json.dumps({"id": "a", "conversations": ONE_TURN}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2"):
        load_records(str(bad_jsonl))

    trailing_comma = tmp_path / "comma.json"
    trailing_comma.write_text('[{"id": "a", "conversations": []},\n]')
    with pytest.raises(ValueError, match=r"comma\.json: malformed JSON at line 2"):
        load_records(str(trailing_comma))

    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_records(str(tmp_path / "missing.json"))


BAD_RECORDS = [
    ({"id": "no-conv"}, "'conversations' is missing"),
    ({"id": "empty-conv", "image": "red.png", "conversations": []}, "'conversations' is empty; it must be a list"),
    ({"id": "text-conv", "image": "red.png", "conversations": "<image>\nWhat?"}, "'conversations' is a str; it must"),
    ({"id": "empty-path", "image": "", "conversations": ONE_TURN}, "its image path is empty"),
    ({"id": "bad-role", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
     "unknown role from='robot'"),
    ({"id": "empty-answer", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]},
     "empty assistant turn"),
    ({"id": "no-file", "image": "missing.png", "conversations": ONE_TURN}, r"missing\.png not found"),
    ({"id": "two-markers", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]}, "2 <image> markers"),
    ({"id": "no-marker", "image": "red.png", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}, "0 <image> markers"),
]


@pytest.mark.parametrize("record, reason", BAD_RECORDS, ids=[r["id"] for r, _ in BAD_RECORDS])
def test_bad_records_raise_or_are_skipped(tmp_path, processor, record, reason):
    write_image(tmp_path / "red.png", (40, 40), (255, 0, 0))
    good = {"id": "good", "image": "red.png", "conversations": ONE_TURN}
    path = write_json(tmp_path / "data.json", [good, record])

    strict = VLMDataset(path, str(tmp_path), processor, "vicuna_v1")
    with pytest.raises(UserError, match=reason) as error:
        strict[1]
    assert f"id={record['id']!r}" in str(error.value)

    lenient = VLMDataset(path, str(tmp_path), processor, "vicuna_v1", skip_bad_samples=True)
    batch = collate([lenient[0], lenient[1]], processor.tokenizer.pad_token_id)
    assert batch["ids"] == ["good"] and batch["input_ids"].shape[0] == 1
    assert [skipped_id for skipped_id, _ in batch["skipped"]] == [record["id"]]
    assert reason.replace("\\", "") in batch["skipped"][0][1]


def test_too_long_records_are_skipped_and_counted(tmp_path, processor):
    write_image(tmp_path / "red.png", (40, 40), (255, 0, 0))
    long_answer = "The quick brown fox jumps over the lazy dog. " * 40
    records = [{"id": "short", "image": "red.png", "conversations": ONE_TURN},
               {"id": "long", "image": "red.png", "conversations": [
                   {"from": "human", "value": long_answer + "<image>"}, {"from": "gpt", "value": "x"}]}]
    dataset = VLMDataset(write_json(tmp_path / "d.json", records), str(tmp_path), processor, "vicuna_v1",
                         max_seq_len=128, skip_bad_samples=True)
    batch = collate([dataset[0], dataset[1]], processor.tokenizer.pad_token_id)
    assert batch["ids"] == ["short"] and len(batch["skipped"]) == 1
    assert batch["skipped"][0][0] == "long" and "max_seq_len=128" in batch["skipped"][0][1]


def test_text_only_and_multi_image_records_batch_together(tmp_path, processor):
    colours = {"red.png": (255, 0, 0), "green.png": (0, 255, 0), "blue.png": (0, 0, 255)}
    for name, colour in colours.items():
        write_image(tmp_path / name, (40, 40), colour)
    two_images = [{"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "no"}]
    records = [
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "pair", "image": ["green.png", "blue.png"], "conversations": two_images},
        {"id": "one", "image": "red.png", "conversations": ONE_TURN},
    ]
    dataset = VLMDataset(write_json(tmp_path / "d.json", records), str(tmp_path), processor, "vicuna_v1")
    assert dataset.has_image == [False, True, True]
    assert dataset.lengths[1] == 5 + 2 * 16 and dataset.lengths[0] == 2  # words + image tokens
    samples = [dataset[i] for i in range(3)]
    assert [tuple(s["pixel_values"].shape) for s in samples] == [(0, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    assert samples[1]["input_ids"].tolist().count(processor.image_token_id) == 2 * 16

    pad = processor.tokenizer.pad_token_id
    batch = collate(samples, pad)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    dominant = batch["pixel_values"].mean(dim=(2, 3)).argmax(dim=1).tolist()  # channel of each image
    assert dominant == [1, 2, 0]  # green, blue (record "pair"), then red: sample order
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch["input_ids"][short, lengths[short]:] == pad).all()
    assert (batch["labels"][short, lengths[short]:] == IGNORE_INDEX).all()

    assert collate(samples[:1], pad)["pixel_values"] is None


def test_packed_batch_keeps_samples_whole_and_images_in_token_order(tmp_path, processor):
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for name, rgb in colours.items():
        write_image(tmp_path / f"{name}.png", (32, 32), rgb)
    records = [{"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]},
               {"id": "pair", "image": ["green.png", "blue.png"],
                "conversations": [{"from": "human", "value": "<image> <image> two?"}, {"from": "gpt", "value": "yes"}]},
               {"id": "one", "image": "red.png", "conversations": ONE_TURN}]
    dataset = VLMDataset(write_json(tmp_path / "d.json", records), str(tmp_path), processor, "vicuna_v1")
    samples = [dataset[i] for i in range(3)]
    lengths = [len(s["input_ids"]) for s in samples]
    batch = collate(samples, processor.tokenizer.pad_token_id, pack_length=sum(lengths))  # room for all in one row
    assert batch["input_ids"].shape == (1, sum(lengths)) and batch["attention_mask"] is None
    assert batch["num_tokens"] == sum(lengths) and sorted(batch["ids"]) == ["one", "pair", "text"]
    begin = 0
    for sample_id in batch["ids"]:  # each sample whole and in place, positions restarting at 0
        sample = samples[["text", "pair", "one"].index(sample_id)]
        n = len(sample["input_ids"])
        assert batch["input_ids"][0, begin:begin + n].tolist() == sample["input_ids"].tolist()
        assert batch["labels"][0, begin + 1:begin + n].tolist() == sample["labels"][1:].tolist()
        assert batch["position_ids"][0, begin:begin + n].tolist() == list(range(n))
        begin += n
    # images in the order their tokens appear in the packed row: the splice fills them in that order
    expected = [c for i in batch["ids"] for c in {"pair": [1, 2], "one": [0], "text": []}[i]]
    assert batch["pixel_values"].mean(dim=(2, 3)).argmax(dim=1).tolist() == expected
    assert batch["ids"][0] != "text"  # longest first: the packed order differs from the input order


@pytest.mark.parametrize("lengths, capacity, rows", [
    ([9, 2, 2, 2, 2, 1], 10, 2),  # evenly filled: 9 and 2+2+2+2+1
    ([6, 4, 3, 3, 2, 2], 10, 3),  # 3 rows of width 8 (24 positions) beat 6 rows of 6 (36)
    ([30, 3, 3], 100, 1),
    ([10, 10, 10], 10, 3),  # no room to share
    ([5, 5, 5, 5], 10, 4),  # equal lengths: packing saves nothing, so rows stay one sample each
])
def test_pack_rows_fills_rows_without_overflow(lengths, capacity, rows):
    packed = pack_rows(lengths, capacity)
    assert sorted(i for row in packed for i in row) == list(range(len(lengths)))  # every sample once
    fills = [sum(lengths[i] for i in row) for row in packed]
    assert len(packed) == rows and max(fills) <= capacity


def test_packing_never_computes_more_positions_than_padding():
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 2049, size=rng.integers(1, 33)).tolist()
        packed = pack_rows(lengths, 2048)
        width = max(sum(lengths[i] for i in row) for row in packed)
        assert width <= 2048 and len(packed) * width <= len(lengths) * max(lengths)


# ----------------------------------------------------------------------------------------------
# Sampler


def make_lengths(n=480, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(10, 1000, n).tolist(), (rng.random(n) < 0.8).tolist()


def test_sampler_ranks_are_disjoint_and_complete():
    lengths, has_image = make_lengths(n=480)
    has_image = [i < 384 for i in range(480)]  # both groups divisible by the global batch of 12
    shares = [list(LengthGroupedSampler(lengths, has_image, 12, 4, world_size=3, rank=r, seed=1)) for r in range(3)]
    assert all(len(share) == 160 == len(LengthGroupedSampler(lengths, has_image, 12, 4, 3, r)) for r, share in
               enumerate(shares))
    assert sorted(sum(shares, [])) == list(range(480))

    # Uneven sizes: every rank gets the same count, together they cover everything.
    lengths, has_image = make_lengths(n=101)
    shares = [list(LengthGroupedSampler(lengths, has_image, 24, 4, world_size=3, rank=r)) for r in range(3)]
    assert len({len(share) for share in shares}) == 1 and len(shares[0]) % 4 == 0
    assert len(shares[0]) == len(LengthGroupedSampler(lengths, has_image, 24, 4, world_size=3))
    assert set(sum(shares, [])) == set(range(101))


def test_sampler_batches_keep_modalities_apart_except_the_tail():
    lengths, has_image = make_lengths(n=490)
    has_image = [i % 5 != 0 for i in range(490)]  # 392 image = 24 x 16 + 8; 98 text-only = 6 x 16 + 2
    order = list(LengthGroupedSampler(lengths, has_image, batch_size=16, micro_batch_size=8, seed=3))
    batches = [order[b:b + 16] for b in range(0, len(order), 16)]
    assert len(batches) == 24 + 6 + 1  # the full batches of each group, then one tail batch
    for batch in batches[:-1]:
        assert len({has_image[i] for i in batch}) == 1
    # The tail: the 8 image and 2 text-only records left over, then 6 repeats to fill the step.
    tail, repeats = batches[-1][:10], batches[-1][10:]
    assert sorted(has_image[i] for i in tail) == [False] * 2 + [True] * 8
    assert sorted(order[:480] + tail) == list(range(490))  # every record once, before the repeats
    assert repeats == order[:6]  # the epoch's first samples
def test_sampler_order_is_deterministic_per_seed_and_epoch():
    lengths, has_image = make_lengths()
    sampler = LengthGroupedSampler(lengths, has_image, 8, 4, seed=5)
    first = list(sampler)
    assert first == list(LengthGroupedSampler(lengths, has_image, 8, 4, seed=5))
    assert first != list(LengthGroupedSampler(lengths, has_image, 8, 4, seed=6))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == sorted(first)


def test_sampler_skip_resumes_mid_epoch_once():
    lengths, has_image = make_lengths()
    sampler = LengthGroupedSampler(lengths, has_image, 8, 4, world_size=2, rank=1, seed=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.skip(5 * 8)  # 5 steps of 8: this rank's 5 micro-batches of 4
    assert len(sampler) == len(full) - 20
    assert list(sampler) == full[20:]
    assert list(sampler) == full  # the skip applies to one pass only
    with pytest.raises(ValueError, match="whole steps"):
        sampler.skip(37)


def step_contents(batch_size, micro, world, skip_steps=0, seed=4):
    """{step: sorted sample indices} that every rank together trains, from `skip_steps` on."""
    lengths, has_image = make_lengths(n=203, seed=1)
    steps = {}
    for rank in range(world):
        sampler = LengthGroupedSampler(lengths, has_image, batch_size, micro, world, rank, seed=seed)
        sampler.skip(skip_steps * batch_size)
        share = list(sampler)
        per_step = batch_size // world
        for k in range(0, len(share), per_step):
            steps.setdefault(skip_steps + k // per_step, []).extend(share[k:k + per_step])
    return {step: sorted(ids) for step, ids in steps.items()}


def test_sampler_steps_do_not_depend_on_micro_batch_or_processes():
    """Resuming after an out-of-memory error with a smaller micro-batch, or on another GPU count,
    trains the very next samples: each step holds the same samples whatever the split."""
    two_ranks = step_contents(batch_size=16, micro=4, world=2)
    assert step_contents(16, 2, 1) == step_contents(16, 8, 2) == step_contents(16, 1, 4) == two_ranks
    resumed = step_contents(16, 2, 1, skip_steps=5)  # 2 ranks ran 5 steps, 1 rank continues
    assert resumed == {s: ids for s, ids in two_ranks.items() if s >= 5}
    seen = sum((two_ranks[s] for s in range(5)), []) + sum(resumed.values(), [])
    assert sorted(seen) == sorted(sum(two_ranks.values(), []))  # the epoch, every sample as often as once


def test_length_grouping_reduces_padding():
    lengths, has_image = make_lengths(n=2000)

    def padded_tokens(order, batch=8):
        return sum(max(lengths[i] for i in order[b:b + batch]) * batch for b in range(0, len(order), batch))

    grouped = padded_tokens(list(LengthGroupedSampler(lengths, has_image, 8, 8)))
    shuffled = padded_tokens(np.random.default_rng(0).permutation(2000).tolist())
    assert grouped < 0.6 * shuffled
    ungrouped = list(LengthGroupedSampler(lengths, has_image, 8, 8, group_by_length=False))  # group_by_length=False
    assert sorted(ungrouped) == list(range(2000)) and grouped < 0.6 * padded_tokens(ungrouped)


# ----------------------------------------------------------------------------------------------
# Demo data


def test_demo_data_is_deterministic_balanced_and_loads(tmp_path, processor):
    sizes = dict(n_pretrain=20, n_finetune=200, n_eval=72)
    first = make_demo_data(str(tmp_path / "a"), **sizes)
    make_demo_data(str(tmp_path / "b"), **sizes)
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "a")
                   for d, _, fs in os.walk(tmp_path / "a") for f in fs)
    assert len(files) == 3 + 20 + 72 + sum(1 for r in json.load(open(first["finetune"])) if "image" in r)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    evaluation = [json.loads(line) for line in open(first["eval"])]
    for category in ("colour", "shape", "position"):
        answers = [r["answer"] for r in evaluation if r["category"] == category]
        counts = {a: answers.count(a) for a in set(answers)}
        assert len(counts) in (6, 3, 4) and max(counts.values()) == min(counts.values()), (category, counts)
        assert all(r["question"] == evaluation[0 if category == "colour" else 1 if category == "shape" else 2]
                   ["question"] for r in evaluation if r["category"] == category)

    finetune = VLMDataset(first["finetune"], first["image_folder"], processor, "vicuna_v1")
    assert 0 < has_no_image(finetune) < 0.15
    assert any(len(r["conversations"]) > 2 for r in finetune.records)
    for i in range(0, len(finetune), 10):
        assert "skipped" not in finetune[i]
    pretrain = VLMDataset(first["pretrain"], first["image_folder"], processor, "plain")
    sample = pretrain[0]
    assert sample["pixel_values"].shape == (1, 3, 32, 32)
    assert processor.tokenizer.decode(sample["labels"][sample["labels"] != IGNORE_INDEX]).endswith("\n")


def has_no_image(dataset):
    return 1 - sum(dataset.has_image) / len(dataset)


# ----------------------------------------------------------------------------------------------
# Equal to LLaVA-1.5's own preprocessing on a SentencePiece (Llama-2 / Vicuna) tokenizer


@pytest.fixture(scope="module")
def vicuna_processor(vicuna_like_tokenizer):
    """Our processor around the Vicuna-shaped SentencePiece tokenizer, 3 image tokens per image."""
    from model import VLMImageProcessor, VLMProcessor, add_image_token, load_tokenizer

    tokenizer = load_tokenizer(vicuna_like_tokenizer)
    add_image_token(tokenizer)
    return VLMProcessor(VLMImageProcessor(size=32), tokenizer, num_image_tokens=3)


class LlavaRules:
    """What LLaVA-1.5's preprocessing (llava/train/train.py, llava/mm_utils.py) gives, written from its
    rules on the raw SentencePiece model, independent of data.py:
    - its slow LlamaTokenizer with legacy=False: BOS, then the text with SentencePiece's word-start
      "▁" at its start but none after a "</s>" inside it;
    - tokenizer_image_token: the text between <image> markers is tokenized on its own (its BOS
      dropped), one image id between the pieces;
    - plain labels: all but BOS and the image; vicuna_v1 labels: each answer and its </s>."""

    def __init__(self, folder, bos, eos):
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        self.with_prefix = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
        proto = sentencepiece_model_pb2.ModelProto()
        with open(os.path.join(folder, "tokenizer.model"), "rb") as f:
            proto.ParseFromString(f.read())
        proto.normalizer_spec.add_dummy_prefix = False
        self.without_prefix = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.bos, self.eos = bos, eos

    def text(self, text):
        ids = []
        for k, part in enumerate(text.split("</s>")):
            ids += [self.eos] if k else []
            ids += (self.with_prefix if k == 0 else self.without_prefix).encode(part) if part else []
        return ids

    def with_images(self, prompt, image):
        ids = [self.bos]
        for k, chunk in enumerate(prompt.split("<image>")):
            ids += ([image] if k else []) + self.text(chunk)
        return ids

    def plain(self, caption, image):
        ids = self.with_images("<image>" + caption + "\n", image)
        return ids, [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]

    def vicuna(self, turns, image):
        """turns: [(question, answer)], the first question with "<image>\\n" in front when there is one."""
        prompt = VICUNA_SYSTEM + " " + "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in turns)
        ids = self.with_images(prompt, image)
        labels = [IGNORE_INDEX] * len(ids)
        for k, (q, a) in enumerate(turns):  # the ids of each answer + </s> sit where the prefix up to it ends
            before = (VICUNA_SYSTEM + " " + "".join(f"USER: {q2} ASSISTANT: {a2}</s>" for q2, a2 in turns[:k])
                      + f"USER: {q} ASSISTANT:")
            start = len(self.with_images(before, image))
            end = len(self.with_images(before + f" {a}</s>", image))
            labels[start:end] = ids[start:end]
        return ids, labels


def expand_images(ids, labels, image_id, n):
    """One image id -> n image ids (label -100), as the processor writes them."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        out_ids += [token] * (n if token == image_id else 1)
        out_labels += [IGNORE_INDEX] * n if token == image_id else [label]
    return out_ids, out_labels


CAPTIONS = ["select luxury furniture 3 - inch gel memory foam mattress topper", "olympic athlete in action",
            "Hello  world, the   world is round", "   leading spaces and a\ttab", "cafe 12345 東京"]
QA = [[("What is the man holding?", "The man is holding an umbrella in the rain.")],
      [("What is this?", "Red"), ("Hello  world?", "def add(a, b):\n    return a + b\n\nprint(add(1, 2))")],
      [("Answer the question using a single word or phrase.", "Brown "), ("Three people?", " Yes, three.")]]


@pytest.mark.parametrize("caption", CAPTIONS)
@pytest.mark.parametrize("where", ["before", "after", "alone"])
def test_plain_ids_and_labels_equal_llavas(vicuna_processor, vicuna_like_tokenizer, caption, where):
    tokenizer, image = vicuna_processor.tokenizer, vicuna_processor.image_token_id
    llava = LlavaRules(vicuna_like_tokenizer, tokenizer.bos_token_id, tokenizer.eos_token_id)
    human = {"before": "<image>\nDescribe the photo.", "after": "Describe the photo.\n<image>", "alone": "<image>"}[where]
    conversation = [{"from": "human", "value": human}, {"from": "gpt", "value": caption}]
    expected = expand_images(*llava.plain(caption, image), image, 3)
    assert tokenize_conversation(conversation, "plain", vicuna_processor) == expected


@pytest.mark.parametrize("turns", QA, ids=["one-turn", "code", "spaces"])
@pytest.mark.parametrize("image", ["front", "back", "alone", "none"])
def test_vicuna_ids_and_labels_equal_llavas(vicuna_processor, vicuna_like_tokenizer, turns, image):
    tokenizer, image_id = vicuna_processor.tokenizer, vicuna_processor.image_token_id
    llava = LlavaRules(vicuna_like_tokenizer, tokenizer.bos_token_id, tokenizer.eos_token_id)
    first = turns[0][0]
    human = {"front": f"<image>\n{first}", "back": f"{first}\n<image>", "alone": "<image>", "none": first}[image]
    conversation = [{"from": "human", "value": human}, {"from": "gpt", "value": turns[0][1]}]
    for q, a in turns[1:]:
        conversation += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    # LLaVA moves the image to the front of its turn and strips the turn (preprocess_multimodal)
    first_turn = {"front": f"<image>\n{first}", "back": f"<image>\n{first}", "alone": "<image>", "none": first}[image]
    expected = expand_images(*llava.vicuna([(first_turn, turns[0][1]), *turns[1:]], image_id), image_id, 3)
    assert tokenize_conversation(conversation, "vicuna_v1", vicuna_processor) == expected


@pytest.mark.parametrize("template", ["plain", "vicuna_v1"])
def test_inference_prompt_ids_equal_the_training_prompt_ids(vicuna_processor, template):
    """The chat template stored with the model writes the separator after <image> too, so the prompt
    ids at inference (our processor, and LlavaProcessor with the same template and tokenizer) are
    the training ids up to the first answer."""
    conversation = [{"from": "human", "value": "What is the man holding?\n<image>"},
                    {"from": "gpt", "value": "An umbrella."}]
    input_ids, labels = tokenize_conversation(conversation, template, vicuna_processor)
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    chat_template = chat_template_for(template, vicuna_processor.tokenizer)
    for content in ("What is the man holding?\n<image>", [{"type": "image"}, {"type": "text", "text": "What is the man holding?"}]):
        prompt = vicuna_processor.apply_chat_template([{"role": "user", "content": content}],
                                                      chat_template=chat_template, add_generation_prompt=True)
        ids = vicuna_processor(text=prompt, images=[Image.new("RGB", (8, 8))])["input_ids"][0].tolist()
        assert ids == input_ids[:first_answer]
        # vLLM's chat adds no special tokens: the template's "<s> " (a space before text) gives training's `<s> ▁A`
        image_id = vicuna_processor.image_token_id
        one_image_id = [t for i, t in enumerate(ids) if t != image_id or ids[i - 1] != image_id]
        assert vicuna_processor.tokenizer(prompt, add_special_tokens=False)["input_ids"] == one_image_id


# ----------------------------------------------------------------------------------------------
# template=chat: what the template writes around an answer


TRIMMING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # trims answers, as Llama-3's does
HEADER_ALWAYS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>{% endfor %}"
                 "{{ '<|im_start|>assistant\n' }}")  # opens the next answer even without add_generation_prompt (Llama-3, 2024-04)


@pytest.mark.parametrize("chat_template", [TRIMMING, HEADER_ALWAYS], ids=["trimming", "header-always"])
def test_chat_supervises_each_answer_as_rendered_and_its_end_token(processor, chat_template):
    tokenizer = processor.tokenizer
    original = tokenizer.chat_template
    tokenizer.chat_template = chat_template
    conversation = [{"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": "A man holding an umbrella in the rain. "},
                    {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "  a circle\n"}]
    try:
        _, labels = tokenize_conversation(conversation, "chat", processor)
        _, one_turn_labels = tokenize_conversation(conversation[:2], "chat", processor)
    finally:
        tokenizer.chat_template = original
    assert [tokenizer.decode(run) for run in supervised_runs(labels)] == [
        "A man holding an umbrella in the rain.<|im_end|>", "a circle<|im_end|>"]
    assert [tokenizer.decode(run) for run in supervised_runs(one_turn_labels)] == [
        "A man holding an umbrella in the rain.<|im_end|>"]


def test_chat_template_that_drops_the_answer_is_refused_with_that_reason(processor):
    tokenizer = processor.tokenizer
    original = tokenizer.chat_template
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'user' %}{{ m['content'] }}"
                               "{% endif %}<|im_end|>{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    try:
        with pytest.raises(ValueError, match="does not write answer 1 after its prompt"):
            render_pieces(ONE_TURN, "chat", tokenizer)
    finally:
        tokenizer.chat_template = original


# ----------------------------------------------------------------------------------------------
# Images that are not plain 8-bit pictures


def test_images_too_large_are_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    import data

    Image.new("1", (8000, 8000)).save(tmp_path / "big.png")  # 64 MP: a tiny file, gigabytes once decoded
    with pytest.raises(ValueError, match=r"big\.png has 8000x8000 pixels, more than the 50,000,000"):
        data.load_image(str(tmp_path / "big.png"))
    # PIL refuses far larger ones at open (a decompression bomb): the same kind of error, naming the file
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 10**9)
    write_image(tmp_path / "bomb.png", (100, 100))
    with pytest.raises(ValueError, match=r"bomb\.png cannot be read: .*decompression bomb"):
        data.load_image(str(tmp_path / "bomb.png"))


def test_16_bit_images_keep_their_picture_and_float_images_are_refused(tmp_path):
    import data

    ramp = (np.arange(256 * 16, dtype=np.uint16).reshape(16, 256) * 16)  # 0 .. 65520 across the width
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")  # a 16-bit greyscale PNG
    rgb = np.asarray(data.load_image(str(tmp_path / "ramp16.png")))
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 256, 3)
    assert np.array_equal(rgb[..., 0], (ramp >> 8).astype(np.uint8))  # not flattened to white
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float\.tif.*floating-point image"):
        data.load_image(str(tmp_path / "float.tif"))


def test_truncated_image_is_a_bad_record(tmp_path, processor):
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "photo.jpg", quality=95)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "photo.jpg").read_bytes()[:300])
    path = write_json(tmp_path / "d.json", [{"id": "cut", "image": "cut.jpg", "conversations": ONE_TURN}])
    dataset = VLMDataset(path, str(tmp_path), processor, "vicuna_v1", skip_bad_samples=True)
    assert dataset[0]["id"] == "cut" and "cut.jpg cannot be read" in dataset[0]["skipped"]


BADLY_SHAPED = [
    ({"id": "list-value", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": ["red"]}]},
     "turn 1: 'value' is a list; it must be text"),
    ({"id": "image-answer", "image": "red.png", "conversations": [
        {"from": "human", "value": "What?"}, {"from": "gpt", "value": "<image>"}]},
     "turn 1 is an answer holding <image>"),
    ({"id": "messages", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "it has 'messages' \\(chat style\\); LLaVA records hold 'conversations'"),
]


@pytest.mark.parametrize("record, reason", BADLY_SHAPED, ids=[r["id"] for r, _ in BADLY_SHAPED])
def test_badly_shaped_records_are_bad_records(tmp_path, processor, record, reason):
    test_bad_records_raise_or_are_skipped(tmp_path, processor, record, reason)


def test_files_that_are_not_llava_data_are_named(tmp_path):
    utf16 = tmp_path / "utf16.json"
    utf16.write_text(json.dumps([{"id": "a", "conversations": []}]), encoding="utf-16")
    with pytest.raises(ValueError, match=r"utf16\.json is not UTF-8 text"):
        load_records(str(utf16))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"id": "a", "conversations": []}]}, indent=1))
    with pytest.raises(ValueError, match=r"wrapped\.json holds one JSON object; expected a JSON list"):
        load_records(str(wrapped))
    with pytest.raises(ValueError, match="is a folder; name the JSON/JSONL file"):
        load_records(str(tmp_path))
    bom = tmp_path / "bom.json"
    bom.write_text("\ufeff" + json.dumps([{"id": "a", "conversations": []}]), encoding="utf-8")
    assert load_records(str(bom))[0]["id"] == "a"  # a byte-order mark is fine


def test_hub_id_that_cannot_load_is_one_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    # offline without waiting for the network's time-out: both libraries read HF_HUB_OFFLINE once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="no local file, and loading it as a Hub data set failed"):
        load_records("someone/no-such-dataset-here")


def test_image_paths_stay_inside_the_image_folder(tmp_path, processor):
    inside = tmp_path / "images"
    inside.mkdir()
    write_image(tmp_path / "secret.png", (40, 40), (1, 2, 3))  # beside the image folder, not in it
    write_image(inside / "red.png", (40, 40), (255, 0, 0))
    records = [{"id": name, "image": path, "conversations": ONE_TURN}
               for name, path in (("climbs", "../secret.png"), ("absolute", str(tmp_path / "secret.png")),
                                  ("fine", "sub/../red.png"))]
    path = write_json(tmp_path / "d.json", records)
    dataset = VLMDataset(path, str(inside), processor, "vicuna_v1", skip_bad_samples=True)
    assert "leads outside image_folder" in dataset[0]["skipped"] and "leads outside" in dataset[1]["skipped"]
    assert "skipped" not in dataset[2]
    trusting = VLMDataset(path, str(inside), processor, "vicuna_v1", image_paths_outside=True)
    assert trusting[0]["pixel_values"].shape[0] == 1


# ----------------------------------------------------------------------------------------------
# python data.py --show: one sample as the model gets it, its labels audited

REAL = os.path.join(os.path.dirname(ROOT), "shared", "real")  # ../shared/real: the real tokenizers and configs


def show(capsys, demo_dir, *more):
    """(exit code, stdout, stderr) of `python data.py --show configs/demo.py` on the small demo data."""
    import data

    argv = ["--show", os.path.join(ROOT, "configs", "demo.py"), f"data_path={demo_dir}/finetune.json",
            f"image_folder={demo_dir}/images", f"vision_model={demo_dir}/backbones/tiny-clip",
            f"llm={demo_dir}/backbones/tiny-llama", "make_demo=false", *more]
    code = exit_code(data.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_show_prints_the_answers_marked_and_the_image_as_one_run(demo_dir, capsys):
    code, out, _ = show(capsys, demo_dir, "--n", "3")
    assert code == 0
    records = json.load(open(demo_dir / "finetune.json"))[:3]
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "backbones" / "tiny-llama")
    blocks = out.split("\n--- record ")[1:]
    assert len(blocks) == 3
    for record, block in zip(records, blocks):
        assert block.startswith(repr(record["id"]))
        answers = [turn["value"] for turn in record["conversations"][1::2]]
        # vicuna_v1 as LLaVA writes it: "ASSISTANT:", then " {answer}</s>" supervised; the 32-pixel tower
        # with 8-pixel patches gives (32 / 8)^2 = 16 image tokens
        assert block.count("[[") == len(answers) and all(f"ASSISTANT:[[ {a}</s>]]" in block for a in answers)
        images = 16 if record.get("image") else 0  # the demo's ~5% text-only records have none
        assert ("USER: <image x16>\n" in block) == bool(images) and block.count("<image") == bool(images)
        total, image, text, supervised, share = re.search(
            r"(\d+) tokens: (\d+) image \+ (\d+) text; (\d+) supervised = ([\d.]+)% of all", block).groups()
        # the byte-level tokenizer splits at spaces: " {answer}" is its own word, "</s>" one more token
        expected = sum(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
        assert (int(image), int(supervised)) == (images, expected) and int(total) == int(image) + int(text)
        assert float(share) == round(100 * expected / int(total), 1)
        assert "audit: ok" in block
    assert out.rstrip().endswith("audit: 3 of 3 samples supervise exactly their answers")


def test_show_colours_instead_of_brackets_on_a_terminal(demo_dir, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    first_with_an_image = next(r["id"] for r in json.load(open(demo_dir / "finetune.json")) if r.get("image"))
    code, out, _ = show(capsys, demo_dir, "--id", first_with_an_image)
    assert code == 0 and "[[" not in out and "\033[1;32m " in out and "\033[36m<image x16>\033[0m" in out


def shifted_labels(tokenize):
    """tokenize_conversation with every label one position late: LLaVA's silent mismatch, by hand."""
    def shifted(*args, **kwargs):
        input_ids, labels = tokenize(*args, **kwargs)
        return input_ids, [IGNORE_INDEX] + labels[:-1]
    return shifted


def role_in_the_answer(turns, eos):
    """A vicuna template edit that moves "ASSISTANT:" into the supervised piece."""
    pieces = [(VICUNA_SYSTEM + " ", False)]
    for (_, question), (_, answer) in zip(turns[0::2], turns[1::2]):
        pieces += [(f"USER: {question} ", False), (f"ASSISTANT: {answer}{eos}", True)]
    return pieces


def no_end_of_turn(turns, eos):
    """A vicuna template edit that leaves the </s> after each answer unsupervised: the model never learns to stop."""
    pieces = [(VICUNA_SYSTEM + " ", False)]
    for (_, question), (_, answer) in zip(turns[0::2], turns[1::2]):
        pieces += [(f"USER: {question} ASSISTANT:", False), (f" {answer}", True), (eos, False)]
    return pieces


@pytest.mark.parametrize("name, broken, problem", [
    ("tokenize_conversation", shifted_labels, "labels not aligned with the ids"),
    ("vicuna_pieces", lambda _: role_in_the_answer, "': ' comes before the answer"),  # " ASSISTANT" straddles
    ("vicuna_pieces", lambda _: no_end_of_turn, "where its end-of-turn marker ('</s>') should be"),
], ids=["labels-shifted", "role-in-the-answer", "no-end-of-turn"])
def test_show_audit_names_the_sample_whose_labels_are_wrong(demo_dir, capsys, monkeypatch, name, broken, problem):
    import data

    monkeypatch.setattr(data, name, broken(getattr(data, name)))
    code, out, _ = show(capsys, demo_dir, "--n", "2")
    assert code == 1
    first_answer = json.load(open(demo_dir / "finetune.json"))[0]["conversations"][1]["value"]
    failure = next(line for line in out.splitlines() if line.startswith("audit FAILED for record 'finetune-0': "))
    assert problem in failure and "answer 1, tokens " in failure and first_answer in failure
    assert out.rstrip().endswith("audit: 0 of 2 samples supervise exactly their answers; FAILED: 'finetune-0', "
                                 "'finetune-1'")


def test_show_gives_the_anyres_tile_grid_and_newlines(demo_dir, tmp_path, capsys):
    write_image(tmp_path / "wide.png", (64, 16), (200, 30, 30))
    path = write_json(tmp_path / "wide.json", [{"id": "wide", "image": "wide.png", "conversations": ONE_TURN}])
    code, out, _ = show(capsys, demo_dir, "image_aspect=anyres", f"data_path={path}", f"image_folder={tmp_path}")
    # 32-pixel tower, 8-pixel patches: pinpoints 32x64, 64x32, 64x64, 96x32, 32x96 (H x W). The 32x64
    # one holds the 64x16 image whole with the least padding: 1 x 2 tiles, a 4 x 8 feature grid, of
    # which the image (16 of 32 rows of pixels, centred) fills the middle 2 rows.
    # Tokens: the base tile's 4 x 4 = 16, then 2 rows x (8 + 1 newline) = 18: 34.
    assert code == 0 and "<image x34>" in out
    assert ("image 1: 64x16 px -> anyres 1x2 tiles of 32 px + a base tile -> 16 base + 2 rows x (8 + 1 newline) "
            "= 34 tokens, 2 newlines") in out


@pytest.mark.skipif(not os.path.isdir(REAL), reason="../shared/real (the real tokenizers) is not here")
@pytest.mark.parametrize("tokenizer, vision, template, answer", [
    ("vicuna-7b-v1.5", "clip-vit-large-patch14-336", "vicuna_v1", "ASSISTANT:[[ {}</s>]]"),
    ("qwen2.5-instruct", "siglip-so400m-patch14-384", "chat", "<|im_start|>assistant\n[[{}<|im_end|>]]"),
    ("llama-3.1-instruct", "clip-vit-large-patch14-336", "chat",
     "<|start_header_id|>assistant<|end_header_id|>\n\n[[{}<|eot_id|>]]"),
])
def test_show_with_real_tokenizers_and_templates(demo_dir, capsys, tokenizer, vision, template, answer):
    code, out, _ = show(capsys, demo_dir, f"llm={REAL}/tokenizers/{tokenizer}", f"vision_model={REAL}/configs/{vision}",
                        f"template={template}", "max_seq_len=2048", "--id", "finetune-2")
    assert code == 0, out
    # CLIP-L/14 at 336: (336 / 14)^2 = 576 patches; SigLIP so400m/14 at 384: (384 / 14)^2 = 27^2 = 729
    assert f"<image x{576 if 'clip' in vision else 729}>" in out
    record = next(r for r in json.load(open(demo_dir / "finetune.json")) if r["id"] == "finetune-2")
    for turn in record["conversations"][1::2]:
        assert answer.format(turn["value"]) in out
    assert "audit: 1 of 1 samples supervise exactly their answers" in out


@pytest.mark.parametrize("more, message", [
    (["--n", "0"], "--n 0: show at least 1 record"),
    (["--id", "no-such-id"], "--id 'no-such-id': no record of data_path="),
    (["data_path=/no/such/file.json"], "data file '/no/such/file.json' does not exist"),
    (["llm=/no/such/llm"], "cannot build the processor from vision_model="),
    (["template=vicuna"], "template='vicuna': valid values are plain, vicuna_v1, chat"),
])
def test_show_bad_input_is_one_error_line(demo_dir, capsys, more, message):
    code, _, err = show(capsys, demo_dir, *more)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_show_names_a_missing_config_and_unreadable_data(demo_dir, tmp_path, capsys):
    import data

    assert exit_code(data.main, ["--show", str(tmp_path / "missing.py")]) == 2
    assert capsys.readouterr().err == f"error: config file '{tmp_path / 'missing.py'}' not found\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "conversations": ONE_TURN}) + "\n{oops\n")
    code, _, err = show(capsys, demo_dir, f"data_path={bad}")
    assert code == 2 and err.startswith(f"error: {bad}, line 2: malformed JSON") and err.count("\n") == 1, err
