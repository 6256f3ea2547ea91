# LLaVA-1.5 stage 1 (feature alignment): only the connector trains, on 558K image-caption pairs.
#   deepspeed --num_gpus 8 train.py configs/llava_pretrain.py
# Data: liuhaotian/LLaVA-Pretrain (blip_laion_cc_sbu_558k.json + images/), see the README.
vision_model = "openai/clip-vit-large-patch14-336"  # 336px / 14px patches = 24x24 = 576 image tokens
vision_layer = -2
connector = "mlp2x_gelu"
llm = "lmsys/vicuna-7b-v1.5"
template = "plain"
data_path = "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
image_folder = "data/LLaVA-Pretrain/images"
image_aspect = "resize"  # stage 1 used resize + centre crop
max_seq_len = 2048
train_vision = False
train_connector = True
train_lm = False
lr_connector = 1e-3
wd_connector = 0.0
# 32 per GPU x 8 GPUs x 1 accumulation = 256 samples/step; 558K / 256 = ~2,180 steps for 1 epoch.
# A sample is ~620 tokens (576 image + ~40 caption and instruction): ~160K tokens/step, of which
# only the ~40 caption tokens per sample are supervised.
# With 1 GPU the same global batch is 32 x 1 x 8 accumulation steps.
batch_size = 256
micro_batch_size = 32
epochs = 1
warmup_ratio = 0.03
precision = "bf16"
zero_stage = 2
gradient_checkpointing = True
out_dir = "out/llava-pretrain"
save_every = 500
