# LLaVA-1.5 stage 2 (visual instruction tuning): connector + LLM train on the 665K mix.
#   deepspeed --num_gpus 8 train.py configs/llava_finetune.py
# Starts from stage 1's connector (init_from). ~40K records are text-only; they train as such.
vision_model = "openai/clip-vit-large-patch14-336"
vision_layer = -2
connector = "mlp2x_gelu"
llm = "lmsys/vicuna-7b-v1.5"
init_from = "out/llava-pretrain"
template = "vicuna_v1"
data_path = "data/llava_v1_5_mix665k.json"
image_folder = "data"  # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
image_aspect = "pad"
max_seq_len = 2048
train_vision = False
train_connector = True
train_lm = True
lr_connector = 2e-5
lr_lm = 2e-5
wd_connector = 0.0
wd_lm = 0.0
# 16 per GPU x 8 GPUs = 128 samples/step; 665K / 128 = ~5,200 steps for 1 epoch.
# A sample is 576 image tokens (none for the ~40K text-only records) + its conversation, at most
# max_seq_len = 2048 tokens: at most 128 x 2048 = 262K tokens/step.
batch_size = 128
micro_batch_size = 16
epochs = 1
warmup_ratio = 0.03
group_by_length = True  # modality-aware length grouping: ~25% faster, same results
precision = "bf16"
zero_stage = 3  # 7B weights + grads + AdamW states are partitioned across the 8 GPUs
gradient_checkpointing = True
out_dir = "out/llava-finetune"
save_every = 1000
