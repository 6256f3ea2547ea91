"""The small-vlm model: a LLaVA-style vision-language model in one file.

Read top to bottom, this is the path of an image and a prompt through the model:
  1. VLMConfig        - what the model is made of (encoder, connector, LLM, image token).
  2. vision encoder   - a CLIP/SigLIP vision tower; we take the hidden states of one layer.
  3. connector        - maps vision features (N, P, D_vision) to LLM embeddings (N, P, D_llm).
  4. the splice       - the processor wrote one <image> token per visual token; the model
                        overwrites exactly those embedding positions with the connector output.
  5. the loss         - next-token cross-entropy computed only at supervised positions.
  6. generation       - transformers' GenerationMixin; images are encoded once, at prefill.
  7. VLMProcessor     - tokenizer + image transform; expands each <image> to its image tokens.
  8. build_vlm        - assembles a new model from a pretrained encoder and LLM.
  9. LoRA             - LoRALinear (a frozen layer + a trainable low-rank update), add_lora,
                        merge_lora (the update folded back into the layer).
 10. quirks           - what real files need: to_rgb (16-bit and float images), the pad canvas
                        bound (MAX_PAD_SIDE), load_tokenizer's SentencePiece repair.
AnyRes (LLaVA-NeXT's high-resolution option) adds one idea at three places: the image processor cuts
an image into tower-sized tiles (section 7, `anyres_tiles`), the model lays the tiles' features back
on their grid (section 4, `lay_out_anyres`), and both take the geometry from one function
(section 1, `anyres_layout`).
Video (LLaVA-NeXT-Video's way) adds one idea: a clip is its frames, each an image through the tower,
pooled 2x2 to a quarter of the tokens (section 4, `get_video_features`), spliced at <video> tokens.

This file imports only torch, transformers (with its tokenizers), PIL and numpy, so push.py can ship it verbatim as
the remote code of a Hub repo (`trust_remote_code=True`).
"""
import json
import math
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_base import ImageProcessingMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.processing_utils import ImagesKwargs
from transformers.tokenization_utils_base import generate_merges
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"  # the processor's marker for a clip (records mark it with <image>, as LLaVA-NeXT-Video's)
IGNORE_INDEX = -100  # label value that the loss skips (prompt, image and padding positions)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# 1. Config


class VLMConfig(PretrainedConfig):
    """Everything needed to rebuild the model offline: both backbone configs are stored nested."""

    model_type = "small_vlm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    vision_model: str = ""  # Hub name or folder the encoder came from (for the model card)
    llm: str = ""  # Hub name or folder the LLM came from
    vision_feature_layer: int = -2  # hidden-states index; -2 = second-to-last layer (LLaVA)
    drop_cls: bool = True  # drop the CLS token (CLIP has one, SigLIP has none)
    connector: str = "mlp2x_gelu"  # identity | linear | mlp{N}x_{gelu,relu,silu}
    image_token: str = IMAGE_TOKEN
    image_token_id: int = -1  # id of <image> in the tokenizer
    num_image_tokens: int = 0  # visual tokens per image (per tile with anyres) = tokens per <image> without anyres
    # AnyRes (LLaVA-NeXT): [[H, W], ...] pixel sizes an image may be tiled to, each a whole number of
    # tower tiles; None = one tile per image (LLaVA-1.5). With it the model has an image_newline vector.
    image_grid_pinpoints: list | None = None
    video_token_id: int = -1  # id of <video>; -1 = the model takes no video (no video_frames when it was built)
    tie_word_embeddings: bool = False  # the LLM ties (or not) its own embeddings


# Registered so that AutoConfig (which AutoTokenizer calls on a saved VLM folder) knows `small_vlm`
# instead of warning "You are using a model of type `small_vlm` to instantiate a model of type ``".
AutoConfig.register(VLMConfig.model_type, VLMConfig, exist_ok=True)


def vision_has_cls(vision_config):
    """CLIP-style towers prepend a CLS token; SigLIP-style towers do not."""
    return vision_config.model_type.startswith("clip")


