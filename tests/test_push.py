"""push.py: both export formats load outside this repository and reproduce the project model; the
upload sends exactly the built folder; bad input stops with one `error:` line and uploads nothing."""
import itertools
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import push
from conftest import ROOT, exit_code, favour_token, smooth_image, write_json
from data import chat_template_for, render_pieces
from prepare import make_tiny_backbones
from model import CLIP_STD, build_vlm
from run import UserError

# llava-hf's message convention: content is a string or a list of {"type": "image"} / {"type": "text"}.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
SECRET = "hf_SECRETtoken1234567890"


ONE_LEVEL = 1 / (255 * min(CLIP_STD)) + 1e-5  # one of 255 levels, normalized: our torch resize vs PIL's


def make_image():
    """Non-square, so the pad-to-square step is exercised: (H, W) = (24, 40)."""
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (24, 40, 3), dtype=np.uint8))


def save_run(model, processor, run_dir):
    """A run folder as train.py writes it: final/ plus the two JSON files."""
    processor.chat_template = CHAT_TEMPLATE
    model.save_pretrained(os.path.join(run_dir, "final"))
    processor.save_pretrained(os.path.join(run_dir, "final"))
    write_json(os.path.join(run_dir, "train_config.json"),
               {"template": "vicuna_v1", "image_aspect": "pad", "lr_llm": 2e-5, "batch_size": 4})
    write_json(os.path.join(run_dir, "train_summary.json"), {"final_loss": 1.2345, "steps": 10, "samples": 40})
    return str(run_dir)


@pytest.fixture
def run(tiny_vlm, tmp_path, monkeypatch):
    """(run_dir, model, processor); remote-code modules are cached under tmp_path, not in ~/.cache."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model, processor = tiny_vlm
    return save_run(model, processor, tmp_path / "run"), model, processor


def project_outputs(model, processor, image):
    inputs = processor(text=processor.apply_chat_template(MESSAGES, add_generation_prompt=True), images=image)
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    return inputs, logits, generated


def project_answer(model, processor, image, question, max_new_tokens=3):
    """The project model's greedy answer to one image and question, as text: what a pipeline on the
    export must reply."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=image)
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# The names of the published llava-hf checkpoints (llava-hf/llava-1.5-7b-hf, llava-v1.6-*): what
# transformers 4 loads (its CLIP and SigLIP towers keep their weights under vision_model.) and what
# transformers 5 renames at load. Written here, not taken from push.py.
LLAVA_HF_PREFIXES = ("vision_tower.vision_model.", "multi_modal_projector.linear_", "language_model.model.",
                     "language_model.lm_head.", "image_newline")


def load_cleanly(model_class, folder):
    """The exported model, after checking that its file names every weight as llava-hf does and that
    transformers loads it with no weight missing (left random) or unexpected (ignored)."""
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(name.startswith(LLAVA_HF_PREFIXES) for name in names), \
        [name for name in names if not name.startswith(LLAVA_HF_PREFIXES)][:5]
    model, info = model_class.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


class FakeHub:
    """Stands in for HfApi: records every call and the files of the folder at upload time."""

    def __init__(self, exists=False):
        self.exists, self.calls, self.files, self.tokens = exists, [], {}, []

    def __call__(self, token=None):  # push.HfApi(token=...) returns this object
        self.tokens.append(token)
        return self

    def repo_exists(self, repo_id):
        return self.exists

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def update_repo_settings(self, repo_id, **kwargs):
        self.calls.append(("update_repo_settings", repo_id, kwargs))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        for name in os.listdir(folder_path):
            with open(os.path.join(folder_path, name), "rb") as f:
                self.files[name] = f.read()


REMOTE_LOAD = """
import json, sys, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
folder, image_path, out = sys.argv[1:4]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
assert "model" not in sys.modules, "the repository's model.py was imported"
inputs = processor(text=processor.apply_chat_template(json.loads(sys.argv[4]), add_generation_prompt=True),
                   images=Image.open(image_path))
with torch.no_grad():
    logits = model(**inputs).logits
generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
torch.save({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "logits": logits,
            "generated": generated, "module": type(model).__module__}, out)
"""


