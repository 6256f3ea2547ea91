"""What only a GPU shows, in one command (under 8 minutes on one H200; `bash tests/gpu_check.sh` on the
device machine installs the wheels first and keeps the log and figures):

    python -m pytest tests/test_gpu.py -vv -s      # -vv: test names (pytest.ini adds -q); -s: the figures

1. `python train.py` at bf16 without the launcher trains (it used to die at the first optimizer step:
   a CPU tensor all-reduced over NCCL). 2. `deepspeed --num_gpus 1` trains under ZeRO-2 and ZeRO-3.
3. SIGTERM, then resume=True under ZeRO-2, gives the uninterrupted run's per-step losses. 4. A packed
micro-batch gives the padded loss with sdpa, flex_attention and flash_attention_2. 5. Gradient
checkpointing lowers peak GPU memory. 6. AnyRes at the real tile size (336 px, patch 14), and a
32-frame clip at it. 7. eval.py and push.py --format llava on a GPU-trained model. 8. One bench.py pretrain measurement. 9. LoRA under
ZeRO-3; QLoRA trains, its bf16 final/ computes what the 4-bit model did, and its memory against LoRA
and the full finetune (tests/lora_memory.py).
Every figure (losses, memory, samples/s) is printed as a JSON line and appended at once to
$SMALL_VLM_FIGURES when it is set.

Without CUDA every test is skipped. SMALL_VLM_GPU_TESTS_ON_CPU=1 runs the same tests on the CPU in fp32
with small shapes, skipping what needs CUDA (flash_attention_2 and flex_attention, the memory
figures), so that the tests themselves can be checked on a machine without a GPU.
"""
import json
import math
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import run
import train
from conftest import (ROOT, last_step, launch, read_metrics, read_weights, smooth_image, stop_job, supervise_text,
                      train_args, wait_for)
from data import VLMDataset, collate
from prepare import make_tiny_backbones
from model import IGNORE_INDEX, build_vlm
CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("SMALL_VLM_GPU_TESTS_ON_CPU") != "1",
                                reason="needs a CUDA GPU (SMALL_VLM_GPU_TESTS_ON_CPU=1 checks these tests on the CPU)")

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
PRECISION = "bf16" if CUDA else "fp32"
# A resumed run repeats the uninterrupted one's computation: equal up to the order of float sums,
# which GPU kernels need not keep from one run to the next.
RESUME_TOLERANCE = 1e-3 if CUDA else 1e-6
# Packed and padded batches compute the same sums in other shapes: bf16 rounding (<1e-4 measured on
# the CPU in bf16) on the GPU, fp32 rounding on the CPU.
PACKING_TOLERANCE = 2e-3 if CUDA else 1e-4


def report(figure, **values):
    """One figure as a JSON line: printed (pytest -s shows it) and appended at once to
    $SMALL_VLM_FIGURES, so a device run that is cut short keeps what it measured."""
    line = json.dumps({"figure": figure, "device": torch.cuda.get_device_name() if CUDA else "cpu", **values})
    print(line, flush=True)
    if os.environ.get("SMALL_VLM_FIGURES"):
        with open(os.environ["SMALL_VLM_FIGURES"], "a") as f:
            f.write(line + "\n")


