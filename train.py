"""Train a small-vlm with an explicit DeepSpeed loop.

    deepspeed train.py configs/demo.py                       # the demo, on CPU
    deepspeed --num_gpus 8 train.py configs/llava_pretrain.py lr_connector=2e-3
    python train.py configs/llava_finetune.py --dry-run      # print the resolved config

Read top to bottom: settings, the model and what trains, param groups, optimizer and DeepSpeed,
the schedule, `main` and its loop, saving. Below the banner "What keeps a run safe": the guards
the loop calls, by concern (config checks, out_dir, processes and data, ranks agreeing, resume, logs).
"""
import argparse
import contextlib
import dataclasses
import difflib
import errno
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from jinja2 import TemplateError
from safetensors import safe_open

from data import (ROLES, TEMPLATES, LengthGroupedSampler, UserError, VLMDataset, bad_record, chat_template_for,
                  collate, demo_corpus, first_line, make_demo_data, make_tiny_backbones, processor_from_config,
                  reading, run_command, tokenize_conversation, write_json, writing)
from model import IGNORE_INDEX, add_lora, build_connector, build_vlm, inference_folder, lora_target_names, merge_lora


# ----------------------------------------------------------------------------------------------
# Settings: every key a config file or `key=value` can set. The README's table mirrors this.


@dataclass
class Config:
    # model
    vision_model: str = "openai/clip-vit-large-patch14-336"  # CLIP/SigLIP, Hub name or folder
    vision_layer: int = -2  # hidden-states index the connector reads (-2: second to last)
    drop_cls: bool = True  # drop the CLS token (ignored for SigLIP, which has none)
    connector: str = "mlp2x_gelu"  # identity | linear | mlp{N}x_{gelu,relu,silu}
    llm: str = "lmsys/vicuna-7b-v1.5"  # any AutoModelForCausalLM, Hub name or folder
    init_from: str = ""  # a stage-1 run or final folder: its connector weights start this run
    # data
    template: str = "plain"  # plain (stage 1) | vicuna_v1 (stage 2, Vicuna) | chat (tokenizer's own)
    data_path: str = ""  # LLaVA JSON/JSONL file(s), comma-separated, or a Hub dataset id whose `image` column holds relative paths
    image_folder: str = ""  # image paths in the data are relative to this folder
    image_aspect: str = "pad"  # pad (square canvas in the mean colour) | resize (resize + centre crop) | anyres (LLaVA-NeXT tiles)
    image_grid_pinpoints: str = ""  # anyres: "HxW,HxW,..." sizes an image is tiled to; "" = LLaVA-NeXT's 1x2,2x1,2x2,3x1,1x3 tiles
    max_seq_len: int = 2048  # tokens per sample, image tokens included
    skip_bad_samples: bool = False  # skip and count bad records instead of stopping
    group_by_length: bool = True  # LLaVA's modality-aware length grouping (less padding)
    pack_samples: bool = False  # pack each micro-batch into rows of up to max_seq_len tokens (attention stays per sample)
    num_workers: int = 4  # DataLoader worker processes per rank
    image_paths_outside: bool = False  # allow image paths that are absolute or climb out of image_folder (trusted data)
    make_demo: bool = False  # create the demo data and tiny backbones at these paths if missing
    # what trains, and how fast
    train_vision: bool = False  # update the vision tower (LLaVA-1.5: never)
    train_connector: bool = True  # update the connector (both LLaVA stages)
    train_lm: bool = False  # update the LLM (LLaVA stage 2)
    lr_vision: float = 2e-6  # peak learning rate of the vision tower
    lr_connector: float = 1e-3  # peak learning rate of the connector
    lr_lm: float = 2e-5  # peak learning rate of the LLM
    wd_vision: float = 0.0  # AdamW weight decay of the vision tower (never on biases and norms)
    wd_connector: float = 0.0  # weight decay of the connector
    wd_lm: float = 0.0  # weight decay of the LLM
    # LoRA: the LLM trains through low-rank adapters (its lr_lm / wd_lm), its own weights frozen
    lora_r: int = 0  # adapter rank; 0 = off (LLaVA-1.5's LoRA recipe: 128)
    lora_alpha: float = 256.0  # the adapters' update is scaled by lora_alpha / lora_r (LLaVA: 256)
    lora_dropout: float = 0.05  # dropout on the adapters' input (LLaVA: 0.05)
    lora_targets: str = "all-linear"  # layers that get adapters: all-linear (all but the LM head) or names, e.g. q_proj,v_proj
    lora_vision: bool = False  # adapters on the vision tower too (with train_vision=True; it trains in full without them)
    qlora: bool = False  # the frozen LLM in 4-bit NF4 (bitsandbytes), adapters in bf16; CUDA GPUs only
    # schedule
    batch_size: int = 256  # global batch: micro_batch_size x GPUs x accumulation steps
    micro_batch_size: int = 32  # samples per GPU per forward pass
    epochs: int = 1  # passes over the data (when max_steps is 0)
    max_steps: int = 0  # optimizer steps; 0 = run `epochs` epochs
    warmup_ratio: float = 0.03  # fraction of steps with linear warmup
    min_lr_ratio: float = 0.0  # cosine decays to this fraction of each group's peak lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # system
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    offload: bool = False  # ZeRO optimizer state (and stage-3 parameters) in CPU memory
    precision: str = "bf16"  # bf16 | fp16 | fp32 (fp32 on CPU)
    gradient_checkpointing: bool = True  # recompute activations in backward: less memory, ~30% slower
    compile: bool = False  # torch.compile each transformer block of the LLM and the vision tower (ZeRO 0-2)
    attn_implementation: str = "sdpa"  # sdpa | flex_attention | flash_attention_2 | eager (GPU; CPU runs use sdpa)
    seed: int = 0  # model init, data order, dropout
    # output
    out_dir: str = "out/run"  # checkpoints/, metrics.jsonl, train_config.json, final/
    log_every: int = 10  # steps between metrics.jsonl lines
    save_every: int = 500  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: bool = False  # continue from the newest checkpoint in out_dir
    overwrite: bool = False  # start again in an out_dir that holds another run
    wandb: bool = False  # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "small-vlm"  # the Weights & Biases project name
    log_sample_ids: bool = False  # write out_dir/sample_ids_rank{R}.jsonl: the record ids each step trained on


# ----------------------------------------------------------------------------------------------
# 1. The model: a pretrained encoder and LLM, a fresh connector, and what of it trains


def build_training_model(cfg, device):
    """The model main() trains: build_vlm (pretrained encoder + LLM + a fresh connector), stage 1's
    connector when init_from is set, the training prompt format as the processor's chat template,
    LoRA adapters (lora_r > 0) and prepare_for_training. Returns (model, processor)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]
    try:
        model, processor = build_vlm(cfg.vision_model, cfg.llm, cfg.connector, cfg.vision_layer, cfg.drop_cls,
                                     cfg.image_aspect, dtype=dtype, attn_implementation=attention_for(cfg, device),
                                     image_grid_pinpoints=parse_pinpoints(cfg.image_grid_pinpoints),
                                     llm_quantization=four_bit_loading(cfg))
    except (OSError, ValueError) as e:  # a wrong path or name, or an unsupported vision tower
        raise UserError(f"cannot build the model from vision_model={cfg.vision_model!r}, llm={cfg.llm!r}: "
                        f"{str(e).splitlines()[0]}") from None
    check_model_fits(cfg, model, processor)
    rank = int(os.environ.get("RANK", 0))
    if cfg.init_from:
        log_rank0(rank, load_connector_weights(model, cfg.init_from))
    processor.chat_template = chat_template_for(cfg.template, processor.tokenizer)
    add_adapters(model, cfg)
    prepare_for_training(model, cfg)
    if cfg.compile:
        log_rank0(rank, f"compiling {len(repeated_blocks(model))} blocks (the first steps are slow)")
    return model, processor


def component_of(name):
    # image_newline (anyres) is new like the connector and sits between tower and LLM: it trains with it
    parts = {"vision_tower": "vision", "connector": "connector", "image_newline": "connector", "language_model": "lm"}
    return parts[name.split(".")[0]]


def is_adapter(name):
    return ".lora_A." in name or ".lora_B." in name


def add_adapters(model, cfg):
    """LoRA (lora_r > 0): a LoRALinear adapter on each of the LLM's linear layers that lora_targets
    names (LLaVA: all but the LM head), and on the vision tower's with lora_vision."""
    if not cfg.lora_r:
        return
    parts = {"llm": model.language_model, "vision_model": model.vision_tower}
    for key in ["llm", "vision_model"] if cfg.lora_vision else ["llm"]:
        names = lora_targets_in(parts[key], cfg, key)
        add_lora(parts[key], names, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)


