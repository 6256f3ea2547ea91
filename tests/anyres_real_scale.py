"""AnyRes at real scale (a 336-pixel CLIP tower, 14-pixel patches, LLaVA-NeXT's pinpoints): our
processor next to transformers' LlavaNextProcessor (its PIL image processor), on smooth synthetic
images of real sizes. No model is needed: tiles and token counts depend on the image size alone.
It prints the table of docs/anyres.md;
tests/test_anyres.py::test_real_scale_table_in_the_docs_is_measured runs the same measurement and
checks docs/anyres.md against it:

    python tests/anyres_real_scale.py
"""
import conftest  # noqa: F401  (puts the repository and data/demo on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor  # noqa: E402

from conftest import smooth_image  # noqa: E402
from prepare import make_tiny_tokenizer  # noqa: E402
from model import (CLIP_STD, IMAGE_TOKEN, VLMImageProcessor, VLMProcessor, add_image_token,  # noqa: E402
                   default_pinpoints)

TILE, PATCH = 336, 14
SIZES = [(640, 480), (1920, 1080), (500, 2000), (1024, 1024), (336, 336), (100, 60), (4000, 3000)]  # (W, H)


def processors():
    """(ours, LlavaNextProcessor, image token id) at real scale, around a tiny tokenizer (the token
    count does not depend on the tokenizer)."""
    tokenizer = make_tiny_tokenizer()
    image_token_id = add_image_token(tokenizer)
    pinpoints = default_pinpoints(TILE)
    ours = VLMProcessor(VLMImageProcessor(TILE, aspect="anyres"), tokenizer, num_image_tokens=(TILE // PATCH) ** 2,
                        patch_size=PATCH)
    theirs = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                                   image_grid_pinpoints=pinpoints),
        tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN)
    return ours, theirs, image_token_id


def table_rows():
    """[(width, height, tiles, our image tokens, theirs, largest pixel difference in levels of 255)] for SIZES."""
    ours, theirs, image_token_id = processors()
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    rows = []
    for width, height in SIZES:
        image = smooth_image(width, height)
        a = ours(text=IMAGE_TOKEN, images=image)
        b = theirs(text=IMAGE_TOKEN, images=image, return_tensors="pt")
        count_a, count_b = [int((x["input_ids"] == image_token_id).sum()) for x in (a, b)]
        levels = ((a["pixel_values"] - b["pixel_values"][0]) * std * 255).abs().max().item()
        rows.append((width, height, len(a["pixel_values"]), count_a, count_b, round(levels)))
    return rows


def count_mismatches(n=2000):
    """Random sizes of 1 to 4,999 pixels a side whose image-token count differs from LlavaNextProcessor's."""
    ours, theirs, _ = processors()
    sizes = np.random.default_rng(0).integers(1, 5000, (n, 2)).tolist()
    # their count includes one CLS feature, which the "default" strategy then drops
    return sum(ours.image_token_count(h, w) != theirs._get_number_of_features(h, w, TILE, TILE) - 1 for w, h in sizes)


def main():
    print("| image (W x H) | tiles | image tokens, ours | LlavaNextProcessor | largest pixel difference (levels in 255) |")
    print("|---|---|---|---|---|")
    for width, height, tiles, count_a, count_b, levels in table_rows():
        print(f"| {width} x {height} | {tiles} | {count_a} | {count_b} | {levels} |")
    print(f"\ntoken-count mismatches over 2000 random sizes of 1 to 4,999 pixels a side: {count_mismatches()}")


if __name__ == "__main__":
    main()
