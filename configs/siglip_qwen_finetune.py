# A backbone swap: SigLIP vision + Qwen2.5 LLM, stage 2. The `chat` template uses Qwen's own
# chat template (ChatML), supervising each assistant answer and its <|im_end|>.
#   deepspeed --num_gpus 8 train.py configs/siglip_qwen_finetune.py
vision_model = "google/siglip-so400m-patch14-384"
connector = "mlp2x_gelu"
llm = "Qwen/Qwen2.5-1.5B-Instruct"
init_from = "out/siglip-qwen-pretrain"
template = "chat"
data_path = "data/llava_v1_5_mix665k.json"
image_folder = "data"
image_aspect = "pad"
train_connector = True
train_lm = True
lr_connector = 2e-5
lr_lm = 1e-5  # a smaller LM than Vicuna-7B; lower lr keeps its chat skills
# 16 per GPU x 8 GPUs = 128 samples/step; ~5,200 steps.
batch_size = 128
micro_batch_size = 16
epochs = 1
precision = "bf16"
zero_stage = 2  # 1.5B fits without parameter partitioning
out_dir = "out/siglip-qwen-finetune"
