"""The demo: a synthetic visual task and tiny random backbones, made here because nothing is
downloaded (nanoGPT's data/shakespeare_char/prepare.py convention).

    python data/demo/prepare.py                # data/demo/{images/, pretrain.json, finetune.json, eval.jsonl}
                                               # and data/demo/backbones/{tiny-clip, tiny-llama}
    python data/demo/prepare.py --video --out data/demo/video   # clips/*.mp4, finetune.json, eval.jsonl

`deepspeed train.py configs/demo.py` runs this on first use (make_demo=True). The data: one coloured
circle, square or triangle on the left, right, top or bottom of a 64x64 image, with captions
(pretrain.json, the plain template) and three-question conversations (finetune.json, half with
LLaVA's short-answer suffix, ~5% text-only), and balanced held-out questions (eval.jsonl). The
backbones: a small random CLIP tower and Llama with a byte-level BPE tokenizer trained on the demo
texts; the tests build theirs here too. The video demo: one shape moving left, right, up or down
across 16 frames, asked its colour, shape and direction (LLaVA-NeXT-Video's "video" records).
"""
import argparse
import json
import os
import random
import sys

import av
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository's modules
from data import SHORT_ANSWER_SUFFIX, VICUNA_SYSTEM  # noqa: E402
from model import IMAGE_TOKEN  # noqa: E402
from run import UserError, exit_after, write_json  # noqa: E402


# ----------------------------------------------------------------------------------------------
# The demo data: one coloured shape on a grey background, at one of four positions

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48)}  # centre (x, y) in 64x64
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "position": tuple(POSITIONS)}
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?", "position": "Where is the shape?"}
DESCRIBE = ("Describe the image.", "What is in the picture?", "Describe the shape.")
DEMO_IMAGE_SIZE = 64
# The video demo: the same shapes, moving in one direction across the clip
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) per unit of travel
VIDEO_ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "direction": tuple(DIRECTIONS)}
VIDEO_QUESTIONS = {"colour": QUESTIONS["colour"], "shape": QUESTIONS["shape"],
                   "direction": "Which way does the shape move?"}


def caption(colour, shape, position):
    return f"a {colour} {shape} on the {position}"


def text_only_question(word):
    """A question answered without looking (the ~5% text-only records, like LLaVA's ShareGPT share)."""
    return f"Is {word} a colour or a shape?"


def demo_corpus(video=False):
    """Every text the demo data can contain, plus the vicuna_v1 prompt words (to train the tiny
    tokenizer); with video, the video demo's direction question and answers too."""
    captions = [caption(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
    words = [text_only_question(w) for w in (*COLOURS, *SHAPES)] + ["colour", "shape"]
    answers = [a for values in ANSWERS.values() for a in values]
    video_texts = [VIDEO_QUESTIONS["direction"], *DIRECTIONS] if video else []
    return [VICUNA_SYSTEM, "USER: ASSISTANT:", IMAGE_TOKEN, SHORT_ANSWER_SUFFIX.strip(), *DESCRIBE,
            *QUESTIONS.values(), *answers, *words, *captions, *video_texts]


def grey_canvas(rng):
    grey = rng.randint(190, 250)
    return Image.new("RGB", (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE), (grey, grey, grey))


def jittered(rng, colour):
    return tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in COLOURS[colour])


def paint_shape(image, shape, fill, x, y, r):
    """Draws `shape` of radius r centred at (x, y) onto `image`, in place."""
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)


def draw_shape(rng, colour, shape, position):
    """A 64x64 RGB image: a jittered shape of the given colour centred near `position`."""
    image = grey_canvas(rng)
    x, y = POSITIONS[position]
    x, y, r = x + rng.randint(-3, 3), y + rng.randint(-3, 3), rng.randint(10, 13)
    paint_shape(image, shape, jittered(rng, colour), x, y, r)
    return image


def random_scene(rng, answers=ANSWERS, **fixed):
    """One value per category of `answers` (colour, shape, position), random except where given in `fixed`."""
    return tuple(fixed.get(category) or rng.choice(values) for category, values in answers.items())


def save_scene(rng, image_dir, name, scene):
    draw_shape(rng, *scene).save(os.path.join(image_dir, name))
    return name