def run_script(*args, timeout=300):
    """`python SCRIPT ARGS` in the project root, without launcher variables (one process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def demo_args(demo_dir, out, *overrides):
    """conftest's few-step run on the small demo, at this machine's precision (bf16 on a GPU)."""
    return train_args(demo_dir, out, f"precision={PRECISION}", *overrides)


def assert_trained(out, output, steps):
    """Every step logged a finite loss, the last below the first, and final/ was written. Returns {step: loss}."""
    losses = read_metrics(out)
    assert sorted(losses) == list(range(1, steps + 1)), output[-3000:]
    assert all(math.isfinite(loss) for loss in losses.values()) and losses[steps] < losses[1], losses
    assert (out / "final" / "model.safetensors").exists()
    return losses


# ---------------------------------------------------------------------------------------------
# Training runs: train.py without and with the launcher, and a pre-emption


@pytest.fixture(scope="module")
def plain_run(demo_dir, tmp_path_factory):
    """`python train.py` on the small demo (6 steps of 8 samples, all three parts train): test 1's run,
    which eval.py and push.py then use (test 7)."""
    out = tmp_path_factory.mktemp("plain") / "run"
    return out, run_script("train.py", *demo_args(demo_dir, out))


ZERO2 = ("zero_stage=2", "max_steps=16", "save_every=4", "num_workers=1")  # steps enough to stop it midway


@pytest.fixture
def zero2_run(reference_run):
    """An uninterrupted ZeRO-2 run through the launcher (conftest's shared reference runs): test 2's
    run and test 3's reference."""
    return reference_run(f"precision={PRECISION}", *ZERO2, procs=1)


def test_python_train_py_at_bf16_without_the_launcher(plain_run):
    """One process, no launcher, NCCL: the run that died at its first optimizer step with "No backend
    type associated with device type cpu" (a CPU tensor all-reduced over NCCL)."""
    out, run = plain_run
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "1 processes x 4 samples x 2 accumulation" in run.stdout
    report("python train.py, demo, 6 steps", precision=PRECISION, losses=assert_trained(out, run.stdout, steps=6))


def test_launcher_trains_under_zero2_and_zero3(zero2_run, demo_dir, tmp_path):
    """`deepspeed --num_gpus 1 train.py`, bf16: 16 steps under ZeRO-2, 4 under ZeRO-3."""
    zero3 = tmp_path / "zero3"
    zero3_run = launch(demo_args(demo_dir, zero3, "zero_stage=3", "max_steps=4"))
    assert zero3_run.returncode == 0, zero3_run.out[-3000:]
    for stage, out, output, steps in ((2, zero2_run.out, zero2_run.output, 16), (3, zero3, zero3_run.out, 4)):
        report(f"deepspeed --num_gpus 1, ZeRO-{stage}", precision=PRECISION, losses=assert_trained(out, output, steps))


def test_sigterm_then_resume_under_zero2_gives_the_uninterrupted_losses(zero2_run, demo_dir, tmp_path):
    """test_reliability.py's SIGTERM test on the GPU: stopped after step 3 or later, then resumed; every
    step's loss is the uninterrupted run's (the ZeRO-2 run of test 2)."""
    out = tmp_path / "run"
    args = demo_args(demo_dir, out, *ZERO2)
    proc = launch(args, wait=False)
    wait_for(lambda: last_step(out) >= 3, proc)
    output = stop_job(proc, signal.SIGTERM, out)  # to every process of the job, as SLURM does before pre-emption
    assert proc.returncode != 0 and "SIGTERM: saved step" in output, output[-3000:]
    saved = int((out / "checkpoints" / "latest").read_text()[len("step"):])
    run = launch([*args, "resume=true"])
    assert run.returncode == 0 and f"at step {saved}" in run.out, run.out[-3000:]
    expected, resumed = zero2_run.losses, read_metrics(out)
    assert sorted(resumed) == sorted(expected)
    worst = max(abs(resumed[step] - expected[step]) for step in expected)
    report("SIGTERM, then resume=True, ZeRO-2", stopped_after_step=saved, max_loss_difference=worst)
    assert worst <= RESUME_TOLERANCE, (resumed, expected)


# ---------------------------------------------------------------------------------------------
# Packing per attention implementation: the loss of a packed micro-batch is the padded one's


def attention_unusable(attn):
    """Why `attn` cannot run here, or None."""
    from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

    if attn == "sdpa":
        return None
    if attn == "flex_attention":
        if not CUDA:
            return "flex_attention runs on CUDA only here (torch's CPU compiler fails on its kernel)"
        return None if is_torch_flex_attn_available() else "this torch has no flex_attention"
    if not CUDA:
        return "flash_attention_2 needs CUDA (flash-attn)"
    return None if is_flash_attn_2_available() else "flash-attn is not installed (pip install flash-attn)"


def packing_model(demo_dir, attn):
    """The demo backbones with `attn`, attention outputs x10. A random model attends almost uniformly,
    and its attention adds little to the residual stream, so a token that also sees another sample's
    tokens moves the loss by only ~3e-3; x10 makes that ~2e-2, far above bf16 rounding (<1e-4)."""
    torch.manual_seed(0)
    model, processor = build_vlm(f"{demo_dir}/backbones/tiny-clip", f"{demo_dir}/backbones/tiny-llama", dtype=DTYPE,
                                 attn_implementation=attn)
    with torch.no_grad():
        for layer in model.language_model.get_decoder().layers:
            layer.self_attn.o_proj.weight.mul_(10)
    return model.to(DEVICE).eval(), processor


def loss_of(model, batch):
    """The loss of a collated batch, given to the model as train.py gives it."""
    inputs = {k: batch[k].to(DEVICE) if batch[k] is not None else None
              for k in ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "image_sizes")}
    with torch.no_grad():
        return model(**inputs).loss.item()


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention", "flash_attention_2"])
def test_packed_micro_batch_gives_the_padded_loss(demo_dir, attn):
    """Rows of several samples: sdpa and flex_attention get a block-diagonal mask from the position_ids
    that restart at 0 per sample, for any number of rows; flash_attention_2 gets per-sample attention
    from them only when the batch is one row, so train.make_collate packs it into one."""
    reason = attention_unusable(attn)
    if reason:
        pytest.skip(reason)
    model, processor = packing_model(demo_dir, attn)
    dataset = VLMDataset(f"{demo_dir}/finetune.json", f"{demo_dir}/images", processor, "vicuna_v1", max_seq_len=512)
    samples = [dataset[i] for i in range(6)]
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) > 1, lengths
    pad = processor.tokenizer.pad_token_id
    cfg = run.Config(pack_samples=True, max_seq_len=max(lengths) + min(lengths))  # rows of 2 or 3 samples
    padded = collate(samples, pad)  # one sample per row, right-padded, attention_mask
    packed = train.make_collate(cfg, pad, attn)(samples)
    rows = len(packed["input_ids"])
    assert packed["attention_mask"] is None  # attention comes from the position_ids alone
    assert packed["labels"].ne(IGNORE_INDEX).sum() == padded["labels"].ne(IGNORE_INDEX).sum()  # the same targets
    if attn == "flash_attention_2":
        assert rows == 1
        leaky = collate(samples, pad, cfg.max_seq_len)  # several rows: flash-attn attends across a row's samples
        assert 2 <= len(leaky["input_ids"]) < len(samples)
    else:
        assert 2 <= rows < len(samples)
        # positions that run on through the row: one causal sequence per row, samples see each other
        leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand(rows, -1))
    losses = {name: loss_of(model, batch) for name, batch in (("padded", padded), ("packed", packed),
                                                              ("leaky", leaky))}
    report(f"packing, {attn}", samples=len(samples), packed_rows=rows, leaky_rows=len(leaky["input_ids"]), **losses)
    assert abs(losses["packed"] - losses["padded"]) <= PACKING_TOLERANCE, losses
    assert abs(losses["leaky"] - losses["padded"]) > 5 * PACKING_TOLERANCE, losses  # the test sees a leak


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing memory, AnyRes at the real scale


