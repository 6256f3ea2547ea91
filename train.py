"""Train a small-vlm with an explicit DeepSpeed loop.

    deepspeed train.py configs/demo.py                       # the demo, on CPU
    deepspeed --num_gpus 8 train.py configs/llava_pretrain.py lr_connector=2e-3
    python train.py configs/llava_finetune.py --dry-run      # print the resolved config

Read top to bottom: the model and what trains, param groups, optimizer and DeepSpeed, the schedule,
the data loader, `main` and its loop, saving. The settings (run.Config: every key) and the run's
machinery (config checks, the output folder, ranks in lockstep, checkpoints and resume, the log)
are named components of run.py: none of them is needed to follow a sample to the loss.
"""
import dataclasses
import json
import math
import os
import shutil
import sys
from functools import partial

import torch
import torch.distributed as dist
from safetensors import safe_open

import run
from data import LengthGroupedSampler, VLMDataset, chat_template_for, check_chat_template, collate, make_demo_files
from model import SettingError, add_lora, build_processor, build_vlm, inference_folder, merge_lora, parse_pinpoints
from run import UserError, first_line, full_numel, full_shape, log_rank0


# ----------------------------------------------------------------------------------------------
# 1. The model: a pretrained encoder and LLM, a fresh connector, and what of it trains