def load_remote_elsewhere(folder, image, tmp_path):
    """REMOTE_LOAD's outputs for `image` (saved as PNG), run in a fresh Python outside this
    repository, offline; returns (outputs, the image as read back from the PNG)."""
    image_path, out = tmp_path / "image.png", tmp_path / "remote_outputs.pt"
    image.save(image_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", REMOTE_LOAD, str(folder), str(image_path), str(out),
                             json.dumps(MESSAGES)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out), Image.open(image_path)


def test_remote_folder_loads_without_this_repository(run, tmp_path):
    run_dir, model, processor = run
    folder = tmp_path / "remote"
    assert push.main([run_dir, "--repo", "me/tiny", "--format", "remote", "--local-dir", str(folder)]) == 0
    with open(folder / "model.py", "rb") as exported, open(os.path.join(ROOT, "model.py"), "rb") as ours:
        assert exported.read() == ours.read()
    assert "1.2345" in (folder / "README.md").read_text()  # final loss from train_summary.json

    remote, image = load_remote_elsewhere(folder, make_image(), tmp_path)
    inputs, logits, generated = project_outputs(model, processor, image)
    assert remote["module"].startswith("transformers_modules.")  # the folder's copy of model.py ran
    assert torch.equal(remote["input_ids"], inputs["input_ids"])
    assert torch.equal(remote["pixel_values"], inputs["pixel_values"])
    assert torch.equal(remote["logits"], logits)
    assert torch.equal(remote["generated"], generated)


def test_llava_folder_matches_project_model(run, tmp_path, capsys):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline

    run_dir, model, processor = run
    folder = tmp_path / "llava"
    assert push.main([run_dir, "--repo", "me/tiny", "--local-dir", str(folder)]) == 0
    assert "format: llava" in capsys.readouterr().out  # the default, announced
    assert not (folder / "model.py").exists()
    card = (folder / "README.md").read_text()
    assert "4.57" in card and "--mmproj mmproj-tiny.gguf" in card  # transformers versions; llama.cpp route
    llava = load_cleanly(LlavaForConditionalGeneration, folder)
    llava_processor = AutoProcessor.from_pretrained(folder)
    assert llava.config.vision_config.vision_feature_layer == model.config.vision_feature_layer  # for llama.cpp
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert not isinstance(tokenizer_config.get("extra_special_tokens"), list)  # transformers 4 fails on a list
    # transformers 4 has no TokenizersBackend class, and its generate() refuses token_type_ids
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "token_type_ids" not in llava_processor(text="Hi")

    image = make_image()
    prompt = llava_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    llava_inputs = llava_processor(images=image, text=prompt, return_tensors="pt")
    inputs, logits, generated = project_outputs(model, processor, image)
    assert torch.equal(llava_inputs["input_ids"], inputs["input_ids"])
    # vLLM's chat tokenizes the rendered prompt without special tokens: the template's BOS is the one BOS
    ids, image_id = inputs["input_ids"][0].tolist(), processor.image_token_id
    one_image_id = [t for i, t in enumerate(ids) if t != image_id or ids[i - 1] != image_id]
    assert llava_processor.tokenizer(prompt, add_special_tokens=False)["input_ids"] == one_image_id
    assert ids.count(processor.tokenizer.bos_token_id) == 1
    torch.testing.assert_close(llava_inputs["pixel_values"], inputs["pixel_values"], atol=ONE_LEVEL, rtol=0)
    llava_inputs["pixel_values"] = inputs["pixel_values"]  # the models compared on the very same pixels
    with torch.no_grad():
        llava_logits = llava(**llava_inputs).logits
    torch.testing.assert_close(llava_logits, logits, atol=1e-5, rtol=0)
    llava_generated = llava.generate(**llava_inputs, max_new_tokens=5, do_sample=False)
    assert llava_processor.batch_decode(llava_generated) == processor.batch_decode(generated)

    pipe = pipeline("image-text-to-text", model=str(folder))
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]}]
    reply = pipe(text=chat, max_new_tokens=3)[0]["generated_text"][-1]
    assert reply == {"role": "assistant", "content": project_answer(model, processor, image, "Describe.")}