def stage1_step(vision, llm, checkpointing, shape):
    """One forward + backward of the stage-1 model train.py builds (the connector trains, gradients
    flow through the frozen LLM): (loss, peak GiB allocated above what was allocated before; None on CPU)."""
    cfg = run.Config(vision_model=vision, llm=llm, template="plain", precision=PRECISION,
                       gradient_checkpointing=checkpointing)
    torch.manual_seed(0)  # the same fresh connector in both runs
    model, processor = train.build_training_model(cfg, DEVICE)
    model.to(DEVICE)
    image_tokens = model.config.num_image_tokens
    ids = torch.randint(10, 400, (shape.batch, shape.length))
    ids[:, 1:1 + image_tokens] = processor.image_token_id
    labels = ids.masked_fill(torch.arange(shape.length) < 1 + image_tokens, IGNORE_INDEX)
    pixels = torch.randn(shape.batch, 3, 64, 64)
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if CUDA else 0
    loss = model(input_ids=ids.to(DEVICE), labels=labels.to(DEVICE), pixel_values=pixels.to(DEVICE)).loss
    loss.backward()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if CUDA else None
    del model
    if CUDA:
        torch.cuda.empty_cache()
    return loss.item(), peak


def test_gradient_checkpointing_lowers_peak_memory(tmp_path):
    """tests/checkpointing_memory.py's shape (8 layers of width 1024, 8 x 1024 tokens) on the GPU; on the
    CPU a small one, and only the losses are compared (there is no memory counter)."""
    shape = SimpleNamespace(layers=8, width=1024, batch=8, length=1024) if CUDA else \
        SimpleNamespace(layers=2, width=64, batch=2, length=128)
    vision, llm = make_tiny_backbones(str(tmp_path), image_size=64, patch_size=8, vision_width=256 if CUDA else 32,
                                      llm_width=shape.width, layers=shape.layers)
    loss_on, peak_on = stage1_step(vision, llm, True, shape)
    loss_off, peak_off = stage1_step(vision, llm, False, shape)
    report("gradient checkpointing, stage 1, one forward + backward", **vars(shape), precision=PRECISION,
           peak_gib_checkpointing=peak_on, peak_gib_without=peak_off, loss=loss_on)
    assert loss_on == pytest.approx(loss_off, rel=1e-5)  # recomputing changes the memory, not the result
    if CUDA:
        assert peak_on < 0.75 * peak_off, (peak_on, peak_off)