def four_bit_loading(cfg):
    """QLoRA: transformers' bitsandbytes settings that load the LLM's linear layers as 4-bit NF4
    (with QLoRA's double quantization), computing in bf16; None without qlora. The LM head and the
    embeddings stay bf16; the adapters on the 4-bit layers train in bf16."""
    if not cfg.qlora:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def freeze_components(model, cfg):
    """train_* decides per component; in a component with LoRA adapters only the adapters train."""
    with_adapters = {component_of(name) for name, _ in model.named_parameters() if is_adapter(name)}
    for name, p in model.named_parameters():
        part = component_of(name)
        p.requires_grad_(getattr(cfg, f"train_{part}") and (part not in with_adapters or is_adapter(name)))


def prepare_for_training(model, cfg, ours=None):
    """A built model made ready to train, the same way in train.py and bench.py: what trains
    (train_*), each part's mode, gradient checkpointing, compiled blocks. `ours`: the model as our
    names see it (bench.py passes its view of the transformers peer)."""
    ours = ours or model
    freeze_components(ours, cfg)
    # from_pretrained leaves every module in eval mode, and transformers recomputes a layer in
    # backward (gradient checkpointing) only while that layer is in training mode. Everything the
    # gradients flow through trains in training mode, a frozen LLM too: in stage 1 the connector's
    # gradients come through the whole LLM, whose activations are what checkpointing saves.
    model.train()
    if not cfg.train_vision:
        # A frozen tower comes before everything that trains: no gradient flows through it, so
        # there is nothing to recompute, and eval mode keeps it deterministic (no dropout).
        ours.vision_tower.eval()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        compile_blocks(model)


def repeated_blocks(model):
    """The LLM's decoder layers and the vision tower's encoder layers."""
    return [*model.language_model.get_decoder().layers, *model.vision_tower.encoder.layers]


def compile_blocks(model):
    """torch.compile each repeated block on its own: the blocks are where the time goes, blocks of
    one kind share their compiled code, and the glue around them (the splice, the loss) stays plain
    Python. The first steps compile a few variants (with and without gradients, a batch of one row)."""
    for block in repeated_blocks(model):
        block.compile(dynamic=True)  # one graph for every batch and sequence length


# ----------------------------------------------------------------------------------------------
# 2. Param groups: one AdamW group per (component x decay / no decay), each with its own lr and wd.


def build_param_groups(model, cfg):
    """Biases and norm weights (1-D tensors) get no weight decay; frozen parameters are left out.
    LoRA adapters take their component's lr and wd, in a row of their own (lm_lora)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = component_of(name)
        decay = len(full_shape(p)) >= 2
        key = f"{part}_lora" if is_adapter(name) else part if decay else f"{part}_no_decay"
        group = groups.setdefault(key, {"name": key, "params": [], "lr": getattr(cfg, f"lr_{part}"),
                                        "weight_decay": getattr(cfg, f"wd_{part}") if decay else 0.0})
        group["params"].append(p)
    return list(groups.values())


def format_param_groups(groups):
    lines = [f"{'group':<20}{'tensors':>8}{'params':>14}{'lr':>10}{'wd':>8}"]
    for g in groups:
        n = sum(full_numel(p) for p in g["params"])
        lines.append(f"{g['name']:<20}{len(g['params']):>8}{n:>14,}{g['lr']:>10.2e}{g['weight_decay']:>8.3g}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 3. The optimizer and the DeepSpeed engine


def make_optimizer(groups, cfg):
    import deepspeed  # imported where used: its import takes seconds and logs, and config errors come first
    if cfg.offload:  # AdamW on the CPU copy of the optimizer state, vectorized C++
        return deepspeed.ops.adam.DeepSpeedCPUAdam(groups, adamw_mode=True)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=torch.cuda.is_available())


def deepspeed_config(cfg, accumulation, load_universal=False):
    """Built here from Config, no 'auto' values: what you set is what DeepSpeed runs.
    load_universal: the run resumes from a universal checkpoint (another number of ranks)."""
    zero = {"stage": cfg.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "checkpoint": {"load_universal": load_universal},
    }


def build_engine(model, cfg, accumulation, rank, load_universal=False):
    """The param groups (printed), the optimizer and the DeepSpeed engine. Returns (engine,
    optimizer, each group's peak lr)."""
    import deepspeed

    groups = build_param_groups(model, cfg)
    log_rank0(rank, format_param_groups(groups))
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=make_optimizer(groups, cfg), config=deepspeed_config(cfg, accumulation, load_universal))
    return engine, optimizer, [g["lr"] for g in groups]


# ----------------------------------------------------------------------------------------------
# 4. Learning rate: linear warmup, then cosine to min_lr_ratio, as a factor of each group's peak lr.


def lr_factor(step, total_steps, warmup_ratio, min_ratio):
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, peak_lrs, factor):
    for group, peak in zip(optimizer.param_groups, peak_lrs):
        group["lr"] = peak * factor


# ----------------------------------------------------------------------------------------------
# 5. The run