def test_llava_export_of_siglip_and_tied_qwen2_matches(tmp_path):
    """SigLIP has no CLS (strategy "full"); Qwen2 ties lm_head to the embeddings."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = build_vlm(*make_tiny_backbones(str(tmp_path), vision="siglip", llm="qwen2"))
    model.save_pretrained(tmp_path / "final")
    processor.save_pretrained(tmp_path / "final")
    push.export_llava(str(tmp_path / "final"), str(tmp_path / "llava"))
    llava = load_cleanly(LlavaForConditionalGeneration, tmp_path / "llava")
    llava_processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    assert llava.config.vision_feature_select_strategy == "full"
    assert llava.lm_head.weight.data_ptr() == llava.get_input_embeddings().weight.data_ptr()
    # Each prompt rendered by its own chat template: the export's writes the BOS that our tokenizer adds.
    messages = [{"role": "user", "content": "<image>\nWhat is in the image?"}]
    inputs = processor(text=processor.apply_chat_template(messages), images=make_image())
    llava_inputs = llava_processor(text=llava_processor.apply_chat_template(messages), images=make_image(),
                                   return_tensors="pt")
    assert torch.equal(llava_inputs["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(llava_inputs["pixel_values"], inputs["pixel_values"], atol=ONE_LEVEL, rtol=0)
    llava_inputs["pixel_values"] = inputs["pixel_values"]  # the models compared on the very same pixels
    with torch.no_grad():
        torch.testing.assert_close(llava(**llava_inputs).logits, model.eval()(**inputs).logits, atol=1e-5, rtol=0)

REAL_VICUNA = os.path.join(os.path.dirname(ROOT), "shared", "real", "tokenizers", "vicuna-7b-v1.5")


def sentencepiece_ids(model_file, text, specials):
    """What transformers 4's slow LlamaTokenizer (legacy=False, as Vicuna's tokenizer_config sets) makes
    of `text` with the SentencePiece model alone, as llama.cpp does: BOS, then the text cut at the
    special tokens ({text: id}), each part encoded by SentencePiece, with the word-start "▁" only
    in front of the first."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    with_prefix = sentencepiece.SentencePieceProcessor(model_file=model_file)
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = False
    without_prefix = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    ids = [with_prefix.bos_id()]
    for k, part in enumerate(re.split("(" + "|".join(map(re.escape, specials)) + ")", text)):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids += (with_prefix if k == 0 else without_prefix).encode(part)
    return ids


