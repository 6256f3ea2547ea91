"""AnyRes (LLaVA-NeXT's high-resolution tiling): parity with transformers' LlavaNextForConditionalGeneration
and LlavaNextProcessor, the tile grid and its unpadding, the data pipeline, training and save/load.

Tiny random backbones (32x32 tiles, 8x8 patches -> 16 features per tile, pinpoints [[32, 64], [64, 32],
[64, 64], [96, 32], [32, 96]]), built locally; the token-count sweep runs at the real scale (336 tiles,
14-pixel patches) without a model. No network."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from conftest import copy_weights_into, smooth_image, supervise_text, write_json
from data import VLMDataset, collate
from run import UserError
from model import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    VLMForCausalLM,
    VLMImageProcessor,
    VLMProcessor,
    add_image_token,
    anyres_layout,
    best_pinpoint,
    build_vlm,
    default_pinpoints,
)

TILE, PATCH = 32, 8  # the tiny CLIP tower
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-NeXT's five grids, in 32-pixel tiles






def their_tiles(height, width, pinpoints=PINPOINTS, tile=TILE):
    """Tiles transformers' LLaVA-NeXT cuts an image into (the base tile included)."""
    return image_size_to_num_patches((height, width), pinpoints, tile)


@pytest.fixture(scope="module")
def anyres(tiny_backbones):
    """One AnyRes (model, processor) for the read-only tests of this file (CLIP + Llama, eval mode)."""
    torch.manual_seed(0)
    model, processor = build_vlm(*tiny_backbones, image_aspect="anyres")
    return model.eval(), processor


# ----------------------------------------------------------------------------------------------
# Parity with transformers' LlavaNextForConditionalGeneration

def to_llava_next(model):
    """The same weights in a LlavaNextForConditionalGeneration (fp32, eval)."""
    config = LlavaNextConfig(
        vision_config=model.config.vision_config.to_dict(),
        text_config=model.config.text_config.to_dict(),
        image_token_id=model.config.image_token_id,
        image_grid_pinpoints=model.config.image_grid_pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # drops CLS, as our drop_cls=True
        projector_hidden_act="gelu",
    )
    return copy_weights_into(LlavaNextForConditionalGeneration(config), model)


def llava_next_processor(tokenizer, size, pinpoints, patch_size, mean, std):
    """transformers' LLaVA-NeXT processor for a tower of size x size tiles, CLS dropped ("default")."""
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": size},
                                                 crop_size={"height": size, "width": size},
                                                 image_grid_pinpoints=pinpoints, image_mean=mean, image_std=std)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token=IMAGE_TOKEN)


@pytest.fixture(scope="module")
def llava_next(anyres):
    """(LlavaNextForConditionalGeneration with our weights, LlavaNextProcessor with our settings)."""
    model, processor = anyres
    image_processor = processor.image_processor
    return to_llava_next(model), llava_next_processor(processor.tokenizer, TILE, PINPOINTS, PATCH,
                                                      image_processor.image_mean, image_processor.image_std)


# (width, height): wide, tall, square (2x2 tiles), tiny (enlarged), one pixel, and two large photos
SIZES = {"wide": (100, 30), "tall": (30, 100), "square": (64, 64), "tiny": (5, 3), "dot": (1, 1),
         "hd": (1920, 1080), "scroll": (500, 2000)}


