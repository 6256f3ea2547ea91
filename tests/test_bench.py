"""bench.py: runs of `python bench.py --preset tiny ...` (bench.main, in this process, on the CPU),
and the batches it measures. Speed itself is never asserted: each mode prints sound JSON for both
systems, measured on the same batches, and a line of ours / peer ratios."""
import json
import math

import numpy as np
import pytest
import torch

import bench
from conftest import one_process
from data import collate
from model import CLIP_STD, IGNORE_INDEX

# The ratio line's keys, by mode, on the CPU (no memory figure): what it compares, then ours / peer
# for each rate, then the mode's own check of the two systems' work.
RATIO_KEYS = {"train": ["ratio", "mode", "stage", "samples_per_s", "tokens_per_s", "real_tokens_per_s", "model_tflops"],
              "data": ["ratio", "mode", "samples_per_s", "max_pixel_difference"],
              "generate": ["ratio", "mode", "tokens_per_s", "same_tokens"]}


def run_bench(capsys, *flags):
    """`python bench.py --preset tiny FLAGS`; returns its JSON lines (DeepSpeed logs are skipped)."""
    with one_process():  # bench.setup starts a one-process group, bench_data sets torch's threads
        bench.main(["--preset", "tiny", *flags])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def split(lines):
    """{system: line} and the ratio line, for lines holding one measurement (ours, peer, ratio):
    the ratio line has its mode's keys, and each rate in it is ours / peer."""
    assert [line.get("system", "ratio") for line in lines] == [bench.OURS, bench.PEER, "ratio"]
    systems, ratio = {line["system"]: line for line in lines[:2]}, lines[2]
    assert list(ratio) == RATIO_KEYS[systems[bench.OURS]["mode"]], ratio
    assert ratio["ratio"] == f"{bench.OURS} / {bench.PEER}" and ratio["mode"] == systems[bench.OURS]["mode"]
    for key in ratio:
        if key.endswith("_per_s") or key == "model_tflops":
            assert ratio[key] == pytest.approx(systems[bench.OURS][key] / systems[bench.PEER][key]), key
    return systems, ratio


def assert_same_work(ours, peer, *keys):
    """Both systems measured with the same settings (steps, warmup, keys) and, for training, on the
    same batches: the same real tokens per sample, and the same positions per sample (padding)."""
    for key in ("steps", "warmup", *keys):
        assert ours[key] == peer[key], key
    if ours["mode"] == "train":
        assert ours["mean_seq_len"] == peer["mean_seq_len"]
        if not ours["packed"]:
            assert ours["padding"] == pytest.approx(peer["padding"])
            assert ours["tokens_per_s"] / ours["samples_per_s"] == pytest.approx(
                peer["tokens_per_s"] / peer["samples_per_s"])


def test_training_step_both_stages_on_the_same_batches(capsys):
    lines = run_bench(capsys, "--stage", "pretrain", "finetune", "--steps", "2", "--warmup", "1",
                      "--micro_batch_size", "2")
    assert len(lines) == 6
    for stage, seq_len, trains in (("pretrain", 16 + 40, "connector"), ("finetune", 1024, "connector+lm")):
        systems, ratio = split([line for line in lines if line["stage"] == stage])
        for line in systems.values():
            assert line["mode"] == "train" and line["trains"] == trains and line["micro_batch_size"] == 2
            assert line["samples_per_s"] > 0 and line["model_tflops"] > 0 and math.isfinite(line["last_loss"])
            assert line["tokens_per_s"] == pytest.approx(line["real_tokens_per_s"])  # fixed lengths: no padding
            assert line["mean_seq_len"] == seq_len  # 16 image tokens + 40 text; finetune 1024
            assert line["mfu"] is None and line["peak_memory_gb"] is None and line["device"] == "cpu"
        assert_same_work(systems[bench.OURS], systems[bench.PEER], "micro_batch_size", "trains", "zero_stage")