@pytest.mark.parametrize("source", ["vicuna-like", "real vicuna"])
def test_llava_export_ships_the_sentencepiece_model_that_splits_training_prompts_alike(
        source, vicuna_like_tokenizer, tiny_backbones, tmp_path):
    """A Vicuna LLM's tokenizer is a SentencePiece model: the export carries it as tokenizer.model (llama.cpp
    takes the piece scores from it), and the training prompts get the training ids from the exported
    tokenizer and from a slow tokenizer on that tokenizer.model alike."""
    if source == "real vicuna" and not os.path.isdir(REAL_VICUNA):
        pytest.skip(f"{REAL_VICUNA} is not here")
    vision, tiny_llm = tiny_backbones
    llm = tmp_path / "vicuna"  # the tiny Llama with a Vicuna tokenizer (build_vlm resizes the embeddings)
    shutil.copytree(REAL_VICUNA if source == "real vicuna" else vicuna_like_tokenizer, llm)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_llm, name), llm)
    model, processor = build_vlm(vision, str(llm))
    processor.chat_template = chat_template_for("vicuna_v1", processor.tokenizer)
    model.save_pretrained(tmp_path / "final")
    processor.save_pretrained(tmp_path / "final")
    push.export_llava(str(tmp_path / "final"), str(tmp_path / "llava"))
    shipped = tmp_path / "llava" / "tokenizer.model"
    assert shipped.read_bytes() == (llm / "tokenizer.model").read_bytes()
    # transformers 4's slow tokenizer then follows sentencepiece_ids' rules: "▁" in front, none after specials.
    tokenizer_config = json.loads((tmp_path / "llava" / "tokenizer_config.json").read_text())
    assert tokenizer_config["legacy"] is False and tokenizer_config.get("add_prefix_space", True) is True

    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(tmp_path / "llava")
    specials = {token.content: token_id for token_id, token in exported.added_tokens_decoder.items()}
    # Each with an image, as every stage-1 (plain) record has one.
    conversations = [[{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
                     for question, answer in [("<image>\nWhat is the man holding?", "An umbrella."),
                                              ("Hello  world?\n<image>", "def add(a, b):\n    return a + b\n\n  x"),
                                              ("cafe 12345 東京 😀\n<image>", " Yes,  three.")]]
    for conversation, template in itertools.product(conversations, ["vicuna_v1", "plain"]):
        text = "".join(piece for piece, _ in render_pieces(conversation, template, processor.tokenizer))
        training = processor.tokenizer(text)["input_ids"]
        assert training[0] == exported.bos_token_id  # which the exported chat template writes, not its tokenizer
        assert exported(text)["input_ids"] == training[1:], (template, text)
        assert sentencepiece_ids(str(shipped), text, specials) == training, (template, text)

class NoPythonMethods:
    """Renders a chat template with Jinja's own syntax, tests and filters and nothing of Python: calling a
    method of a value (text.count('<image>'), .strip(), .upper()) raises, as it does in Jinja engines that
    are not Python (llama.cpp's). jinja2's sandbox calls is_safe_callable before every call in a template;
    macros and namespace() are Jinja's own and stay allowed. Same whitespace settings as transformers."""

    def __init__(self):
        import inspect

        from jinja2.sandbox import SandboxedEnvironment

        class Environment(SandboxedEnvironment):
            def is_safe_callable(self, obj):
                return not (inspect.ismethod(obj) or inspect.isbuiltin(obj) or inspect.ismethoddescriptor(obj))

        self.environment = Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def render(self, template, messages, add_generation_prompt, tokenizer):
        return self.environment.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


def test_restricted_renderer_refuses_python_methods():
    from jinja2.exceptions import SecurityError

    renderer = NoPythonMethods()
    for python in ("{{ 'a<image>'.count('<image>') }}", "{{ ' a '.strip() }}", "{{ m['role'].upper() }}"):
        with pytest.raises(SecurityError):
            renderer.environment.from_string(python).render(m={"role": "user"})
    assert renderer.environment.from_string("{{ ' a ' | trim | upper }}").render() == "A"


SHIPPED_MESSAGES = [  # content as llava-hf writes it (a list of items) and as a string; images anywhere
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is  in the image?"}]},
     {"role": "assistant", "content": "A red square."}],
    [{"role": "user", "content": "Describe it.\n<image>"}, {"role": "assistant", "content": " Two  circles. "}],
    [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "A dog."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]},
     {"role": "assistant", "content": "The first."}, {"role": "user", "content": "And  the colours?"},
     {"role": "assistant", "content": "Red, blue."}],
]


