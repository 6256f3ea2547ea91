"""Video: a clip is video_frames frames sampled uniformly (data.load_video), each pooled 2x2 after the
tower and spliced at <video> tokens (model.py), trained from LLaVA-NeXT-Video records (data.py),
exported as transformers' LlavaNextVideoForConditionalGeneration (push.py) and asked by eval.py. A bad
clip is a bad record: one line naming it, or skipped."""
import json
import math
import os
import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import push
from conftest import ROOT, exit_code, launch, train_args, write_json
from data import VLMDataset, chat_template_for, collate, load_video, tokenize_conversation
from model import IGNORE_INDEX, build_vlm
from prepare import save_clip
from run import UserError

FRAMES = 4  # sampled per clip; the tiny tower's 4x4 patch grid pools to 2x2 = 4 tokens a frame
QUESTION = [{"from": "human", "value": "<image>\nWhich way?"}, {"from": "gpt", "value": "Up."}]


def write_clip(path, n_frames=10, size=(40, 32)):
    """A clip whose frame i is grey level 20 + 20 i (so a decoded frame tells which one it is)."""
    save_clip(str(path), [Image.new("RGB", size, (20 + 20 * i,) * 3) for i in range(n_frames)])
    return str(path)


def frame_level(frame):
    return float(np.asarray(frame).mean())


@pytest.fixture(scope="module")
def video_vlm(tiny_backbones):
    """A video model with AnyRes images (LlavaNextVideo's image path), so that it also exports natively."""
    model, processor = build_vlm(*tiny_backbones, image_aspect="anyres", video_frames=FRAMES)
    processor.chat_template = chat_template_for("vicuna_v1", processor.tokenizer)
    return model.eval(), processor


def test_clips_are_sampled_uniformly_as_transformers_samples_them(tmp_path):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    frames = load_video(write_clip(tmp_path / "ten.mp4"), FRAMES)
    chosen = default_sample_indices_fn(VideoMetadata(total_num_frames=10), num_frames=FRAMES).tolist()
    assert chosen == [0, 2, 5, 7]
    assert [round((frame_level(f) - 20) / 20) for f in frames] == chosen
    assert frames[0].size == (40, 32) and frames[0].mode == "RGB"
    with pytest.raises(ValueError, match=r"has 10 frames, fewer than video_frames=11; .*not repeated"):
        load_video(str(tmp_path / "ten.mp4"), 11)


def test_each_frame_is_pooled_2x2_before_the_connector(video_vlm):
    model, processor = video_vlm
    clips = torch.randn(2, FRAMES, 3, 32, 32)
    with torch.no_grad():
        features = model.get_video_features(clips)
        patches = model.vision_features(clips.flatten(0, 1))  # (8, 16, D): a 4x4 grid a frame
        grid = patches.view(-1, 4, 4, patches.shape[-1])
        pooled = torch.stack([grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((1, 2))
                              for i in range(2) for j in range(2)], dim=1)  # (8, 4, D), row by row
        expected = model.connector(pooled).flatten(0, 1)
    assert processor.video_token_count(FRAMES) == FRAMES * 4 == features.shape[0] // 2
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=0)


def test_processor_expands_each_clip_and_the_model_splices_it_at_its_tokens(video_vlm, tmp_path):
    model, processor = video_vlm
    frames = load_video(write_clip(tmp_path / "c.mp4"), FRAMES)
    image = Image.new("RGB", (40, 24), (0, 90, 200))
    inputs = processor(text=["<video>\nWhich way?", "<image>\nWhat colour?"], images=[image], videos=[frames])
    assert inputs["pixel_values_videos"].shape == (1, FRAMES, 3, 32, 32)
    video_positions = inputs["input_ids"] == model.config.video_token_id
    assert video_positions.sum(1).tolist() == [FRAMES * 4, 0]
    with torch.no_grad():
        embeds = model.embed_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                                    inputs["pixel_values_videos"])
        torch.testing.assert_close(embeds[video_positions], model.get_video_features(inputs["pixel_values_videos"]))
        with pytest.raises(ValueError, match="16 <video> tokens in input_ids, 32 features from the videos"):
            model.embed_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                               inputs["pixel_values_videos"].repeat(2, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="1 '<video>' markers in the text but 0 videos given"):
        processor(text="<video>\nWhich way?")


