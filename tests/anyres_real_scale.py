"""AnyRes at real scale (a 336-pixel CLIP tower, 14-pixel patches, LLaVA-NeXT's pinpoints): our
processor next to transformers' LlavaNextProcessor (its PIL image processor), on smooth synthetic
images of real sizes. No model is needed: tiles and token counts depend on the image size alone.
Not a test (a measurement; the README's table):

    python tests/anyres_real_scale.py
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor  # noqa: E402

from conftest import smooth_image  # noqa: E402
from data import make_tiny_tokenizer  # noqa: E402
from model import (CLIP_STD, IMAGE_TOKEN, VLMImageProcessor, VLMProcessor, add_image_token,  # noqa: E402
                   default_pinpoints)

TILE, PATCH = 336, 14
SIZES = [(640, 480), (1920, 1080), (500, 2000), (1024, 1024), (336, 336), (100, 60), (4000, 3000)]  # (W, H)




def main():
    tokenizer = make_tiny_tokenizer()  # the token count does not depend on the tokenizer
    image_token_id = add_image_token(tokenizer)
    pinpoints = default_pinpoints(TILE)
    ours = VLMProcessor(VLMImageProcessor(TILE, aspect="anyres"), tokenizer, num_image_tokens=(TILE // PATCH) ** 2,
                        patch_size=PATCH)
    theirs = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                                   image_grid_pinpoints=pinpoints),
        tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    print("| image (W x H) | tiles | image tokens, ours | LlavaNextProcessor | largest pixel difference (levels in 255) |")
    print("|---|---|---|---|---|")
    for width, height in SIZES:
        image = smooth_image(width, height)
        a = ours(text=IMAGE_TOKEN, images=image)
        b = theirs(text=IMAGE_TOKEN, images=image, return_tensors="pt")
        count_a, count_b = [int((x["input_ids"] == image_token_id).sum()) for x in (a, b)]
        levels = ((a["pixel_values"] - b["pixel_values"][0]) * std * 255).abs().max().item()
        print(f"| {width} x {height} | {len(a['pixel_values'])} | {count_a} | {count_b} | {levels:.0f} |")
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 5000, (2000, 2)).tolist()
    # their count includes one CLS feature, which the "default" strategy then drops
    mismatches = sum(ours.image_token_count(h, w) != theirs._get_number_of_features(h, w, TILE, TILE) - 1
                     for w, h in sizes)
    print(f"\ntoken-count mismatches over {len(sizes)} random sizes of 1 to 4,999 pixels a side: {mismatches}")


if __name__ == "__main__":
    main()