def test_anyres_at_the_real_tile_size(tmp_path):
    """336 px tiles of 14 px patches (a tiny-width tower and LLM): a 640x480 photo is a 2x2 grid + the
    base tile, 576 + 36 rows x (48 + newline) = 2,340 image tokens; forward + backward."""
    vision, llm = make_tiny_backbones(str(tmp_path), image_size=336, patch_size=14, vision_width=32, llm_width=64)
    model, processor = build_vlm(vision, llm, image_aspect="anyres", dtype=DTYPE)
    model.to(DEVICE).train()
    batch = processor(text=["<image>\nWhat is in the photo? Smooth bands of colour."], images=[smooth_image(640, 480)])
    image_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
    assert image_tokens == 2340 and tuple(batch["pixel_values"].shape) == (5, 3, 336, 336)
    labels = supervise_text(batch, processor.image_token_id)
    loss = model(**{k: v.to(DEVICE) for k, v in batch.items()}, labels=labels.to(DEVICE)).loss
    loss.backward()
    report("anyres 640x480 at 336/14", image_tokens=image_tokens, tokens=batch["input_ids"].shape[1],
           dtype=str(DTYPE), loss=loss.item())
    assert math.isfinite(loss.item())
    assert torch.isfinite(model.image_newline.grad).all() and model.image_newline.grad.abs().sum() > 0


def test_video_at_the_real_frame_size(tmp_path):
    """LLaVA-NeXT-Video's clip (32 frames of 336 px, 14 px patches; a tiny-width tower and LLM): 32 x 144
    = 4,608 video tokens, pooled in the model's dtype; forward + backward, and the pooled features
    within bf16 rounding of an fp32 run's."""
    vision, llm = make_tiny_backbones(str(tmp_path), image_size=336, patch_size=14, vision_width=32, llm_width=64)
    model, processor = build_vlm(vision, llm, image_aspect="anyres", dtype=DTYPE, video_frames=32)
    model.to(DEVICE).train()
    frames = [smooth_image(480, 360, seed=i) for i in range(32)]
    batch = processor(text=["<video>\nWhich way does it move? Smooth bands of colour."], videos=[frames])
    video_tokens = int((batch["input_ids"] == model.config.video_token_id).sum())
    assert video_tokens == 4608 and tuple(batch["pixel_values_videos"].shape) == (1, 32, 3, 336, 336)
    labels = supervise_text(batch, model.config.video_token_id)
    loss = model(**{k: v.to(DEVICE) for k, v in batch.items()}, labels=labels.to(DEVICE)).loss
    loss.backward()
    with torch.no_grad():
        ours = model.get_video_features(batch["pixel_values_videos"].to(DEVICE, DTYPE)).float()
        exact = model.float().get_video_features(batch["pixel_values_videos"].to(DEVICE))
    report("video 32 frames at 336/14", video_tokens=video_tokens, dtype=str(DTYPE), loss=loss.item(),
           pooled_max_abs_diff_vs_fp32=(ours - exact).abs().max().item())
    assert math.isfinite(loss.item()) and model.connector[0].weight.grad.abs().sum() > 0
    torch.testing.assert_close(ours, exact, atol=0.1 if CUDA else 1e-6, rtol=0.05 if CUDA else 0)


# ---------------------------------------------------------------------------------------------
# LoRA and QLoRA

LORA = ("lora_r=8", "lora_alpha=16", "train_vision=false", "train_connector=true", "train_lm=true")