def main(argv=None):
    # --- settings: the config, checked before anything starts
    cfg, dry_run = load_config(sys.argv[1:] if argv is None else argv)
    if not dry_run:
        use_one_process_without_launcher()
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    accumulation = check_config(cfg, world_size)
    log_rank0(rank, json.dumps(dataclasses.asdict(cfg), indent=1))
    if dry_run:
        return
    lock_out_dir(cfg, rank)  # a second run in this out_dir is refused until this one ends
    resume_tag = check_out_dir(cfg)

    # --- processes, model, data, engine
    device = start_processes(cfg, rank)
    check_template(cfg)  # a chat template that cannot render fails here, not in a DataLoader worker
    zero3_loading = partitioned_loading(cfg, accumulation)  # kept for the run: transformers looks it up
    model, processor = build_training_model(cfg, device)  # pretrained encoder + LLM + a fresh (or stage-1) connector
    dataset, sampler, loader = build_data(cfg, processor, device, world_size, rank)
    total_steps = count_steps(cfg, len(dataset), len(loader) // accumulation, resume_tag)
    if rank == 0:  # every check passed: only now does out_dir become this run's
        prepare_out_dir(cfg, fresh=resume_tag is None)
    dist.barrier()
    universal = prepare_universal_checkpoint(cfg, resume_tag, world_size, rank)  # resumed on another GPU count
    engine, optimizer, peak_lrs = build_engine(model, cfg, accumulation, rank, universal)

    # --- resume: the weights, the optimizer, and the data position (the samples of this epoch
    # already trained, in whole steps: a run resumed on other GPUs takes the very next ones)
    step, epoch, samples_done = resume(engine, cfg, resume_tag, rank, world_size, universal)
    stop = catch_stop_signals()  # SIGTERM / Ctrl-C: a checkpoint at the next step's end, then exit
    log = RunLog(cfg, model, rank, world_size, device, total_steps)
    log_rank0(rank, f"{len(dataset)} records, {len(loader) // accumulation} steps/epoch, {total_steps} steps, "
                    f"{world_size} processes x {cfg.micro_batch_size} samples x {accumulation} accumulation")

    # --- the loop: `accumulation` micro-batches per rank make one optimizer step
    failure = None  # this rank's first bad record or diverged loss: every rank stops at the step's end
    while step < total_steps:
        sampler.set_epoch(epoch)
        sampler.skip(samples_done)
        for batch in loader:
            log.arrived(batch)
            failure = failure or bad_record_in(batch, cfg)
            if not batch["ids"] or failure:  # nothing to train: an all-masked batch keeps the ranks in lockstep
                batch = nothing_to_train(processor.tokenizer.pad_token_id)
            boundary = engine.is_gradient_accumulation_boundary()  # this micro-batch ends an optimizer step
            if boundary:
                set_lr(optimizer, peak_lrs, lr_factor(step, total_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
            loss = engine(**on_device(batch, device)).loss
            loss_value = loss.item()  # the one GPU sync per micro-batch
            failure = failure or diverged(loss_value, step, batch)
            engine.backward(loss)  # scales by 1/accumulation
            engine.step()  # steps the optimizer only at the accumulation boundary
            log.trained(batch, loss_value)
            if not boundary:
                continue

            # one optimizer step done: the ranks agree on how it went (and on the loss), then log and save
            stop_asked = agree_at_step_end(log, stop, failure, device, world_size, rank)
            step, samples_done = step + 1, samples_done + cfg.batch_size
            log.step_done(step, epoch, optimizer, engine)
            position = {"epoch": epoch, "samples_done": samples_done}
            if stop_asked:  # some rank got SIGTERM or SIGINT
                save_checkpoint_and_exit(engine, cfg, step, position, rank, stop)
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save_checkpoint(engine, cfg, step, position, rank)
            if step >= total_steps:
                break
        else:  # the epoch ran out
            log.epoch_done(epoch)
            epoch, samples_done = epoch + 1, 0

    # --- the end: a last checkpoint (to resume or extend) and the inference folder
    save_checkpoint(engine, cfg, step, {"epoch": epoch, "samples_done": samples_done}, rank)
    save_final(engine, processor, cfg, rank, log.summary(step))
    log.close()
    log_rank0(rank, f"done: {cfg.out_dir}/final (load with VLMForCausalLM.from_pretrained, or python eval.py)")


# ----------------------------------------------------------------------------------------------
# 6. Saving: checkpoints (to resume) and final/ (to use)
# Checkpoints are written under a temporary name, renamed when complete, then `latest` is switched:
# a run killed mid-write leaves the previous checkpoint as the one resume picks.


def save_checkpoint(engine, cfg, step, position, rank):
    root = os.path.join(cfg.out_dir, "checkpoints")
    tag = f"step{step:08d}"
    partial_tag = tag + ".partial"
    if rank == 0:
        shutil.rmtree(os.path.join(root, partial_tag), ignore_errors=True)
    dist.barrier()
    frozen = any(not p.requires_grad for p in engine.module.parameters())
    with disk_full_says_so(os.path.join(root, partial_tag)):
        engine.save_checkpoint(root, tag=partial_tag, client_state={"step": step, **position}, save_latest=False,
                               exclude_frozen_parameters=frozen)  # frozen weights come from the base models
        torch.save(rng_state(), os.path.join(root, partial_tag, f"rng_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
        os.replace(os.path.join(root, partial_tag), os.path.join(root, tag))
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        done = sorted(d for d in os.listdir(root) if d.startswith("step") and not d.endswith(".partial"))
        for old in done[:-max(1, cfg.keep_checkpoints)]:
            shutil.rmtree(os.path.join(root, old))
    dist.barrier()


def whole_state_dict(model, zero3, rank):
    """The model's weights, whole, on rank 0. Under ZeRO-3 each rank holds a slice of every
    parameter: they are gathered one at a time and rank 0 keeps a CPU copy of each, so a GPU never
    holds more than one whole parameter beyond its slices (gathering all at once would put a whole
    model on every GPU: +13.5 GB for a 7B LLM in bf16)."""
    import deepspeed

    state = model.state_dict()  # under ZeRO-3: buffers whole, parameters as empty placeholders
    if zero3:
        for name, p in model.named_parameters(remove_duplicate=False):
            with deepspeed.zero.GatheredParameters([p]):
                if rank == 0:
                    state[name] = p.detach().cpu().clone()
    return state


def save_final(engine, processor, cfg, rank, summary):
    """out_dir/final: a folder that VLMForCausalLM/VLMProcessor.from_pretrained load for inference.
    With LoRA: the adapters merged into the weights, and final/adapters (save_adapters)."""
    final, partial_dir = os.path.join(cfg.out_dir, "final"), os.path.join(cfg.out_dir, "final.partial")
    state = whole_state_dict(engine.module, cfg.zero_stage == 3, rank)
    if rank == 0:
        shutil.rmtree(partial_dir, ignore_errors=True)
        with disk_full_says_so(partial_dir):
            if cfg.lora_r:  # the adapters alone (to share), then folded in: final/ is a plain model
                state = dequantized(state, engine.module) if cfg.qlora else state
                save_adapters(state, cfg, os.path.join(partial_dir, "adapters"))
                state = merge_lora(state, engine.module)
            engine.module.save_pretrained(partial_dir, state_dict=state)
            processor.save_pretrained(partial_dir)
            write_json(os.path.join(partial_dir, "train_config.json"), dataclasses.asdict(cfg))
            write_json(os.path.join(partial_dir, "train_summary.json"), summary)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial_dir, final)


def save_adapters(state, cfg, folder):
    """FOLDER: the LoRA adapters alone, in peft's layout (what adapter repos on the Hub hold), for
    those who share only them: adapter_config.json + adapter_model.safetensors, whose
    `base_model.model.<layer>.lora_A/B.weight` peft's PeftModel.from_pretrained puts on the base LLM
    (cfg.llm); vision/ the same for the tower (lora_vision); connector.safetensors, the connector
    that trained with them (with the adapters and the two backbones it makes the VLM)."""
    from safetensors.torch import save_file

    parts = [("language_model.", folder, cfg.llm, "CAUSAL_LM")]
    if cfg.lora_vision:
        parts.append(("vision_tower.", os.path.join(folder, "vision"), cfg.vision_model, None))
    for prefix, where, base, task in parts:
        adapters = {"base_model.model." + name[len(prefix):]: t.detach().cpu().contiguous()
                    for name, t in state.items() if name.startswith(prefix) and is_adapter(name)}
        os.makedirs(where, exist_ok=True)
        save_file(adapters, os.path.join(where, "adapter_model.safetensors"))
        write_json(os.path.join(where, "adapter_config.json"), {
            "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base, "r": cfg.lora_r,
            "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "bias": "none",
            "target_modules": sorted({name.split(".")[-3] for name in adapters}),  # x.q_proj.lora_A.weight -> q_proj
        })
    connector = {name: t.detach().cpu().contiguous() for name, t in state.items() if component_of(name) == "connector"}
    save_file(connector, os.path.join(folder, "connector.safetensors"))


def dequantized(state, model):
    """QLoRA: STATE with each 4-bit layer's packed weight (and its quantization constants) replaced
    by the bf16 weight it stands for, so the merged final/ is a plain bf16 model."""
    import bitsandbytes as bnb

    state = dict(state)
    for name, layer in model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            for key in [k for k in state if k.startswith(f"{name}.weight.")]:
                del state[key]  # absmax, quant_map, ...: the packing's constants
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            state[f"{name}.weight"] = weight.to(torch.bfloat16).cpu()
    return state


# ==============================================================================================
# What keeps a run safe. The loop above calls these; none of them is needed to follow a sample
# from the data to the loss, but each guards something a real run meets.
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# Config parsing and checks


def parse_value(key, text, default):
    """'5e-6' -> float for a float field, 'true' -> bool for a bool field, and so on."""
    kind = type(default)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
    else:
        try:
            return kind(text)
        except ValueError:
            pass
    raise UserError(f"{key}={text!r}: expected {kind.__name__} (default {default!r})")


def check_key(key, where):
    names = [f.name for f in dataclasses.fields(Config)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see the README's config table"
        raise UserError(f"unknown config key {key!r} in {where}{hint}")


def load_config(argv):
    """Config file (Python assignments), then key=value overrides. Returns (Config, dry_run)."""
    parser = argparse.ArgumentParser(description="Train a small-vlm.", usage="%(prog)s [CONFIG.py] [key=value ...]")
    parser.add_argument("args", nargs="*", help="a config file, then key=value overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # from the launcher
    opts = parser.parse_args(argv)
    cfg = Config()
    settings = []
    if opts.args and opts.args[0].endswith(".py"):
        path = opts.args.pop(0)
        if not os.path.isfile(path):
            raise UserError(f"config file {path!r} not found")
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"config file {path!r} cannot be read ({e}); save it as UTF-8 text") from None
        scope = {}
        try:
            exec(compile(source, path, "exec"), scope)
        except (Exception, SystemExit) as e:  # a config file is Python: report its error as the user's, in one line
            raise UserError(f"config file {path!r} does not run: {type(e).__name__}: {e}; a config file only "
                            "assigns settings") from None
        settings += [(k, v, path) for k, v in scope.items() if not k.startswith("_") and not callable(v)
                     and type(v).__name__ != "module"]
    for arg in opts.args:
        key, sep, text = arg.partition("=")
        if not sep:
            raise UserError(f"override {arg!r} is not key=value")
        check_key(key, "the command line")
        settings.append((key, parse_value(key, text, getattr(Config, key)), "the command line"))
    for key, value, where in settings:
        check_key(key, where)
        default = getattr(Config, key)
        if type(default) is float and type(value) is int:
            value = float(value)
        if type(value) is not type(default):
            raise UserError(f"{key}={value!r} in {where}: expected {type(default).__name__}")
        setattr(cfg, key, value)
    return cfg, opts.dry_run


CHOICES = {"template": TEMPLATES, "image_aspect": ("pad", "resize", "anyres"),
           "precision": ("bf16", "fp16", "fp32"), "zero_stage": (0, 1, 2, 3),
           "attn_implementation": ("sdpa", "flex_attention", "flash_attention_2", "eager")}


# key -> (lowest, highest) valid value, both included (None: no bound)
RANGES = {"lr_vision": (0, None), "lr_connector": (0, None), "lr_lm": (0, None), "wd_vision": (0, None),
          "wd_connector": (0, None), "wd_lm": (0, None), "batch_size": (1, None), "micro_batch_size": (1, None),
          "epochs": (0, None), "max_steps": (0, None), "warmup_ratio": (0, 1), "min_lr_ratio": (0, 1),
          "grad_clip": (0, None), "max_seq_len": (2, None), "num_workers": (0, None), "seed": (0, 2**32 - 1),
          "log_every": (1, None), "save_every": (0, None), "keep_checkpoints": (1, None), "lora_r": (0, None),
          "lora_alpha": (0, None), "lora_dropout": (0, 0.99)}


def check_config(cfg, world_size):
    """Value checks that need no files; returns gradient accumulation steps."""
    for key, valid in CHOICES.items():
        if getattr(cfg, key) not in valid:
            raise UserError(f"{key}={getattr(cfg, key)!r}: valid values are {', '.join(map(str, valid))}")
    for key, (low, high) in RANGES.items():
        value = getattr(cfg, key)
        if not math.isfinite(value):  # inf, or NaN: no learning rate, ratio or count works with one
            raise UserError(f"{key}={value!r} is out of range: it must be a finite number "
                            f"(default {getattr(Config, key)!r})")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise UserError(f"{key}={value!r} is out of range: it must be {bounds} (default {getattr(Config, key)!r})")
    if cfg.max_steps == 0 and cfg.epochs == 0:
        raise UserError("max_steps=0 and epochs=0 train nothing: set epochs >= 1 or max_steps >= 1")
    if cfg.compile and cfg.zero_stage == 3:
        raise UserError("compile=True needs zero_stage 0, 1 or 2 (ZeRO-3 gathers parameters inside the blocks, "
                        "which breaks the compiled graphs)")
    if cfg.offload and cfg.zero_stage == 0:
        raise UserError("offload=True needs zero_stage 1, 2 or 3 (ZeRO does the offloading)")
    if not (cfg.train_vision or cfg.train_connector or cfg.train_lm):
        raise UserError("nothing to train: set at least one of train_vision, train_connector, train_lm")
    per_step = cfg.micro_batch_size * world_size
    if cfg.micro_batch_size < 1 or cfg.batch_size % per_step:
        raise UserError(
            f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size ({cfg.micro_batch_size}) x "
            f"{world_size} processes = {per_step}; pick batch_size = k x {per_step} or another micro_batch_size")
    try:
        build_connector(cfg.connector, 8, 8)  # the name alone decides validity
    except ValueError as e:
        raise UserError(f"connector: {e}") from None
    if not cfg.data_path:
        raise UserError("data_path is empty: set it in the config file or as data_path=FILE.json")
    if not cfg.out_dir.strip():
        raise UserError("out_dir is empty: set it to the folder this run writes to, as out_dir=out/NAME")
    if cfg.image_grid_pinpoints and cfg.image_aspect != "anyres":
        raise UserError(f"image_grid_pinpoints is set but image_aspect={cfg.image_aspect!r}; it only applies to "
                        "image_aspect=anyres")
    parse_pinpoints(cfg.image_grid_pinpoints)
    check_lora(cfg)
    return cfg.batch_size // per_step


LORA_KEYS = ("lora_alpha", "lora_dropout", "lora_targets", "lora_vision", "qlora")  # mean nothing with lora_r=0


def check_lora(cfg):
    """LoRA settings that cannot work together, each refused in one line."""
    if not cfg.lora_r:
        changed = [key for key in LORA_KEYS if getattr(cfg, key) != getattr(Config, key)]
        if changed:
            raise UserError(f"{changed[0]}={getattr(cfg, changed[0])!r} is set but lora_r=0 (LoRA off): set lora_r "
                            f"(LLaVA: 128) to train with adapters, or remove {changed[0]}")
        return
    if not cfg.train_lm:
        raise UserError(f"lora_r={cfg.lora_r} puts adapters on the LLM but train_lm=False: set train_lm=True (its "
                        "own weights stay frozen, only the adapters train) or lora_r=0")
    if cfg.lora_vision and not cfg.train_vision:
        raise UserError("lora_vision=True puts adapters on the vision tower but train_vision=False: set "
                        "train_vision=True, or lora_vision=False")
    if not cfg.lora_alpha:
        raise UserError(f"lora_alpha=0 scales the adapters' update to nothing; set it (LLaVA: 2 x lora_r = "
                        f"{2 * cfg.lora_r})")
    if cfg.qlora:
        check_qlora(cfg)


def check_qlora(cfg):
    if not torch.cuda.is_available():
        raise UserError("qlora=True needs a CUDA GPU (bitsandbytes' 4-bit layers); on this machine train with "
                        "LoRA alone (qlora=False): same adapters, a 16-bit LLM")
    if cfg.zero_stage == 3 or cfg.precision != "bf16":
        raise UserError(f"qlora=True needs zero_stage 0-2 (4-bit weights cannot be partitioned) and precision=bf16; "
                        f"got zero_stage={cfg.zero_stage}, precision={cfg.precision!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("qlora=True needs bitsandbytes: pip install bitsandbytes==0.50.2") from None


def lora_targets_in(module, cfg, key):
    """The names of the layers of MODULE (cfg.KEY's model) that get adapters; none is a user error."""
    names = lora_target_names(module, cfg.lora_targets)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"lora_targets={cfg.lora_targets!r} matches no linear layer of {key}={getattr(cfg, key)!r}; "
                        f"its linear layers are named {', '.join(linear)} (all-linear takes all but the LM head)")
    return names


def parse_pinpoints(text):
    """"336x672,672x336" -> [[336, 672], [672, 336]] ([height, width] each); "" -> None (the default list)."""
    if not text:
        return None
    pinpoints = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item)
        if not match:
            raise UserError(f"image_grid_pinpoints={text!r}: {item!r} is not HEIGHTxWIDTH in pixels "
                            "(e.g. 336x672,672x336,672x672,1008x336,336x1008)")
        pinpoints.append([int(match[1]), int(match[2])])
    return pinpoints


def check_model_fits(cfg, model, processor):
    """Settings that need the built model: vision_layer exists, one image fits max_seq_len (and a
    note when an anyres image may not)."""
    layers = model.config.vision_config.num_hidden_layers + 1  # hidden states: the embeddings, then each layer's
    if not -layers <= cfg.vision_layer < layers:
        raise UserError(f"vision_layer={cfg.vision_layer} is out of range: {cfg.vision_model} has {layers} hidden "
                        f"states, so it must be between {-layers} and {layers - 1} (LLaVA: -2)")
    if cfg.max_seq_len <= model.config.num_image_tokens:
        raise UserError(f"max_seq_len={cfg.max_seq_len} leaves no room for text after one image's "
                        f"{model.config.num_image_tokens} image tokens; raise it (LLaVA: 2048)")
    if model.config.image_grid_pinpoints:
        most = max(processor.image_token_count(pin_h, pin_w) for pin_h, pin_w in model.config.image_grid_pinpoints)
        if cfg.max_seq_len < most:
            log_rank0(int(os.environ.get("RANK", 0)),
                      f"note: with anyres an image takes up to {most} tokens (an image shaped like a pinpoint); "
                      f"max_seq_len={cfg.max_seq_len} refuses such samples (skip_bad_samples skips them). "
                      "LLaVA-NeXT trains with 4096.")


def count_steps(cfg, n_records, steps_per_epoch, resume_tag=None):
    """The run's optimizer steps: max_steps, or epochs x whole steps of batch_size per epoch. A run
    resumed from checkpoint resume_tag must have steps left: a finished run resumed would train
    nothing and then rewrite final/ and its summary (found here, before out_dir is touched)."""
    if steps_per_epoch == 0:
        raise UserError(f"{n_records} records give no full step of batch_size={cfg.batch_size}; lower batch_size")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    done = int(resume_tag.removeprefix("step")) if resume_tag else 0
    if done >= total_steps:
        raise UserError(f"nothing to train: {cfg.out_dir}/checkpoints/{resume_tag} is at step {done}, and this run "
                        f"has {total_steps} steps (max_steps={cfg.max_steps}, epochs={cfg.epochs}); raise max_steps "
                        "or epochs to train on from there")
    return total_steps


# ----------------------------------------------------------------------------------------------
# The output folder


RUN_FILES = ("checkpoints", "final", "metrics.jsonl")  # what a run writes beside train_config.json

# What a resumed run must share with the run that wrote the checkpoint: the model, the data and its
# order, and what decides the param groups and the checkpoint's file layout (what trains, the ZeRO
# stage, the shapes of the connector's input). A change is otherwise found by DeepSpeed or torch
# halfway through loading.
KEYS_A_RESUME_MUST_KEEP = ("vision_model", "llm", "connector", "vision_layer", "drop_cls", "image_aspect",
                           "image_grid_pinpoints", "template", "data_path", "batch_size", "seed", "train_vision",
                           "train_connector", "train_lm", "zero_stage", "lora_r", "lora_alpha", "lora_targets",
                           "lora_vision", "qlora")


def check_out_dir(cfg):
    """Refuse to mix two runs in one folder; returns the checkpoint to resume from (or None)."""
    saved = os.path.join(cfg.out_dir, "train_config.json")
    latest = os.path.join(cfg.out_dir, "checkpoints", "latest")
    if not os.path.exists(saved):
        foreign = [name for name in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, name))]
        if foreign:  # someone else's files by our names: never delete or mix with them
            raise UserError(f"out_dir {cfg.out_dir} holds {', '.join(foreign)} but no small-vlm run (no "
                            "train_config.json); choose a new or empty out_dir")
        if cfg.resume:
            raise UserError(f"resume=True but {cfg.out_dir} holds no run; drop resume=True to start one")
        return None
    if cfg.resume:
        if not os.path.exists(latest):
            return None  # the run died before its first checkpoint: start it again
        with reading(saved, "restore it from a copy, or start again with overwrite=True"):
            with open(saved) as f:
                old = json.load(f)
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        changed = [k for k in KEYS_A_RESUME_MUST_KEEP if old.get(k, getattr(Config, k)) != getattr(cfg, k)]
        if changed:
            raise UserError(f"resume=True, but {cfg.out_dir} was trained with different "
                            f"{', '.join(f'{k}={old.get(k, getattr(Config, k))!r}' for k in changed)}; use another out_dir")
        with open(latest) as f:
            tag = f.read().strip()
        root = os.path.dirname(latest)
        problem = checkpoint_problem(os.path.join(root, tag)) if tag else "it is empty"
        if problem:
            complete = [d for d in sorted(os.listdir(root), reverse=True)
                        if re.fullmatch(r"step\d+", d) and not checkpoint_problem(os.path.join(root, d))]
            offer = (f"the newest complete checkpoint is {complete[0]}: write {complete[0]} into {latest} to resume "
                     "from it" if complete else "no complete checkpoint is left: start again with overwrite=True")
            raise UserError(f"cannot resume: {latest} names {tag!r}, and {problem}; {offer}")
        return tag
    if cfg.overwrite:
        return None
    state = "a finished" if os.path.exists(os.path.join(cfg.out_dir, "final")) else "an unfinished"
    raise UserError(f"out_dir {cfg.out_dir} already holds {state} run; pass resume=True to continue it, "
                    "overwrite=True to start again there, or choose another out_dir")


LOCK_FILE = "run.lock"  # in out_dir while a run uses it: {"pid", "host"} of the run's rank 0
held_locks = []  # (lock file, out_dir if this process created it): released by exit_now


def lock_out_dir(cfg, rank):
    """Rank 0 marks out_dir as in use before any check reads it: out_dir/run.lock, created only if
    absent, holds its pid and host. A second run there (a second terminal, overwrite=True) is
    refused instead of deleting the files of the run that trains. A lock left by a process that
    is gone (killed on this host) is taken over; exit_now removes this run's lock."""
    if rank != 0:
        return
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"out_dir={cfg.out_dir!r} is a file; choose a new or empty folder")
    created = not os.path.exists(cfg.out_dir)
    path = os.path.join(cfg.out_dir, LOCK_FILE)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                holder = read_lock(path)
                if holder is None or lock_holder_lives(holder):
                    who = f"process {holder['pid']} on {holder['host']}" if holder else "a run (unreadable lock)"
                    raise UserError(f"out_dir {cfg.out_dir} is in use by {who}; wait for that run to end or choose "
                                    f"another out_dir (if no run uses it any more, remove {path})") from None
                with contextlib.suppress(FileNotFoundError):  # its process is gone: the lock is stale
                    os.remove(path)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    except OSError as e:
        raise UserError(f"out_dir={cfg.out_dir!r} is not writable: {e}") from None
    held_locks.append((path, cfg.out_dir if created else None))


def read_lock(path):
    """{"pid", "host"} of a lock file, or None when it cannot be read."""
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) and {"pid", "host"} <= holder.keys() else None
    except (OSError, ValueError):
        return None