def count_image_tokens(vision_config, drop_cls):
    """Tokens one image becomes: one per patch (+ CLS when the tower has it and we keep it)."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + int(vision_has_cls(vision_config) and not drop_cls)


def count_frame_tokens(image_size, patch_size):
    """Tokens one video frame becomes: its g x g patch grid average-pooled 2x2 (LLaVA-NeXT-Video),
    (g // 2)^2: 576 -> 144 at 336 px with 14 px patches. A clip of F frames: F times that."""
    return (image_size // patch_size // 2) ** 2


# AnyRes geometry: which tiles an image is cut into, and which of their features show the image.
# LLaVA-NeXT's grids in tiles (rows, columns); with a 336 tower these are its pinpoints
# [H, W] = [336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008].
ANYRES_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def default_pinpoints(tile):
    """LLaVA-NeXT's pinpoint list for a tower that sees tile x tile pixels, as [[H, W], ...]."""
    return [[rows * tile, cols * tile] for rows, cols in ANYRES_GRIDS]


def best_pinpoint(height, width, pinpoints):
    """The pinpoint (H, W) that keeps the most of the image, fitted inside it with its aspect kept
    (pixels beyond the original count for nothing: upscaling adds no detail), and of those the one
    that wastes the least area on padding. The first such pinpoint in the list wins a tie."""
    best, best_kept, best_waste = None, 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = pin_w * pin_h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (pin_h, pin_w), kept, waste
    return best


def anyres_layout(height, width, pinpoints, tile, patch):
    """Where an image of height x width lands under AnyRes: (rows, cols) of tiles it is cut into,
    and (top, bottom, left, right), the part of its (rows * g, cols * g) feature grid that shows
    the image, g = tile // patch features per tile side (bottom, right exclusive). The image was
    fitted and centred in the pinpoint, so the rest is padding: whole feature rows above and below
    a wide image, columns left and right of a tall one. The processor counts tokens and the model
    removes the padding with this one function, so the two always agree."""
    pin_h, pin_w = best_pinpoint(height, width, pinpoints)
    rows, cols = pin_h // tile, pin_w // tile
    grid_h, grid_w = rows * (tile // patch), cols * (tile // patch)
    if width / height > grid_w / grid_h:  # wider than the grid: padding above and below
        shown = int(round(height * (grid_w / width), 7))  # round(, 7) as LLaVA-NeXT: 23.9999999 -> 24
        pad = (grid_h - shown) // 2
        return (rows, cols), (pad, grid_h - pad, 0, grid_w)
    shown = int(round(width * (grid_h / height), 7))
    pad = (grid_w - shown) // 2
    return (rows, cols), (0, grid_h, pad, grid_w - pad)


def count_anyres_tokens(height, width, pinpoints, tile, patch):
    """Image tokens of one AnyRes image: the base tile's (tile / patch)^2 features, then the
    unpadded grid, each feature row ended by one image_newline."""
    _, (top, bottom, left, right) = anyres_layout(height, width, pinpoints, tile, patch)
    return (tile // patch) ** 2 + (bottom - top) * (right - left + 1)


class SettingError(ValueError):
    """A setting these backbones cannot take (AnyRes pinpoints that are not whole tiles of the tower)."""


def check_pinpoints(pinpoints, tile):
    """[[H, W], ...] with each side a positive multiple of the tile, or a ValueError saying which is not."""
    if not pinpoints or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pinpoints):
        raise SettingError(f"image_grid_pinpoints must be a non-empty list of [height, width] pairs, got {pinpoints!r}")
    for pin_h, pin_w in pinpoints:
        if pin_h <= 0 or pin_w <= 0 or pin_h % tile or pin_w % tile:
            raise SettingError(f"image_grid_pinpoints entry [{pin_h}, {pin_w}] is not a whole number of the vision "
                             f"tower's {tile}x{tile} tiles; use multiples of {tile} (e.g. {default_pinpoints(tile)})")
        if pin_h * pin_w > MAX_PAD_SIDE ** 2:  # every image is resized to a pinpoint: bound it as pad's canvas
            raise SettingError(f"image_grid_pinpoints entry [{pin_h}, {pin_w}] has more pixels than "
                             f"{MAX_PAD_SIDE}x{MAX_PAD_SIDE} (model.MAX_PAD_SIDE); LLaVA-NeXT's largest is 672x672")
    return [[int(pin_h), int(pin_w)] for pin_h, pin_w in pinpoints]


def parse_pinpoints(text):
    """"336x672,672x336" -> [[336, 672], [672, 336]] ([height, width] each); "" -> None (the default list)."""
    if not text:
        return None
    pinpoints = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item)
        if not match:
            raise ValueError(f"image_grid_pinpoints={text!r}: {item!r} is not HEIGHTxWIDTH in pixels "
                             "(e.g. 336x672,672x336,672x672,1008x336,336x1008)")
        pinpoints.append([int(match[1]), int(match[2])])
    return pinpoints


# ----------------------------------------------------------------------------------------------
# 2. Vision encoder


def load_vision_config(name_or_path):
    """The vision tower's config; of a full CLIP/SigLIP checkpoint, its vision half."""
    config = AutoConfig.from_pretrained(name_or_path)
    config = getattr(config, "vision_config", config)
    if not re.match(r"(clip|siglip|siglip2)_vision_model$", config.model_type):
        raise ValueError(
            f"vision_model={name_or_path!r} is a {config.model_type!r} model; small-vlm supports "
            "CLIP and SigLIP vision towers (e.g. openai/clip-vit-large-patch14-336, "
            "google/siglip-so400m-patch14-384)."
        )
    return config


def load_vision_tower(name_or_path, **kwargs):
    """A CLIP/SigLIP vision tower from the Hub or a folder; a full CLIP/SigLIP checkpoint yields its
    vision half (its `vision_model.*` weights are the same keys the vision-only model expects)."""
    config = load_vision_config(name_or_path)
    # A full CLIP/SigLIP checkpoint also holds a text tower; transformers would print a table of
    # those "unexpected" weights. Skipping them is the point here, so hush that one report.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(name_or_path, config=config, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


# ----------------------------------------------------------------------------------------------
# 3. Connector

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def build_connector(name, vision_dim, llm_dim):
    """`identity`, `linear`, or `mlp{N}x_{act}`: N Linear layers with `act` between them
    (LLaVA-1.5's `mlp2x_gelu` = Linear(vision_dim, llm_dim), GELU, Linear(llm_dim, llm_dim))."""
    if name == "identity":
        if vision_dim != llm_dim:
            raise ValueError(f"connector='identity' needs equal widths, got vision {vision_dim} and LLM {llm_dim}")
        return nn.Identity()
    if name == "linear":
        return nn.Linear(vision_dim, llm_dim)
    match = re.fullmatch(r"mlp(\d+)x_(\w+)", name)
    if match and int(match[1]) >= 1 and match[2] in ACTIVATIONS:
        layers = [nn.Linear(vision_dim, llm_dim)]
        for _ in range(int(match[1]) - 1):
            layers += [ACTIVATIONS[match[2]](), nn.Linear(llm_dim, llm_dim)]
        return nn.Sequential(*layers)
    raise ValueError(
        f"unknown connector {name!r}; valid: identity, linear, mlp{{N}}x_{{act}} with N >= 1 and act in "
        f"{sorted(ACTIVATIONS)} (e.g. mlp2x_gelu, LLaVA-1.5's)"
    )


# ----------------------------------------------------------------------------------------------
# 4-6. The model


class VLMForCausalLM(PreTrainedModel, GenerationMixin):
    config: VLMConfig
    config_class = VLMConfig
    base_model_prefix = "vlm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config, vision_tower=None, language_model=None):
        """Builds random backbones from `config`, or takes already loaded ones (build_vlm)."""
        super().__init__(config)
        self.vision_tower = vision_tower or AutoModel.from_config(config.vision_config)
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self.connector = build_connector(
            config.connector, config.vision_config.hidden_size, config.text_config.hidden_size
        )
        if config.image_grid_pinpoints:
            # AnyRes: a learned vector that ends each row of an image's feature grid, so the LLM,
            # which reads the grid as one flat sequence, can tell where a row ends (LLaVA-NeXT).
            width = config.text_config.hidden_size
            self.image_newline = nn.Parameter(torch.randn(width) / math.sqrt(width))
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def encode_tiles(self, pixel_values):
        """(N, 3, S, S) tower-sized images -> (N, P, D_llm) LLM-space features, P = config.num_image_tokens."""
        return self.connector(self.vision_features(pixel_values))

    def vision_features(self, pixel_values):
        """(N, 3, S, S) -> (N, P, D_vision): the tower's hidden states at vision_feature_layer."""
        frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):  # no graph when frozen
            pixel_values = pixel_values.to(self.vision_tower.dtype)
            out = self.vision_tower(pixel_values, output_hidden_states=True)
            features = out.hidden_states[self.config.vision_feature_layer]  # (N, P(+1), D_vision)
        if self.config.drop_cls and vision_has_cls(self.config.vision_config):
            features = features[:, 1:]
        return features

    def get_video_features(self, pixel_values_videos):
        """(V, F, 3, S, S) clips -> (V * F * p, D_llm) tokens, frame by frame, clip by clip. Each frame
        goes through the tower like an image; its g x g feature grid is average-pooled 2x2 before the
        connector, p = (g // 2)^2 tokens a frame (LLaVA-NeXT-Video's pooling: 32 frames x 576 patches
        would be 18,432 tokens a clip, pooled 4,608). The model sees time only as the frames' order."""
        features = self.vision_features(pixel_values_videos.flatten(0, 1))  # (V * F, g * g, D_vision)
        g = math.isqrt(features.shape[1])
        grid = features.transpose(1, 2).unflatten(2, (g, g))  # (V * F, D_vision, g, g)
        pooled = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (V * F, p, D_vision)
        return self.connector(pooled).flatten(0, 1)

    def get_image_features(self, pixel_values, image_sizes=None):
        """The visual tokens of all images, in order: (K, D_llm). One tile per image: K = N * P.
        AnyRes: pixel_values holds each image's tiles, base tile first (see the processor), and
        image_sizes (N, 2) each image's original (height, width), which fixes its tile grid."""
        tiles = self.encode_tiles(pixel_values)  # (tiles, P, D)
        if not self.config.image_grid_pinpoints:
            return tiles.flatten(0, 1)
        if image_sizes is None:
            raise ValueError("this model uses AnyRes tiling: pass image_sizes, (N, 2) heights and widths, "
                             "as the processor returns it")
        vision, pinpoints = self.config.vision_config, self.config.image_grid_pinpoints
        layouts = [anyres_layout(height, width, pinpoints, vision.image_size, vision.patch_size)
                   for height, width in image_sizes.tolist()]
        needed = sum(1 + rows * cols for (rows, cols), _ in layouts)
        if needed != len(tiles):
            raise ValueError(f"{len(tiles)} tiles in pixel_values but the image_sizes call for {needed}; "
                             "build inputs with the processor")
        images, begin = [], 0
        for (rows, cols), window in layouts:
            images.append(self.lay_out_anyres(tiles[begin:begin + 1 + rows * cols], rows, cols, window))
            begin += 1 + rows * cols
        return torch.cat(images)

    def lay_out_anyres(self, features, rows, cols, window):
        """One AnyRes image: (1 + rows * cols, P, D) tile features, base tile first -> (K, D) tokens.

        The grid tiles are laid back side by side as one (rows * g, cols * g) feature map (g = sqrt(P)
        features per tile side); the rows or columns that only show padding are cut away; each
        remaining row is followed by image_newline. The base tile's P features come first.

            tiles 1 2       feature map       unpadded, + newline        tokens
                  3 4   ->  . . . . . .   ->  a a a a a a \n      ->    [base P] a a a a a a \n
            (2x2 grid)      a a a a a a        b b b b b b \n                     b b b b b b \n
                            b b b b b b
                            . . . . . .  (a wide image: padding above and below)
        """
        g = math.isqrt(features.shape[1])
        base, grid = features[0], features[1:]  # (P, D), (rows * cols, P, D)
        grid = grid.view(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, -1)
        top, bottom, left, right = window
        grid = grid[top:bottom, left:right]  # (h, w, D): the image without its padding
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, -1)  # (h, 1, D)
        return torch.cat([base, torch.cat([grid, newline], dim=1).flatten(0, 1)])  # (P + h * (w + 1), D)

    def merge_image_features(self, input_ids, inputs_embeds, image_features, media="image"):
        """The splice. The processor wrote one image-token id per visual token, so position k of
        the image tokens (row-major over the batch) receives visual token k of the images in
        order. input_ids (B, T), inputs_embeds (B, T, D), image_features (K, D) -> (B, T, D).
        media="video": the clips' features the same way, at the <video> tokens."""
        token_id = self.config.video_token_id if media == "video" else self.config.image_token_id
        image_positions = input_ids == token_id  # (B, T)
        n_tokens = int(image_positions.sum())
        n_features = 0 if image_features is None else image_features.shape[0]
        if n_tokens != n_features:
            vision = self.config.vision_config
            per_image = (f"{count_frame_tokens(vision.image_size, vision.patch_size)} per frame" if media == "video"
                         else "as many as anyres_layout counts for each image's size"
                         if self.config.image_grid_pinpoints else f"{self.config.num_image_tokens} per image")
            raise ValueError(
                f"{media} tokens and {media} features do not match: {n_tokens} <{media}> tokens in input_ids, "
                f"{n_features} features from the {media}s. Build inputs with the processor, which writes {per_image}."
            )
        if n_tokens == 0:
            return inputs_embeds
        return inputs_embeds.masked_scatter(image_positions.unsqueeze(-1), image_features.to(inputs_embeds.dtype))

    def embed_inputs(self, input_ids, pixel_values, image_sizes=None, pixel_values_videos=None):
        """Token embeddings with image and video features spliced in: (B, T) -> (B, T, D)."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = self.get_image_features(pixel_values, image_sizes) if pixel_values is not None else None
        inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
        takes_video = self.config.video_token_id >= 0
        if takes_video or pixel_values_videos is not None:
            video_features = None if pixel_values_videos is None else self.get_video_features(pixel_values_videos)
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, video_features, "video")
        if self.training:
            # Every rank runs the same modules in the same order, whatever its batch holds: ZeRO-3 gathers a
            # module's parameters as it runs it (a rank that skipped one would leave the others waiting, or
            # pair their gathers wrongly), and DDP reduces every gradient. So the image path with no image
            # (and image_newline), and a video model's clip path with no clip, run on one blank image at weight 0.
            size = self.config.vision_config.image_size
            blank = inputs_embeds.new_zeros(1, 3, size, size)
            unused = []
            if pixel_values is None:
                unused.append(self.encode_tiles(blank).sum())
                if self.config.image_grid_pinpoints:
                    unused.append(self.image_newline.sum())
            if takes_video and pixel_values_videos is None:
                unused.append(self.get_video_features(blank[None]).sum())  # a clip of one blank frame
            if unused:
                inputs_embeds = inputs_embeds + 0.0 * sum(unused)
        return inputs_embeds

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        labels=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        logits_to_keep=0,
        image_sizes=None,
        pixel_values_videos=None,
        **kwargs,
    ):
        """With `labels`: loss over supervised positions only (logits only there, too).
        Without: logits of the last `logits_to_keep` positions (0 = all), for generation."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_sizes, pixel_values_videos)
        if labels is None:
            out = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
            return CausalLMOutputWithPast(logits=out.logits, past_key_values=out.past_key_values)
        hidden = self.language_model.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, D)
        loss, logits = self.supervised_loss(hidden, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def supervised_loss(self, hidden, labels):
        """Next-token cross-entropy where labels != -100. Position t predicts token t+1, so hidden
        (B, T, D) is paired with labels shifted left. Only the K supervised rows go through the LM
        head: (K, D) -> (K, V) instead of (B, T, V), e.g. 40 of 620 positions in pretraining."""
        targets = labels[:, 1:]  # (B, T-1)
        supervised = targets != IGNORE_INDEX
        head = self.get_output_embeddings()
        logits = head(hidden[:, :-1][supervised])  # (K, V)
        if logits.shape[0] == 0:
            # Nothing supervised (every sample of a micro-batch skipped): a zero loss that still runs
            # the head, so every parameter a normal step touches gets a (zero) gradient and the
            # ranks' gradient reductions under ZeRO stay in step.
            return head(hidden[:, :1]).float().sum() * 0.0, logits
        return F.cross_entropy(logits.float(), targets[supervised]), logits


# ----------------------------------------------------------------------------------------------
# 7. Processor: image transform + tokenizer


def resize(pixels, height, width):
    """(H, W, 3) uint8 -> (3, height, width) uint8, bicubic with antialiasing. The (H, W, 3) layout
    seen as (1, 3, H, W) is channels-last, which takes torch's vectorized uint8 kernel."""
    return F.interpolate(pixels.permute(2, 0, 1)[None], size=(height, width), mode="bicubic", antialias=True)[0]


class VLMImageProcessor(ImageProcessingMixin):
    """PIL image -> (tiles, 3, size, size) normalized tensor, one tile unless aspect is anyres.
    aspect `pad`: paste centred on a square canvas of the mean colour (LLaVA's expand2square), then
    resize; `resize`: resize the short side to `size`, then centre-crop (CLIP's own transform);
    `anyres`: LLaVA-NeXT's tiling (anyres_tiles), for detail beyond one size x size view.

    Resizing is bicubic with antialiasing, as LLaVA's PIL resize, but done by torch on the uint8
    image: 2-3x faster than PIL here, and on photos at most one level in 255 apart from PIL's
    output (bench.py --data measures both)."""

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = ImagesKwargs  # the keyword overrides from_pretrained accepts (size, image_mean, ...)

    def __init__(self, size=336, image_mean=CLIP_MEAN, image_std=CLIP_STD, aspect="pad", image_grid_pinpoints=None,
                 **kwargs):
        super().__init__(**kwargs)
        if aspect not in ("pad", "resize", "anyres"):
            raise ValueError(f"image aspect must be 'pad', 'resize' or 'anyres', got {aspect!r}")
        self.size, self.aspect = int(size), aspect
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.image_grid_pinpoints = (check_pinpoints(image_grid_pinpoints or default_pinpoints(self.size), self.size)
                                     if aspect == "anyres" else None)

    def transform(self, image):
        """One image -> (tiles, 3, S, S) normalized: 1 tile for pad and resize, 1 + rows * cols for anyres."""
        image = to_rgb(image)
        if self.aspect == "pad":
            image = bound_pad_canvas(image)  # a very long image is shrunk first (section 10)
            side = max(image.size)
            canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in self.image_mean))
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            pixels = resize(torch.from_numpy(np.array(canvas)), self.size, self.size)[None]  # (1, 3, S, S)
        elif self.aspect == "resize":
            pixels = self.resize_and_crop(image)
        else:
            pixels = self.anyres_tiles(image)  # (1 + rows * cols, 3, S, S)
        return self.normalize(pixels)

    def normalize(self, pixels):
        """uint8 (..., 3, S, S) -> (pixels / 255 - mean) / std, as one multiply-add in place."""
        std, mean = torch.tensor(self.image_std).view(3, 1, 1), torch.tensor(self.image_mean).view(3, 1, 1)
        return pixels.float().mul_(1 / (255 * std)).sub_(mean / std)

    def resize_and_crop(self, image):
        """(1, 3, S, S) uint8: the short side resized to S, the centre kept (aspect `resize`, and every video frame)."""
        image = bound_resize_strip(image, self.size)  # a very long strip is cut first (section 10)
        # the long side = int(size * long / short), as CLIPImageProcessor computes it
        short = min(image.size)
        w, h = int(self.size * image.width / short), int(self.size * image.height / short)
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return resize(torch.from_numpy(np.array(image)), h, w)[None, :, top:top + self.size, left:left + self.size]

    def transform_clip(self, frames):
        """A clip's frames (PIL images) -> (F, 3, S, S) normalized. Frames are never tiled or padded:
        each is resized and centre-cropped, as transformers' LlavaNextVideoVideoProcessor does."""
        return self.normalize(torch.cat([self.resize_and_crop(to_rgb(frame)) for frame in frames]))

    def anyres_tiles(self, image):
        """LLaVA-NeXT's AnyRes: (1 + rows * cols, 3, S, S) uint8 tiles of one image.
          1. choose the pinpoint (H, W) that keeps the most of the image (best_pinpoint);
          2. resize the image to fit inside it, aspect kept, and centre it on black;
          3. cut that into rows x cols tiles of S x S, row by row;
          4. put the whole image squeezed to S x S in front: the base tile, a global view."""
        size = self.size
        pixels = torch.from_numpy(np.array(image))  # (H, W, 3)
        pin_h, pin_w = best_pinpoint(image.height, image.width, self.image_grid_pinpoints)
        # the side that limits the scale fills the pinpoint; the other is rounded up (as LLaVA-NeXT)
        scale_w, scale_h = pin_w / image.width, pin_h / image.height
        if scale_w < scale_h:
            new_h, new_w = min(math.ceil(image.height * scale_w), pin_h), pin_w
        else:
            new_h, new_w = pin_h, min(math.ceil(image.width * scale_h), pin_w)
        canvas = torch.zeros(3, pin_h, pin_w, dtype=torch.uint8)
        top, left = (pin_h - new_h) // 2, (pin_w - new_w) // 2
        canvas[:, top:top + new_h, left:left + new_w] = resize(pixels, new_h, new_w)
        rows, cols = pin_h // size, pin_w // size
        grid = canvas.view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
        return torch.cat([resize(pixels, size, size)[None], grid])

    def __call__(self, images=None, return_tensors="pt", videos=None, **kwargs):
        """pixel_values (tiles of all images, 3, S, S); with anyres also image_sizes (N, 2), each
        image's (height, width), which the model needs to lay its tiles out again. videos (clips of
        equal frame counts, each a list of PIL frames) -> pixel_values_videos (V, F, 3, S, S)."""
        data = {}
        if images is not None:
            images = [images] if isinstance(images, Image.Image) else list(images)
            data["pixel_values"] = torch.cat([self.transform(im) for im in images])
            if self.aspect == "anyres":
                data["image_sizes"] = torch.tensor([[im.height, im.width] for im in images])
        if videos:
            data["pixel_values_videos"] = torch.stack([self.transform_clip(clip) for clip in videos])
        return BatchFeature(data)