def build_training_model(cfg, device):
    """The model main() trains: build_vlm (pretrained encoder + LLM + a fresh connector), stage 1's
    connector when init_from is set (load_connector_weights), the training prompt format as the
    processor's chat template, LoRA adapters (lora_r > 0) and prepare_for_training. Returns
    (model, processor)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]
    pinpoints = parse_pinpoints(cfg.image_grid_pinpoints)
    try:
        if cfg.template == "chat":  # the tokenizer's own template: one that cannot render fails here, not in a worker
            check_chat_template(build_processor(cfg.vision_model, cfg.llm, cfg.image_aspect, cfg.drop_cls, pinpoints,
                                                cfg.video_frames), cfg.llm)
        model, processor = build_vlm(cfg.vision_model, cfg.llm, cfg.connector, cfg.vision_layer, cfg.drop_cls,
                                     cfg.image_aspect, dtype=dtype, attn_implementation=attention_for(cfg, device),
                                     image_grid_pinpoints=pinpoints,
                                     llm_quantization=four_bit_loading(cfg), video_frames=cfg.video_frames)
    except SettingError as e:  # the backbones load, and a setting does not fit them
        raise UserError(first_line(e)) from None
    except (OSError, ValueError) as e:  # a wrong path or name, or an unsupported vision tower
        raise UserError(f"cannot build the model from vision_model={cfg.vision_model!r}, llm={cfg.llm!r}: "
                        f"{first_line(e)}") from None
    run.check_model_fits(cfg, model, processor)
    rank = int(os.environ.get("RANK", 0))
    if cfg.init_from:
        log_rank0(rank, load_connector_weights(model, cfg.init_from))
    processor.chat_template = chat_template_for(cfg.template, processor.tokenizer)
    add_adapters(model, cfg)
    prepare_for_training(model, cfg)
    if cfg.compile:
        log_rank0(rank, f"compiling {len(repeated_blocks(model))} blocks (the first steps are slow)")
    return model, processor


def load_connector_weights(model, folder):
    """Stage 2 starts from stage 1's connector (LLaVA's pretrain_mm_mlp_adapter). Loaded before
    deepspeed.initialize, so it also works under ZeRO-3 (nothing is partitioned yet)."""
    folder = inference_folder(folder)
    files = [f for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")] if os.path.isdir(folder) else []
    if not files:
        raise UserError(f"init_from={folder!r} holds no .safetensors weights; point it at a stage-1 run or final/")
    weights = {}
    for f in files:  # only the connector's tensors are read: a few MB of a 14 GB folder at 7B
        with run.reading(os.path.join(folder, f), "copy or save that run's final/ again"):
            with safe_open(os.path.join(folder, f), framework="pt") as shard:
                weights.update({k: shard.get_tensor(k) for k in shard.keys()
                                if k.startswith("connector.") or k == "image_newline"})
    try:
        model.connector.load_state_dict({k[len("connector."):]: v for k, v in weights.items() if k != "image_newline"})
    except RuntimeError as e:
        raise UserError(f"init_from={folder!r}: its connector does not fit this model ({first_line(e)})") from None
    if hasattr(model, "image_newline"):  # anyres: stage 1 may have trained it, or run without anyres
        if "image_newline" not in weights:
            return f"init_from={folder}: connector loaded; it has no image_newline (trained without anyres), so that starts fresh"
        model.image_newline.data.copy_(weights["image_newline"])
        return f"init_from={folder}: connector and image_newline loaded"
    return f"init_from={folder}: connector loaded"


def attention_for(cfg, device):
    """The attention implementation this run uses: the configured one on GPUs, sdpa on the CPU."""
    return cfg.attn_implementation if device.type == "cuda" else "sdpa"


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
    parts = {key: parts[key] for key in (["llm", "vision_model"] if cfg.lora_vision else ["llm"])}
    for key, names in run.lora_layers(parts, cfg).items():
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


def partitioned_loading(cfg, accumulation):
    """Under ZeRO-3, from_pretrained creates each model already cut into per-rank slices (DeepSpeed's
    zero.Init; only rank 0 reads the weight files), instead of a whole copy per rank in host memory
    (8 x 68 GB for a 34B LLM on 8 GPUs): transformers looks for this object while it exists.
    None below ZeRO-3."""
    if cfg.zero_stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config(cfg, accumulation))


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
# 5. The data loader: records -> samples (data.py) -> length-grouped micro-batches on each rank


def build_data(cfg, processor, device, world_size, rank):
    """(dataset, sampler, loader), checked before any GPU work: a bad file fails here, not hours in.
    Bad records come back marked, never raised in a DataLoader worker (whose traceback would wrap
    the message); the loop stops at the first one unless skip_bad_samples is set."""
    def load():
        try:
            dataset = VLMDataset(cfg.data_path, cfg.image_folder, processor, cfg.template, cfg.max_seq_len,
                                 skip_bad_samples=True, image_paths_outside=cfg.image_paths_outside,
                                 video_frames=cfg.video_frames)
            dataset.check_first_images(every_one=not cfg.skip_bad_samples)
            return dataset
        except (ValueError, FileNotFoundError) as e:  # data.py's messages name the file / record
            raise UserError(str(e)) from None

    # Rank 0 converts the files and estimates the lengths (with anyres: one image header per record)
    # into the datasets cache; the other ranks then read that cache instead of all doing the same.
    dataset = run.rank0_first(load, rank)
    sampler = LengthGroupedSampler(dataset.lengths, dataset.has_image, cfg.batch_size, cfg.micro_batch_size,
                                   world_size, rank, cfg.seed, group_by_length=cfg.group_by_length)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.micro_batch_size, sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=make_collate(cfg, processor.tokenizer.pad_token_id, attention_for(cfg, device)),
        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.num_workers else None,
        worker_init_fn=run.ignore_stop_signals,
        # Each new iterator (every epoch, and once after a resume) draws its workers' seed: from a
        # generator of its own, not the global one that dropout (LoRA's) draws from, so a resumed run
        # continues the very dropout masks of the uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed + rank))
    return dataset, sampler, loader


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


def on_device(batch, device):
    """The batch's model inputs on the device; one it lacks (no images, no videos, packed rows' mask) stays None."""
    return {k: batch[k].to(device, non_blocking=True)
            for k in ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "image_sizes",
                      "pixel_values_videos") if batch.get(k) is not None}


# ----------------------------------------------------------------------------------------------
# 6. The run


def main(argv=None):
    # --- settings: the config, checked before anything starts
    cfg, dry_run = run.load_config(sys.argv[1:] if argv is None else argv)
    if not dry_run:
        run.use_one_process_without_launcher()
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    accumulation = run.check_config(cfg, world_size)
    log_rank0(rank, json.dumps(dataclasses.asdict(cfg), indent=1))
    if dry_run:
        return
    run.lock_out_dir(cfg, rank)  # a second run in this out_dir is refused until this one ends
    resume_tag = run.check_out_dir(cfg)

    # --- processes, model, data, engine
    device = run.start_processes(cfg)
    if cfg.make_demo:  # the demo's data and tiny backbones, made on first use (there is no download)
        run.rank0_first(lambda: make_demo_files(cfg.data_path, cfg.vision_model, cfg.llm, cfg.video_frames > 0), rank,
                        then_the_others=False)
    zero3_loading = partitioned_loading(cfg, accumulation)  # kept for the run: transformers looks it up
    model, processor = build_training_model(cfg, device)  # pretrained encoder + LLM + a fresh (or stage-1) connector
    dataset, sampler, loader = build_data(cfg, processor, device, world_size, rank)
    total_steps = run.count_steps(cfg, len(dataset), len(loader) // accumulation, resume_tag)
    if rank == 0:  # every check passed: only now does out_dir become this run's
        run.prepare_out_dir(cfg, fresh=resume_tag is None)
    dist.barrier()
    universal = run.prepare_universal_checkpoint(cfg, resume_tag, world_size, rank)  # resumed on another GPU count
    engine, optimizer, peak_lrs = build_engine(model, cfg, accumulation, rank, universal)
    step, epoch, samples_done = run.resume(engine, cfg, resume_tag, rank, world_size, universal)
    lockstep = run.Lockstep(cfg, device, world_size)  # bad records, non-finite losses, SIGTERM / Ctrl-C
    log = run.RunLog(cfg, model, device, total_steps)
    log_rank0(rank, f"{len(dataset)} records, {len(loader) // accumulation} steps/epoch, {total_steps} steps, "
                    f"{world_size} processes x {cfg.micro_batch_size} samples x {accumulation} accumulation")

    # --- the loop: `accumulation` micro-batches per rank make one optimizer step
    while step < total_steps:
        sampler.set_epoch(epoch)
        sampler.skip(samples_done)  # a resumed epoch goes on after the samples already trained
        for batch in loader:
            log.arrived(batch)
            batch = lockstep.batch_to_train(batch, processor.tokenizer.pad_token_id)  # after a failure: all-masked
            boundary = engine.is_gradient_accumulation_boundary()  # this micro-batch ends an optimizer step
            if boundary:
                set_lr(optimizer, peak_lrs, lr_factor(step, total_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
            loss = engine(**on_device(batch, device)).loss
            loss_value = loss.item()  # the one GPU sync per micro-batch
            lockstep.check_loss(loss_value, step, batch)
            engine.backward(loss)  # scales by 1/accumulation
            engine.step()  # steps the optimizer only at the accumulation boundary
            log.trained(batch, loss_value)
            if not boundary:
                continue

            # one optimizer step done: the ranks agree on how it went (and on the loss), then log and save
            step_loss, stop_asked = lockstep.agree_at_step_end(*log.take_step_loss())
            step, samples_done = step + 1, samples_done + cfg.batch_size
            log.step_done(step, epoch, step_loss, optimizer, engine)
            position = {"epoch": epoch, "samples_done": samples_done}
            if stop_asked or (cfg.save_every and step % cfg.save_every == 0 and step < total_steps):
                run.save_checkpoint(engine, cfg, step, position, rank)
            if stop_asked:  # SIGTERM or Ctrl-C reached some rank: saved, now every rank exits
                raise lockstep.stopped(step, cfg.out_dir)
            if step >= total_steps:
                break
        else:  # the epoch ran out
            log.epoch_done(epoch)
            epoch, samples_done = epoch + 1, 0

    # --- the end: a last checkpoint (to resume or extend) and the inference folder
    run.save_checkpoint(engine, cfg, step, {"epoch": epoch, "samples_done": samples_done}, rank)
    save_final(engine, processor, cfg, rank, log.summary(step))
    log.close()
    log_rank0(rank, f"done: {cfg.out_dir}/final (load with VLMForCausalLM.from_pretrained, or python eval.py)")


# ----------------------------------------------------------------------------------------------
# 7. Saving final/, the model to use (the checkpoints to resume from are run.save_checkpoint's)


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
        with run.writing(partial_dir, "; the last checkpoint is intact: continue with resume=True"):
            if cfg.lora_r:  # the adapters alone (to share), then folded in: final/ is a plain model
                state = dequantized(state, engine.module) if cfg.qlora else state
                save_adapters(state, cfg, os.path.join(partial_dir, "adapters"))
                state = merge_lora(state, engine.module)
            engine.module.save_pretrained(partial_dir, state_dict=state)
            processor.save_pretrained(partial_dir)
            run.write_json(os.path.join(partial_dir, "train_config.json"), dataclasses.asdict(cfg))
            run.write_json(os.path.join(partial_dir, "train_summary.json"), summary)
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
        run.write_json(os.path.join(where, "adapter_config.json"), {
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


if __name__ == "__main__":
    run.exit_after(main, hard=True)
