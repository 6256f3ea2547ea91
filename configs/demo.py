# The demo: a tiny VLM learns a synthetic visual task (coloured shapes at positions) on 2 CPU cores
# in a few minutes. Data and tiny random backbones are created on first use (make_demo).
#   deepspeed train.py configs/demo.py      then      python eval.py out/demo --data data/demo/eval.jsonl
make_demo = True
data_path = "data/demo/finetune.json"
image_folder = "data/demo/images"
vision_model = "data/demo/backbones/tiny-clip"  # 64x64 images, 8x8 patches -> 64 image tokens
llm = "data/demo/backbones/tiny-llama"  # 2 layers, width 128, byte-level BPE tokenizer
template = "vicuna_v1"
image_aspect = "pad"
max_seq_len = 256
# All three parts train (one stage instead of LLaVA's two: the backbones are random, not pretrained).
train_vision = True
train_connector = True
train_lm = True
lr_vision = 1e-3
lr_connector = 1e-3
lr_lm = 1e-3
wd_lm = 0.01
# 16 samples/step x 3000 steps = 48,000 samples = 6 epochs of the 8,000-record demo finetune file
batch_size = 16
micro_batch_size = 16
max_steps = 3000
warmup_ratio = 0.05
min_lr_ratio = 0.1
# CPU: fp32, no ZeRO partitioning needed, no checkpointing (the model is tiny)
precision = "fp32"
zero_stage = 0
gradient_checkpointing = False
num_workers = 1
out_dir = "out/demo"
overwrite = True
log_every = 25
save_every = 200
