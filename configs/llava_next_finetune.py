# LLaVA-NeXT-style stage 2 (LLaVA-1.6 recipe): AnyRes tiles; connector, image_newline, LLM and
# vision tower train.
#   deepspeed --num_gpus 8 train.py configs/llava_next_finetune.py
# Starts from stage 1's connector and image_newline (init_from). LLaVA-NeXT's own 760K mix is not
# public; LLaVA-1.5's 665K (below) or Open-LLaVA-NeXT's 1M mix (same record format) stand in.
vision_model = "openai/clip-vit-large-patch14-336"
vision_layer = -2
connector = "mlp2x_gelu"
llm = "lmsys/vicuna-7b-v1.5"
init_from = "out/llava-next-pretrain"
template = "vicuna_v1"
data_path = "data/llava_v1_5_mix665k.json"
image_folder = "data"  # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
image_aspect = "anyres"
image_grid_pinpoints = "336x672,672x336,672x672,1008x336,336x1008"
max_seq_len = 4096  # LLaVA-NeXT's: up to 2,928 image tokens + the conversation
train_vision = True  # LLaVA-NeXT unfreezes the vision tower in stage 2, at a 10x lower lr
train_connector = True
train_lm = True
lr_vision = 2e-6
lr_connector = 2e-5
lr_lm = 2e-5
wd_vision = 0.0
wd_connector = 0.0
wd_lm = 0.0
# 4 per GPU x 8 GPUs x 4 accumulation = 128 samples/step; 665K / 128 = ~5,200 steps for 1 epoch.
# A sample is up to max_seq_len = 4096 tokens (~2,400 typical with an image): ~330K tokens/step.
batch_size = 128
micro_batch_size = 4
epochs = 1
warmup_ratio = 0.03
group_by_length = True  # lengths now include each image's own token count, read from its header
precision = "bf16"
zero_stage = 3
gradient_checkpointing = True
out_dir = "out/llava-next-finetune"
save_every = 1000