@pytest.mark.parametrize("template, tokenizer_kind", [
    ("plain", "byte-level BPE"), ("vicuna_v1", "byte-level BPE"), ("chat", "byte-level BPE"),
    ("plain", "SentencePiece"), ("vicuna_v1", "SentencePiece"),  # SentencePiece: a space after <image>
])
def test_shipped_chat_templates_render_alike_without_python_methods(template, tokenizer_kind, tiny_vlm,
                                                                    vicuna_like_tokenizer):
    """Every chat template that training stores (and push.py ships) gives, in a Jinja that has no Python
    methods, the prompt that transformers' Python Jinja gives: for each conversation, its first turn with the
    generation prompt (what inference renders) and all of it (what training wrote)."""
    from model import add_image_token, load_tokenizer

    if tokenizer_kind == "SentencePiece":
        tokenizer = load_tokenizer(vicuna_like_tokenizer)
        add_image_token(tokenizer)
    else:
        tokenizer = tiny_vlm[1].tokenizer
    chat_template = chat_template_for(template, tokenizer)
    assert "//" not in chat_template  # llama.cpp's Jinja has no floor division: its parser refuses the template
    renderer = NoPythonMethods()
    for messages in SHIPPED_MESSAGES[:3] if template == "plain" else SHIPPED_MESSAGES:  # plain: one exchange
        first_turn = messages[:2] if messages[0]["role"] == "system" else messages[:1]
        for shown, add_generation_prompt in ((first_turn, True), (messages, False)):
            python = tokenizer.apply_chat_template(shown, chat_template=chat_template, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
            assert renderer.render(chat_template, shown, add_generation_prompt, tokenizer) == python, shown


def test_anyres_model_exports_as_native_llava_next(tiny_backbones, tmp_path, monkeypatch, capsys):
    """An anyres model becomes LlavaNextForConditionalGeneration + LlavaNextProcessor: no remote code,
    the same prompt ids, tiles within resize rounding, the same logits and generations, a pipeline.
    The remote-code export of the same model keeps working too."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaNextForConditionalGeneration, pipeline

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model, processor = build_vlm(*tiny_backbones, image_aspect="anyres")
    run_dir = save_run(model.eval(), processor, tmp_path / "run")
    folder = tmp_path / "llava"
    assert push.main([run_dir, "--repo", "me/tiny", "--local-dir", str(folder)]) == 0
    assert "format: llava" in capsys.readouterr().out
    assert not (folder / "model.py").exists()
    assert "no GGUF route" in (folder / "README.md").read_text()  # llama.cpp cannot convert AnyRes
    llava = load_cleanly(AutoModelForImageTextToText, folder)
    llava_processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(llava, LlavaNextForConditionalGeneration)
    assert type(llava_processor).__name__ == "LlavaNextProcessor"
    assert llava.config.image_grid_pinpoints == model.config.image_grid_pinpoints

    prompt = llava_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    for width, height in [(40, 24), (24, 80), (200, 150), (7, 5)]:  # wide, tall, large, tiny
        image = smooth_image(width, height)
        llava_inputs = llava_processor(images=image, text=prompt, return_tensors="pt")
        inputs, logits, generated = project_outputs(model, processor, image)
        assert torch.equal(llava_inputs["input_ids"], inputs["input_ids"]), (width, height)
        assert torch.equal(llava_inputs["image_sizes"], inputs["image_sizes"])
        their_tiles = llava_inputs["pixel_values"][0]  # (tiles, 3, S, S): one image
        torch.testing.assert_close(their_tiles, inputs["pixel_values"], atol=2 * ONE_LEVEL, rtol=0)
        llava_inputs["pixel_values"] = inputs["pixel_values"][None]  # the models compared on the very same pixels
        with torch.no_grad():
            torch.testing.assert_close(llava(**llava_inputs).logits, logits, atol=1e-5, rtol=0)
        llava_generated = llava.generate(**llava_inputs, max_new_tokens=5, do_sample=False)
        assert llava_processor.batch_decode(llava_generated) == processor.batch_decode(generated)

    pipe = pipeline("image-text-to-text", model=str(folder))
    chat = [{"role": "user", "content": [{"type": "image", "image": smooth_image(60, 30)},
                                         {"type": "text", "text": "Describe."}]}]
    reply = pipe(text=chat, max_new_tokens=3)[0]["generated_text"][-1]
    assert reply == {"role": "assistant", "content": project_answer(model, processor, smooth_image(60, 30), "Describe.")}

    remote = tmp_path / "remote"
    assert push.main([run_dir, "--repo", "me/tiny", "--format", "remote", "--local-dir", str(remote)]) == 0
    loaded, image = load_remote_elsewhere(remote, smooth_image(70, 30), tmp_path)
    inputs, logits, generated = project_outputs(model, processor, image)
    assert torch.equal(loaded["input_ids"], inputs["input_ids"]) and torch.equal(loaded["logits"], logits)
    assert torch.equal(loaded["generated"], generated)


def test_both_formats_carry_suppress_tokens_and_never_generate_the_image_token(tiny_vlm, tmp_path):
    """The checkpoint's generation_config suppresses <image> (build_vlm sets it): both exports' generation
    configs carry it, and the native model, rigged to want <image> next (favour_token), never writes it."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = tiny_vlm
    image_token_id = model.config.image_token_id
    final = os.path.join(save_run(model, processor, tmp_path / "run"), "final")
    for fmt, export in (("llava", push.export_llava), ("remote", push.export_remote)):
        export(final, str(tmp_path / fmt))
        generation_config = json.loads((tmp_path / fmt / "generation_config.json").read_text())
        assert generation_config["suppress_tokens"] == [image_token_id], fmt
    llava = favour_token(LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval(), image_token_id)
    llava_processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    inputs = llava_processor(text=llava_processor.apply_chat_template(MESSAGES, add_generation_prompt=True),
                             images=make_image(), return_tensors="pt")
    new = llava.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert len(new) > 0 and image_token_id not in new.tolist()


def test_interactive_upload_sends_the_folder_and_never_the_token(run, monkeypatch, capsys):
    run_dir, _, _ = run
    hub = FakeHub(exists=True)
    monkeypatch.setattr(push, "HfApi", hub)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    answers = iter([run_dir, "me/tiny", "private", "y"])  # checkpoint, repo, visibility, overwrite?
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))

    assert push.main([]) == 0
    assert hub.tokens == [SECRET]
    assert hub.calls == [
        ("create_repo", "me/tiny", {"private": True, "exist_ok": True}),
        ("update_repo_settings", "me/tiny", {"private": True}),
        ("upload_folder", "me/tiny", {"commit_message": "Upload small-vlm model", "delete_patterns": "*"}),
    ]
    assert sorted(hub.files) == ["README.md", "chat_template.jinja", "config.json", "generation_config.json",
                                 "model.safetensors", "processor_config.json", "tokenizer.json",
                                 "tokenizer_config.json"]
    assert json.loads(hub.files["config.json"])["model_type"] == "llava"
    assert not any(SECRET.encode() in content for content in hub.files.values())
    output = capsys.readouterr()
    assert SECRET not in output.out + output.err