def inference_folder(path):
    """A training run's output folder (out/<run>) holds its inference model in final/; any other
    folder is taken as the model folder itself. train.py (init_from), eval.py and push.py use this."""
    final = os.path.join(path, "final")
    return final if os.path.isdir(final) else path


def writes_own_bos(tokenizer, text):
    """True when `text` already starts with the BOS (a chat template wrote it): the tokenizer must
    then not add a second one. Training (data.py) and inference (the processor) share this rule."""
    return bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)


class VLMProcessor(ProcessorMixin):
    """processor(text=[...], images=[...]) -> input_ids, attention_mask, pixel_values (+ image_sizes
    with anyres). Each <image> in the text becomes that image's image tokens: num_image_tokens, or
    with anyres a count that depends on the image's size (image_token_count). Images are given in
    the order their <image> markers appear (a flat list, or one list per text)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=0, image_token=IMAGE_TOKEN,
                 patch_size=0, chat_template=None, video_frames=0, **kwargs):
        self.num_image_tokens = num_image_tokens
        self.image_token, self.video_token = image_token, VIDEO_TOKEN
        self.video_frames = video_frames  # frames sampled from a clip (data.load_video); 0 = the model takes no video
        self.patch_size = patch_size  # the tower's patch side in pixels: with anyres, the token count needs it
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def image_token_id(self):
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def video_token_id(self):
        """The id of <video>, or -1 when the tokenizer has none (a model built without video_frames)."""
        return self.tokenizer.get_vocab().get(self.video_token, -1)

    def video_token_count(self, n_frames):
        """Video tokens a clip of n_frames frames becomes (count_frame_tokens each), known before any decoding."""
        return n_frames * count_frame_tokens(self.image_processor.size, self.patch_size)

    def image_token_count(self, height, width):
        """Image tokens an image of height x width pixels becomes, from its size alone."""
        image_processor = self.image_processor
        if image_processor.aspect != "anyres":
            return self.num_image_tokens
        return count_anyres_tokens(height, width, image_processor.image_grid_pinpoints, image_processor.size,
                                   self.patch_size)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # Our image processor is not in transformers' registry, so load both parts by class.
        return [
            VLMImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs),
            AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs),
        ]

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True, padding_side="left", videos=None,
                 **kwargs):
        if text is None:
            raise ValueError("VLMProcessor needs text (use '<image>' where each image goes, '<video>' for a clip)")
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = []
        elif isinstance(images, Image.Image):
            images = [images]
        images = [im for item in images for im in (item if isinstance(item, (list, tuple)) else [item])]
        videos = list(videos or [])  # each clip a list of PIL frames
        for marker, given in ((self.image_token, images), (self.video_token, videos)):
            n_markers = sum(t.count(marker) for t in texts)
            if n_markers != len(given):
                raise ValueError(f"{n_markers} '{marker}' markers in the text but {len(given)} "
                                 f"{'images' if marker == self.image_token else 'videos'} given")
        if videos and self.video_token_id < 0:
            raise ValueError("this model takes no video: it was built without video_frames (no <video> token)")
        counts = {self.image_token: iter([self.image_token_count(im.height, im.width) for im in images]),
                  self.video_token: iter([self.video_token_count(len(clip)) for clip in videos])}
        markers = re.escape(self.image_token) + "|" + re.escape(self.video_token)
        expanded = [re.sub(markers, lambda m: m[0] * next(counts[m[0]]), t) for t in texts]
        kwargs.setdefault("add_special_tokens", not any(writes_own_bos(self.tokenizer, t) for t in texts))
        encoding = self.tokenizer(
            expanded, return_tensors=return_tensors, padding=padding, padding_side=padding_side, **kwargs
        )
        data = dict(encoding)
        if images or videos:
            data.update(self.image_processor(images or None, videos=videos))
        return BatchFeature(data, tensor_type=return_tensors)


# ----------------------------------------------------------------------------------------------
# 8. Building a new VLM from a pretrained encoder and LLM


def add_image_token(tokenizer, image_token=IMAGE_TOKEN):
    """Adds <image> as a special token (so text never splits it) and a pad token if missing."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    if tokenizer.pad_token is None:  # Llama/Vicuna have none; LLaVA pads with unk
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(image_token)


