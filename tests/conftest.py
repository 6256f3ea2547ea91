"""Shared fixtures: tiny random backbones saved to folders (no network), built once per session."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import build_vlm, make_tiny_backbones  # noqa: E402


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory):
    """(vision_dir, llm_dir): a full tiny CLIPModel and a tiny Llama + byte-level BPE tokenizer."""
    return make_tiny_backbones(str(tmp_path_factory.mktemp("backbones")))


@pytest.fixture
def tiny_vlm(tiny_backbones):
    """A fresh (model, processor) built from the tiny backbones with build_vlm."""
    model, processor = build_vlm(*tiny_backbones)
    return model.eval(), processor


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """Small demo data (64 pretrain, 64 finetune, 12 eval records) and tiny backbones trained on
    its tokenizer corpus, shared by the training, reliability and end-to-end tests."""
    from data import demo_corpus, make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(str(root), n_pretrain=64, n_finetune=64, n_eval=12)
    make_tiny_backbones(str(root / "backbones"), corpus=demo_corpus(), image_size=32, patch_size=8)
    return root


def train_args(demo_dir, out_dir, *overrides):
    """Arguments for a few-step CPU training run on the small demo data (4 samples per rank)."""
    return ["configs/demo.py", f"data_path={demo_dir}/finetune.json", f"image_folder={demo_dir}/images",
            f"vision_model={demo_dir}/backbones/tiny-clip", f"llm={demo_dir}/backbones/tiny-llama",
            "make_demo=false", "max_steps=6", "batch_size=8", "micro_batch_size=4", "num_workers=0",
            "log_every=1", "save_every=0", "max_seq_len=128", "overwrite=false", f"out_dir={out_dir}", *overrides]


_ports = iter(range(29600, 29700))


def launch(args, procs=1, wait=True, timeout=300):
    """`deepspeed --num_gpus N train.py ARGS` (the real launcher, CPU ranks); returns the Popen
    (wait=False) or the finished CompletedProcess-like Popen with .out holding its output."""
    import subprocess

    cmd = ["deepspeed", "--num_gpus", str(procs), "--master_port", str(next(_ports)), "train.py", *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if wait:
        proc.out, _ = proc.communicate(timeout=timeout)
    return proc


def read_metrics(out_dir):
    """{step: loss} from metrics.jsonl; a resumed run's later line for a step wins."""
    import json

    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def read_weights(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, f)).items()}
