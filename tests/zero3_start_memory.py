"""Host memory of each rank when a 2-rank ZeRO-3 run has built its model (train.py's start: the
process group, then build_training_model), for a model of about a GB: an 8-layer LLM of width
2048, 0.3B parameters, saved in fp16 and trained in fp32 (1.2 GB). Not a test (a measurement, on
CPU ranks):

    python tests/zero3_start_memory.py [CHECKOUT]     # CHECKOUT: the train.py to measure (default: this one)

It launches itself with `deepspeed --num_gpus 2`; each rank prints its peak and current RSS and how
many parameter values it holds. Under ZeRO-3 train.py creates the model already partitioned
(transformers' DeepSpeed integration: only rank 0 reads the weight files), so a rank holds its slice.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile

from conftest import ROOT  # the repository (conftest puts it and data/demo on sys.path)
FOLDER = os.path.join(tempfile.gettempdir(), "small-vlm-zero3-start")


def measure_rank(checkout):
    """One rank: build the model as train.py does under ZeRO-3, then report."""
    import psutil
    import torch

    sys.path.insert(0, checkout)
    import run
    import train

    cfg = run.Config(vision_model=f"{FOLDER}/tiny-clip", llm=f"{FOLDER}/tiny-llama", precision="fp32",
                     zero_stage=3, batch_size=2, micro_batch_size=1, data_path="unused", train_lm=True)
    rank = int(os.environ["RANK"])
    device = run.start_processes(cfg)
    partitioning = train.partitioned_loading(cfg, 1)
    model, _ = train.build_training_model(cfg, device)
    held = sum(p.numel() for p in model.parameters())  # this rank's values (a slice when partitioned)
    print(json.dumps({"checkout": checkout, "rank": rank, "partitioned": partitioning is not None,
                      "parameter_values_held": held,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "rss_mb": round(psutil.Process().memory_info().rss / 2**20)}), flush=True)
    torch.distributed.barrier()


def main(checkout):
    import torch

    from prepare import make_tiny_backbones

    if not os.path.exists(os.path.join(FOLDER, "tiny-llama")):
        from transformers import AutoModelForCausalLM

        make_tiny_backbones(FOLDER, image_size=32, patch_size=8, vision_width=64, llm_width=2048, layers=8)
        # saved in fp16, as Vicuna ships: loading it in another dtype makes a copy in memory (a file
        # in the loaded dtype is memory-mapped, and its pages are shared by the ranks)
        llm = AutoModelForCausalLM.from_pretrained(f"{FOLDER}/tiny-llama", dtype=torch.float16)
        llm.save_pretrained(f"{FOLDER}/tiny-llama")
    run = subprocess.run(["deepspeed", "--num_gpus", "2", os.path.abspath(__file__), "--rank", checkout],
                         cwd=checkout, capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith('{"checkout"')]
    print("\n".join(sorted(lines)) if lines else run.stdout[-3000:] + run.stderr[-3000:])


if __name__ == "__main__":
    if "--rank" in sys.argv:
        measure_rank(sys.argv[sys.argv.index("--rank") + 1])
    else:
        main(os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