def text_only_record(rng, record_id):
    word = rng.choice((*COLOURS, *SHAPES))
    answer = "colour" if word in COLOURS else "shape"
    return {"id": record_id, "conversations": [{"from": "human", "value": text_only_question(word)},
                                               {"from": "gpt", "value": answer}]}


def question_turns(rng, questions, scene):
    """All of `questions` about `scene` (one answer per question, in order), asked in a random order:
    several answers to learn from per image. Half the records ask with LLaVA's short-answer suffix
    (its VQA data) and half plainly (its conversations), so that a question typed without the suffix
    gets the same answer."""
    suffix = SHORT_ANSWER_SUFFIX if rng.random() < 0.5 else ""
    turns = []
    for category in rng.sample(tuple(questions), k=len(questions)):
        turns += [{"from": "human", "value": questions[category] + suffix},
                  {"from": "gpt", "value": scene[tuple(questions).index(category)]}]
    turns[0]["value"] = f"{IMAGE_TOKEN}\n{turns[0]['value']}"
    return turns


def balanced_answer(answers, i):
    """The i-th eval question's (category, answer): categories take turns, and each cycles through
    its answers, so answers are balanced."""
    category = tuple(answers)[i % len(answers)]
    return category, answers[category][(i // len(answers)) % len(answers[category])]


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def make_demo_data(out_dir, n_pretrain=2000, n_finetune=8000, n_eval=144, seed=0):
    """Writes images/, pretrain.json (plain captions), finetune.json (three questions per image, ~5%
    text-only) and eval.jsonl (questions balanced over answers) under out_dir; returns their paths.
    Deterministic: the same arguments write the same bytes."""
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = random.Random(seed)

    pretrain = []
    for i in range(n_pretrain):
        scene = random_scene(rng)
        instruction = rng.choice(DESCRIBE)
        human = f"{IMAGE_TOKEN}\n{instruction}" if rng.random() < 0.5 else f"{instruction}\n{IMAGE_TOKEN}"
        pretrain.append({"id": f"pretrain-{i}", "image": save_scene(rng, image_dir, f"pretrain_{i:05d}.png", scene),
                         "conversations": [{"from": "human", "value": human},
                                           {"from": "gpt", "value": caption(*scene)}]})

    finetune = []
    for i in range(n_finetune):
        if rng.random() < 0.05:
            finetune.append(text_only_record(rng, f"finetune-{i}"))
            continue
        scene = random_scene(rng)
        turns = question_turns(rng, QUESTIONS, scene)
        finetune.append({"id": f"finetune-{i}", "image": save_scene(rng, image_dir, f"finetune_{i:05d}.png", scene),
                         "conversations": turns})

    evaluation = []
    for i in range(n_eval):
        category, answer = balanced_answer(ANSWERS, i)
        scene = random_scene(rng, **{category: answer})
        # eval.jsonl names images relative to its own folder, eval.py's default --image_folder
        image = "images/" + save_scene(rng, image_dir, f"eval_{i:05d}.png", scene)
        evaluation.append({"id": f"eval-{i}", "image": image,
                           "question": QUESTIONS[category], "answer": answer, "category": category})

    paths = {"image_folder": image_dir, "pretrain": os.path.join(out_dir, "pretrain.json"),
             "finetune": os.path.join(out_dir, "finetune.json"), "eval": os.path.join(out_dir, "eval.jsonl")}
    for key, records in (("pretrain", pretrain), ("finetune", finetune)):
        write_json(paths[key], records)
    write_jsonl(paths["eval"], evaluation)
    return paths


# ----------------------------------------------------------------------------------------------
# The video demo: one coloured shape moving left, right, up or down across the clip

TRAVEL = 40  # pixels from the first frame to the last


def save_clip(path, frames, fps=8):
    """Writes PIL RGB frames (all one even size) to an .mp4: MPEG-4 part 2, yuv420p, at qscale 2, so
    frames decode back within a few levels of the originals."""
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps, options={"qscale": "2"})
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())  # flush the encoder's buffered frames


