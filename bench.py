"""How fast is small-vlm? Its training step, data pipeline and generation, against transformers' LLaVA.

    python bench.py --preset tiny --stage pretrain finetune          # CPU, seconds
    python bench.py --preset llava7b --stage pretrain                # one GPU
    deepspeed --num_gpus 8 bench.py --preset llava7b --stage finetune --lengths realistic
    python bench.py --preset qwen1.5b --stage finetune --lengths realistic --pack --attn flex_attention
    python bench.py --preset llava7b --stage finetune --lengths realistic --padding   # no model
    python bench.py --preset llava7b --data                          # image + text pipeline, per worker
    python bench.py --preset llava7b --generate --batch_size 8 --max_new_tokens 128

Both systems get random weights at real shapes (nothing is downloaded), the same frozen/trainable
split, the same DeepSpeed config and param groups (train.py's functions), the same batches. Each
measured system prints one JSON line, then a line of ours/peer ratios.

Read top to bottom: presets, the two models, batches, the training step, the data pipeline,
generation, setup and main.
"""
import argparse
import gc
import importlib.util
import json
import os
import socket
import statistics
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

import run
import train
from data import DEMO_SCRIPT, LengthGroupedSampler, collate, tokenize_conversation
from model import IGNORE_INDEX, VLMConfig, VLMForCausalLM, VLMImageProcessor, VLMProcessor, add_image_token
from push import LLAVA_NAMES, llava_config, rename_to_llava

OURS, PEER = "small-vlm", "transformers-llava"

# ----------------------------------------------------------------------------------------------
# Presets: real shapes. CLIP ViT-L/14-336 gives (336 / 14)^2 = 576 image tokens (CLS dropped).

CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, patch_size=14, image_size=336, projection_dim=768)
PRESETS = {
    "llava7b": (CLIP_L_336, dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)),
    "qwen1.5b": (CLIP_L_336, dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                  num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                  tie_word_embeddings=True)),
    # (56 / 14)^2 = 16 image tokens, two layers each: a CPU step takes milliseconds
    "tiny": (dict(CLIP_L_336, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  image_size=56, projection_dim=64),
             dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=256, vocab_size=512)),
}