def test_data_pipeline_same_pixels(capsys):
    systems, ratio = split(run_bench(capsys, "--data", "--steps", "2", "--warmup", "1", "--micro_batch_size", "4"))
    assert systems[bench.OURS]["image_processor"] == "VLMImageProcessor"
    assert systems[bench.PEER]["image_processor"].startswith("CLIPImageProcessor")
    assert all(line["samples_per_s"] > 0 for line in systems.values())
    assert_same_work(systems[bench.OURS], systems[bench.PEER], "micro_batch_size", "image", "image_size")
    # the same tensors but for resampling rounding (torch's resize vs PIL's): a fair race
    assert ratio["max_pixel_difference"] <= 1 / (255 * min(CLIP_STD)) + 1e-5  # one level in 255


def test_generate_same_tokens(capsys):
    systems, ratio = split(run_bench(capsys, "--generate", "--steps", "1", "--warmup", "1", "--batch_size", "2",
                                     "--max_new_tokens", "8"))
    assert all(line["tokens_per_s"] > 0 and line["max_new_tokens"] == 8 for line in systems.values())
    assert_same_work(systems[bench.OURS], systems[bench.PEER], "batch_size", "max_new_tokens", "prompt_len")
    assert ratio["same_tokens"] == 1.0  # the same weights in fp32: the same greedy tokens


def test_realistic_lengths_are_a_llava_like_mix():
    config = bench.vlm_config("llava7b")  # only the config: no weights are built
    records = bench.draw_records("finetune", "realistic", config, 20000, seed=0)
    lengths = np.array([r["images"] * config.num_image_tokens + r["text"] for r in records])
    text_only = np.mean([r["images"] == 0 for r in records])
    assert 0.04 < text_only < 0.08 and lengths.max() <= bench.MAX_SEQ_LEN
    assert np.median(lengths) < 900 and (lengths > 1500).mean() > 0.03  # mostly short, with a long tail
    assert records == bench.draw_records("finetune", "realistic", config, 20000, seed=0)  # seeded


def test_realistic_batches_are_padded_and_supervise_answers():
    config = bench.vlm_config("tiny")
    args = bench.parse_args(["--lengths", "realistic", "--steps", "6", "--warmup", "0", "--micro_batch_size", "4"])
    micro_batches = bench.make_batches("finetune", args, config, world_size=1, rank=0)
    assert len(micro_batches) == 6 and all(len(samples) == 4 for samples in micro_batches)
    batches = [collate(samples, pad_token_id=0) for samples in micro_batches]
    assert any(not b["attention_mask"].all() for b in batches)  # padding per micro-batch shows up
    for b in batches:
        supervised = b["labels"] != IGNORE_INDEX
        assert (b["labels"][supervised] == b["input_ids"][supervised]).all()
        assert not (supervised & (b["input_ids"] == config.image_token_id)).any()
        assert 0 < supervised.sum() < b["num_tokens"]
        images = (b["input_ids"] == config.image_token_id).sum()
        n_images = 0 if b["pixel_values"] is None else len(b["pixel_values"])
        assert images == n_images * config.num_image_tokens


def test_packed_finetune_runs_with_less_padding(capsys):
    lines = run_bench(capsys, "--stage", "finetune", "--lengths", "realistic", "--pack", "--steps", "3", "--warmup",
                      "1", "--micro_batch_size", "8")
    systems, ratio = split(lines)
    ours, peer = systems[bench.OURS], systems[bench.PEER]
    assert ours["packed"] and not peer["packed"]
    assert_same_work(ours, peer, "micro_batch_size", "lengths")  # the same samples: the same mean_seq_len
    assert ours["padding"] < peer["padding"] and ours["real_tokens_per_s"] > 0


def test_padding_mode_shows_what_grouping_and_packing_save(capsys):
    bench.main(["--preset", "tiny", "--stage", "finetune", "--lengths", "realistic", "--padding"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    padding = {(r["group_by_length"], r["pack_samples"]): r["padding"] for r in lines}
    assert len(lines) == 4 and all(0 <= p < 1 for p in padding.values())
    for grouped in (True, False):
        assert padding[grouped, True] <= padding[grouped, False]  # packing never adds padding
    assert padding[False, False] > 0.2 > padding[True, False]  # random order pads a lot; grouping little
    assert padding[False, True] < padding[False, False] / 2  # packing recovers most of it


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_gpu_only_attention_is_refused_on_cpu(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--attn", "flex_attention"])
    assert "--attn flex_attention needs a GPU" in capsys.readouterr().err