def image_text_separator(tokenizer):
    """What the prompt writes between an <image> and the text after it: " " or "".
    LLaVA tokenizes the text between images on its own (tokenizer_image_token). A SentencePiece
    tokenizer starts every text with a word boundary ("What" -> `▁What`), so LLaVA's text after an
    image starts with one: `<image> ▁What`. Tokenized in one piece after the special <image> token,
    the same text gets none (`<image> What`). Written as a space, "<image> What", one tokenization
    gives LLaVA's ids. Byte-level tokenizers (Qwen, Llama-3) add no boundary: no separator."""
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; add it first (add_image_token)")
    alone = tokenizer("What", add_special_tokens=False)["input_ids"]
    after_image = tokenizer(IMAGE_TOKEN + "What", add_special_tokens=False)["input_ids"][1:]
    return "" if alone == after_image else " "


def build_vlm(vision_model, llm, connector="mlp2x_gelu", vision_feature_layer=-2, drop_cls=True,
              image_aspect="pad", dtype=None, attn_implementation=None, image_grid_pinpoints=None,
              llm_quantization=None, video_frames=0):
    """A new VLM: pretrained encoder + pretrained LLM + fresh connector (+ image_newline with
    image_aspect='anyres'). Returns (model, processor). dtype=None loads the LLM in its saved dtype
    (Vicuna: fp16, Qwen2.5: bf16) and the rest in that dtype too: the image features must reach
    the LLM in the dtype of its embeddings. image_grid_pinpoints: anyres only; None = LLaVA-NeXT's
    five grids (default_pinpoints). llm_quantization: transformers' quantization settings for the
    LLM (QLoRA's 4-bit loading, train.py's four_bit_loading). video_frames > 0: the model takes clips of
    that many frames, at <video> tokens."""
    processor = build_processor(vision_model, llm, image_aspect, drop_cls, image_grid_pinpoints, video_frames)
    load = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # Loading draws from the random generator in some set-ups (ZeRO-3's partitioned loading) and not
    # in others: on a generator of its own, the new parts below start the same way in every set-up.
    text_config = AutoConfig.from_pretrained(llm)
    if type(text_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"llm={llm!r} is a {text_config.model_type!r} model, not a causal language model "
                         "(e.g. Vicuna, Llama, Qwen2)")
    with torch.random.fork_rng(devices=[]):
        language_model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype or "auto",
                                                              quantization_config=llm_quantization, **load)
        vision_tower = load_vision_tower(vision_model, dtype=language_model.dtype, **load)
    if len(processor.tokenizer) > language_model.get_input_embeddings().num_embeddings:
        # The <image> row is never read as an input (the splice overwrites those positions), so it
        # needs no careful start: no mean/covariance of the old table (mean_resizing), which at 7B
        # under ZeRO-3 would gather the whole table on every rank.
        language_model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    config = VLMConfig(
        vision_config=vision_tower.config.to_dict(),
        # without the LLM's quantization settings: the saved model is a plain 16-bit one (QLoRA merges)
        text_config={k: v for k, v in language_model.config.to_dict().items() if k != "quantization_config"},
        vision_model=str(vision_model),
        llm=str(llm),
        vision_feature_layer=vision_feature_layer,
        drop_cls=drop_cls,
        connector=connector,
        image_token_id=processor.image_token_id,
        num_image_tokens=processor.num_image_tokens,
        image_grid_pinpoints=processor.image_processor.image_grid_pinpoints,
        video_token_id=processor.video_token_id,
        attn_implementation=attn_implementation,  # None = transformers' default (sdpa)
    )
    model = VLMForCausalLM(config, vision_tower=vision_tower, language_model=language_model)
    # The LLM's generation_config may list several end tokens (Qwen2.5: <|im_end|> and <|endoftext|>)
    # that its config.json does not; generation must stop at them too.
    model.generation_config.eos_token_id = language_model.generation_config.eos_token_id
    # a generated <image> (or <video>) has no image behind it
    suppressed = [processor.image_token_id] + ([config.video_token_id] if video_frames else [])
    model.generation_config.suppress_tokens = suppressed
    # The new parts in the LLM's dtype (the loaded ones already are; under ZeRO-3 they are already
    # partitioned, and must not be moved as a whole)
    model.connector.to(language_model.dtype)
    if config.image_grid_pinpoints:
        model.image_newline.data = model.image_newline.data.to(language_model.dtype)
    return model, processor


