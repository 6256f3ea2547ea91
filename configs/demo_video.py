# The video demo: the tiny VLM learns which way a shape moves across a clip (and its colour and shape)
# on 2 CPU cores. Clips, questions and tiny backbones are created on first use (make_demo).
#   deepspeed train.py configs/demo_video.py   then   python eval.py out/demo_video --data data/demo/video/eval.jsonl
# The direction needs several frames: one frame, repeated, answers it near chance (eval.py --still_frame).
from configs.demo import *  # noqa: F403 -- the image demo's training settings; what differs follows

data_path = "data/demo/video/finetune.json"
image_folder = "data/demo/video/clips"
vision_model = "data/demo/video/backbones/tiny-clip"  # 64x64 frames, 8x8 patches -> 64, pooled 2x2 to 16 a frame
llm = "data/demo/video/backbones/tiny-llama"  # 4 layers (2 leave the direction at chance); knows the direction words
video_frames = 8  # of each 16-frame clip: 8 x 16 = 128 video tokens
image_aspect = "anyres"  # LLaVA-NeXT-Video's images (frames are never tiled): the native export needs it
max_seq_len = 320
out_dir = "out/demo_video"
save_every = 500
