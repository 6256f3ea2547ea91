"""Peak CPU memory of one forward + backward of the model train.py builds (stage 1: the connector
trains, the LLM is frozen but gradients flow through it), with gradient checkpointing on, off, or
"inert" (on, but the LLM left in eval mode, as train.py did before prepare_for_training). Not a test
(a measurement, in a fresh process each):

    for mode in on off inert; do python tests/checkpointing_memory.py $mode; done
"""
import os
import resource
import sys
import tempfile

import conftest  # noqa: F401  (puts the repository and data/demo on sys.path)

import torch  # noqa: E402

import run  # noqa: E402
import train  # noqa: E402
from prepare import make_tiny_backbones  # noqa: E402


def backbones():
    """The folder of an 8-layer LLM of width 1024 and a 64 px tower (made once, in the temp folder)."""
    folder = os.path.join(tempfile.gettempdir(), "small-vlm-checkpointing-memory")
    if not os.path.exists(os.path.join(folder, "tiny-llama")):
        make_tiny_backbones(folder, image_size=64, patch_size=8, vision_width=256, llm_width=1024, layers=8)
    return folder


def random_batch(model, processor, batch, length):
    """(ids, labels, pixels): BATCH rows of LENGTH random tokens, one image each, its text supervised."""
    torch.manual_seed(0)
    image_tokens = model.config.num_image_tokens
    ids = torch.randint(10, 400, (batch, length))
    ids[:, 1:1 + image_tokens] = processor.image_token_id
    labels = ids.clone()
    labels[:, :1 + image_tokens] = -100
    return ids, labels, torch.randn(batch, 3, 64, 64)


def main(mode):
    folder = backbones()
    cfg = run.Config(vision_model=os.path.join(folder, "tiny-clip"), llm=os.path.join(folder, "tiny-llama"),
                       template="plain", precision="fp32", gradient_checkpointing=mode in ("on", "inert"))
    model, processor = train.build_training_model(cfg, torch.device("cpu"))
    if mode == "inert":
        model.language_model.eval()
    batch, length = 8, 1024
    ids, labels, pixels = random_batch(model, processor, batch, length)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model(input_ids=ids, labels=labels, pixel_values=pixels).loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(f"checkpointing {mode}: peak RSS {after / 2**20:.2f} GiB (+{(after - before) / 2**20:.2f} GiB in "
          f"forward + backward, {batch} x {length} tokens)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "on")