def draw_clip(rng, colour, shape, direction, n_frames):
    """n_frames 64x64 frames of one jittered shape moving TRAVEL pixels in `direction`. The path's
    midpoint is uniform over one square whatever the direction, so the middle of the clip alone does
    not tell the direction (its first and last frames do: they sit TRAVEL/2 before and after it)."""
    background, r, fill = grey_canvas(rng), rng.randint(8, 9), jittered(rng, colour)
    low, high = r + TRAVEL // 2, DEMO_IMAGE_SIZE - 1 - r - TRAVEL // 2  # the whole shape stays in every frame
    mid_x, mid_y = rng.randint(low, high), rng.randint(low, high)
    dx, dy = DIRECTIONS[direction]
    frames = []
    for t in range(n_frames):
        travelled = TRAVEL * (t / (n_frames - 1) - 0.5)  # -TRAVEL/2 at the first frame, +TRAVEL/2 at the last
        frame = background.copy()
        paint_shape(frame, shape, fill, round(mid_x + dx * travelled), round(mid_y + dy * travelled), r)
        frames.append(frame)
    return frames


def save_clip_scene(rng, clip_dir, name, scene, n_frames):
    save_clip(os.path.join(clip_dir, name), draw_clip(rng, *scene, n_frames))
    return name


def make_demo_video_data(out_dir, n_finetune=4000, n_eval=144, seed=0, n_frames=16):
    """Writes clips/, finetune.json (three questions per clip, ~5% text-only) and eval.jsonl (questions
    balanced over answers) under out_dir; returns their paths. Deterministic for a seed."""
    if n_frames < 2:
        raise ValueError(f"n_frames={n_frames}: a direction needs at least 2 frames")
    clip_dir = os.path.join(out_dir, "clips")
    os.makedirs(clip_dir, exist_ok=True)
    rng = random.Random(seed)

    finetune = []
    for i in range(n_finetune):
        if rng.random() < 0.05:
            finetune.append(text_only_record(rng, f"video-{i}"))
            continue
        scene = random_scene(rng, VIDEO_ANSWERS)
        turns = question_turns(rng, VIDEO_QUESTIONS, scene)
        clip = save_clip_scene(rng, clip_dir, f"clip_{i:05d}.mp4", scene, n_frames)
        finetune.append({"id": f"video-{i}", "video": clip, "conversations": turns})

    evaluation = []
    for i in range(n_eval):
        category, answer = balanced_answer(VIDEO_ANSWERS, i)
        scene = random_scene(rng, VIDEO_ANSWERS, **{category: answer})
        # eval.jsonl names clips relative to its own folder, as the image demo's eval.jsonl does
        clip = "clips/" + save_clip_scene(rng, clip_dir, f"eval_{i:05d}.mp4", scene, n_frames)
        evaluation.append({"id": f"eval-{i}", "video": clip,
                           "question": VIDEO_QUESTIONS[category], "answer": answer, "category": category})

    paths = {"image_folder": clip_dir, "finetune": os.path.join(out_dir, "finetune.json"),
             "eval": os.path.join(out_dir, "eval.jsonl")}
    write_json(paths["finetune"], finetune)
    write_jsonl(paths["eval"], evaluation)
    return paths


# ----------------------------------------------------------------------------------------------
# Tiny random backbones, saved to folders, so tests and the demo run the real loading path

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT: What is in the "
    "image? Describe the photo. The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9"
)


