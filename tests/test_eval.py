"""eval.py: answer normalization and metrics on hand-written cases, batched vs one-by-one generation,
the command line end to end on a tiny saved model, and one clear error per kind of bad input."""
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from conftest import exit_code, favour_token, smooth_image, write_image, write_json
from eval import (
    build_prompt,
    format_question,
    generate_answers,
    load_model,
    load_questions,
    main,
    normalize_answer,
    option_letter,
    score,
)
from model import build_vlm
from run import UserError

# A vicuna-style chat template (llava-hf convention: image items render as "<image>\n" first).
VICUNA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}USER: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
COLORS = {"red.png": (255, 0, 0), "green.png": (0, 255, 0), "blue.png": (0, 0, 255), "wide.png": (9, 99, 199)}


@pytest.fixture
def run_dir(tiny_vlm, tmp_path):
    """A training output folder: the tiny model and its processor saved in run/final/."""
    model, processor = tiny_vlm
    processor.chat_template = VICUNA_TEMPLATE
    final = tmp_path / "run" / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    return str(tmp_path / "run")


PARROT_WORD = "dog"  # one token of the tiny tokenizer (" dog")


@pytest.fixture
def parrot_run_dir(tiny_vlm, tmp_path):
    """A run folder whose model answers every prompt with PARROT_WORD, once per new token, so that the
    tests know its answers without running eval.py's code. Its decoder layers add nothing (their
    output projections are zero), so the last position's hidden state is its own token's embedding;
    every embedding is 1 in dimension 0, the final norm keeps only that dimension, and the LM head
    reads it into the word's logit alone: the word scores above every other token (0), always."""
    model, processor = tiny_vlm
    word = processor.tokenizer(" " + PARROT_WORD, add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    decoder = model.language_model.get_decoder()
    with torch.no_grad():
        for layer in decoder.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.language_model.get_input_embeddings().weight[:, 0] = 1.0
        decoder.norm.weight.zero_()
        decoder.norm.weight[0] = 1.0
        head = model.language_model.get_output_embeddings().weight
        head.zero_()
        head[word[0], 0] = 1.0
    processor.chat_template = VICUNA_TEMPLATE
    final = tmp_path / "parrot" / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    return str(tmp_path / "parrot")


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, color in COLORS.items():
        size = (64, 24) if name == "wide.png" else (40, 40)
        write_image(folder / name, size, color)
    return str(folder)


# ----------------------------------------------------------------------------------------------
# Normalization and metrics


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"),
    ("the cat.", "cat"),
    ("An Apple!", "apple"),
    ("  Yes,  it  IS ", "yes it is"),
    ("1,000", "1000"),
    ("3.5 meters.", "3.5 meters"),
    ("dog's", "dogs"),
    ("T-shirt", "t shirt"),
    ("Ten birds", "10 birds"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert score("Two", {"answer": "2"}, "exact") == 1.0
    assert score("the cat.", {"answer": "cat"}, "exact") == 1.0
    assert score("a cat", {"answer": "The Cat"}, "exact") == 1.0
    assert score("cats", {"answer": "cat"}, "exact") == 0.0
    assert score("black cat", {"answer": "cat"}, "exact") == 0.0
    assert score("", {"answer": "cat"}, "exact") == 0.0


def test_vqa_accuracy_is_vqav2s_leave_one_out_mean():
    """Expected values from the definition: leave each of the 10 answers out, score min(1, matches
    among the other 9 / 3), average the 10 scores."""
    humans = ["2", "two", "2", "3", "3", "4", "yes", "yes", "yes", "no"]  # "2" x3, "3" x2, "4" x1
    assert score("Two", {"answer": humans}, "vqa") == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert score("3", {"answer": humans}, "vqa") == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert score("four", {"answer": humans}, "vqa") == pytest.approx((1 * 0 + 9 * 1 / 3) / 10)  # 0.3
    assert score("5", {"answer": humans}, "vqa") == 0.0
    assert score("yes", {"answer": humans[:6] + ["yes"] * 4}, "vqa") == 1.0  # 4 of 10: every subset has 3
    assert score("the dog", {"answer": "dog"}, "vqa") == 1.0  # one answer string: exact match


@pytest.mark.parametrize("prediction, expected_letter", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("B) red", "B"), ("B: red", "B"), ("b", "B"),
    ("red", "B"), ("The red.", "B"), ("A dog", "A"), ("D", None), ("Blue", None), ("the red one", None),
])
def test_option_letter(prediction, expected_letter):
    assert option_letter(prediction, ["a dog", "red", "a cat"]) == expected_letter


def test_multiple_choice():
    by_letter = {"choices": ["blue", "red", "green"], "answer": "B"}
    by_text = {"choices": ["blue", "red", "green"], "answer": "red"}
    for record in (by_letter, by_text):
        for prediction in ("B", "B.", "(B)", "B) red", "red", "Red."):
            assert score(prediction, record, "mc") == 1.0, (prediction, record)
        for prediction in ("A", "(C)", "green", "C) red", "purple", ""):
            assert score(prediction, record, "mc") == 0.0, (prediction, record)


def test_auto_picks_the_metric_per_record():
    assert score("B", {"answer": "B", "choices": ["x", "y"]}) == 1.0  # mc: letter
    assert score("y", {"answer": "B", "choices": ["x", "y"]}) == 1.0  # mc: option text
    assert score("2", {"answer": ["2", "3", "3"]}) == pytest.approx((0 + 1 / 3 + 1 / 3) / 3)  # vqa, leave-one-out
    assert score("Two.", {"answer": "2"}) == 1.0  # exact


def test_question_format_and_suffixes():
    short = format_question({"question": "What color?"})
    assert short == "What color?\nAnswer the question using a single word or phrase."
    mc = format_question({"question": "Which?", "choices": ["cat", "dog"]})
    assert mc == "Which?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."
    assert format_question({"question": "Which?", "choices": ["cat", "dog"]}, suffix=False) == "Which?\nA. cat\nB. dog"


# ----------------------------------------------------------------------------------------------
# Loading and generation


def test_load_model_reads_final_and_builds_the_training_prompt(run_dir):
    model, processor = load_model(run_dir)
    assert type(model).__name__ == "VLMForCausalLM" and not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert build_prompt(processor, "Hi?") == "USER: <image>\nHi? ASSISTANT:"
    assert build_prompt(processor, "Hi?", None) == "USER: Hi? ASSISTANT:"


def test_batched_generation_equals_one_by_one(run_dir, image_folder):
    model, processor = load_model(run_dir)
    questions = ["What color?", "How many dogs are in the photo?", "Describe it.", "Is it wide?", "Say hi."]
    images = [os.path.join(image_folder, name) for name in COLORS] + [None]  # the last is text-only
    prompts = [build_prompt(processor, q, "image" if im is not None else None) for q, im in zip(questions, images)]
    lengths = {len(processor.tokenizer(p).input_ids) for p in prompts}
    assert len(lengths) > 1  # prompts differ in length, so a batch needs left padding

    one_by_one = generate_answers(model, processor, prompts, images, batch_size=1, max_new_tokens=6)
    batched = generate_answers(model, processor, prompts, images, batch_size=3, max_new_tokens=6)
    assert batched == one_by_one
    assert len(set(one_by_one)) > 1  # answers depend on the input (a weak test otherwise)


def test_anyres_batched_generation_equals_one_by_one(tiny_backbones, tmp_path, image_folder):
    """AnyRes: images of different sizes give different numbers of tiles and image tokens in one batch."""
    model, processor = build_vlm(*tiny_backbones, image_aspect="anyres")
    processor.chat_template = VICUNA_TEMPLATE
    model.save_pretrained(tmp_path / "run" / "final")
    processor.save_pretrained(tmp_path / "run" / "final")
    model, processor = load_model(str(tmp_path / "run"))
    images = [os.path.join(image_folder, name) for name in ("red.png", "wide.png", "blue.png")] + [None]
    prompts = [build_prompt(processor, q, "image" if im is not None else None)
               for q, im in zip(["What?", "What color is it?", "Describe.", "Say hi."], images)]
    tiles = processor.image_processor([Image.open(path) for path in images[:3]])["pixel_values"]
    assert len(tiles) == 5 + 3 + 5  # 40x40: base + 2x2 tiles; 64x24: base + 1x2
    batched = generate_answers(model, processor, prompts, images, batch_size=4, max_new_tokens=5)
    assert batched == generate_answers(model, processor, prompts, images, batch_size=1, max_new_tokens=5)


def test_native_llava_folder_loads_and_batches(tiny_backbones, tmp_path, image_folder):
    """push.py's native export: model_type 'llava' loads with transformers' LLaVA classes."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from prepare import make_tiny_tokenizer
    from model import add_image_token

    tokenizer = make_tiny_tokenizer()
    image_token_id = add_image_token(tokenizer)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_id=image_token_id, image_seq_length=16,  # (32 / 8)^2 patches, CLS dropped
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "llava")
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32), tokenizer=tokenizer,
                   patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=VICUNA_TEMPLATE).save_pretrained(tmp_path / "llava")

    model, processor = load_model(str(tmp_path / "llava"))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    images = [os.path.join(image_folder, name) for name in COLORS]
    prompts = [build_prompt(processor, q) for q in ["What?", "What color is it?", "Describe.", "Wide?"]]
    batched = generate_answers(model, processor, prompts, images, batch_size=4, max_new_tokens=5)
    assert batched == generate_answers(model, processor, prompts, images, batch_size=1, max_new_tokens=5)


def test_native_llava_next_export_answers_as_the_folder_it_came_from(tiny_backbones, tmp_path):
    """push.py's native export of an anyres model (model_type 'llava_next': LlavaNextForConditionalGeneration
    + LlavaNextProcessor) loads, and gives the greedy answers of the small-vlm folder it was exported
    from: the same prompts from its chat template, and images of different sizes (different tile
    counts, so padded tiles and image_sizes) batched together or asked one by one."""
    import push

    model, processor = build_vlm(*tiny_backbones, image_aspect="anyres")
    processor.chat_template = VICUNA_TEMPLATE
    model.save_pretrained(tmp_path / "run" / "final")
    processor.save_pretrained(tmp_path / "run" / "final")
    push.export_llava(str(tmp_path / "run" / "final"), str(tmp_path / "llava"))
    images = []
    for width, height in [(40, 24), (24, 80), (200, 150), (7, 5)]:  # wide, tall, large, tiny
        images.append(str(tmp_path / f"{width}x{height}.png"))
        smooth_image(width, height).save(images[-1])
    questions = ["What?", "What color is it?", "Describe.", "Is it small?"]

    answers = {}
    for folder in ("run", "llava"):
        model, processor = load_model(str(tmp_path / folder))
        prompts = [build_prompt(processor, q) for q in questions]
        answers[folder] = generate_answers(model, processor, prompts, images, batch_size=4, max_new_tokens=6)
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert answers["llava"] == answers["run"]
    assert generate_answers(model, processor, prompts, images, batch_size=1, max_new_tokens=6) == answers["run"]
    assert len(set(answers["run"])) > 1  # answers depend on the image and question


def test_image_token_is_never_generated_as_the_saved_generation_config_says(tiny_vlm, tmp_path, image_folder,
                                                                            monkeypatch):
    """A saved folder's generation_config suppresses <image> (build_vlm sets it, save_pretrained writes
    it), and generate() follows it: a model rigged to write <image> next (favour_token) answers, greedy
    and sampled, with no error and no image token; without that setting it writes <image> at once. A
    generated <image> would be an image token with no image features behind it at the next step."""
    model, processor = tiny_vlm
    processor.chat_template = VICUNA_TEMPLATE
    model.save_pretrained(tmp_path / "run")
    processor.save_pretrained(tmp_path / "run")
    model, processor = load_model(str(tmp_path / "run"))
    image_token_id = model.config.image_token_id
    assert model.generation_config.suppress_tokens == [image_token_id]
    favour_token(model, image_token_id)
    generated = []  # the new ids of every generate() call
    generate = model.generate

    def recording_generate(**inputs):
        output = generate(**inputs)
        generated.append(output[:, inputs["input_ids"].shape[1]:])
        return output

    monkeypatch.setattr(model, "generate", recording_generate)
    images = [os.path.join(image_folder, "red.png"), None]
    prompts = [build_prompt(processor, "What?"), build_prompt(processor, "Say hi.", None)]
    torch.manual_seed(0)
    for temperature in (0.0, 1.0):  # greedy, sampled
        generate_answers(model, processor, prompts, images, batch_size=2, max_new_tokens=4, temperature=temperature)
    assert len(generated) == 2  # one batch each
    assert not any((ids == image_token_id).any() for ids in generated)
    model.generation_config.suppress_tokens = None  # the control: the rigged model does want <image>
    generate_answers(model, processor, prompts[1:], images[1:], max_new_tokens=1)
    assert generated[-1].tolist() == [[image_token_id]]


# ----------------------------------------------------------------------------------------------
# Command line


def test_prompt_mode_prints_the_answer(parrot_run_dir, image_folder, capsys):
    image = os.path.join(image_folder, "red.png")
    main([parrot_run_dir, "--image", image, "--prompt", "What is in the image?", "--max_new_tokens", "3"])
    assert capsys.readouterr().out == f"{PARROT_WORD} {PARROT_WORD} {PARROT_WORD}\n"  # one word per new token


def test_benchmark_end_to_end(parrot_run_dir, image_folder, tmp_path, capsys):
    """The parrot answers "dog" to everything (one new token); the scores follow by hand."""
    records = [
        {"id": "q1", "image": "red.png", "question": "What is it?", "answer": "Dog.", "category": "color"},
        {"id": "q2", "image": "green.png", "question": "What color?", "answer": "zzz nothing", "category": "color"},
        # VQAv2's leave-one-out mean over the 3 annotators: (1/3 + 1/3 + 2/3) / 3 = 4/9
        {"id": "q3", "image": "blue.png", "question": "How many?", "answer": ["dog", "a dog", "cat"],
         "category": "count"},
        {"id": "q4", "image": "wide.png", "question": "Which?", "choices": ["cat", "dog"], "answer": "B",
         "category": "choice"},  # the option's text counts as its letter
        {"id": "q5", "question": "Say something.", "answer": "the dog"},  # text-only
    ]
    data = write_json(tmp_path / "bench.jsonl", records)

    out = tmp_path / "results"
    main([parrot_run_dir, "--data", data, "--image_folder", image_folder, "--out", str(out),
          "--batch_size", "2", "--max_new_tokens", "1"])
    table = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())

    assert [row["id"] for row in rows] == ["q1", "q2", "q3", "q4", "q5"]
    assert all(row["prediction"] == PARROT_WORD for row in rows)
    correct = {row["id"]: row["correct"] for row in rows}
    assert correct == {"q1": 1.0, "q2": 0.0, "q3": pytest.approx(4 / 9), "q4": 1.0, "q5": 1.0}
    mc_suffix = "Answer with the option's letter from the given choices directly."
    assert rows[3]["prompt"].endswith(f"A. cat\nB. dog\n{mc_suffix} ASSISTANT:")
    assert rows[0]["prompt"].endswith("Answer the question using a single word or phrase. ASSISTANT:")

    assert results["overall"] == {"count": 5, "accuracy": pytest.approx((3 + 4 / 9) / 5)}
    assert results["categories"]["color"] == {"count": 2, "accuracy": 0.5}
    assert results["categories"]["count"] == {"count": 1, "accuracy": pytest.approx(4 / 9)}
    assert results["categories"]["choice"] == {"count": 1, "accuracy": 1.0}
    assert results["missing"] == []
    assert results["settings"]["batch_size"] == 2 and results["settings"]["metric"] == "auto"
    assert "overall" in table and "color" in table and f"{100 * (3 + 4 / 9) / 5:.2f}%" in table


def test_skip_missing_counts_missing_images(run_dir, image_folder, tmp_path, capsys):
    data = write_json(tmp_path / "bench.jsonl", [
        {"id": "here", "image": "red.png", "question": "Color?", "answer": "red"},
        {"id": "gone", "image": "nowhere.png", "question": "Color?", "answer": "red"},
    ])
    out = tmp_path / "results"
    main([run_dir, "--data", data, "--image_folder", image_folder, "--out", str(out),
          "--skip_missing", "--max_new_tokens", "3"])
    results = json.loads((out / "results.json").read_text())
    assert results["missing"] == ["gone"] and results["overall"]["count"] == 1
    assert "skipped 1 records" in capsys.readouterr().out


def test_default_out_dir_is_next_to_the_data_and_never_takes_another_checkpoints_results(run_dir, image_folder,
                                                                                          tmp_path):
    """bench/x.jsonl + out/run (or out/run/final) -> bench/x-run/; a re-run of the same model writes there
    again, and another model of the same name (elsewhere/run) is refused instead of replacing the results."""
    data = write_json(tmp_path / "bench.jsonl", [{"id": "1", "image": "red.png", "question": "Q?", "answer": "a"}])
    for ckpt in (run_dir, os.path.join(run_dir, "final")):
        main([ckpt, "--data", data, "--image_folder", image_folder, "--max_new_tokens", "2"])
        results = json.loads((tmp_path / "bench-run" / "results.json").read_text())
        assert results["settings"]["ckpt"] == os.path.realpath(os.path.join(run_dir, "final"))
    other = tmp_path / "elsewhere" / "run"
    shutil.copytree(run_dir, other)
    with pytest.raises(UserError, match=r"bench-run holds the results of another checkpoint, .*; pass --out"):
        main([str(other), "--data", data, "--image_folder", image_folder, "--max_new_tokens", "2"])
    assert json.loads((tmp_path / "bench-run" / "results.json").read_text()) == results


def test_a_prompt_longer_than_the_models_positions_is_refused_naming_it(run_dir, image_folder, tmp_path):
    """RoPE answers past max_position_embeddings (2,048 here) without a word: refused, with the record."""
    long_question = "What colour is the shape? " * 400  # ~2,000 words: more than 2,048 tokens
    data = write_json(tmp_path / "bench.jsonl", [GOOD, {**GOOD, "id": "long", "question": long_question}])
    with pytest.raises(UserError, match=r"line 2 \(id 'long'\): the prompt is \d+ tokens .* passes the model's 2048 "
                                        "positions; shorten the question or lower --max_new_tokens"):
        main([run_dir, "--data", data, "--image_folder", image_folder, "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match=r"^--prompt: the prompt is \d+ tokens"):
        main([run_dir, "--prompt", long_question])


# ----------------------------------------------------------------------------------------------
# Bad input: one `error: ...` line, exit code 2, no results written

GOOD = {"id": "ok", "image": "red.png", "question": "Color?", "answer": "red"}


@pytest.mark.parametrize("lines, expected", [
    ([GOOD, {**GOOD, "id": "q7", "image": "missing.png"}], ["q7", "missing.png", "--skip_missing"]),
    ([json.dumps(GOOD), '{"id": "q2", "question": '], ["bench.jsonl line 2", "not valid JSON"]),
    ([GOOD, {"id": "q3", "image": "red.png", "answer": "red"}], ["line 2", "q3", "'question'"]),
    ([GOOD, {"id": "q4", "image": "red.png", "question": "Color?"}], ["q4", "'answer'"]),
    ([{**GOOD, "id": "q5", "choices": ["x", "y"], "answer": "purple"}], ["q5", "'purple'", "option"]),
    ([], ["holds no records"]),
    ([GOOD, {**GOOD, "question": "Colour?"}], ["line 2 (id 'ok')", "also the id of", "line 1"]),
    ([{**GOOD, "question": " "}], ["line 1", "'question' must be a non-empty string"]),
    ([{**GOOD, "answer": ""}], ["line 1", "'answer' must be a non-empty string"]),
    ([json.dumps([GOOD])], ["line 1: expected a JSON object, got list", "not a JSON list"]),
    (["[", json.dumps(GOOD), "]"], ["line 1: not valid JSON", "an indented JSON list is not"]),
])
def test_bad_data_is_one_error_line(run_dir, image_folder, tmp_path, capsys, lines, expected):
    data = tmp_path / "bench.jsonl"
    data.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    out = tmp_path / "results"
    assert exit_code(main, [run_dir, "--data", str(data), "--image_folder", image_folder, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not out.exists()


def test_bad_checkpoint_and_arguments(run_dir, image_folder, tmp_path):
    data = write_json(tmp_path / "bench.jsonl", [GOOD])
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "empty"), "--data", data, "--image_folder", image_folder], ["is not a model", "config.json"]),
        ([str(tmp_path / "no" / "such" / "run"), "--prompt", "Hi?"], ["checkpoint not found", "run"]),
        ([run_dir], ["--data", "--prompt"]),
        ([run_dir, "--prompt", "Hi?", "--image", str(tmp_path / "nope.png")], ["image not found", "nope.png"]),
        ([run_dir, "--prompt", "Hi?", "--image", str(tmp_path)], ["is a folder; give one image file"]),
        ([run_dir, "--prompt", " "], ["--prompt is empty"]),
    ]
    for argv, expected in cases:
        with pytest.raises(UserError) as error:
            main(argv)
        message = str(error.value)
        assert "\n" not in message
        for fragment in expected:
            assert fragment in message, (fragment, message)
    assert not list(tmp_path.glob("bench-*"))


def test_data_is_checked_before_the_model_loads(image_folder, tmp_path):
    data = write_json(tmp_path / "bench.jsonl", [{**GOOD, "image": "missing.png"}])
    (tmp_path / "empty").mkdir()  # not a model: loading it would fail with another message
    with pytest.raises(UserError, match="missing.png"):
        main([str(tmp_path / "empty"), "--data", data, "--image_folder", image_folder])


def test_load_questions_names_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n[1, 2]\n")
    with pytest.raises(UserError, match=r"q.jsonl line 3: expected a JSON object"):
        load_questions(str(path))


@pytest.mark.parametrize("change, expected", [
    ({"image": ["red.png"]}, ["'image' must be one path"]),
    ({"image": None, "question": "<image>\nColor?"}, ["holds <image> but there is no image"]),
    ({"image": "cut.jpg"}, ["cut.jpg cannot be read"]),
])
def test_more_bad_records_are_one_line_before_the_model_loads(image_folder, tmp_path, change, expected):
    with open(os.path.join(image_folder, "red.png"), "rb") as f:
        (tmp_path / "images" / "cut.jpg").write_bytes(f.read()[:60])
    data = write_json(tmp_path / "bench.jsonl", [{**GOOD, **change}])
    (tmp_path / "empty").mkdir()  # not a model: the record must fail first
    with pytest.raises(UserError) as error:
        main([str(tmp_path / "empty"), "--data", data, "--image_folder", image_folder])
    message = str(error.value)
    assert "\n" not in message and all(e in message for e in expected), message


def test_image_marker_in_a_question_is_where_the_image_goes(run_dir, image_folder, tmp_path, capsys, monkeypatch):
    """LLaVA users type <image>; the chat template places the image, so the marker is dropped."""
    import eval as eval_module

    data = write_json(tmp_path / "bench.jsonl", [{**GOOD, "id": "marked", "question": "<image>\nColor?"}, GOOD])
    main([run_dir, "--data", data, "--image_folder", image_folder, "--out", str(tmp_path / "out")])
    rows = [json.loads(line) for line in open(tmp_path / "out" / "answers.jsonl")]
    assert rows[0]["prompt"] == rows[1]["prompt"] and rows[0]["prompt"].count("<image>") == 1
    given, generate = [], eval_module.generate_answers  # the prompts the model is given

    def recording(model, processor, prompts, *args, **kwargs):
        given.extend(prompts)
        return generate(model, processor, prompts, *args, **kwargs)

    monkeypatch.setattr(eval_module, "generate_answers", recording)
    capsys.readouterr()
    printed = []
    for question in ("<image> Color?", "Color?"):
        main([run_dir, "--image", os.path.join(image_folder, "red.png"), "--prompt", question, "--max_new_tokens", "3"])
        printed.append(capsys.readouterr().out)
    assert given[0] == given[1] == "USER: <image>\nColor? ASSISTANT:"
    assert printed[0] == printed[1] != ""


def test_arguments_checked_before_the_model_loads(run_dir, image_folder, tmp_path):
    data = write_json(tmp_path / "bench.jsonl", [GOOD])
    (tmp_path / "taken").write_text("a file")
    cases = [([run_dir, "--data", data, "--image_folder", image_folder, "--out", str(tmp_path / "taken")],
              "--out " + str(tmp_path / "taken") + " is a file"),
             ([run_dir, "--prompt", "Hi?", "--device", "nonsense"], "is not a device name"),
             ([run_dir, "--prompt", "Hi?", "--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or more"),
             ([run_dir, "--prompt", "Hi?", "--temperature", "nan"], "--temperature nan: must be 0"),
             ([run_dir, "--prompt", "Hi?", "--temperature", "1", "--top_p", "-3"], "--top_p -3.0: must be above 0"),
             ([run_dir, "--prompt", "Hi?", "--top_p", "0"], "--top_p 0.0: must be above 0 and at most 1"),
             ([run_dir, "--prompt", "Hi?", "--device", "meta"], "this machine has no meta device")]
    if not torch.accelerator.is_available():  # each accelerator a machine does not have is named
        cases += [([run_dir, "--prompt", "Hi?", "--device", kind], f"this machine has no {kind} device; use --device cpu")
                  for kind in ("cuda", "mps", "xpu")]
    else:
        have = torch.accelerator.current_accelerator().type
        cases.append(([run_dir, "--prompt", "Hi?", "--device", f"{have}:99"], "devices, numbered from 0"))
    for argv, expected in cases:
        with pytest.raises(UserError) as error:
            main(argv)
        assert expected in str(error.value), str(error.value)
    assert (tmp_path / "taken").read_text() == "a file"


def test_remote_code_runs_only_when_trusted(run_dir, tmp_path):
    import push

    folder = tmp_path / "remote"
    assert push.main([run_dir, "--repo", "me/tiny", "--format", "remote", "--local-dir", str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "someone_elses_vlm"  # not ours by name: only its own code can load it
    write_json(folder / "config.json", config)
    with pytest.raises(UserError, match="pass --trust_remote_code if you trust them"):
        main([str(folder), "--prompt", "Hi?"])


@pytest.mark.parametrize("damage, expected", [
    ("cut_weights", r"cannot read .*final/model.safetensors \(SafetensorError: .*\); copy or save the checkpoint again"),
    ("no_processor_config", r"final has no processor_config.json: the model folder is incomplete; copy it again"),
    ("cut_tokenizer_json", r"cannot read .*final \(JSONDecodeError: .*\); copy or save the checkpoint again"),
    ("unknown_connector", r"cannot build the model in .*final \(unknown connector 'mlp2x_nope'.*\); fix that "
                          r"setting in its config.json"),
])
def test_a_damaged_folder_is_told_from_a_setting_the_model_cannot_take(run_dir, damage, expected):
    """A file cut short is damaged (copy it again); a config value the model cannot be built with is a
    setting to fix, not a damaged file."""
    final = os.path.join(run_dir, "final")
    if damage == "unknown_connector":
        with open(os.path.join(final, "config.json")) as f:
            config = json.load(f)
        write_json(os.path.join(final, "config.json"), {**config, "connector": "mlp2x_nope"})
    elif damage == "no_processor_config":
        os.remove(os.path.join(final, "processor_config.json"))
    else:
        path = os.path.join(final, "model.safetensors" if damage == "cut_weights" else "tokenizer.json")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
    with pytest.raises(UserError, match=expected) as error:
        load_model(run_dir)
    assert "\n" not in str(error.value)
    if damage == "unknown_connector":
        assert "cannot read" not in str(error.value)