def lock_holder_lives(holder):
    """Whether the run holding a lock may still be running: a process on another host cannot be asked."""
    if holder["host"] != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):  # another user's process, or a pid it cannot ask about
        pass
    return True


def release_out_dir():
    """Removes this process's lock, and the out_dir it created when nothing else was written there
    (a run refused at start-up leaves no folder behind)."""
    while held_locks:
        path, created = held_locks.pop()
        if (read_lock(path) or {}).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                os.remove(path)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run's files stay
                os.rmdir(created)


def prepare_out_dir(cfg, fresh):
    """Writable, holding this run's resolved config; a fresh start with overwrite=True (or resume=True
    and no checkpoint yet) clears what the previous run left (check_out_dir made sure it is one)."""
    try:
        if fresh and (cfg.overwrite or cfg.resume):  # resume=True before any checkpoint starts over
            for stale in RUN_FILES:
                path = os.path.join(cfg.out_dir, stale)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_json(os.path.join(cfg.out_dir, "train_config.json"), dataclasses.asdict(cfg))
    except OSError as e:
        raise UserError(f"out_dir={cfg.out_dir!r} is not writable: {e}") from None


# ----------------------------------------------------------------------------------------------
# Processes, loading and data


def use_one_process_without_launcher():
    """`python train.py ...` without the deepspeed launcher: one process (one GPU, or the CPU).
    The launcher sets these; without them DeepSpeed would look for MPI to find its ranks."""
    if "RANK" in os.environ:
        return
    with socket.socket() as probe:  # a port for the (one-member) process group
        try:
            # the launcher's default: DeepSpeed's CPU backend leaves a shared-memory buffer named
            # after the port in /dev/shm, so reruns on one port reuse one buffer instead of adding more
            probe.bind(("127.0.0.1", 29500))
        except OSError:
            probe.bind(("127.0.0.1", 0))  # in use: any free port
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def start_processes(cfg, rank):
    """The process group, this rank's device, the seeds, and (rank 0) the demo files. Returns the device."""
    import deepspeed  # imported where used: its import takes seconds and logs, and config errors come first

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds each rank to its own GPU
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.precision != "fp32" and device.type == "cpu":
        raise UserError(f"precision={cfg.precision} needs a GPU; use precision=fp32 on CPU")
    if device.type != "cuda" and cfg.attn_implementation != "sdpa":
        log_rank0(rank, f"attn_implementation={cfg.attn_implementation} is for GPUs; this CPU run uses sdpa")
    seed_everything(cfg.seed)
    if rank == 0 and cfg.make_demo:
        prepare_demo(cfg)
    dist.barrier()
    return device


