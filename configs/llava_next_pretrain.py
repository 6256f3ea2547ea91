# LLaVA-NeXT-style stage 1: LLaVA-1.5's feature alignment, with AnyRes tiles (see the README).
#   deepspeed --num_gpus 8 train.py configs/llava_next_pretrain.py
# Only the connector and image_newline train. (LLaVA-NeXT's own stage 1 is LLaVA-1.5's, and its
# image_newline trains in stage 2 only, with the LLM; here it trains with the connector, from the start.)
vision_model = "openai/clip-vit-large-patch14-336"  # 336px tiles / 14px patches = 24x24 = 576 tokens a tile
vision_layer = -2
connector = "mlp2x_gelu"
llm = "lmsys/vicuna-7b-v1.5"
template = "plain"
data_path = "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
image_folder = "data/LLaVA-Pretrain/images"
image_aspect = "anyres"
image_grid_pinpoints = "336x672,672x336,672x672,1008x336,336x1008"  # LLaVA-NeXT's: 1x2, 2x1, 2x2, 3x1, 1x3 tiles
# An image is 576 (base tile) + the unpadded grid with a newline per row: 1,752-2,928 tokens for
# an image shaped like a pinpoint, fewer for others (a 640x480 photo: 2,340; 1920x1080: 1,948). Caption ~40 more.
max_seq_len = 4096
train_vision = False
train_connector = True
train_lm = False
lr_connector = 1e-3
wd_connector = 0.0
# 16 per GPU x 8 GPUs x 2 accumulation = 256 samples/step, ~2,180 steps for 558K; ~4x the tokens
# of LLaVA-1.5's stage 1 (~2,300 instead of ~620 a sample), so half the micro-batch.
batch_size = 256
micro_batch_size = 16
epochs = 1
warmup_ratio = 0.03
precision = "bf16"
zero_stage = 2
gradient_checkpointing = True
out_dir = "out/llava-next-pretrain"
save_every = 500
