"""Trainable parameters and peak memory of one training step (forward, backward, AdamW step) of
the model train.py builds, stage 2 at tests/checkpointing_memory.py's shape (an 8-layer LLM of
width 1024): the LLM trained in full, through LoRA adapters (r=64), or (CUDA only) through
adapters on its 4-bit QLoRA weights. Not a test (a measurement, in a fresh process each):

    for mode in full lora; do python tests/lora_memory.py $mode; done      # CPU, fp32: peak RSS
    for mode in full lora qlora; do python tests/lora_memory.py $mode; done   # CUDA, bf16: peak allocated
"""
import json
import os
import resource
import sys

import conftest  # noqa: F401  (puts the repository and data/demo on sys.path)

import torch  # noqa: E402

import run  # noqa: E402
import train  # noqa: E402
from checkpointing_memory import backbones, random_batch  # noqa: E402


def main(mode):
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    folder = backbones()
    lora = {"lora_r": 64, "lora_alpha": 128.0, "qlora": mode == "qlora"} if mode != "full" else {}
    cfg = run.Config(vision_model=os.path.join(folder, "tiny-clip"), llm=os.path.join(folder, "tiny-llama"),
                       template="plain", precision="bf16" if cuda else "fp32", gradient_checkpointing=True,
                       train_lm=True, **lora)
    run.check_lora(cfg)
    if cuda:
        torch.cuda.set_device(0)
    model, processor = train.build_training_model(cfg, device)
    model.to(device)  # QLoRA's 4-bit LLM is on the GPU already (bitsandbytes loads it there); the rest moves
    groups = train.build_param_groups(model, cfg)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(groups)  # plain AdamW, its state in the model's dtype (no DeepSpeed here)
    # a small batch: weights, gradients and AdamW state, which LoRA shrinks, outweigh the activations
    batch, length = 2, 256
    ids, labels, pixels = random_batch(model, processor, batch, length)
    pixels = pixels.to(model.connector[0].weight.dtype)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second step runs with AdamW's state in place
        loss = model(input_ids=ids.to(device), labels=labels.to(device), pixel_values=pixels.to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"mode": mode, "device": device.type, "trainable_params": trainable, "params": total,
                      "peak_gib": round(peak, 2), "measure": "max_memory_allocated" if cuda else "peak RSS",
                      "batch": f"{batch} x {length} tokens"}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lora")