def build_processor(vision_model, llm, image_aspect="pad", drop_cls=True, image_grid_pinpoints=None, video_frames=0):
    """The processor of a VLM built from these parts, from files alone (no weights are read): the
    LLM's tokenizer with <image> (and <video>), our image transform with the encoder's own
    normalization constants, and the image token counts from the tower's config."""
    tokenizer = load_tokenizer(llm)
    add_image_token(tokenizer)
    vision_config = load_vision_config(vision_model)
    if video_frames:
        if vision_has_cls(vision_config) and not drop_cls:
            raise SettingError("video pools each frame's patch grid 2x2, so it needs drop_cls=True (a CLS token has "
                               "no place on the grid), as LLaVA-NeXT-Video")
        add_image_token(tokenizer, VIDEO_TOKEN)
    pinpoints = None
    if image_aspect == "anyres":
        if vision_has_cls(vision_config) and not drop_cls:
            raise SettingError("image_aspect='anyres' lays each tile's patch features out on a grid, so it needs "
                             "drop_cls=True (a CLS token has no place on the grid), as LLaVA-NeXT")
        pinpoints = check_pinpoints(image_grid_pinpoints or default_pinpoints(vision_config.image_size),
                                    vision_config.image_size)
    try:
        reference = AutoImageProcessor.from_pretrained(vision_model)
        mean, std = reference.image_mean, reference.image_std
    except (OSError, ValueError):  # a bare vision checkpoint without preprocessor_config.json
        mean, std = CLIP_MEAN, CLIP_STD
    image_processor = VLMImageProcessor(size=vision_config.image_size, image_mean=mean, image_std=std,
                                        aspect=image_aspect, image_grid_pinpoints=pinpoints)
    return VLMProcessor(image_processor, tokenizer, num_image_tokens=count_image_tokens(vision_config, drop_cls),
                        image_token=IMAGE_TOKEN, patch_size=vision_config.patch_size,
                        chat_template=tokenizer.chat_template, video_frames=video_frames)