def make_tiny_tokenizer(corpus=(DEFAULT_CORPUS,), vocab_size=512):
    """A byte-level BPE tokenizer trained on `corpus` (decode(encode(x)) == x for any text), with
    Llama-style <s>/</s>, a pad token, ChatML markers and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=CHATML_TEMPLATE)


def make_tiny_backbones(out_dir, vision="clip", llm="llama", image_size=32, patch_size=8, vision_width=32,
                        llm_width=64, layers=2, corpus=(DEFAULT_CORPUS,), vocab_size=512, seed=0):
    """Saves a random vision tower and a random LLM + tokenizer under out_dir; returns both paths.
    vision: 'clip' (full CLIPModel, as openai/clip-* ships), 'clip_vision' or 'siglip';
    llm: 'llama' or 'qwen2'."""
    from transformers import (AutoModelForCausalLM, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig,
                              CLIPVisionModel, LlamaConfig, Qwen2Config, SiglipVisionConfig, SiglipVisionModel)

    torch.manual_seed(seed)
    tower = dict(image_size=image_size, patch_size=patch_size, hidden_size=vision_width,
                 intermediate_size=2 * vision_width, num_hidden_layers=layers, num_attention_heads=4)
    if vision == "clip":
        text = dict(vocab_size=64, hidden_size=vision_width, intermediate_size=2 * vision_width,
                    num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16)
        vision_model = CLIPModel(CLIPConfig(vision_config=tower, text_config=text, projection_dim=vision_width))
    elif vision == "clip_vision":
        vision_model = CLIPVisionModel(CLIPVisionConfig(**tower))
    elif vision == "siglip":
        vision_model = SiglipVisionModel(SiglipVisionConfig(**tower))
    else:
        raise ValueError(f"unknown tiny vision tower {vision!r}; valid: clip, clip_vision, siglip")
    vision_dir = os.path.join(out_dir, f"tiny-{vision}")
    vision_model.save_pretrained(vision_dir)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size).save_pretrained(vision_dir)

    tokenizer = make_tiny_tokenizer(corpus, vocab_size)
    shape = dict(vocab_size=len(tokenizer), hidden_size=llm_width, intermediate_size=2 * llm_width,
                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if llm == "llama":
        config = LlamaConfig(**shape, tie_word_embeddings=False)
    elif llm == "qwen2":
        config = Qwen2Config(**shape, tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown tiny LLM {llm!r}; valid: llama, qwen2")
    llm_dir = os.path.join(out_dir, f"tiny-{llm}")
    AutoModelForCausalLM.from_config(config).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return vision_dir, llm_dir


# ----------------------------------------------------------------------------------------------
# The command: each part made once, never over files of the same names


DEMO_DATA = ("images", "pretrain.json", "finetune.json", "eval.jsonl")
VIDEO_DEMO_DATA = ("clips", "finetune.json", "eval.jsonl")
HERE = os.path.dirname(os.path.abspath(__file__))


def refuse_to_overwrite(folder, names, ours=()):
    """The demo writes its fixed names only into a new or empty folder (or one holding only `ours`,
    such as this script): a user's files stay untouched, and a mistyped path is caught."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{folder} is a file; give a new or empty folder for the demo")
    others = sorted(set(os.listdir(folder)) - set(ours)) if os.path.isdir(folder) else []
    if others:
        raise UserError(f"{folder} holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}, and the demo "
                        f"writes its files ({', '.join(names)}) only into a new or empty folder; check the path "
                        "for a typo, or give another folder")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Make the demo's data and tiny backbones (each part only once).")
    parser.add_argument("--out", default=HERE, help="the data's folder (default: data/demo)")
    parser.add_argument("--backbones", help="the backbones' folder (default: OUT/backbones)")
    parser.add_argument("--n-pretrain", type=int, default=2000, help="stage-1 caption records")
    parser.add_argument("--video", action="store_true", help="write the video demo (clips/) instead of the image one")
    parser.add_argument("--n-finetune", type=int, help="stage-2 QA records (default: 8000, or 4000 with --video)")
    parser.add_argument("--n-eval", type=int, default=144, help="eval questions (36k balances all answers)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    backbones = args.backbones or os.path.join(args.out, "backbones")
    if args.n_finetune is None:
        args.n_finetune = 4000 if args.video else 8000
    for flag, count in (("--n-pretrain", args.n_pretrain), ("--n-finetune", args.n_finetune),
                        ("--n-eval", args.n_eval)):
        if count < 1:
            raise UserError(f"{flag} {count}: the demo needs at least 1 such record")
    names = VIDEO_DEMO_DATA if args.video else DEMO_DATA
    if not all(os.path.exists(os.path.join(args.out, name)) for name in names):
        refuse_to_overwrite(args.out, names, ours=(os.path.basename(__file__), "backbones"))
        paths = (make_demo_video_data(args.out, args.n_finetune, args.n_eval, args.seed) if args.video else
                 make_demo_data(args.out, args.n_pretrain, args.n_finetune, args.n_eval, args.seed))
        print("\n".join(f"{key}: {path}" for key, path in paths.items()))
    towers = ("tiny-clip", "tiny-llama")
    if not all(os.path.exists(os.path.join(backbones, name)) for name in towers):
        refuse_to_overwrite(backbones, towers)
        # The video demo's LLM must compare where the shape is across frames: with 2 layers it answered the
        # direction at chance after 2000 steps (colour and shape learned); with 4 it learns it.
        paths = make_tiny_backbones(backbones, corpus=demo_corpus(args.video), image_size=64, patch_size=8,
                                    vision_width=96, llm_width=128, layers=4 if args.video else 2)
        print(f"vision_model: {paths[0]}\nllm: {paths[1]}")


if __name__ == "__main__":
    exit_after(main)