@pytest.mark.parametrize("width, height", SIZES.values(), ids=SIZES.keys())
def test_same_logits_and_loss_as_transformers_llava_next(anyres, llava_next, width, height):
    model, processor = anyres
    theirs_model, _ = llava_next
    batch = processor(text=[f"{IMAGE_TOKEN}\nWhat is in the image?"], images=[smooth_image(width, height)])
    assert batch["image_sizes"].tolist() == [[height, width]]
    assert batch["pixel_values"].shape == (their_tiles(height, width), 3, TILE, TILE)
    labels = supervise_text(batch, model.config.image_token_id)
    # Theirs take (images, tiles, 3, S, S); ours are the tiles of all images, flat.
    theirs_inputs = dict(batch, pixel_values=batch["pixel_values"][None])
    with torch.no_grad():
        ours, theirs = model(**batch), theirs_model(**theirs_inputs)
        ours_loss, theirs_loss = model(**batch, labels=labels).loss, theirs_model(**theirs_inputs, labels=labels).loss
    assert ours.logits.shape == theirs.logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))
    assert (ours.logits - theirs.logits).abs().max() <= 1e-5
    assert torch.isclose(ours_loss, theirs_loss, atol=1e-5), (ours_loss, theirs_loss)


def test_batch_of_differently_tiled_images_gives_llava_next_logits(anyres, llava_next):
    model, processor = anyres
    theirs_model, _ = llava_next
    square, wide, dot = smooth_image(64, 64, 1), smooth_image(100, 30, 2), smooth_image(1, 1, 3)  # 5, 4 and 3 tiles
    texts = [f"{IMAGE_TOKEN}\nWhat is in the image?", f"Compare {IMAGE_TOKEN} with {IMAGE_TOKEN} please."]
    batch = processor(text=texts, images=[[square], [wide, dot]])
    assert batch["image_sizes"].tolist() == [[64, 64], [30, 100], [1, 1]]
    tiles = [their_tiles(h, w) for h, w in batch["image_sizes"].tolist()]
    assert tiles == [5, 4, 3] and len(batch["pixel_values"]) == sum(tiles)
    # Theirs: (images, most tiles, 3, S, S), the missing tiles zero (LlavaNextProcessor's do_pad).
    padded = torch.zeros(len(tiles), max(tiles), 3, TILE, TILE)
    for i, image_tiles in enumerate(batch["pixel_values"].split(tiles)):
        padded[i, :len(image_tiles)] = image_tiles
    labels = supervise_text(batch, model.config.image_token_id)
    with torch.no_grad():
        ours, theirs = model(**batch), theirs_model(**dict(batch, pixel_values=padded))
        ours_loss = model(**batch, labels=labels).loss
        theirs_loss = theirs_model(**dict(batch, pixel_values=padded), labels=labels).loss
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left padded
    assert (ours.logits - theirs.logits).abs().max() <= 1e-5
    assert torch.isclose(ours_loss, theirs_loss, atol=1e-5), (ours_loss, theirs_loss)


# ----------------------------------------------------------------------------------------------
# Parity with transformers' LlavaNextProcessor

# (width, height) -> the most two resamplings of the same picture may differ, in levels of 255:
# torch's and PIL's bicubic filters round differently (one level when shrinking a photo, two when
# enlarging a tiny image); a layout error (wrong pinpoint, offset, tile order) is tens of levels off.
# 200x30 and 30x200 are placed off-centre by an odd pixel count (a one-pixel shift meets black padding).
PIXEL_TOLERANCE = {(640, 480): 1, (1920, 1080): 1, (500, 2000): 1, (900, 700): 1, (200, 30): 1, (30, 200): 1,
                   (5, 3): 2, (1, 1): 2, (12, 20): 2}


@pytest.mark.parametrize("width, height", PIXEL_TOLERANCE, ids=[f"{w}x{h}" for w, h in PIXEL_TOLERANCE])
def test_processor_matches_llava_next_processor(anyres, llava_next, width, height):
    _, processor = anyres
    _, theirs_processor = llava_next
    image, text = smooth_image(width, height, seed=width * height), f"{IMAGE_TOKEN}\nWhat is this?"
    ours = processor(text=[text], images=[image])
    theirs = theirs_processor(text=[text], images=[image], return_tensors="pt")
    image_id = processor.image_token_id
    assert (ours["input_ids"] == image_id).sum() == (theirs["input_ids"] == image_id).sum()
    assert torch.equal(ours["input_ids"], theirs["input_ids"])  # the same prompt, every id in place
    assert ours["image_sizes"].tolist() == theirs["image_sizes"].tolist() == [[height, width]]
    assert ours["pixel_values"].shape == theirs["pixel_values"][0].shape  # (tiles, 3, S, S)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    levels = (ours["pixel_values"] - theirs["pixel_values"][0]) * std * 255  # back to 0-255 steps
    assert levels.abs().max() <= PIXEL_TOLERANCE[width, height] + 1e-3