# ----------------------------------------------------------------------------------------------
# 9. LoRA: a small trainable low-rank update beside each frozen linear layer (LLaVA-1.5's LoRA recipe)


class LoRALinear(nn.Module):
    """A frozen linear layer and a trainable low-rank update beside it:

        y = base(x) + (alpha / r) * B(A(dropout(x)))        A: (r, in), B: (out, r), r << in, out

    B starts at zero, so the update B @ A is zero and the model starts exactly as the pretrained
    one; A starts random, so B's first gradient, (dL/dy)^T (A x), is not zero and training moves.
    alpha / r keeps the update's size when r changes, so one learning rate fits every rank. Only A
    and B train: r x (in + out) numbers instead of in x out (7B's 4096 x 4096 at r=128: 1/16)."""

    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        self.base = base
        # the adapters in the layer's compute dtype (a 4-bit QLoRA layer stores uint8 and computes in bf16)
        dtype = base.weight.dtype if base.weight.is_floating_point() else torch.bfloat16
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=dtype, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=dtype, device=base.weight.device)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own start
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def lora_target_names(module, targets):
    """The names of MODULE's linear layers that get adapters. targets: "all-linear" (every linear
    layer but the LM head, as LLaVA) or module names, each matching a layer name's end ("q_proj",
    "self_attn.o_proj")."""
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    names = []
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear) or layer is head:
            continue
        if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets.split(",")):
            names.append(name)
    return names