def vlm_config(preset, attn="sdpa"):
    """LLaVA-1.5's architecture: second-to-last layer, CLS dropped, mlp2x_gelu. The last vocabulary
    id stands in for <image> (llava-hf appends it to the vocabulary instead; the cost is the same)."""
    vision, text = PRESETS[preset]
    return VLMConfig(vision_config=vision, text_config=dict(text, max_position_embeddings=4096),
                     image_token_id=text["vocab_size"] - 1,
                     num_image_tokens=(vision["image_size"] // vision["patch_size"]) ** 2,
                     connector="mlp2x_gelu", vision_feature_layer=-2, drop_cls=True, attn_implementation=attn)


# ----------------------------------------------------------------------------------------------
# The two models, built directly on the device in the run's dtype (no slow fp32 init on the CPU)


def build_model(system, config, device, dtype):
    """Ours from VLMConfig; the peer from the equivalent LlavaConfig (push.py's llava_config)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            if system == OURS:
                return VLMForCausalLM(config)
            peer_config = llava_config(config)
            peer_config._attn_implementation = config._attn_implementation  # the same attention for both
            return LlavaForConditionalGeneration(peer_config)
    finally:
        torch.set_default_dtype(default)


def with_our_names(peer):
    """The peer's parameters under our names (push.LLAVA_NAMES read backwards: model.vision_tower ->
    vision_tower, model.multi_modal_projector -> connector, the rest -> language_model), and its
    vision tower, so train.prepare_for_training and train.build_param_groups treat both models alike."""
    def named_parameters():
        for name, p in peer.named_parameters():
            ours, theirs = next((o, t) for o, t in LLAVA_NAMES if name.startswith(t))
            yield ours + name[len(theirs):], p
    return SimpleNamespace(named_parameters=named_parameters, vision_tower=peer.model.vision_tower)


# ----------------------------------------------------------------------------------------------
# Batches: fixed lengths, or a mix drawn like LLaVA's data, padded per micro-batch as collate does

# (share, images, text tokens from-to (log-uniform), turns from-to, share of text supervised)
MIXES = {
    "pretrain": [(1.00, 1, 15, 80, 1, 1, 0.95)],  # 558K: one caption per image, all of it supervised
    "finetune": [(0.50, 1, 40, 250, 1, 6, 0.15),  # 665K: short-answer VQA (VQAv2, GQA, OCR-VQA, RefCOCO)
                 (0.32, 1, 150, 700, 1, 4, 0.70),  # LLaVA-Instruct conversations, detailed descriptions
                 (0.12, 1, 700, 1450, 4, 12, 0.60),  # long multi-turn conversations (up to ~2K tokens)
                 (0.06, 0, 100, 2000, 1, 8, 0.65)],  # ShareGPT text-only records
}
MAX_SEQ_LEN = run.Config.max_seq_len  # 2048


def draw_records(stage, lengths, config, n, seed):
    """n records as {"images": 0|1, "text": tokens, "turns": int, "answer": supervised share}."""
    if lengths == "fixed":  # pretrain 576 + 40 = 616 tokens; finetune 1024 tokens
        text = 40 if stage == "pretrain" else 1024 - config.num_image_tokens
        return [{"images": 1, "text": text, "turns": 1 if stage == "pretrain" else 3,
                 "answer": 0.95 if stage == "pretrain" else 0.4}] * n
    rng, mix = np.random.default_rng(seed), MIXES[stage]
    records = []
    for kind in rng.choice(len(mix), size=n, p=[m[0] for m in mix]):
        _, images, low, high, turns_low, turns_high, answer = mix[kind]
        text = int(np.exp(rng.uniform(np.log(low), np.log(high))))
        text = min(text, MAX_SEQ_LEN - images * config.num_image_tokens)
        records.append({"images": images, "text": text, "answer": answer,
                        "turns": int(rng.integers(turns_low, turns_high + 1))})
    return records


def make_sample(record, index, config, seed):
    """input_ids = [BOS, <image> x P, turn 1 question, turn 1 answer, ...]; labels = the answers."""
    rng = np.random.default_rng([seed, index])
    vocab, P = config.text_config.vocab_size, config.num_image_tokens
    text = rng.integers(3, vocab - 1, size=record["text"])  # any id but <image> (vocab - 1)
    labels = np.full(record["text"], IGNORE_INDEX)
    bounds = np.linspace(1, record["text"], record["turns"] + 1).astype(int)  # turn starts (after BOS)
    for begin, end in zip(bounds[:-1], bounds[1:]):
        answer = max(1, round((end - begin) * record["answer"]))
        labels[end - answer:end] = text[end - answer:end]
    image = np.full(P * record["images"], config.image_token_id)
    size = config.vision_config.image_size
    return {"id": str(index),
            "input_ids": torch.tensor(np.concatenate([text[:1], image, text[1:]])),  # (T,)
            "labels": torch.tensor(np.concatenate([labels[:1], np.full(len(image), IGNORE_INDEX), labels[1:]])),
            "pixel_values": torch.randn(record["images"], 3, size, size),  # (n, 3, H, W)
            "image_sizes": torch.full((record["images"], 2), size)}  # (n, 2)


def make_batches(stage, args, config, world_size, rank):
    """This rank's warmup + steps micro-batches as lists of samples, chosen by train.py's sampler
    (length grouping on); each system collates them its own way (bench_train)."""
    n_batches = args.warmup + args.steps
    records = draw_records(stage, args.lengths, config, max(2000, 4 * n_batches * args.micro_batch_size * world_size),
                           args.seed)
    lengths = [r["images"] * config.num_image_tokens + r["text"] for r in records]
    sampler = LengthGroupedSampler(lengths, [r["images"] > 0 for r in records], args.micro_batch_size * world_size,
                                   args.micro_batch_size, world_size, rank, args.seed)
    mine = list(sampler)[:n_batches * args.micro_batch_size]  # this rank's samples, in training order
    return [[make_sample(records[i], i, config, args.seed) for i in mine[k:k + args.micro_batch_size]]
            for k in range(0, len(mine), args.micro_batch_size)]


# ----------------------------------------------------------------------------------------------
# The training step: forward, backward, optimizer step, as train.py runs it


def stage_config(stage, args, env, system):
    """run.Config for the stage: pretrain trains the connector; finetune the connector and the LLM.
    --pack and --compile are our levers (pack_samples, compile); the peer runs as transformers ships it."""
    ours = system == OURS
    return run.Config(train_lm=stage == "finetune", micro_batch_size=args.micro_batch_size,
                        batch_size=args.micro_batch_size * env.world_size, zero_stage=args.zero_stage,
                        offload=args.offload, precision=env.settings["precision"],
                        gradient_checkpointing=not args.no_grad_ckpt, pack_samples=args.pack and ours,
                        compile=args.compile and ours)


def model_flops(config, cfg):
    """train.py's (FLOPs per LLM position, per image) for this stage's trainable split, counted on a
    weightless (meta) copy of our model; both systems do this same useful work."""
    model = build_model(OURS, config, torch.device("meta"), torch.float32)
    train.freeze_components(model, cfg)
    return run.flops_per_token_and_image(model)


def bench_train(system, stage, args, config, samples, env):
    """Throughput of one system over the measured micro-batches; an out-of-memory run is a result
    too. Unpacked, every sample is padded to the longest in its micro-batch."""
    cfg = stage_config(stage, args, env, system)
    settings = {"system": system, "mode": "train", "stage": stage, **env.settings, "lengths": args.lengths,
                "micro_batch_size": args.micro_batch_size, "grad_ckpt": cfg.gradient_checkpointing,
                "zero_stage": args.zero_stage, "offload": args.offload, "packed": cfg.pack_samples,
                "compiled": cfg.compile, "attn_implementation": config._attn_implementation,
                "trains": "connector" if stage == "pretrain" else "connector+lm"}
    collate_batch = train.make_collate(cfg, 0, config._attn_implementation)  # flash_attention_2 packs one row
    batches = [collate_batch(s) for s in samples]
    try:
        return settings | measure_train_steps(system, cfg, config, batches, env)
    except torch.OutOfMemoryError as e:
        error = f"out of memory: {str(e).splitlines()[0]}"
    gc.collect()  # the failed engine went with the exception: free its memory for the next system
    torch.cuda.empty_cache()
    return settings | {"error": error}


def measure_train_steps(system, cfg, config, batches, env):
    """Warm-up steps, then the measured ones, each timed from forward to the end of the optimizer step."""
    import deepspeed

    model = build_model(system, config, env.device, env.dtype)
    names = model if system == OURS else with_our_names(model)
    train.prepare_for_training(model, cfg, names)  # as train.py does: modes, checkpointing, compiled blocks
    optimizer = train.make_optimizer(train.build_param_groups(names, cfg), cfg)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=train.deepspeed_config(cfg, accumulation=1))
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per_token, per_image = model_flops(config, cfg)
    warmup = len(batches) - env.settings["steps"]
    times, totals = [], [0.0, 0.0, 0.0, 0.0]  # samples, tokens, real, FLOPs
    for step, batch in enumerate(batches):
        inputs = {k: batch[k].to(env.device) if batch[k] is not None else None
                  for k in ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values")}
        start = time.perf_counter()
        loss = engine(**inputs).loss
        engine.backward(loss)
        engine.step()
        loss = loss.item()  # waits for the GPU
        if step < warmup:
            continue
        times.append(time.perf_counter() - start)
        real = batch["num_tokens"]
        images = 0 if batch["pixel_values"] is None else len(batch["pixel_values"])
        for i, value in enumerate((len(batch["ids"]), batch["input_ids"].numel(), real,
                                   per_token * real + per_image * images)):
            totals[i] += value
    # over ranks: every rank ran its own micro-batches
    samples, tokens, real, flops = run.sum_over_ranks(totals, env.device)
    memory = torch.cuda.max_memory_allocated() / 2**30 if env.device.type == "cuda" else None
    engine.destroy()
    del engine, optimizer, model, names
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    # Lengths may differ per step (--lengths realistic), so rates are totals over the summed time.
    seconds = sum(times)
    return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "real_tokens_per_s": real / seconds,
            "model_tflops": flops / seconds / env.world_size / 1e12,  # per device
            "mfu": flops / seconds / (env.world_size * env.peak) if env.peak else None,
            "peak_memory_gb": memory, "step_s_median": statistics.median(times), "last_loss": loss,
            "padding": 1 - real / tokens, "mean_seq_len": real / samples}


def bench_padding(args, config):
    """No model: the share of computed positions that are padding for the stage's length mix, with
    length-grouped or random micro-batches, padded or packed (train.py's group_by_length and
    pack_samples). One JSON line per stage and combination."""
    for stage in args.stage:
        records = draw_records(stage, args.lengths, config, 20000, args.seed)
        lengths = [r["images"] * config.num_image_tokens + r["text"] for r in records]
        n = args.micro_batch_size or LLAVA_MICRO_BATCH[stage]
        for grouped in (True, False):
            sampler = LengthGroupedSampler(lengths, [r["images"] > 0 for r in records], n, n, seed=args.seed,
                                           group_by_length=grouped)
            order = list(sampler)
            for pack in (False, True):
                real = computed = 0
                for k in range(0, len(order), n):  # token ids stand in for samples: only lengths matter here
                    samples = [{"id": i, "input_ids": torch.zeros(lengths[i], dtype=torch.long),
                                "labels": torch.zeros(lengths[i], dtype=torch.long),
                                "pixel_values": torch.zeros(0, 3, 1, 1), "image_sizes": torch.zeros(0, 2)}
                               for i in order[k:k + n]]
                    batch = collate(samples, pad_token_id=0, pack_length=MAX_SEQ_LEN if pack else 0)
                    real, computed = real + batch["num_tokens"], computed + batch["input_ids"].numel()
                print(json.dumps({"mode": "padding", "stage": stage, "lengths": args.lengths, "micro_batch_size": n,
                                  "group_by_length": grouped, "pack_samples": pack, "padding": 1 - real / computed,
                                  "computed_per_sample": computed / len(order)}), flush=True)


# ----------------------------------------------------------------------------------------------
# The data pipeline alone: JPEG decode, pad to square, resize, normalize, tokenize, collate


def demo_prepare():
    """data/demo/prepare.py as a module (a script in the data folder, not a package): its tiny tokenizer."""
    spec = importlib.util.spec_from_file_location("prepare", DEMO_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_photos(folder, n=16, seed=0):
    """n 640x480 JPEGs with photo-like content: smooth colour fields (upsampled noise) plus grain."""
    rng, paths = np.random.default_rng(seed), []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        grain = rng.normal(0, 12, (480, 640, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        paths.append(os.path.join(folder, f"photo_{i}.jpg"))
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def expand2square(image, background):
    """LLaVA's expand2square: the image centred on a square canvas of the mean colour."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def bench_data(args, config, env):
    """Samples/s of one worker (one thread, as in a DataLoader worker) for both image processors,
    with the same tokenization (vicuna_v1 template) and collate; only the image path differs."""
    from transformers import CLIPImageProcessorPil  # the torchvision-free variant (no torchvision here)

    torch.set_num_threads(1)
    size = config.vision_config.image_size
    tokenizer = demo_prepare().make_tiny_tokenizer()  # a tiny byte-level BPE: no download; the same for both systems
    add_image_token(tokenizer)
    ours = VLMImageProcessor(size=size, aspect="pad")
    processor = VLMProcessor(ours, tokenizer, num_image_tokens=config.num_image_tokens)
    peer = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    background = tuple(int(m * 255) for m in peer.image_mean)
    to_pixels = {OURS: ours.transform,  # PIL image -> (1, 3, S, S)
                 PEER: lambda image: peer(expand2square(image, background), return_tensors="pt")["pixel_values"]}
    conversation = [{"from": "human", "value": "<image>\nWhat is in the image? Describe the photo."},
                    {"from": "gpt", "value": "The quick brown fox jumps over the lazy dog. " * 4}]

    def load_sample(path, system):
        with Image.open(path) as image:
            image = image.convert("RGB")  # the JPEG decode
        input_ids, labels = tokenize_conversation(conversation, "vicuna_v1", processor, MAX_SEQ_LEN)
        return {"id": path, "input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                "pixel_values": to_pixels[system](image), "image_sizes": torch.tensor([[image.height, image.width]])}

    results, pixels, n = {}, {}, args.micro_batch_size
    with tempfile.TemporaryDirectory() as folder:
        paths = write_photos(folder)
        for system in (OURS, PEER):
            times = []
            for step in range(args.warmup + args.steps):
                start = time.perf_counter()
                batch = collate([load_sample(paths[(step * n + i) % len(paths)], system) for i in range(n)], 0)
                times.append(time.perf_counter() - start)
            pixels[system] = batch["pixel_values"]  # (B, 3, S, S): to check that both did the same work
            seconds = sum(times[args.warmup:])
            results[system] = {"system": system, "mode": "data", "samples_per_s": args.steps * n / seconds,
                               "image_processor": type(ours if system == OURS else peer).__name__,
                               "image": "640x480 JPEG", "image_size": size, "micro_batch_size": n, **env.settings}
    return results, {"max_pixel_difference": float((pixels[OURS] - pixels[PEER]).abs().max())}


# ----------------------------------------------------------------------------------------------
# Generation: batched greedy decoding with the same weights


def bench_generate(args, config, env):
    """New tokens/s of each model's generate; the peer gets our weights (push.py's renaming)."""
    ours = build_model(OURS, config, env.device, env.dtype).eval()
    peer = build_model(PEER, config, env.device, env.dtype).eval()
    peer.load_state_dict(rename_to_llava(ours.state_dict()))
    prompt = {"images": 1, "text": 24, "turns": 1, "answer": 0.0}  # [BOS, <image> x P, 23 question tokens]
    batch = collate([make_sample(prompt, i, config, args.seed) for i in range(args.batch_size)], pad_token_id=0)
    inputs = {k: batch[k].to(env.device) for k in ("input_ids", "attention_mask", "pixel_values")}  # (B, 24 + P)
    results, tokens = {}, {}
    for system, model in ((OURS, ours), (PEER, peer)):
        times = []
        for step in range(args.warmup + args.steps):
            start = time.perf_counter()
            with torch.no_grad():  # no EOS in the config: every row runs to max_new_tokens
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        tokens[system] = out[:, inputs["input_ids"].shape[1]:]  # (B, max_new_tokens)
        median = statistics.median(times[args.warmup:])
        results[system] = {"system": system, "mode": "generate", "tokens_per_s": tokens[system].numel() / median,
                           "s_median": median, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                           "prompt_len": inputs["input_ids"].shape[1], **env.settings}
    # bf16 rounding can flip a near-tie, after which greedy paths part: expect close to 1, not exactly 1
    return results, {"same_tokens": float((tokens[OURS] == tokens[PEER]).float().mean())}


# ----------------------------------------------------------------------------------------------
# Setup and main


LLAVA_MICRO_BATCH = {"pretrain": 32, "finetune": 16}  # LLaVA-1.5 per GPU: 256 / 8 GPUs, 128 / 8 GPUs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark small-vlm against transformers' LLaVA.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--stage", nargs="+", choices=("pretrain", "finetune"), default=["pretrain"],
                        help="pretrain: the connector trains; finetune: connector + LLM (one or both)")
    parser.add_argument("--lengths", choices=("fixed", "realistic"), default="fixed",
                        help="fixed: 616 (pretrain) / 1024 (finetune) tokens; realistic: a LLaVA-like mix")
    parser.add_argument("--micro_batch_size", type=int, default=None,
                        help="samples per device per step (default: LLaVA-1.5's, 32 pretrain / 16 finetune)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    parser.add_argument("--no-grad-ckpt", dest="no_grad_ckpt", action="store_true",
                        help="keep activations instead of recomputing them in backward")
    parser.add_argument("--pack", action="store_true",
                        help="ours packs each micro-batch into rows of up to 2048 tokens (train.py's pack_samples)")
    parser.add_argument("--compile", action="store_true",
                        help="ours compiles each transformer block (train.py's compile=True)")
    parser.add_argument("--attn", choices=run.CHOICES["attn_implementation"], default="sdpa",
                        help="attention implementation of both systems (train.py's attn_implementation)")
    parser.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), default=2)
    parser.add_argument("--offload", action="store_true", help="ZeRO optimizer state in CPU memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--padding", action="store_true",
                        help="no model: padding share with/without length grouping and packing")
    parser.add_argument("--data", action="store_true", help="benchmark the data pipeline alone")
    parser.add_argument("--generate", action="store_true", help="benchmark batched greedy generation")
    parser.add_argument("--batch_size", type=int, default=8, help="--generate: prompts per batch")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="--generate: tokens per prompt")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # from the launcher
    args = parser.parse_args(argv)
    if args.attn in ("flex_attention", "flash_attention_2") and not torch.cuda.is_available():
        parser.error(f"--attn {args.attn} needs a GPU; on the CPU use sdpa or eager")
    return args