def test_lora_trains_under_zero3(demo_dir, tmp_path):
    """LoRA adapters at bf16 under ZeRO-3 (the new adapters are partitioned by DeepSpeed, the final
    save gathers and merges them): trains, and final/ holds plain weights plus the adapters."""
    out = tmp_path / "run"
    run = launch(demo_args(demo_dir, out, *LORA, "zero_stage=3", "max_steps=4"))
    assert run.returncode == 0, run.out[-3000:]
    report("LoRA r=8, ZeRO-3, deepspeed --num_gpus 1", precision=PRECISION, losses=assert_trained(out, run.out, 4))
    weights = read_weights(out / "final")
    assert not any("lora_" in k or ".base." in k for k in weights)
    assert (out / "final" / "adapters" / "adapter_model.safetensors").exists()


def needs_bitsandbytes():
    if not CUDA:
        pytest.skip("QLoRA needs a CUDA GPU (bitsandbytes' 4-bit layers)")
    pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def qlora_run(demo_dir, tmp_path_factory):
    """`python train.py` with qlora=True: the LLM's linear layers in 4-bit NF4, rank-8 adapters in bf16."""
    needs_bitsandbytes()
    out = tmp_path_factory.mktemp("qlora") / "run"
    return out, run_script("train.py", *demo_args(demo_dir, out, *LORA, "qlora=true", "zero_stage=0"))


def test_qlora_trains_and_its_bf16_final_computes_what_the_4bit_model_did(qlora_run, demo_dir):
    """The 4-bit model with the trained adapters (rebuilt here) and final/ (its layers dequantized to
    bf16, the adapters merged) give the same logits up to bf16 rounding (10% of their scale at most);
    final/ is a plain model."""
    from safetensors.torch import load_file

    from model import VLMForCausalLM, VLMProcessor, add_lora, lora_target_names

    out, job = qlora_run
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    losses = assert_trained(out, job.stdout, steps=6)
    assert "quantization_config" not in (out / "final" / "config.json").read_text()
    final = VLMForCausalLM.from_pretrained(out / "final", dtype=torch.bfloat16).to(DEVICE).eval()
    processor = VLMProcessor.from_pretrained(out / "final")

    cfg = run.Config(lora_r=8, lora_alpha=16.0, qlora=True, train_lm=True)
    four_bit, _ = build_vlm(demo_dir / "backbones" / "tiny-clip", demo_dir / "backbones" / "tiny-llama",
                            dtype=torch.bfloat16, llm_quantization=train.four_bit_loading(cfg))
    add_lora(four_bit.language_model, lora_target_names(four_bit.language_model, "all-linear"), 8, 16.0, 0.0)
    state = {"language_model." + k[len("base_model.model."):]: v
             for k, v in load_file(out / "final" / "adapters" / "adapter_model.safetensors").items()}
    state.update(load_file(out / "final" / "adapters" / "connector.safetensors"))
    four_bit.load_state_dict(state, strict=False)
    four_bit.to(DEVICE).eval()
    batch = processor(text=["USER: <image>\nWhat colour is the shape? ASSISTANT:"], images=[smooth_image(40, 24)])
    batch = {k: v.to(DEVICE, torch.bfloat16 if k == "pixel_values" else v.dtype) for k, v in batch.items()}
    text = torch.arange(len(processor.tokenizer), device=DEVICE) != processor.image_token_id
    with torch.no_grad():
        ours, merged = four_bit(**batch).logits[..., text].float(), final(**batch).logits[..., text].float()
    difference = (ours - merged).abs().max().item()
    report("QLoRA: 4-bit + adapters vs bf16 merged final/", losses=losses, max_logit_difference=difference,
           logit_scale=ours.abs().max().item())
    # bf16 rounding of the merged weights: on the CPU (bitsandbytes' CPU kernels, tiny random model) 4.5%
    # of the logits' scale, as for a merge without 4-bit (3.5%); near-ties make greedy tokens unfit to compare
    assert difference <= 0.1 * ours.abs().max().item()