def init_process_group(backend):
    """deepspeed.init_distributed. A one-process run is its own master, on a port probed free a
    moment before (use_one_process_without_launcher): a run started at the same moment may have
    taken it since. Then it starts on another free port; nothing else has to reach it."""
    import deepspeed

    try:
        deepspeed.init_distributed(dist_backend=backend)
    except dist.DistNetworkError:
        if int(os.environ.get("WORLD_SIZE", 1)) != 1:
            raise
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
        deepspeed.init_distributed(dist_backend=backend)


def partitioned_loading(cfg, accumulation):
    """Under ZeRO-3, from_pretrained creates each model already cut into per-rank slices (DeepSpeed's
    zero.Init; only rank 0 reads the weight files), instead of a whole copy per rank in host memory
    (8 x 68 GB for a 34B LLM on 8 GPUs): transformers looks for this object while it exists.
    None below ZeRO-3."""
    if cfg.zero_stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config(cfg, accumulation))


def full_shape(p):
    """A parameter's shape; under ZeRO-3 a partitioned parameter's own tensor is an empty slice."""
    return getattr(p, "ds_shape", p.shape)


def full_numel(p):
    return getattr(p, "ds_numel", p.numel())


def load_connector_weights(model, folder):
    """Stage 2 starts from stage 1's connector (LLaVA's pretrain_mm_mlp_adapter). Loaded before
    deepspeed.initialize, so it also works under ZeRO-3 (nothing is partitioned yet)."""
    folder = inference_folder(folder)
    files = [f for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")] if os.path.isdir(folder) else []
    if not files:
        raise UserError(f"init_from={folder!r} holds no .safetensors weights; point it at a stage-1 run or final/")
    weights = {}
    for f in files:  # only the connector's tensors are read: a few MB of a 14 GB folder at 7B
        with reading(os.path.join(folder, f), "copy or save that run's final/ again"):
            with safe_open(os.path.join(folder, f), framework="pt") as shard:
                weights.update({k: shard.get_tensor(k) for k in shard.keys()
                                if k.startswith("connector.") or k == "image_newline"})
    try:
        model.connector.load_state_dict({k[len("connector."):]: v for k, v in weights.items() if k != "image_newline"})
    except RuntimeError as e:
        raise UserError(f"init_from={folder!r}: its connector does not fit this model ({e})".splitlines()[0])
    if hasattr(model, "image_newline"):  # anyres: stage 1 may have trained it, or run without anyres
        if "image_newline" not in weights:
            return f"init_from={folder}: connector loaded; it has no image_newline (trained without anyres), so that starts fresh"
        model.image_newline.data.copy_(weights["image_newline"])
        return f"init_from={folder}: connector and image_newline loaded"
    return f"init_from={folder}: connector loaded"


def attention_for(cfg, device):
    """The attention implementation this run uses: the configured one on GPUs, sdpa on the CPU."""
    return cfg.attn_implementation if device.type == "cuda" else "sdpa"


def make_collate(cfg, pad_token_id, attn_implementation):
    """The DataLoader's collate function: samples -> one micro-batch. Packed rows carry no attention
    mask, only position_ids that restart at 0 for every sample. transformers turns those into
    per-sample (block-diagonal) attention for sdpa, flex_attention and eager at any number of rows,
    but flash_attention_2 finds the sample boundaries only in a batch of ONE row (its
    _is_packed_sequence; with more rows each row is plain causal and a sample would attend to the
    ones before it). So with flash_attention_2 a micro-batch is packed into a single row."""
    if not cfg.pack_samples:
        return partial(collate, pad_token_id=pad_token_id)
    return partial(collate, pad_token_id=pad_token_id, pack_length=cfg.max_seq_len,
                   one_row=attn_implementation == "flash_attention_2")


def build_data(cfg, processor, device, world_size, rank):
    """(dataset, sampler, loader), checked before any GPU work: a bad file fails here, not hours in.
    Bad records come back marked, never raised in a DataLoader worker (whose traceback would wrap
    the message); the loop stops at the first one unless skip_bad_samples is set."""
    def load():
        try:
            return VLMDataset(cfg.data_path, cfg.image_folder, processor, cfg.template, cfg.max_seq_len,
                              skip_bad_samples=True, image_paths_outside=cfg.image_paths_outside)
        except (ValueError, FileNotFoundError) as e:  # data.py's messages name the file / record
            raise UserError(str(e)) from None

    # Rank 0 converts the files and estimates the lengths (with anyres: one image header per record)
    # into the datasets cache; the other ranks then read that cache instead of all doing the same.
    dataset = rank0_first(load, rank)
    if len(dataset) == 0:
        raise UserError(f"data_path={cfg.data_path!r} holds no records")
    check_images(dataset, cfg)
    sampler = LengthGroupedSampler(dataset.lengths, dataset.has_image, cfg.batch_size, cfg.micro_batch_size,
                                   world_size, rank, cfg.seed, group_by_length=cfg.group_by_length)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.micro_batch_size, sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=make_collate(cfg, processor.tokenizer.pad_token_id, attention_for(cfg, device)),
        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.num_workers else None,
        worker_init_fn=leave_stop_signals_to_the_rank,
        # Each new iterator (every epoch, and once after a resume) draws its workers' seed: from a
        # generator of its own, not the global one that dropout (LoRA's) draws from, so a resumed run
        # continues the very dropout masks of the uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed + rank))
    return dataset, sampler, loader


# Two turns, an image, and text a template may treat specially (a system-like opening, a second question):
# enough to meet a template's syntax errors, its raise_exception checks and prefix-instability.
PROBE_CONVERSATION = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A cat."},
                      {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Black."}]


def check_template(cfg):
    """template=chat renders every sample with the tokenizer's own Jinja template, which may have a
    syntax error, reject conversations (raise_exception) or be missing. Rendered once here on a probe
    conversation, for training and for the inference template final/ will hold, so such a template
    stops the run at start-up in one line, not in a DataLoader worker of every rank hours in."""
    if cfg.template != "chat":
        return  # plain and vicuna_v1 are this repository's own templates
    processor = processor_from_config(cfg)
    try:
        tokenize_conversation(PROBE_CONVERSATION, cfg.template, processor)
        messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in PROBE_CONVERSATION[:1]]
        processor.tokenizer.apply_chat_template(messages, chat_template=chat_template_for(cfg.template,
                                                                                          processor.tokenizer),
                                                tokenize=False, add_generation_prompt=True)
    except (ValueError, TemplateError) as e:
        raise UserError(f"template=chat: the chat template of llm={cfg.llm!r} fails on a probe conversation "
                        f"({first_line(e)}); fix the "
                        "template or use template=vicuna_v1") from None


def check_images(dataset, cfg, sample=100):
    """Before any GPU work: image_folder exists and the first `sample` image records resolve."""
    indices = [i for i, has in enumerate(dataset.has_image) if has][:sample]
    if not indices:
        return
    if not os.path.isdir(cfg.image_folder):
        raise UserError(f"image_folder={cfg.image_folder!r} is not a folder, and the data has image records")
    missing = [(dataset.records[i]["id"], path) for i in indices for path in dataset.records[i]["image"]
               if not os.path.exists(os.path.join(cfg.image_folder, path))]
    if missing and (not cfg.skip_bad_samples or len(missing) == len(indices)):
        record_id, path = missing[0]
        raise UserError(f"{len(missing)} of the first {len(indices)} image records have no file under "
                        f"image_folder={cfg.image_folder!r} (e.g. record {record_id!r}: {path!r}); fix "
                        "image_folder, or set skip_bad_samples=True to skip such records")


def prepare_demo(cfg):
    """The demo's data and tiny backbones, created on first use (there is no download)."""
    data_file = cfg.data_path.split(",")[0]
    data_dir, backbones_dir = os.path.dirname(data_file), os.path.dirname(cfg.llm)
    for wanted, folder in ((data_file, data_dir), (cfg.llm, backbones_dir)):
        if not os.path.exists(wanted) and os.path.isdir(folder) and os.listdir(folder):
            raise UserError(f"make_demo=True: {wanted} does not exist, and the demo writes its files only into a "
                            f"new or empty folder, which {folder} is not; check the path for a typo")
    if not os.path.exists(data_file):
        make_demo_data(data_dir)
    if not (os.path.exists(cfg.vision_model) and os.path.exists(cfg.llm)):
        vision_dir, llm_dir = make_tiny_backbones(os.path.dirname(cfg.llm), corpus=demo_corpus(), image_size=64,
                                                  patch_size=8, vision_width=96, llm_width=128, layers=2)
        if (vision_dir, llm_dir) != (cfg.vision_model, cfg.llm):
            raise UserError(f"make_demo wrote {vision_dir} and {llm_dir}; point vision_model and llm there")


# ----------------------------------------------------------------------------------------------
# Ranks agreeing: bad records, diverged losses, stop signals


def sum_over_ranks(values, device):
    """[x, y, ...] summed over every rank, as floats. The tensor lives on the training device: the
    process group of a GPU run has only NCCL, which moves GPU tensors alone, and a CPU tensor there
    stops the run ("No backend type associated with device type cpu")."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def agree_at_step_end(log, stop, failure, device, world_size, rank):
    """At each step's end the ranks sum the step's loss and their flags: a failure on any rank stops
    every rank (one error line); otherwise log gets the mean loss. Returns whether a stop signal came."""
    loss_sum, micro_batches = log.take_step_loss()
    loss_sum, micro_batches, stop_asked, failed = sum_over_ranks(
        [loss_sum, micro_batches, float(stop["signal"] > 0), float(failure is not None)], device)
    if failed:
        stop_every_rank(first_failure(failure, world_size), rank)
    log.last_loss = loss_sum / micro_batches
    return stop_asked > 0


def bad_record_in(batch, cfg):
    """The message of the batch's first bad record, unless skip_bad_samples (then it is counted)."""
    if batch["skipped"] and not cfg.skip_bad_samples:
        return str(bad_record(*batch["skipped"][0]))
    return None


def diverged(loss_value, step, batch):
    if math.isfinite(loss_value):
        return None
    return (f"loss is {loss_value} at step {step + 1} (micro-batch ids {batch['ids']}); "
            "lower the learning rate or check those samples, then resume=True")


def nothing_to_train(pad_token_id):
    """A micro-batch of one pad token and no label: every module still runs (the model sees to
    that), so ZeRO's collectives stay in step with the ranks that have samples."""
    return {"input_ids": torch.tensor([[pad_token_id]]), "labels": torch.tensor([[IGNORE_INDEX]]),
            "attention_mask": None, "position_ids": torch.zeros(1, 1, dtype=torch.long), "pixel_values": None,
            "image_sizes": None, "num_tokens": 0, "ids": []}


def on_device(batch, device):
    return {k: batch[k].to(device, non_blocking=True) if batch[k] is not None else None
            for k in ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "image_sizes")}