def test_mixed_file_of_videos_images_and_text_trains(video_vlm, tmp_path):
    model, processor = video_vlm
    write_clip(tmp_path / "clip.mp4")
    Image.new("RGB", (40, 24), (0, 90, 200)).save(tmp_path / "a.png")
    records = [{"id": "video", "video": "clip.mp4", "conversations": QUESTION},
               {"id": "image", "image": "a.png", "conversations": QUESTION},
               {"id": "images", "image": ["a.png", "a.png"], "conversations": [
                   {"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "Yes."}]},
               {"id": "text", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}]}]
    dataset = VLMDataset(write_json(tmp_path / "d.json", records), str(tmp_path), processor, "vicuna_v1",
                         video_frames=FRAMES)
    assert dataset.has_image == [True, True, True, False]
    assert dataset.lengths[0] == 4 + FRAMES * 4  # 4 words + the clip's tokens, known before decoding
    sample = dataset[0]
    video_id = model.config.video_token_id
    assert (sample["input_ids"] == video_id).sum() == FRAMES * 4
    assert (sample["labels"][sample["input_ids"] == video_id] == IGNORE_INDEX).all()
    frames = load_video(str(tmp_path / "clip.mp4"), FRAMES)
    assert torch.equal(sample["pixel_values_videos"][0], processor.image_processor.transform_clip(frames))

    batch = collate([dataset[i] for i in range(4)], processor.tokenizer.pad_token_id)
    assert batch["pixel_values_videos"].shape == (1, FRAMES, 3, 32, 32)
    assert batch["pixel_values"].shape[0] == 3 * 3  # three anyres images, 1 + 2 tiles each at 40x24
    model.train()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values",
                                    "image_sizes", "pixel_values_videos")}
    model(**inputs).loss.backward()
    model.eval()
    assert model.connector[0].weight.grad.abs().sum() > 0
    model.zero_grad()

    # the training prompt of a clip is the inference prompt (the chat template writes <video>)
    ids, labels = tokenize_conversation(QUESTION, "vicuna_v1", processor, None, [FRAMES * 4], video_id)
    prompt = evaluation.build_prompt(processor, "Which way?", "video")
    asked = processor(text=prompt, videos=[frames])["input_ids"][0].tolist()
    assert asked == ids[:labels.index(next(label for label in labels if label != IGNORE_INDEX))]


def test_show_prints_the_clip_as_one_run_of_its_video_tokens(tiny_backbones, tmp_path, capsys):
    """python data.py --show on a video record: the clip as one `<video xN>` run, counted as video tokens."""
    write_clip(tmp_path / "clip.mp4")
    path = write_json(tmp_path / "d.json", [{"id": "v", "video": "clip.mp4", "conversations": QUESTION}])
    argv = ["--show", "configs/demo.py", f"data_path={path}", f"image_folder={tmp_path}", "make_demo=false",
            f"vision_model={tiny_backbones[0]}", f"llm={tiny_backbones[1]}", f"video_frames={FRAMES}"]
    assert exit_code(data.main, argv) == 0
    out = capsys.readouterr().out
    assert f"USER: <video x{FRAMES * 4}>\nWhich way? ASSISTANT:[[ Up.</s>]]" in out
    assert f"{FRAMES} frames sampled, each pooled 2x2 to 4 tokens" in out and f" {FRAMES * 4} video + " in out