def add_lora(module, names, r, alpha, dropout):
    """Wraps each named linear layer of MODULE in LoRALinear, in place."""
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), r, alpha, dropout))


def merge_lora(state, model):
    """STATE (a whole state dict of MODEL) with each adapter folded into its layer, the model a plain
    one again: `x.base.weight` + (alpha / r) * B @ A -> `x.weight` (in fp32, stored in the layer's
    dtype), `x.base.bias` -> `x.bias`, the adapters dropped. The merged model computes what the
    adapted one did, with no extra work per token, and loads without any LoRA code."""
    state = dict(state)
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            base = state.pop(f"{name}.base.weight")
            A, B = state.pop(f"{name}.lora_A.weight"), state.pop(f"{name}.lora_B.weight")
            state[f"{name}.weight"] = (base.float() + layer.scaling * (B.float() @ A.float())).to(base.dtype)
            if f"{name}.base.bias" in state:
                state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
    return state


# ----------------------------------------------------------------------------------------------
# 10. Real-world quirks: odd image files (16-bit, float, very long), SentencePiece-only tokenizers


def to_rgb(image):
    """An 8-bit RGB image. 16-bit greyscale (medical, scientific PNGs) keeps its top 8 bits; PIL's
    own convert("RGB") would clip it to white. Floating-point pixels have no known range: refused."""
    if image.mode == "RGB":
        return image  # convert() would copy it
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I" (32-bit integers, as PIL opens some 16-bit files)
        pixels = np.asarray(image).astype(np.int64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(f"{image.mode} image with values outside 0..65535; save it as an 8- or 16-bit image")
        return Image.fromarray((pixels >> 8).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        raise ValueError("floating-point image (mode F): its value range is unknown; save it as an 8- or 16-bit image")
    return image.convert("RGB")


# The `pad` canvas is a square of the image's long side: a 1080x20000 image would make a 20000x20000
# canvas (1.2 GB). Longer sides are shrunk to this first (50 MB canvas at most); no LLaVA image is that big.
MAX_PAD_SIDE = 4096


def bound_pad_canvas(image):
    """The image, shrunk with its aspect kept when its long side is over MAX_PAD_SIDE, so that its
    `pad` canvas stays bounded; any other image as it is."""
    if max(image.size) > MAX_PAD_SIDE:  # bound the canvas: shrink first (then a little off LLaVA's pixels)
        scale = MAX_PAD_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    return image


def bound_resize_strip(image, size):
    """`resize` scales the short side to `size` before it keeps the centre square: a 5 x 10,000,000
    strip would first become 336 x 672,000,000 (gigabytes). When the scaled long side would pass
    MAX_PAD_SIDE, the image is first cut to its centre part that scales to MAX_PAD_SIDE, which holds
    the square with room to spare; any other image as it is."""
    short, long = min(image.size), max(image.size)
    if long * size <= MAX_PAD_SIDE * short:
        return image
    keep = math.ceil(short * MAX_PAD_SIDE / size)
    start = (long - keep) // 2
    if image.width > image.height:
        return image.crop((start, 0, start + keep, image.height))
    return image.crop((0, start, image.width, start + keep))


def load_tokenizer(name_or_path):
    """AutoTokenizer, with one repair. A tokenizer shipped only as a SentencePiece BPE model
    (Llama-2 / Vicuna: tokenizer.model and no tokenizer.json) is converted by transformers with its
    merges ranked by piece id instead of piece score. SentencePiece scores whitespace-only pieces
    ("▁▁", "▁▁▁▁", ...) lowest, so it merges them last: "Hello  world" -> `▁Hello ▁ ▁world`; the
    id ranking merges (▁, ▁) first -> `▁Hello ▁▁ world`, ids LLaVA never trained on (code
    indentation in ShareGPT answers, say). Re-ranked by score, the fast tokenizer gives
    SentencePiece's pieces; final/ saves the repaired tokenizer.json, so eval and the Hub get it."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    sp_file = tokenizer.init_kwargs.get("vocab_file")
    shipped_json = cached_file(name_or_path, "tokenizer.json", _raise_exceptions_for_missing_entries=False)
    if tokenizer.is_fast and sp_file and str(sp_file).endswith(".model") and not shipped_json:
        import sentencepiece  # only tokenizers converted from SentencePiece need it

        sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        if state["model"]["type"] == "BPE":
            scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
            state["model"]["merges"] = [list(m) for m in generate_merges(state["model"]["vocab"], scores)]
            tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    return tokenizer