def first_failure(failure, world_size):
    """The message of the lowest rank that failed, known to every rank (its failure, or None)."""
    messages = [None] * world_size
    dist.all_gather_object(messages, failure)
    return next(m for m in messages if m)


def rank0_first(work, rank, then_the_others=True):
    """work() on rank 0, then (then_the_others) on the other ranks, which find what rank 0 wrote to
    disk. A UserError on rank 0 stops every rank with its one line, instead of leaving the others
    waiting for rank 0 for ever. Returns work()'s result (None on ranks that did not run it)."""
    result, error = None, [None]
    if rank == 0:
        try:
            result = work()
        except UserError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        stop_every_rank(error[0], rank)
    if rank != 0 and then_the_others:
        result = work()
    return result


def stop_every_rank(message, rank):
    """Every rank ends with exit code 2 and the job prints one error line: rank 0 prints it before
    any rank leaves (a launcher kills the others as soon as one rank exits)."""
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    dist.barrier()
    exit_now(2)


MAX_SKIPPED_SHARE = 0.5  # a run that skips more of its samples than this stops: its data or settings are wrong


def check_skipped_share(totals, reasons):
    """Stops a run that trains on (almost) nothing, such as every image missing, or max_seq_len
    too short for any sample: skip_bad_samples=True is for a few bad records, not for bad settings."""
    seen = totals["trained"] + totals["skipped"]
    if seen and totals["skipped"] > MAX_SKIPPED_SHARE * seen:
        why = f"; e.g. record {reasons[0][0]!r}: {reasons[0][1]}" if reasons else ""
        raise UserError(f"{int(totals['skipped'])} of the {int(seen)} samples so far were bad and skipped, more than "
                        f"{MAX_SKIPPED_SHARE:.0%}{why}; fix the data or the settings (image_folder, max_seq_len)")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # pre-emption, Ctrl-C: finish the step, save, exit