def test_qlora_lora_and_full_finetune_memory():
    """tests/lora_memory.py on the GPU: trainable parameters and peak memory of one training step."""
    needs_bitsandbytes()
    figures = {}
    for mode in ("full", "lora", "qlora"):
        run = run_script("tests/lora_memory.py", mode)
        assert run.returncode == 0, run.stderr[-3000:]
        figures[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        report(f"lora_memory.py {mode}", **figures[mode])
    assert figures["qlora"]["peak_gib"] < figures["lora"]["peak_gib"] < figures["full"]["peak_gib"]
    assert figures["lora"]["trainable_params"] == figures["qlora"]["trainable_params"] < figures["full"]["trainable_params"]


# ---------------------------------------------------------------------------------------------
# The GPU-trained model: eval.py, the native LLaVA export, bench.py


def test_eval_and_llava_export_of_the_gpu_trained_model(plain_run, demo_dir, tmp_path):
    """eval.py answers the demo's eval questions with test 1's model; push.py --format llava exports it;
    transformers' LlavaForConditionalGeneration, given the same inputs, gives the same greedy answers."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from eval import build_prompt, format_question, load_model, open_image

    out, run = plain_run
    assert run.returncode == 0, "test 1's run failed"
    evaluated = run_script("eval.py", out, "--data", demo_dir / "eval.jsonl", "--out", tmp_path / "answers")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((tmp_path / "answers" / "results.json").read_text())
    assert results["overall"]["count"] == 12 and results["settings"]["device"].startswith(DEVICE.type)
    report("eval.py, demo eval questions, python train.py run", dtype=results["settings"]["dtype"],
           accuracy=results["overall"]["accuracy"])

    export = tmp_path / "llava"
    pushed = run_script("push.py", out, "--repo", "me/gpu-check", "--format", "llava", "--local-dir", export)
    assert pushed.returncode == 0 and "LlavaForConditionalGeneration loads" in pushed.stdout, pushed.stderr[-3000:]
    ours, processor = load_model(str(out))  # as eval.py loads it: CUDA + bf16 on a GPU
    llava = LlavaForConditionalGeneration.from_pretrained(export, dtype=ours.dtype).to(DEVICE).eval()
    llava_processor = AutoProcessor.from_pretrained(export)
    records = [json.loads(line) for line in (demo_dir / "eval.jsonl").read_text().splitlines()]
    images = [open_image(str(demo_dir / r["image"])) for r in records]
    inputs = processor(text=[build_prompt(processor, format_question(r)) for r in records], images=images)
    theirs = llava_processor(text=[build_prompt(llava_processor, format_question(r)) for r in records],
                             images=images, return_tensors="pt", padding=True, padding_side="left")
    assert torch.equal(theirs["input_ids"], inputs["input_ids"])
    # the same pixels for both (ours resizes with torch, LLaVA's processor with PIL: a level apart)
    inputs = {k: v.to(DEVICE, ours.dtype if k == "pixel_values" else v.dtype) for k, v in inputs.items()}
    answers = {}
    for name, model in (("ours", ours), ("llava", llava)):
        with torch.no_grad():  # 8 tokens each: a barely trained model would often end at once
            generated = model.generate(**inputs, min_new_tokens=8, max_new_tokens=8, do_sample=False,
                                       pad_token_id=processor.tokenizer.pad_token_id)
        answers[name] = generated[:, inputs["input_ids"].shape[1]:]  # (12, 8)
    report("greedy answers, ours vs the llava export", dtype=str(ours.dtype),
           first_answers=processor.batch_decode(answers["ours"][:3]))
    assert torch.equal(answers["llava"], answers["ours"])


def test_one_bench_pretrain_measurement():
    """The smallest pretrain measurement bench.py offers (--preset tiny), both systems."""
    import bench

    run = run_script("bench.py", "--preset", "tiny", "--stage", "pretrain", "--steps", "3", "--warmup", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]  # ours, peer, ratio
    systems = {line["system"]: line for line in lines if "system" in line}
    ours = systems[bench.OURS]
    report("bench.py --preset tiny --stage pretrain", samples_per_s=ours["samples_per_s"],
           peer_samples_per_s=systems[bench.PEER]["samples_per_s"], peak_memory_gb=ours["peak_memory_gb"],
           precision=ours["precision"], micro_batch_size=ours["micro_batch_size"])
    assert ours["samples_per_s"] > 0 and math.isfinite(ours["last_loss"])
    assert ours["device"] == (torch.cuda.get_device_name() if CUDA else "cpu")
    assert (ours["peak_memory_gb"] is not None) == CUDA