def test_folder_that_does_not_load_is_not_uploaded(run, monkeypatch):
    run_dir, _, _ = run
    hub = FakeHub()
    monkeypatch.setattr(push, "HfApi", hub)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    real_export = push.export_remote

    def export_without_weights(src, dst):
        real_export(src, dst)
        os.remove(os.path.join(dst, "model.safetensors"))

    monkeypatch.setattr(push, "export_remote", export_without_weights)
    with pytest.raises(UserError, match="does not load in a fresh Python process .*; nothing was uploaded"):
        push.main([run_dir, "--repo", "me/tiny", "--format", "remote"])
    assert hub.calls == []


def linear_run(tiny_backbones, tmp_path):
    model, processor = build_vlm(*tiny_backbones, connector="linear")
    return save_run(model, processor, tmp_path / "linear_run")


@pytest.mark.parametrize("case, expected", [
    ("not_a_checkpoint", "is not a small-vlm checkpoint"),
    ("repo_without_slash", "must look like user/name"),
    ("existing_repo_without_yes", "already exists on the Hub; pass --yes"),
    ("no_token", "no Hugging Face token"),
    ("local_dir_not_empty", "is not empty"),
    ("llava_with_linear_connector", "cannot export as llava: connector 'linear'"),
])
def test_bad_input_is_one_error_line_and_uploads_nothing(case, expected, run, tiny_backbones, tmp_path,
                                                         monkeypatch, capsys):
    run_dir, _, _ = run
    hub = FakeHub(exists=case == "existing_repo_without_yes")
    monkeypatch.setattr(push, "HfApi", hub)
    monkeypatch.setattr(push, "get_token", lambda: None if case == "no_token" else SECRET)
    argv = {
        "not_a_checkpoint": [str(tmp_path), "--repo", "me/tiny"],
        "repo_without_slash": [run_dir, "--repo", "tiny"],
        "existing_repo_without_yes": [run_dir, "--repo", "me/tiny"],
        "no_token": [run_dir, "--repo", "me/tiny"],
        "local_dir_not_empty": [run_dir, "--repo", "me/tiny", "--local-dir", run_dir],
        "llava_with_linear_connector": [linear_run(tiny_backbones, tmp_path), "--repo", "me/tiny", "--format", "llava"],
    }[case]
    capsys.readouterr()  # drop what building the fixtures logged
    assert exit_code(push.main, argv) == 2  # as `python push.py ARGV` exits
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    if case == "llava_with_linear_connector":
        assert "--format remote" in err[0]
    assert [call[0] for call in hub.calls if call[0] != "repo_exists"] == []


def test_default_format_falls_back_to_remote_and_says_why(tiny_backbones, tmp_path, capsys):
    config = push.VLMConfig.from_pretrained(os.path.join(linear_run(tiny_backbones, tmp_path), "final"))
    assert push.choose_format(config, None) == "remote"
    assert "format: remote (llava is not possible: connector 'linear'" in capsys.readouterr().out


