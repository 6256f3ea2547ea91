"""Peak host memory (RSS) of each rank of a 2-rank ZeRO-3 start, for a model of a few hundred MB
(an 8-layer LLM of width 1024 in fp32: 113M parameters, 450 MB). Not a test (a measurement: it
launches `deepspeed --num_gpus 2 train.py` for one step and samples every process's RSS):

    python tests/zero3_start_memory.py [CHECKOUT]     # CHECKOUT: the train.py to measure (default: this one)

Under ZeRO-3, train.py creates the model already partitioned (transformers' DeepSpeed integration:
only rank 0 reads the weight files), so a rank holds its slice, not the whole model.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import make_demo_data, make_tiny_backbones  # noqa: E402


def peak_rss_per_rank(command, cwd):
    """Runs command; returns ({pid: peak RSS in bytes} of its train.py ranks, its exit code)."""
    job = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks = {}
    while job.poll() is None:
        for child in psutil.Process(job.pid).children(recursive=True):
            try:
                if "--local_rank" in " ".join(child.cmdline()):
                    peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.1)
    return peaks, job.returncode


def main(checkout):
    folder = os.path.join(tempfile.gettempdir(), "small-vlm-zero3-start")
    if not os.path.exists(os.path.join(folder, "tiny-llama")):
        make_demo_data(folder, n_pretrain=8, n_finetune=16, n_eval=1)
        make_tiny_backbones(folder, image_size=32, patch_size=8, vision_width=64, llm_width=1024, layers=8)
    out = os.path.join(folder, "run")
    command = ["deepspeed", "--num_gpus", "2", "train.py", "configs/demo.py", f"data_path={folder}/finetune.json",
               f"image_folder={folder}/images", f"vision_model={folder}/tiny-clip", f"llm={folder}/tiny-llama",
               "make_demo=false", "zero_stage=3", "max_steps=1", "batch_size=4", "micro_batch_size=2",
               "num_workers=0", "save_every=0", "max_seq_len=128", "overwrite=true", f"out_dir={out}"]
    peaks, code = peak_rss_per_rank(command, checkout)
    print(json.dumps({"checkout": checkout, "exit_code": code,
                      "peak_rss_mb_per_rank": sorted(round(v / 2**20) for v in peaks.values())}))


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