def sweep_sizes(n=300, seed=0):
    """(height, width) pairs: photo and screen sizes, extreme and one-pixel sides, exact pinpoints,
    and random sizes from 1 to 5000 pixels, log-uniform (every aspect ratio is likely)."""
    fixed = [(480, 640), (1080, 1920), (2000, 500), (1, 1), (1, 5000), (5000, 1), (336, 336), (336, 672),
             (672, 336), (672, 672), (1008, 336), (336, 1008), (337, 673), (335, 671), (768, 1024), (3, 5),
             (55, 176), (88, 55), (47, 1128)]  # 14.999999999999998 feature rows (columns) shown: 15, not 14
    rng = np.random.default_rng(seed)
    random = np.exp(rng.uniform(0, np.log(5000), (n, 2))).astype(int).clip(1, 5000)
    return fixed + [tuple(map(int, size)) for size in random]


# LLaVA-NeXT's pinpoints, and a list with a single-tile pinpoint and grids of 4 tiles in a row
REAL_PINPOINTS = {"llava-next": default_pinpoints(336),
                  "other": [[336, 336], [336, 1344], [1344, 336], [672, 1008], [1008, 672]]}


@pytest.mark.parametrize("pinpoints", REAL_PINPOINTS.values(), ids=REAL_PINPOINTS.keys())
def test_pinpoints_and_token_counts_match_transformers_at_336(tiny_backbones, pinpoints):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbones[1])
    add_image_token(tokenizer)
    ours = VLMProcessor(VLMImageProcessor(size=336, aspect="anyres", image_grid_pinpoints=pinpoints), tokenizer,
                        num_image_tokens=576, patch_size=14)
    theirs = llava_next_processor(tokenizer, 336, pinpoints, 14, ours.image_processor.image_mean,
                                  ours.image_processor.image_std)
    sizes = sweep_sizes()
    # LlavaNextProcessor counts the base tile's features + 1 (num_additional_image_tokens: the CLS),
    # then takes the 1 away again for vision_feature_select_strategy="default", which drops the CLS.
    expected = theirs._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    assert [ours.image_token_count(h, w) for h, w in sizes] == expected
    for height, width in sizes:
        assert best_pinpoint(height, width, pinpoints) == select_best_resolution((height, width), pinpoints)
        (rows, cols), _ = anyres_layout(height, width, pinpoints, 336, 14)
        assert (rows, cols) == get_anyres_image_grid_shape((height, width), pinpoints, 336)
        assert 1 + rows * cols == image_size_to_num_patches((height, width), pinpoints, 336)

    # The count transformers' processor writes into input_ids, for real images at this scale.
    for width, height in [(640, 480), (1920, 1080), (500, 2000)]:
        image = Image.new("RGB", (width, height), (90, 120, 200))
        our_batch = ours(text=[f"{IMAGE_TOKEN} hi"], images=[image])
        their_batch = theirs(text=[f"{IMAGE_TOKEN} hi"], images=[image], return_tensors="pt")
        n_ours, n_theirs = ((b["input_ids"] == ours.image_token_id).sum().item() for b in (our_batch, their_batch))
        assert n_ours == n_theirs == ours.image_token_count(height, width)
        assert our_batch["pixel_values"].shape == their_batch["pixel_values"][0].shape