def catch_stop_signals():
    """{"signal": 0}, set to the first SIGTERM or SIGINT received (the launcher answers Ctrl-C by
    sending SIGTERM after it: the first names the stop)."""
    stop = {"signal": 0}
    for number in STOP_SIGNALS:
        signal.signal(number, lambda received, _: stop.update(signal=stop["signal"] or received))
    return stop


def save_checkpoint_and_exit(engine, cfg, step, position, rank, stop):
    save_checkpoint(engine, cfg, step, position, rank)
    received = signal.Signals(stop["signal"] or signal.SIGTERM)
    log_rank0(rank, f"{received.name}: saved step {step} in {cfg.out_dir}/checkpoints; continue with the "
                    f"same command plus resume=True")
    exit_now(128 + received.value)


def run_and_exit(main):
    """`python train.py`: main(), then the process ends through exit_now whichever way main ends:
    0, 2 after one error line (a user's mistake, a diverged run), argparse's code, 130 on Ctrl-C
    before the loop catches it, 1 with the traceback of a bug or of an error a DataLoader worker
    raised. Python's own exit would join the workers, which ignore SIGTERM: the rank would hang."""
    try:
        code = run_command(main) or 0
    except SystemExit as e:  # argparse: --help, or a usage error it has printed
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_now(code)


def leave_stop_signals_to_the_rank(_worker_id):
    """DataLoader workers leave SIGTERM and SIGINT (Ctrl-C reaches the whole process group) to their
    rank, which checkpoints before exiting; a worker dying on them would crash the rank mid-save.
    So the rank must end with exit_now, never sys.exit: Python's exit joins its worker processes
    after a SIGTERM that these ignore, and would wait forever."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def exit_now(code):
    """Ends this process at once (its DataLoader workers see their parent gone and stop), its
    out_dir lock released."""
    release_out_dir()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------------------------
# Resume and random state


def resume(engine, cfg, tag, rank, world_size, universal):
    """(step, epoch, samples_done): (0, 0, 0) for a new run, else the checkpoint's, loaded."""
    if not tag:
        return 0, 0, 0
    state = load_checkpoint(engine, cfg, tag, rank, world_size, universal)
    if rank == 0:
        forget_steps_after(cfg.out_dir, state["step"])
    dist.barrier()  # before any rank appends to its sample-id log again
    log_rank0(rank, f"resumed from {cfg.out_dir}/checkpoints/{tag} at step {state['step']}")
    return state["step"], state["epoch"], state["samples_done"]


def prepare_universal_checkpoint(cfg, tag, world_size, rank):
    """True when the run resumes under ZeRO on another number of ranks than wrote checkpoint TAG;
    then rank 0 has written its universal form (the others wait)."""
    if not tag or not needs_universal_checkpoint(cfg, tag, world_size):
        return False
    rank0_first(lambda: write_universal_checkpoint(os.path.join(cfg.out_dir, "checkpoints", tag)), rank,
                then_the_others=False)
    return True


def load_checkpoint(engine, cfg, tag, rank, world_size, universal):
    """The engine's weights and optimizer state, this rank's RNG state; returns the client state
    (step, epoch, samples_done). universal: from TAG/universal (see needs_universal_checkpoint)."""
    root = os.path.join(cfg.out_dir, "checkpoints")
    try:
        path, state = engine.load_checkpoint(root, tag=f"{tag}/universal" if universal else tag,
                                             load_module_strict=False)
    except (AssertionError, RuntimeError, OSError, KeyError, ValueError, EOFError) as e:  # damaged, or not this model's
        raise UserError(f"checkpoint {root}/{tag} cannot be loaded ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}); point "
                        f"{root}/latest at an older step, or start again with overwrite=True") from None
    if path is None:
        raise UserError(f"could not load checkpoint {root}/{tag}; remove it from {root}/latest or set overwrite=True")
    if "samples_done" not in state:  # written before positions were counted in samples
        raise UserError(f"checkpoint {root}/{tag} was written by an older small-vlm (no data position in "
                        "samples); start the run again with overwrite=True")
    if ranks_that_wrote(os.path.join(root, tag)) == world_size:
        set_rng_state(torch.load(os.path.join(root, tag, f"rng_rank{rank}.pt"), weights_only=True))
    else:  # rank r of a new layout has no rank-r state to continue: the generators restart, as at a start
        seed_everything(cfg.seed + state["step"])
    return state


def ranks_that_wrote(folder):
    """How many ranks wrote the checkpoint in FOLDER (each wrote its RNG state)."""
    return len([f for f in os.listdir(folder) if re.fullmatch(r"rng_rank\d+\.pt", f)])


def needs_universal_checkpoint(cfg, tag, world_size):
    """ZeRO (stages 1-3) saves each rank's slice of the optimizer state, cut for the number of ranks
    that wrote it; DeepSpeed reads it on another number of ranks only in its universal form."""
    return cfg.zero_stage > 0 and ranks_that_wrote(os.path.join(cfg.out_dir, "checkpoints", tag)) != world_size


