"""The main job: `deepspeed train.py configs/demo.py`, then eval.py on the held-out questions.
Takes about 5 minutes on 2 CPU cores (training and eval); the accuracy must be far above chance."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, launch

pytestmark = pytest.mark.slow


def test_demo_trains_far_above_chance(tmp_path):
    data, out = tmp_path / "demo", tmp_path / "out"
    run = launch(["configs/demo.py", f"data_path={data}/finetune.json", f"image_folder={data}/images",
                  f"vision_model={data}/backbones/tiny-clip", f"llm={data}/backbones/tiny-llama",
                  f"out_dir={out}", "log_every=500", "save_every=0"], timeout=1200)
    assert run.returncode == 0, run.out[-3000:]
    assert (data / "eval.jsonl").exists() and (out / "final" / "model.safetensors").exists()  # made on first use
    scored = subprocess.run([sys.executable, "eval.py", str(out), "--data", str(data / "eval.jsonl"),
                             "--out", str(tmp_path / "eval"), "--batch_size", "48"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert scored.returncode == 0, scored.stderr[-3000:]
    results = json.load(open(tmp_path / "eval" / "results.json"))
    accuracy = {name: c["accuracy"] for name, c in results["categories"].items()}
    # chance: colour 1/6, shape 1/3, position 1/4 -> about 0.25 overall. Seeds 0-4 measured on the
    # 2-core machine: overall 0.75-0.92, colour 1.0, position 0.75-1.0 (README); the bounds sit
    # below the worst seed, so another machine's float order does not fail a working demo.
    assert results["overall"]["accuracy"] >= 0.7, accuracy
    assert accuracy["colour"] >= 0.9 and accuracy["position"] >= 0.7, accuracy
