# LLaVA-1.5 stage 2 with LoRA (LLaVA's finetune_lora.sh): the connector trains in full, the LLM
# through rank-128 adapters on every linear layer but the LM head; its 7B weights stay frozen.
#   deepspeed --num_gpus 8 train.py configs/llava_finetune_lora.py
#   python train.py configs/llava_finetune_lora.py zero_stage=0 micro_batch_size=4   # one 80 GB GPU
# Starts from stage 1's connector (init_from). LLaVA's LoRA model scores as its full finetune
# (GQA 63.0 vs 62.0, MME 1476.9 vs 1510.7).
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
train_lm = True  # through the adapters only
# r x (in + out) per layer: 128 x (4096 + 4096) for q/k/v/o, 128 x (4096 + 11008) for gate/up/down
# -> 32 layers x 7 = 224 adapters, 320M trainable parameters (4.7% of 6.7B)
lora_r = 128
lora_alpha = 256.0  # update scaled by 256 / 128 = 2
lora_dropout = 0.05
lora_targets = "all-linear"
# LLaVA: learning_rate 2e-4 (the adapters), mm_projector_lr 2e-5 (the connector)
lr_lm = 2e-4
lr_connector = 2e-5
wd_lm = 0.0
wd_connector = 0.0
# 16 per GPU x 8 GPUs = 128 samples/step, as the full finetune: ~5,200 steps for 1 epoch of 665K
batch_size = 128
micro_batch_size = 16
epochs = 1
warmup_ratio = 0.03
group_by_length = True
precision = "bf16"
zero_stage = 2  # only the adapters and the connector have gradients and AdamW state: no need to partition weights
gradient_checkpointing = True
out_dir = "out/llava-finetune-lora"
save_every = 1000