@pytest.mark.parametrize("aspect", ["pad", "resize"])
def test_llava_image_processor_matches_ours(run, aspect):
    """Both aspect modes give the native export the pixels of training (PIL's resize there, torch's
    here: one level in 255 apart at most), odd sizes included."""
    import copy

    _, model, processor = run
    ours = copy.deepcopy(processor)
    ours.image_processor.aspect = aspect
    theirs = push.llava_processor(ours, model.config).image_processor
    images = [Image.new("RGB", size, (200, 30, 90)) for size in [(31, 20), (20, 31), (500, 375), (333, 334)]]
    for image in images:
        image.paste((10, 220, 40), (0, 0, image.width // 3, image.height // 2))  # not uniform: resampling shows
        expected = ours.image_processor(image)["pixel_values"]
        got = torch.as_tensor(theirs(image, return_tensors="pt")["pixel_values"])
        torch.testing.assert_close(got, expected, atol=ONE_LEVEL, rtol=0)


def damaged_copy(run_dir, tmp_path, damage):
    """A copy of the run with one thing wrong."""
    copy = tmp_path / f"damaged_{damage}"
    shutil.copytree(run_dir, copy)
    final = copy / "final"
    if damage == "no_weights":
        (final / "model.safetensors").unlink()
    elif damage == "truncated_weights":
        data = (final / "model.safetensors").read_bytes()
        (final / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "weights_cut_in_header":
        data = (final / "model.safetensors").read_bytes()
        (final / "model.safetensors").write_bytes(data[:4])
    elif damage == "unknown_connector":
        config = json.loads((final / "config.json").read_text())
        write_json(final / "config.json", {**config, "connector": "mlp2x_nope"})
    elif damage == "no_tokenizer_json":
        (final / "tokenizer.json").unlink()
    return str(copy)


class OfflineHub(FakeHub):
    def repo_exists(self, repo_id):
        raise ConnectionError("[Errno -3] Temporary failure in name resolution")


@pytest.mark.parametrize("case, expected", [
    ("no_weights", "has no model weights"),
    ("truncated_weights", "final/model.safetensors (SafetensorError: Error while deserializing header: incomplete "
                          "metadata, file not fully covered); copy or save the checkpoint again"),
    ("weights_cut_in_header", "final/model.safetensors (SafetensorError: Error while deserializing header: header "
                              "too small); copy or save the checkpoint again"),
    ("unknown_connector", "(unknown connector 'mlp2x_nope'"),  # a setting to fix, not a damaged file
    ("no_tokenizer_json", "has no tokenizer.json"),
    ("local_dir_is_a_file", "is a file; give a new or empty folder"),
    ("offline", "cannot reach the Hugging Face Hub for me/tiny (ConnectionError"),
])
def test_damaged_checkpoints_and_no_network_are_one_error_line(case, expected, run, tmp_path, monkeypatch):
    run_dir, _, _ = run
    hub = OfflineHub() if case == "offline" else FakeHub()
    monkeypatch.setattr(push, "HfApi", hub)
    monkeypatch.setattr(push, "get_token", lambda: SECRET)
    (tmp_path / "a_file").write_text("x")
    argv = [run_dir, "--repo", "me/tiny"]
    if case not in ("local_dir_is_a_file", "offline"):
        argv[0] = damaged_copy(run_dir, tmp_path, case)
    if case == "local_dir_is_a_file":
        argv += ["--local-dir", str(tmp_path / "a_file")]
    with pytest.raises(UserError) as error:
        push.main(argv)
    message = str(error.value)
    assert "\n" not in message and expected in message, message
    if case == "unknown_connector":
        assert message.startswith(f"cannot build the model in {argv[0]}/final (") and "cannot read" not in message
    assert [call[0] for call in hub.calls] == []  # nothing uploaded


@pytest.mark.parametrize("fmt", ["llava", "remote"])
def test_exported_folder_names_no_local_path_and_no_local_flags(run, tmp_path, fmt):
    run_dir, model, _ = run
    folder = tmp_path / "export"
    assert push.main([run_dir, "--repo", "me/tiny", "--format", fmt, "--local-dir", str(folder)]) == 0
    local = [os.path.dirname(model.config.llm), str(tmp_path)]  # the base models' and the run's folders
    for name in os.listdir(folder):
        if name.endswith((".json", ".md", ".jinja", ".py")):
            text = (folder / name).read_text()
            assert not any(path in text for path in local), (name, [p for p in local if p in text])
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tokenizer_config and "is_local" not in tokenizer_config
    assert "tiny-llama" in (folder / "README.md").read_text()  # named by its folder's name