def test_unpadding_window_is_llava_next_unpad_image():
    """The part of the feature grid that shows the image, as transformers' modeling cuts it."""
    pinpoints, g = default_pinpoints(336), 336 // 14
    for height, width in sweep_sizes(n=200, seed=1):
        (rows, cols), (top, bottom, left, right) = anyres_layout(height, width, pinpoints, 336, 14)
        grid = torch.arange(rows * g * cols * g).view(1, rows * g, cols * g)  # every feature position numbered
        expected = unpad_image(grid, (height, width))[0]
        assert torch.equal(grid[0, top:bottom, left:right], expected), (height, width)


# ----------------------------------------------------------------------------------------------
# The tile grid: base tile, rows across tiles, unpadding, image_newline


def expected_tokens(features, rows, cols, kept_rows, kept_cols, newline):
    """From the definition: the base tile's features, then for each kept feature row of the
    (rows * 4) x (cols * 4) grid (4 = 32 / 8 features per tile side) its kept features, each taken
    from the tile that holds it (tiles numbered row by row after the base), then the newline."""
    g = TILE // PATCH
    tokens = list(features[0])
    for y in kept_rows:
        for x in kept_cols:
            tile = 1 + (y // g) * cols + (x // g)
            tokens.append(features[tile, (y % g) * g + (x % g)])
        tokens.append(newline)
    return torch.stack(tokens)


def test_features_are_laid_out_base_first_then_unpadded_rows_with_newlines(anyres, monkeypatch):
    model, processor = anyres
    # wide 200x30 -> pinpoint 32x96 (1x3 tiles), shown 96x15 pixels at rows 8-22: feature rows 1-2 of 4;
    # tall 30x200 -> 96x32 (3x1 tiles): feature columns 1-2 of 4; square 64x64 -> 2x2 tiles, nothing cut.
    images = {"wide": (smooth_image(200, 30), 1, 3, range(1, 3), range(12)),
              "tall": (smooth_image(30, 200), 3, 1, range(12), range(1, 3)),
              "square": (smooth_image(64, 64), 2, 2, range(8), range(8))}
    pixel_values = processor.image_processor([image for image, *_ in images.values()])
    tiles = 1 + 3 + 1 + 3 + 1 + 4
    assert pixel_values["pixel_values"].shape[0] == tiles
    known = torch.randn(tiles, 16, model.config.text_config.hidden_size)  # every value distinct
    monkeypatch.setattr(model, "encode_tiles", lambda pixel_values: known[:len(pixel_values)])
    with torch.no_grad():
        laid_out = model.get_image_features(**pixel_values)
    expected, begin = [], 0
    for _, rows, cols, kept_rows, kept_cols in images.values():
        features = known[begin:begin + 1 + rows * cols]
        expected.append(expected_tokens(features, rows, cols, kept_rows, kept_cols, model.image_newline))
        begin += 1 + rows * cols
    assert [len(e) for e in expected] == [16 + 2 * 13, 16 + 12 * 3, 16 + 8 * 9]
    assert [processor.image_token_count(image.height, image.width) for image, *_ in images.values()] == [42, 52, 88]
    assert torch.equal(laid_out, torch.cat(expected))


def test_tiles_and_image_sizes_must_agree(anyres):
    model, processor = anyres
    inputs = processor.image_processor([smooth_image(64, 64), smooth_image(100, 30)])  # 5 + 4 tiles
    with pytest.raises(ValueError, match="pass image_sizes"):
        model.get_image_features(inputs["pixel_values"])
    extra = torch.cat([inputs["pixel_values"], inputs["pixel_values"][:1]])
    with pytest.raises(ValueError, match="10 tiles in pixel_values but the image_sizes call for 9"):
        model.get_image_features(extra, inputs["image_sizes"])
    with pytest.raises(ValueError, match="8 tiles in pixel_values but the image_sizes call for 9"):
        model.get_image_features(inputs["pixel_values"][:8], inputs["image_sizes"])


# ----------------------------------------------------------------------------------------------
# The data pipeline

CONVERSATION = [{"from": "human", "value": "What is in the image?\n<image>"},
                {"from": "gpt", "value": "a smooth picture"}]
TWO_IMAGES = [{"from": "human", "value": "<image> and <image>: which is taller?"},
              {"from": "gpt", "value": "the first"}]
TEXT_ONLY = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello to you"}]




def their_count(processor, height, width):
    """LlavaNextProcessor's image-token count for a height x width image on the tiny tower."""
    image_processor = processor.image_processor
    theirs = llava_next_processor(processor.tokenizer, TILE, PINPOINTS, PATCH, image_processor.image_mean,
                                  image_processor.image_std)
    return theirs._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens[0]


@pytest.fixture
def anyres_data(tmp_path):
    """Images of several sizes and records: text only, one image, two images of different sizes, one pixel."""
    sizes = {"wide.png": (200, 30), "tall.png": (30, 100), "square.png": (64, 64), "dot.png": (1, 1)}
    for seed, (name, (width, height)) in enumerate(sizes.items()):
        smooth_image(width, height, seed).save(tmp_path / name)
    records = [{"id": "text", "conversations": TEXT_ONLY},
               {"id": "wide", "image": "wide.png", "conversations": CONVERSATION},
               {"id": "pair", "image": ["tall.png", "square.png"], "conversations": TWO_IMAGES},
               {"id": "dot", "image": "dot.png", "conversations": CONVERSATION}]
    return write_json(tmp_path / "data.json", records), str(tmp_path), sizes


def test_anyres_samples_have_each_images_tokens_and_tiles(anyres, anyres_data):
    _, processor = anyres
    path, folder, sizes = anyres_data
    dataset = VLMDataset(path, folder, processor, "vicuna_v1")
    images = {"text": [], "wide": ["wide.png"], "pair": ["tall.png", "square.png"], "dot": ["dot.png"]}
    for i, (record_id, names) in enumerate(images.items()):
        sample = dataset[i]
        hw = [(sizes[n][1], sizes[n][0]) for n in names]  # (height, width)
        counts = [their_count(processor, h, w) for h, w in hw]
        assert sample["input_ids"].tolist().count(processor.image_token_id) == sum(counts), record_id
        assert sample["pixel_values"].shape == (sum(their_tiles(h, w) for h, w in hw), 3, TILE, TILE)
        assert sample["image_sizes"].tolist() == [list(size) for size in hw] and sample["image_sizes"].shape[1] == 2
        # the sampler's length (words + image tokens), from the files' headers: the image part is exact
        words = sum(len(turn["value"].split()) for turn in dataset.records[i]["conversations"])
        assert dataset.lengths[i] == words + sum(counts), record_id
    assert dataset.has_image == [False, True, True, True]
    assert their_count(processor, 1, 1) == 36  # 16 + 4 rows of 4 features and a newline: a 1x1 image is fine


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_anyres_batch_gives_the_per_sample_losses(anyres, anyres_data, packed):
    model, processor = anyres
    path, folder, _ = anyres_data
    dataset = VLMDataset(path, folder, processor, "vicuna_v1")
    samples = [dataset[i] for i in range(len(dataset))]
    pack_length = sum(len(s["input_ids"]) for s in samples) if packed else 0  # room for all in one row
    batch = collate(samples, processor.tokenizer.pad_token_id, pack_length=pack_length)
    assert batch["input_ids"].shape[0] == (1 if packed else 4)
    # tiles and sizes in the order the samples' <image> tokens appear in the rows (row-major)
    in_order = [samples[["text", "wide", "pair", "dot"].index(i)] for i in batch["ids"]]
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in in_order]))
    assert torch.equal(batch["image_sizes"], torch.cat([s["image_sizes"] for s in in_order]))
    inputs = ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "image_sizes")
    with torch.no_grad():
        loss = model(**{k: batch[k] for k in inputs}).loss
        # each sample alone; the batch loss is their mean per supervised token
        alone = [collate([s], processor.tokenizer.pad_token_id) for s in samples]
        losses = torch.stack([model(**{k: b[k] for k in inputs}).loss for b in alone])
    targets = torch.tensor([(b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in alone])
    assert torch.isclose(loss, (losses * targets).sum() / targets.sum(), atol=1e-5)


def test_record_too_long_once_tiled_is_a_bad_record(tiny_backbones, anyres, tmp_path):
    _, processor = anyres
    smooth_image(1, 1).save(tmp_path / "dot.png")  # 36 image tokens
    smooth_image(64, 64).save(tmp_path / "square.png")  # 88 image tokens (16 with aspect pad)
    records = [{"id": "small", "image": "dot.png", "conversations": CONVERSATION},
               {"id": "big", "image": "square.png", "conversations": CONVERSATION}]
    path = write_json(tmp_path / "data.json", records)
    strict = VLMDataset(path, str(tmp_path), processor, "plain", max_seq_len=64)
    assert len(strict[0]["input_ids"]) <= 64
    # data.SampleTooLong's reason, in the bad-record message that names the record
    with pytest.raises(UserError, match=r"id='big'.*image tokens end at position 89 > max_seq_len=64"):
        strict[1]
    lenient = VLMDataset(path, str(tmp_path), processor, "plain", max_seq_len=64, skip_bad_samples=True)
    batch = collate([lenient[0], lenient[1]], processor.tokenizer.pad_token_id)
    assert batch["ids"] == ["small"] and [i for i, _ in batch["skipped"]] == ["big"]
    assert "max_seq_len=64" in batch["skipped"][0][1] and len(batch["image_sizes"]) == 1
    # one tile per image (aspect pad): the same record fits, so the tiling is what made it too long
    _, pad_processor = build_vlm(*tiny_backbones)
    assert "skipped" not in VLMDataset(path, str(tmp_path), pad_processor, "plain", max_seq_len=64)[1]


def test_broken_image_is_reported_as_with_pad_and_its_header_gives_its_length(tiny_backbones, anyres, tmp_path):
    _, processor = anyres
    smooth_image(200, 30).save(tmp_path / "photo.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "photo.png").read_bytes()[:200])  # header whole, pixels cut
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    records = [{"id": "cut", "image": "cut.png", "conversations": CONVERSATION},
               {"id": "junk", "image": "junk.png", "conversations": CONVERSATION}]
    path = write_json(tmp_path / "data.json", records)
    _, pad_processor = build_vlm(*tiny_backbones)
    for i, name in enumerate(("cut.png", "junk.png")):
        messages = []
        for p in (processor, pad_processor):
            with pytest.raises(UserError, match=rf"{name} cannot be read") as error:
                VLMDataset(path, str(tmp_path), p, "vicuna_v1")[i]
            messages.append(str(error.value))
        assert messages[0] == messages[1]  # the same message whatever the aspect
        skipped = VLMDataset(path, str(tmp_path), processor, "vicuna_v1", skip_bad_samples=True)[i]
        assert f"{name} cannot be read" in skipped["skipped"]
    # lengths come from the header alone: the cut file's size counts; the unreadable one counts one tile
    words = sum(len(turn["value"].split()) for turn in CONVERSATION)
    lengths = VLMDataset(path, str(tmp_path), processor, "vicuna_v1").lengths
    assert lengths == [words + their_count(processor, 30, 200), words + 16]


# ----------------------------------------------------------------------------------------------
# Training: image_newline learns with the connector


def test_image_newline_gets_a_gradient_with_images_and_a_zero_one_without(tiny_backbones):
    from train import component_of

    model, processor = build_vlm(*tiny_backbones, image_aspect="anyres")
    model.train()

    def newline_grad(batch):
        model.zero_grad(set_to_none=True)
        loss = model(**batch, labels=supervise_text(batch, model.config.image_token_id)).loss
        assert torch.isfinite(loss)
        loss.backward()
        return model.image_newline.grad

    images = processor(text=[f"{IMAGE_TOKEN}\nWhat is in the image?", "Describe the photo."], images=[smooth_image(100, 30)])
    grad = newline_grad(images)
    assert grad is not None and grad.abs().sum() > 0
    # Text only: the blank-image pass (ZeRO lockstep) reaches image_newline too, with a zero gradient.
    text = processor(text=["Describe the photo.", "The quick brown fox"])
    grad = newline_grad(text)
    assert grad is not None and torch.all(grad == 0)
    assert component_of("image_newline") == "connector"  # new, like the connector: it trains in stage 1


# ----------------------------------------------------------------------------------------------
# Build options and save / load


def test_anyres_needs_drop_cls_and_whole_tile_pinpoints(tiny_backbones):
    with pytest.raises(ValueError, match="drop_cls"):
        build_vlm(*tiny_backbones, image_aspect="anyres", drop_cls=False)
    with pytest.raises(ValueError, match=r"entry \[32, 48\] is not a whole number of the vision tower's 32x32 tiles"):
        build_vlm(*tiny_backbones, image_aspect="anyres", image_grid_pinpoints=[[32, 64], [32, 48]])
    with pytest.raises(ValueError, match=r"entry \[30, 60\]"):
        VLMImageProcessor(size=32, aspect="anyres", image_grid_pinpoints=[[30, 60]])
    model, _ = build_vlm(*tiny_backbones)  # aspect pad: no pinpoints, no image_newline
    assert model.config.image_grid_pinpoints is None and not hasattr(model, "image_newline")


def test_anyres_model_and_processor_round_trip(tiny_backbones, tmp_path, monkeypatch):
    pinpoints = [[32, 64], [64, 32], [64, 64], [32, 128]]  # not the default list: it must be saved
    model, processor = build_vlm(*tiny_backbones, image_aspect="anyres", image_grid_pinpoints=pinpoints)
    model.eval().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = VLMForCausalLM.from_pretrained(tmp_path).eval()
    loaded_processor = VLMProcessor.from_pretrained(tmp_path)
    assert loaded.config.image_grid_pinpoints == loaded_processor.image_processor.image_grid_pinpoints == pinpoints
    assert loaded_processor.image_processor.aspect == "anyres" and loaded_processor.patch_size == PATCH
    assert torch.equal(loaded.image_newline, model.image_newline)

    texts, images = [f"{IMAGE_TOKEN}\nWhat is in the image?", "Describe the photo."], [smooth_image(120, 30)]  # 1x4 tiles
    batch, loaded_batch = processor(text=texts, images=images), loaded_processor(text=texts, images=images)
    assert batch.keys() == loaded_batch.keys() >= {"pixel_values", "image_sizes"}
    assert all(torch.equal(batch[k], loaded_batch[k]) for k in batch)
    assert len(batch["pixel_values"]) == 1 + 4
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_real_scale_table_in_the_docs_is_measured():
    """docs/anyres.md's real-scale table (a 336 tower, 14-pixel patches, LLaVA-NeXT's pinpoints; ours next
    to LlavaNextProcessor) holds what tests/anyres_real_scale.py measures, row for row."""
    import os
    import re

    from anyres_real_scale import count_mismatches, table_rows

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "anyres.md")) as f:
        doc = f.read()
    table = doc[doc.index("| image (W x H) | tiles | image tokens, ours |"):]
    table = table[:table.index("\n\n")]
    written = [tuple(map(int, row)) for row in re.findall(r"^\| (\d+) x (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$",
                                                           table, flags=re.M)]
    assert len(written) == 7 and written == table_rows()
    assert "and 0 token-count mismatches over 2,000 random sizes" in doc and count_mismatches(2000) == 0
