# The video demo: the tiny VLM learns which way a shape moves across a clip (and its colour and shape)
# on 2 CPU cores. Clips, questions and tiny backbones are created on first use (make_demo).
#   deepspeed train.py configs/demo_video.py   then   python eval.py out/demo_video --data data/demo/video/eval.jsonl
# The direction needs several frames: one frame, repeated, answers it near chance (tests/video_control.py).
make_demo = True
data_path = "data/demo/video/finetune.json"
image_folder = "data/demo/video/clips"
vision_model = "data/demo/video/backbones/tiny-clip"  # 64x64 frames, 8x8 patches -> 64, pooled 2x2 to 16 a frame
llm = "data/demo/video/backbones/tiny-llama"  # its tokenizer knows the direction words
video_frames = 8  # of each 16-frame clip: 8 x 16 = 128 video tokens
template = "vicuna_v1"
image_aspect = "anyres"  # LLaVA-NeXT-Video's images (frames are never tiled): the native export needs it
max_seq_len = 320
train_vision = True
train_connector = True
train_lm = True
lr_vision = 3e-5  # as configs/demo.py: the random tower's features already tell the shapes apart
lr_connector = 7e-4
lr_lm = 7e-4
wd_lm = 0.01
batch_size = 8
micro_batch_size = 8
max_steps = 2000
warmup_ratio = 0.05
min_lr_ratio = 0.1
precision = "fp32"
zero_stage = 0
gradient_checkpointing = False
num_workers = 1
out_dir = "out/demo_video"
overwrite = True
log_every = 25
save_every = 500