def test_records_that_cannot_be_videos_are_refused(video_vlm, tmp_path):
    _, processor = video_vlm
    write_clip(tmp_path / "clip.mp4")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [{"id": "both", "image": "a.png", "video": "clip.mp4", "conversations": QUESTION},
               {"id": "two-markers", "video": "clip.mp4", "conversations": [
                   {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]}]
    path = write_json(tmp_path / "d.json", records)
    dataset = VLMDataset(path, str(tmp_path), processor, "vicuna_v1", video_frames=FRAMES)
    with pytest.raises(UserError, match="id='both': it has both 'image' and 'video'"):
        dataset[0]
    with pytest.raises(UserError, match="2 <image> markers in the conversation of a video record"):
        dataset[1]
    with pytest.raises(ValueError, match="2 records have a 'video', and video_frames=0; set video_frames"):
        VLMDataset(path, str(tmp_path), processor, "vicuna_v1")


def write_bad_clip(folder, kind):
    """A clip file that cannot give FRAMES frames, and what the error must say."""
    write_clip(folder / "good.mp4")
    if kind == "damaged":
        (folder / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
        return "bad.mp4", r"bad\.mp4 cannot be read"
    if kind == "truncated":  # its index first (faststart), then cut: the header counts 10 frames, fewer decode
        with av.open(str(folder / "whole.mp4"), "w", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = 40, 32, "yuv420p"
            for noise in np.random.RandomState(0).randint(0, 256, (10, 32, 40, 3), dtype=np.uint8):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(noise, format="rgb24")))
            container.mux(stream.encode())
        whole = (folder / "whole.mp4").read_bytes()
        (folder / "bad.mp4").write_bytes(whole[:len(whole) * 6 // 10])
        return "bad.mp4", r"bad\.mp4(: only \d of its 10 frames decode \(damaged or truncated\)| cannot be read)"
    if kind == "no-frames":  # a video stream that holds no frame
        with av.open(str(folder / "bad.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            container.start_encoding()  # writes the header, with no frame after it
        return "bad.mp4", r"bad\.mp4 holds no video frames"
    if kind == "still-image":
        Image.new("RGB", (32, 32), (5, 5, 5)).save(folder / "bad.png")
        return "bad.png", r"bad\.png is a still image \(png_pipe\); list it under 'image'"
    if kind == "too-short":
        write_clip(folder / "bad.mp4", n_frames=3)
        return "bad.mp4", r"has 3 frames, fewer than video_frames=4"
    if kind == "huge":
        write_clip(folder / "bad.mp4", size=(64, 48))
        return "bad.mp4", r"has 64x48 frames, more than the 2,000 pixels"
    return "missing.mp4", r"video .*missing\.mp4 not found"


BAD_CLIPS = ["damaged", "truncated", "no-frames", "still-image", "too-short", "huge", "missing"]


@pytest.mark.parametrize("kind", BAD_CLIPS)
def test_bad_clips_are_bad_records(video_vlm, tmp_path, monkeypatch, kind):
    _, processor = video_vlm
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 2000)  # "huge": 64x48 stands for an 8K clip
    path, reason = write_bad_clip(tmp_path, kind)
    records = [{"id": "good", "video": "good.mp4", "conversations": QUESTION},
               {"id": kind, "video": path, "conversations": QUESTION}]
    data_path = write_json(tmp_path / "d.json", records)
    strict = VLMDataset(data_path, str(tmp_path), processor, "vicuna_v1", video_frames=FRAMES)
    with pytest.raises(UserError, match=reason) as error:
        strict[1]
    assert f"id={kind!r}" in str(error.value) and "\n" not in str(error.value)

    lenient = VLMDataset(data_path, str(tmp_path), processor, "vicuna_v1", video_frames=FRAMES, skip_bad_samples=True)
    batch = collate([lenient[0], lenient[1]], processor.tokenizer.pad_token_id)
    assert batch["ids"] == ["good"] and batch["pixel_values_videos"].shape[0] == 1
    assert [skipped for skipped, _ in batch["skipped"]] == [kind]


@pytest.mark.slow
def test_two_ranks_under_zero3_train_on_clips_beside_images(demo_dir, tmp_path):
    """deepspeed --num_gpus 2, ZeRO-3, a file of clips, AnyRes images and text: modality grouping gives
    a rank clips while the other has images, and both must still gather the same tower, connector and
    image_newline parameters in the same order (a rank that skipped one would hang the other)."""
    folder = tmp_path / "media"
    folder.mkdir()
    image_records = [r for r in json.load(open(demo_dir / "finetune.json")) if r.get("image")][:8]
    for record in image_records:
        shutil.copy(demo_dir / "images" / record["image"], folder / record["image"])
    clips = [{"id": f"clip-{i}", "video": os.path.basename(write_clip(folder / f"c{i}.mp4", size=(64, 48))),
              "conversations": QUESTION} for i in range(8)]
    data_path = write_json(tmp_path / "mixed.json", clips + image_records)
    out = tmp_path / "run"
    job = launch(train_args(demo_dir, out, f"data_path={data_path}", f"image_folder={folder}", "image_aspect=anyres",
                            f"video_frames={FRAMES}", "max_seq_len=512", "zero_stage=3", "max_steps=2",
                            "micro_batch_size=2", "train_lm=true", "log_sample_ids=true"), procs=2)
    assert job.returncode == 0, job.out[-3000:]
    assert "2 processes x 2 samples x 2 accumulation" in job.out
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert json.loads((out / "final" / "config.json").read_text())["video_token_id"] >= 0
    steps = [[json.loads(line)["ids"] for line in open(out / f"sample_ids_rank{rank}.jsonl")] for rank in (0, 1)]
    clips_only = [[all(i.startswith("clip-") for i in ids) for ids in rank] for rank in steps]
    assert any(a != b for a, b in zip(*clips_only)), steps  # a step where one rank had clips only, the other not


def save_video_run(model, processor, folder):
    model.save_pretrained(folder / "final")
    processor.save_pretrained(folder / "final")
    return str(folder)


def test_native_export_is_llava_next_video_with_equal_logits(video_vlm, tmp_path, capsys):
    from transformers import LlavaNextVideoForConditionalGeneration

    model, processor = video_vlm
    run_dir = save_video_run(model, processor, tmp_path / "run")
    folder = tmp_path / "llava"
    assert push.main([run_dir, "--repo", "me/video", "--local-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "format: llava" in out and "LlavaNextVideoForConditionalGeneration loads" in out
    native, info = LlavaNextVideoForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    native.eval()
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "LlavaNextVideoProcessor"
    assert processor_config["video_token"] == "<video>"
    assert processor_config["video_processor"]["num_frames"] == FRAMES
    assert processor_config["video_processor"]["crop_size"] == {"height": 32, "width": 32}
    assert "LlavaNextVideoForConditionalGeneration" in (folder / "README.md").read_text()

    frames = load_video(write_clip(tmp_path / "c.mp4"), FRAMES)
    image = Image.new("RGB", (40, 24), (0, 90, 200))
    for media in ("video", "image"):
        prompt = evaluation.build_prompt(processor, "Which way?", media)
        inputs = processor(text=prompt, **({"videos": [frames]} if media == "video" else {"images": [image]}))
        with torch.no_grad():
            ours, theirs = model(**inputs).logits, native(**inputs).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_remote_export_takes_clips_and_pad_video_models_are_not_llava(tiny_backbones, tmp_path, monkeypatch,
                                                                       capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model, processor = build_vlm(*tiny_backbones, video_frames=FRAMES)  # pad images: LlavaNextVideo cannot
    processor.chat_template = chat_template_for("vicuna_v1", processor.tokenizer)
    run_dir = save_video_run(model.eval(), processor, tmp_path / "run")
    assert exit_code(push.main, [run_dir, "--repo", "me/v", "--local-dir", tmp_path / "no", "--format", "llava"]) == 2
    assert "takes images only as AnyRes tiles" in capsys.readouterr().err
    folder = tmp_path / "remote"
    assert push.main([run_dir, "--repo", "me/v", "--local-dir", str(folder)]) == 0
    assert "format: remote (llava is not possible: a video model" in capsys.readouterr().out
    remote = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    remote_processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert remote_processor.video_frames == FRAMES
    frames = load_video(write_clip(tmp_path / "c.mp4"), FRAMES)
    prompt = evaluation.build_prompt(remote_processor, "Which way?", "video")
    inputs = remote_processor(text=prompt, videos=[frames])
    assert torch.equal(inputs["input_ids"], processor(text=prompt, videos=[frames])["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(remote(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_eval_asks_clips_from_the_jsonl_and_from_the_command_line(video_vlm, tmp_path, capsys):
    model, processor = video_vlm
    run_dir = save_video_run(model, processor, tmp_path / "run")
    write_clip(tmp_path / "c.mp4")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "v", "video": "c.mp4", "question": "<image>\nWhich way?", "answer": "up", "category": "direction"},
        {"id": "t", "question": "Hi?", "answer": "hi", "category": "text"}]))
    evaluation.main([run_dir, "--data", str(questions), "--out", str(tmp_path / "scores"), "--max_new_tokens", "3"])
    results = json.loads((tmp_path / "scores" / "results.json").read_text())
    assert set(results["categories"]) == {"direction", "text"} and results["overall"]["count"] == 2
    answers = [json.loads(line) for line in open(tmp_path / "scores" / "answers.jsonl")]
    asked = evaluation.generate_answers(model, processor, [answers[0]["prompt"]], [{"video": str(tmp_path / "c.mp4")}],
                                        max_new_tokens=3)
    assert answers[0]["prediction"] == asked[0] and answers[0]["prompt"].count("<video>") == 1
    capsys.readouterr()

    evaluation.main([run_dir, "--video", str(tmp_path / "c.mp4"), "--prompt", "Which way?", "--max_new_tokens", "3"])
    plain = evaluation.build_prompt(processor, "Which way?", "video")  # --prompt adds no answer-format suffix
    assert capsys.readouterr().out.strip() == evaluation.generate_answers(
        model, processor, [plain], [{"video": str(tmp_path / "c.mp4")}], max_new_tokens=3)[0]
    still = evaluation.open_clip(str(tmp_path / "c.mp4"), FRAMES, "c", still_frame=True)
    assert [round(frame_level(f)) for f in still] == [round(frame_level(load_video(str(tmp_path / "c.mp4"),
                                                                                    FRAMES)[2]))] * FRAMES
    write_clip(tmp_path / "short.mp4", n_frames=2)
    assert exit_code(evaluation.main, [run_dir, "--video", tmp_path / "short.mp4", "--prompt", "Which way?"]) == 2
    assert "--prompt: video" in capsys.readouterr().err
    assert exit_code(evaluation.main, [run_dir, "--video", tmp_path / "c.mp4", "--image", tmp_path / "c.mp4",
                                       "--prompt", "?"]) == 2
    assert "pass --image or --video, not both" in capsys.readouterr().err


def test_frame_token_counts_at_real_scale_are_what_the_pooling_makes():
    from model import count_frame_tokens

    assert count_frame_tokens(336, 14) == 144  # LLaVA-NeXT-Video: 24 x 24 patches -> 12 x 12
    for side in (24, 27):  # SigLIP-so400m at 384 px: 27 x 27, the last row and column dropped
        assert torch.nn.functional.avg_pool2d(torch.zeros(1, 1, side, side), 2).numel() == \
            count_frame_tokens(side * 14, 14)


REAL = os.path.join(os.path.dirname(ROOT), "shared", "real")  # ../shared/real: the real tokenizers and configs


@pytest.mark.skipif(not os.path.isdir(REAL), reason="../shared/real (the real tokenizers) is not here")
@pytest.mark.parametrize("llm, vision, template, tokens", [
    ("vicuna-7b-v1.5", "clip-vit-large-patch14-336", "vicuna_v1", 32 * 144),
    ("qwen2.5-instruct", "siglip-so400m-patch14-384", "chat", 32 * 169),  # 27 x 27 patches pool to 13 x 13
    ("llama-3.1-instruct", "clip-vit-large-patch14-336", "chat", 32 * 144)])
def test_real_tokenizers_train_on_the_ids_inference_asks_with(llm, vision, template, tokens):
    """LLaVA-NeXT-Video's 32 frames on the real files: the clip's token count, and the training ids of a
    video record up to its first answer equal the processor's ids for the chat template's prompt."""
    from model import build_processor

    processor = build_processor(f"{REAL}/configs/{vision}", f"{REAL}/tokenizers/{llm}", "anyres", video_frames=32)
    processor.chat_template = chat_template_for(template, processor.tokenizer)
    assert processor.video_token_count(32) == tokens
    ids, labels = tokenize_conversation(QUESTION, template, processor, None, [tokens], processor.video_token_id)
    assert ids.count(processor.video_token_id) == tokens and processor.image_token_id not in ids
    frames = [Image.new("RGB", (480, 360), (9, 9, 9))] * 32
    asked = processor(text=evaluation.build_prompt(processor, "Which way?", "video"), videos=[frames])
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert asked["input_ids"][0].tolist() == ids[:first_answer]
    size = processor.image_processor.size
    assert tuple(asked["pixel_values_videos"].shape) == (1, 32, 3, size, size)