def setup(args):
    """One process group (a single-process one without the deepspeed launcher), the device, and
    the settings every JSON line carries."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:  # no launcher: a group of one, on a free port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = run.device_peak_flops()  # per device, dense bf16 (run.PEAK_BF16_FLOPS), None on CPU
    world_size = int(os.environ["WORLD_SIZE"])
    settings = {"preset": args.preset, "device": torch.cuda.get_device_name() if cuda else "cpu",
                "peak_tflops": peak / 1e12 if peak else None, "world_size": world_size,
                "precision": "bf16" if cuda else "fp32", "steps": args.steps, "warmup": args.warmup}
    return SimpleNamespace(device=device, dtype=torch.bfloat16 if cuda else torch.float32, peak=peak,
                           world_size=world_size, rank=int(os.environ["RANK"]), settings=settings)


def report(env, results, extra=None):
    """On rank 0: each system's line, then ours / peer for every rate both have (above 1: small-vlm
    is faster, or for memory, uses more)."""
    keys = ("samples_per_s", "tokens_per_s", "real_tokens_per_s", "model_tflops", "peak_memory_gb")
    ours, peer = results[OURS], results[PEER]
    ratio = {"ratio": f"{OURS} / {PEER}", "mode": ours["mode"], **({"stage": ours["stage"]} if "stage" in ours else {}),
             **{k: ours[k] / peer[k] for k in keys if ours.get(k) and peer.get(k)}, **(extra or {})}
    if env.rank == 0:
        for line in (ours, peer, ratio):
            print(json.dumps(line), flush=True)


def main(argv=None):
    args = parse_args(argv)
    config = vlm_config(args.preset, args.attn)
    if args.padding:
        return bench_padding(args, config)
    env = setup(args)
    if args.data or args.generate:
        args.micro_batch_size = args.micro_batch_size or 16
        report(env, *(bench_data if args.data else bench_generate)(args, config, env))
        return
    for stage in args.stage:
        stage_args = argparse.Namespace(**vars(args))
        stage_args.micro_batch_size = args.micro_batch_size or LLAVA_MICRO_BATCH[stage]
        batches = make_batches(stage, stage_args, config, env.world_size, env.rank)  # the same for both systems
        report(env, {system: bench_train(system, stage, stage_args, config, batches, env) for system in (OURS, PEER)})


if __name__ == "__main__":
    main()
