# A backbone swap: SigLIP vision + Qwen2.5 LLM, stage 1 (connector only).
#   deepspeed --num_gpus 8 train.py configs/siglip_qwen_pretrain.py
vision_model = "google/siglip-so400m-patch14-384"  # 384px / 14px = 27x27 = 729 image tokens, no CLS
vision_layer = -2
drop_cls = True  # ignored: SigLIP has no CLS token
connector = "mlp2x_gelu"
llm = "Qwen/Qwen2.5-1.5B-Instruct"
template = "plain"
data_path = "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
image_folder = "data/LLaVA-Pretrain/images"
image_aspect = "resize"
train_connector = True
lr_connector = 1e-3
# 32 per GPU x 8 GPUs = 256 samples/step, as LLaVA-1.5; ~2,180 steps.
batch_size = 256
micro_batch_size = 32
epochs = 1
precision = "bf16"
zero_stage = 2
out_dir = "out/siglip-qwen-pretrain"