def write_universal_checkpoint(folder):
    """FOLDER/universal: DeepSpeed's universal form of the checkpoint (one file per parameter and
    optimizer state, whole), which any number of ranks can load. Written once, by DeepSpeed's own
    converter in a child process, under a temporary name until it is complete."""
    target, partial_dir = os.path.join(folder, "universal"), os.path.join(folder, "universal.partial")
    if os.path.isdir(target):
        return
    shutil.rmtree(partial_dir, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", folder,
               "--output_folder", partial_dir, "--inject_missing_state"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise UserError(f"cannot convert {folder} for another number of processes ({last}); resume on the "
                        f"{ranks_that_wrote(folder)} processes that wrote it")
    os.replace(partial_dir, target)
    with contextlib.suppress(FileNotFoundError):  # the converter's pointer to its output: unused here
        os.remove(os.path.join(folder, "latest_universal"))


def checkpoint_problem(folder):
    """Why a checkpoint folder cannot be resumed from, or None when it looks complete: every rank
    wrote its RNG state, and DeepSpeed's model (and, under ZeRO, per-rank optimizer) files are there."""
    if not os.path.isdir(folder):
        return f"{folder} does not exist"
    files = os.listdir(folder)
    ranks = ranks_that_wrote(folder)
    models = len([f for f in files if f.endswith("model_states.pt")])
    optimizers = len([f for f in files if f.endswith("optim_states.pt")])
    if not ranks or not models:
        return f"{folder} lacks its {'RNG' if not ranks else 'model'} state files"
    if models not in (1, ranks) or optimizers not in (0, ranks):
        return f"{folder} has {models} model and {optimizers} optimizer state files for {ranks} ranks"
    return None


def forget_steps_after(out_dir, step):
    """A resumed run trains the steps after its checkpoint again: the lines the interrupted run wrote
    for them (metrics.jsonl, sample_ids_rank*.jsonl) go, so that every step is logged once. A line
    cut short by a kill goes too."""
    def kept(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    for name in os.listdir(out_dir):
        if name == "metrics.jsonl" or re.fullmatch(r"sample_ids_rank\d+\.jsonl", name):
            path = os.path.join(out_dir, name)
            with open(path) as f:
                lines = [line.rstrip("\n") + "\n" for line in f if kept(line)]
            with open(path + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(path + ".tmp", path)


@contextlib.contextmanager
def disk_full_says_so(path):
    """A save that fails for lack of space (torch reports it as "unexpected pos") says so, and where."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        folder = next(p for p in (path, os.path.dirname(path), ".") if os.path.isdir(p))
        free = shutil.disk_usage(folder).free
        if getattr(e, "errno", None) != errno.ENOSPC and "unexpected pos" not in str(e) and free > 2**20:
            raise
        raise UserError(f"the disk is full ({free / 2**20:.0f} MiB free) while writing {path}; free some space "
                        "and continue with resume=True (checkpoints/latest still names the last complete "
                        "checkpoint)") from None


def rng_state():
    """Every generator's state as tensors, ints and strings, so that torch.load(weights_only=True)
    reads it back (a checkpoint is data: loading one must not run code). On a GPU: this rank's own
    device's generator only, so the file fits a rank of a run on any number of GPUs."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                   has_gauss, gauss],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the CPU and every GPU


# ----------------------------------------------------------------------------------------------
# Logging and FLOPs


LOG_FULL_DISK = "; the last checkpoint is intact: continue with resume=True"  # what a failed log write adds


class RunLog:
    """What the loop measures and writes: the loss of the step being trained, a window of
    throughput counters (samples, real tokens, computed positions, FLOPs, time waiting for data,
    skipped samples) logged every log_every steps, the bad records skipped, and each step's record
    ids. Writes out_dir/metrics.jsonl (rank 0), sample_ids_rank{R}.jsonl (log_sample_ids), wandb."""

    def __init__(self, cfg, model, rank, world_size, device, total_steps):
        self.cfg, self.rank, self.world_size, self.device, self.total_steps = cfg, rank, world_size, device, total_steps
        self.flops_per_token, self.flops_per_image = flops_per_token_and_image(model)
        with writing(cfg.out_dir, LOG_FULL_DISK):
            self.metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if rank == 0 else None
            self.id_log = (open(os.path.join(cfg.out_dir, f"sample_ids_rank{rank}.jsonl"), "a")
                           if cfg.log_sample_ids else None)
        self.wandb_run = None
        if cfg.wandb and rank == 0:
            import wandb

            self.wandb_run = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg))
        self.step_loss, self.step_micro, self.step_ids, self.last_loss = 0.0, 0, [], float("nan")
        self.skipped, self.skipped_before = [], 0  # skipped: (id, reason) this epoch, on this rank
        self.totals = {"trained": 0, "skipped": 0}  # samples, all ranks, this run (check_skipped_share)
        self.window = dict.fromkeys(("samples", "tokens", "positions", "flops", "wait", "skipped"), 0)
        self.t_window = self.t_wait = time.time()

    def arrived(self, batch):
        self.window["wait"] += time.time() - self.t_wait
        self.skipped += batch["skipped"]
        self.window["skipped"] += len(batch["skipped"])

    def trained(self, batch, loss_value):
        self.step_ids += batch["ids"]
        self.step_loss, self.step_micro = self.step_loss + loss_value, self.step_micro + 1
        n_tokens = batch["num_tokens"]  # real tokens, not padding
        n_tiles = 0 if batch["pixel_values"] is None else len(batch["pixel_values"])  # anyres: several per image
        self.window["samples"] += len(batch["ids"])
        self.window["tokens"] += n_tokens
        self.window["positions"] += batch["input_ids"].numel()  # computed, padding included
        self.window["flops"] += self.flops_per_token * n_tokens + self.flops_per_image * n_tiles
        self.t_wait = time.time()

    def take_step_loss(self):
        """(sum of this rank's micro-batch losses this step, their number), then starts the next step."""
        taken, self.step_loss, self.step_micro = (self.step_loss, self.step_micro), 0.0, 0
        return taken

    def step_done(self, step, epoch, optimizer, engine):
        if self.id_log:
            with writing(self.id_log.name, LOG_FULL_DISK):
                self.id_log.write(json.dumps({"step": step, "epoch": epoch, "ids": self.step_ids}) + "\n")
                self.id_log.flush()
        self.step_ids = []
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            trained, skipped = log_step(self.cfg, self.rank, self.world_size, self.device, step, self.total_steps,
                                        epoch, self.last_loss, optimizer, engine, self.window,
                                        time.time() - self.t_window, self.metrics, self.wandb_run)
            self.totals["trained"] += trained
            self.totals["skipped"] += skipped
            check_skipped_share(self.totals, self.skipped)
            self.window = dict.fromkeys(self.window, 0)
            self.t_window = time.time()

    def epoch_done(self, epoch):
        if self.skipped:
            log_rank0(self.rank, f"epoch {epoch}: skipped {len(self.skipped)} bad samples on rank 0: {self.skipped[:10]}")
        self.skipped_before += len(self.skipped)
        self.skipped = []

    def summary(self, step):
        """train_summary.json's content; says how many samples were skipped, if any."""
        skipped = self.skipped_before + len(self.skipped)
        if skipped:
            log_rank0(self.rank, f"skipped {skipped} bad samples on rank 0 in all; this epoch: {self.skipped[:10]}")
        return {"final_loss": self.last_loss, "steps": step, "samples": step * self.cfg.batch_size,
                "skipped_rank0": skipped}

    def close(self):
        for log in (self.metrics, self.id_log):
            if log:
                log.close()


def log_step(cfg, rank, world_size, device, step, total_steps, epoch, loss, optimizer, engine, window, elapsed,
             metrics, wandb_run):
    """One line in out_dir/metrics.jsonl (rank 0), a progress line, and wandb if on. Returns the samples
    trained and skipped in this window, summed over ranks."""
    samples, tokens, positions, flops, skipped = sum_over_ranks(
        [window["samples"], window["tokens"], window["positions"], window["flops"], window["skipped"]], device)
    peak = device_peak_flops()
    grad_norm = engine.get_global_grad_norm()  # a float or a tensor, by ZeRO stage
    grad_norm = None if grad_norm is None else float(grad_norm)
    memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {"step": step, "epoch": epoch, "loss": loss,
              "lr": {g["name"]: g["lr"] for g in optimizer.param_groups}, "grad_norm": grad_norm,
              "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
              "padding": 1 - tokens / positions if positions else 0.0,
              "mfu": flops / elapsed / (world_size * peak) if peak else None,
              "data_wait": window["wait"] / elapsed, "skipped": int(skipped), "memory_gb": memory / 2**30}
    if rank != 0:
        return samples, skipped
    with writing(metrics.name, LOG_FULL_DISK):
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    eta = elapsed / cfg.log_every * (total_steps - step)
    print(f"step {step}/{total_steps} | loss {loss:.4f} | lr {max(record['lr'].values()):.2e} | "
          f"{samples / elapsed:.1f} samples/s | "
          f"data wait {record['data_wait']:.0%} | eta {eta / 60:.1f} min", flush=True)
    if wandb_run:
        wandb_run.log({k: v for k, v in record.items() if k != "lr"} |
                      {f"lr/{k}": v for k, v in record["lr"].items()}, step=step)
    return samples, skipped


def flops_per_token_and_image(model):
    """Matmul FLOPs of training, as (per LLM position, per image tile: one per image, or the
    base + grid tiles of an anyres image): 2 per parameter per token
    forward; in backward 2 more for activation gradients wherever gradients flow (a module that
    trains, or lies after one that trains), and 2 more for the weight gradients of trainable
    parameters. So a trained LLM costs 6N per token, a frozen one under a trained connector 4N.
    Attention's T^2 term and the LM head (run only at supervised positions) are left out."""
    lm = model.language_model
    lookups = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}

    def count(module, trainable=None):  # embedding tables are lookups, and the head runs on few positions
        return sum(full_numel(p) for p in module.parameters()
                   if id(p) not in lookups and (trainable is None or p.requires_grad == trainable))

    patches = model.config.num_image_tokens
    vision_trains = count(model.vision_tower, True) > 0
    connector_needs_grad = vision_trains or count(model.connector, True) > 0
    lm_needs_grad = connector_needs_grad or count(lm, True) > 0
    per_image = 2 * count(model.vision_tower) * patches * (3 if vision_trains else 1)
    per_image += (2 * count(model.connector) * (2 if vision_trains else 1) + 2 * count(model.connector, True)) * patches
    per_token = 2 * count(lm) * (2 if lm_needs_grad else 1) + 2 * count(lm, True)
    return per_token, per_image


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak_flops():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def log_rank0(rank, *args):
    if rank == 0:
        print(*args, flush=True)


if __name__ == "__main__":
    run_and_exit(main)
