"""train.py: config parsing, param groups, the lr schedule, and training runs: in this process
(train.main on one rank), and through the DeepSpeed launcher where two ranks are the subject."""
import itertools
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import model
import run
import train
from conftest import (ROOT, exit_code, launch, read_metrics, read_weights, train_args, train_in_process,
                      write_json)
from model import VLMForCausalLM
from run import Config, UserError, load_config
from train import build_param_groups, freeze_components, lr_factor


# ---------------------------------------------------------------------------------------------
# Config parsing


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("import math\nlr_lm = 1e-4\nbatch_size = 64\ntemplate = 'vicuna_v1'\nepochs = 2\n"
                    "warmup_ratio = 0  # an int for a float field is fine\n")
    cfg, dry = load_config([str(path), "lr_lm=5e-6", "train_vision=true", "out_dir=runs/x", "--local_rank=1"])
    assert (cfg.lr_lm, cfg.batch_size, cfg.template, cfg.epochs) == (5e-6, 64, "vicuna_v1", 2)
    assert cfg.train_vision is True and cfg.out_dir == "runs/x" and cfg.warmup_ratio == 0.0 and not dry
    cfg, dry = load_config(["max_steps=3", "--dry-run"])  # overrides alone, no file
    assert cfg.max_steps == 3 and dry


@pytest.mark.parametrize("args, message", [
    (["lr_llm=1e-5"], "unknown config key 'lr_llm' in the command line; did you mean lr_lm"),
    (["max_steps=ten"], "max_steps='ten': expected int"),
    (["train_lm=maybe"], "train_lm='maybe': expected bool"),
    (["lr_lm"], "override 'lr_lm' is not key=value"),
    (["missing.py"], "config file 'missing.py' not found"),
])
def test_config_errors(args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_config(args)


def test_config_file_errors(tmp_path):
    (tmp_path / "typo.py").write_text("micro_batch = 4\n")
    with pytest.raises(UserError, match=r"unknown config key 'micro_batch' in .*typo.py; did you mean micro_batch_size"):
        load_config([str(tmp_path / "typo.py")])
    (tmp_path / "broken.py").write_text("lr_lm = 1e-5 +\n")
    with pytest.raises(UserError, match=r"config file .*broken.py' does not run: SyntaxError"):
        load_config([str(tmp_path / "broken.py")])
    (tmp_path / "type.py").write_text("batch_size = '8'\n")
    with pytest.raises(UserError, match="batch_size='8' in .*type.py: expected int"):
        load_config([str(tmp_path / "type.py")])
    (tmp_path / "pins.py").write_text("image_grid_pinpoints = ['336x672', '672x336']\n")
    with pytest.raises(UserError, match="expected one text; write a list as one comma-separated string "
                                        r"\(e.g. image_grid_pinpoints='336x672,672x336'"):
        load_config([str(tmp_path / "pins.py")])
    (tmp_path / "settings.txt").write_text("lr_lm = 1e-5\n")
    with pytest.raises(UserError, match=r"settings.txt' is a file, and a config file is Python whose name ends in .py"):
        load_config([str(tmp_path / "settings.txt"), "lr_lm=1e-5"])


def test_a_config_file_may_compute_its_numbers_with_numpy(tmp_path):
    """numpy's numbers are numbers: np.float64 for a float, np.int64 for an int (as Python's own)."""
    (tmp_path / "np.py").write_text("import numpy as np\nlr_lm = np.float64(2e-5)\nlr_vision = np.float32(0.5)\n"
                                    "max_steps = np.int64(10)\nwarmup_ratio = 0\n")
    cfg, _ = load_config([str(tmp_path / "np.py")])
    assert (cfg.lr_lm, cfg.lr_vision, cfg.max_steps, cfg.warmup_ratio) == (2e-5, 0.5, 10, 0.0)
    assert [type(v) for v in (cfg.lr_lm, cfg.lr_vision, cfg.max_steps, cfg.warmup_ratio)] == [float, float, int, float]
    (tmp_path / "bool.py").write_text("max_steps = True\n")
    with pytest.raises(UserError, match="max_steps=True in .*bool.py: expected int"):
        load_config([str(tmp_path / "bool.py")])


def test_value_checks():
    with pytest.raises(UserError, match="batch_size=100 is not a multiple of micro_batch_size \\(8\\) x 2"):
        run.check_config(Config(batch_size=100, micro_batch_size=8, data_path="x"), world_size=2)
    assert run.check_config(Config(batch_size=64, micro_batch_size=8, data_path="x"), world_size=2) == 4
    with pytest.raises(UserError, match="template='llama3': valid values are plain, vicuna_v1, chat"):
        run.check_config(Config(template="llama3", data_path="x"), 1)
    with pytest.raises(UserError, match="nothing to train"):
        run.check_config(Config(train_connector=False, data_path="x"), 1)
    with pytest.raises(UserError, match="attn_implementation='flash': valid values are sdpa, flex_attention"):
        run.check_config(Config(attn_implementation="flash", data_path="x"), 1)
    with pytest.raises(UserError, match="compile=True needs zero_stage 0, 1 or 2"):
        run.check_config(Config(compile=True, zero_stage=3, data_path="x"), 1)


def test_anyres_settings_are_checked(tiny_backbones):
    with pytest.raises(UserError, match="image_grid_pinpoints='336,672': '336' is not HEIGHTxWIDTH"):
        run.check_config(Config(image_aspect="anyres", image_grid_pinpoints="336,672", data_path="x"), 1)
    with pytest.raises(UserError, match="image_grid_pinpoints is set but image_aspect='pad'"):
        run.check_config(Config(image_grid_pinpoints="336x672", data_path="x"), 1)
    assert model.parse_pinpoints(" 64x32,32x96") == [[64, 32], [32, 96]]
    vision, llm = tiny_backbones
    # a setting the loaded backbones cannot take is named as that setting, not as a model that cannot be built
    for settings, message in [({"image_grid_pinpoints": "32x48"},
                               r"image_grid_pinpoints entry \[32, 48\] is not a whole number of .* 32x32 tiles"),
                              ({"drop_cls": False}, "image_aspect='anyres' .* needs drop_cls=True")]:
        cfg = Config(vision_model=vision, llm=llm, image_aspect="anyres", precision="fp32", **settings)
        with pytest.raises(UserError, match="^" + message):
            train.build_training_model(cfg, torch.device("cpu"))


@pytest.mark.parametrize("override, message", [
    ({"lr_lm": -1.0}, "lr_lm=-1.0 is out of range: it must be at least 0"),
    ({"batch_size": 0}, "batch_size=0 is out of range: it must be at least 1"),
    ({"log_every": 0}, "log_every=0 is out of range"),
    ({"seed": -1}, "seed=-1 is out of range: it must be between 0 and"),
    ({"num_workers": -1}, "num_workers=-1 is out of range"),
    ({"max_steps": -1}, "max_steps=-1 is out of range"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio=1.5 is out of range: it must be between 0 and 1"),
    ({"lr_connector": float("nan")}, "lr_connector=nan is out of range"),
    ({"epochs": 0}, "max_steps=0 and epochs=0 train nothing"),
])
def test_every_key_is_range_checked_before_anything_runs(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        run.check_config(Config(data_path="x", **override), world_size=1)


def test_dry_run_prints_config_and_loads_nothing(capsys, monkeypatch):
    """`python train.py CONFIG key=value --dry-run` (train.main through exit_after, in this process)
    prints the resolved config as JSON and exits 0 before any lock, process group or model; a bad
    key is one error line and exit code 2."""
    def started(*_):
        raise AssertionError("a dry run started a run")

    for module, name in ((run, "lock_out_dir"), (run, "start_processes"), (train, "build_training_model")):
        monkeypatch.setattr(module, name, started)
    assert exit_code(train.main, ["configs/llava_pretrain.py", "lr_connector=2e-3", "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["lr_connector"] == 2e-3 and resolved["llm"] == "lmsys/vicuna-7b-v1.5"
    assert exit_code(train.main, ["configs/demo.py", "lr_llm=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key") and "Traceback" not in err


def test_shipped_configs_parse_and_check():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        cfg, _ = load_config([os.path.join(ROOT, "configs", name)])
        run.check_config(cfg, world_size=8 if "llava" in name or "qwen" in name else 1)
        if name == "demo_video.py":  # the image demo's settings, imported, then its own
            assert (cfg.lr_vision, cfg.max_steps, cfg.video_frames, cfg.out_dir) == (3e-5, 2000, 8, "out/demo_video")


# ---------------------------------------------------------------------------------------------
# Param groups and schedule


def test_param_groups(tiny_vlm):
    """A stage-2 split (tower frozen) of the tiny VLM, the groups written out by hand: weights in
    their component's group, biases and norm weights in its no_decay group (weight decay 0), each
    group at its component's lr; the frozen tower in none."""
    model, _ = tiny_vlm
    cfg = Config(train_vision=False, train_connector=True, train_lm=True, lr_connector=1e-3, lr_lm=2e-5,
                 wd_connector=0.0, wd_lm=0.1)
    freeze_components(model, cfg)
    layers = ("language_model.model.layers.0.", "language_model.model.layers.1.")
    linear = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")
    expected = {  # (name, lr, weight decay): the tensors' names
        ("lm", 2e-5, 0.1): ["language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                            *[f"{layer}{name}.weight" for layer in layers for name in linear]],
        ("lm_no_decay", 2e-5, 0.0): ["language_model.model.norm.weight",
                                     *[f"{layer}{norm}.weight" for layer in layers
                                       for norm in ("input_layernorm", "post_attention_layernorm")]],
        ("connector", 1e-3, 0.0): ["connector.0.weight", "connector.2.weight"],
        ("connector_no_decay", 1e-3, 0.0): ["connector.0.bias", "connector.2.bias"],
    }
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {(g["name"], g["lr"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"])
              for g in build_param_groups(model, cfg)}
    assert groups == {key: sorted(tensors) for key, tensors in expected.items()}
    assert all(p.requires_grad == (not n.startswith("vision_tower.")) for n, p in model.named_parameters())


def test_compile_blocks_runs_every_block_compiled_with_the_same_output(tiny_vlm, monkeypatch):
    """After compile_blocks, each LLM and vision block runs under torch.compile (a hook inside it sees
    torch.compiler.is_compiling()), the glue around them does not, and the logits do not change.
    The "eager" backend keeps this fast: TorchDynamo captures the same graphs, without code generation
    (the launcher test below runs inductor, train.py's default)."""
    import functools

    from PIL import Image

    model, processor = tiny_vlm
    blocks = [*model.language_model.get_decoder().layers, *model.vision_tower.encoder.layers]
    compiled = {}
    for k, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, k=k: compiled.update({k: torch.compiler.is_compiling()}))
    glue = []
    model.connector.register_forward_pre_hook(lambda *_: glue.append(torch.compiler.is_compiling()))
    inputs = processor(text="<image>\nWhat is in the image?", images=Image.new("RGB", (32, 32), (200, 30, 30)))
    with torch.no_grad():
        eager = model(**inputs).logits
    assert compiled == {k: False for k in range(4)}  # 2 LLM + 2 vision layers
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    train.compile_blocks(model)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        torch.compiler.reset()  # forget the compiled code: other tests build other models
    assert compiled == {k: True for k in range(4)} and glue == [False, False]
    assert torch.equal(logits, eager)


def test_lr_schedule():
    total = 100
    factors = [lr_factor(s, total, 0.1, 0.1) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)  # 10 warmup steps
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))  # cosine never goes up
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_factor(total, total, 0.1, 0.1) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# Runs of train.py: in this process (conftest.train_in_process, one rank), and through the
# launcher where two ranks are the subject


def initial_connector(demo_dir, seed=0):
    """The connector a run starts from: train.py seeds, then builds (the same on every rank)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cfg = Config(vision_model=f"{demo_dir}/backbones/tiny-clip", llm=f"{demo_dir}/backbones/tiny-llama",
                 template="vicuna_v1", precision="fp32")
    model, _ = train.build_training_model(cfg, torch.device("cpu"))
    return {f"connector.{k}": v for k, v in model.connector.state_dict().items()}


@pytest.mark.slow
def test_two_ranks_under_zero2_and_zero3_move_each_component_at_its_own_lr_into_the_same_final(demo_dir, tmp_path):
    """What the optimizer did, not what train.py wrote into its groups (the original project's bug:
    DeepSpeed silently ran one lr for everything), on 2 ranks under ZeRO-2 and ZeRO-3: the frozen
    tower stays bit-identical to the pretrained one; the connector, trained at lr 0, to its start;
    the LLM's layers (lr 1e-3) move by about their lr per step (Adam's first steps move each weight
    by ~lr). And the ZeRO-3 final/, gathered one parameter at a time, holds what ZeRO-2's holds."""
    steps, lr_lm, finals = 3, 1e-3, {}
    for stage in (2, 3):
        out = tmp_path / f"zero{stage}"
        job = launch(train_args(demo_dir, out, f"zero_stage={stage}", f"max_steps={steps}", "train_vision=false",
                                "train_lm=true", "lr_connector=0", f"lr_lm={lr_lm}", "warmup_ratio=0",
                                "min_lr_ratio=1.0"), procs=2)
        assert job.returncode == 0, job.out[-3000:]
        assert "2 processes x 4 samples x 1 accumulation" in job.out
        lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert [r["step"] for r in lines] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in lines)
        finals[stage] = read_weights(out / "final")
    vision_base = read_weights(demo_dir / "backbones" / "tiny-clip")
    layers_base = {k: v for k, v in read_weights(demo_dir / "backbones" / "tiny-llama").items()
                   if k.startswith("model.layers.")}
    connector_start = initial_connector(demo_dir)
    for stage, final in finals.items():
        for name, value in final.items():
            if name.startswith("vision_tower."):  # frozen: bit-identical to the pretrained tower
                assert torch.equal(value, vision_base["vision_model." + name[len("vision_tower."):]]), (stage, name)
        moved = [k for k in connector_start if not torch.equal(final[k], connector_start[k])]
        assert not moved, (stage, moved)  # in the optimizer, at lr 0
        change = torch.cat([(final["language_model." + k] - v).abs().flatten() for k, v in layers_base.items()])
        assert change.median() > 0.5 * lr_lm and change.max() < (steps + 1) * lr_lm, (stage, change.median(),
                                                                                       change.max())
    assert sorted(finals[2]) == sorted(finals[3])
    assert all(torch.allclose(finals[2][k], finals[3][k], atol=1e-5) for k in finals[2])


def test_stage1_then_stage2_init_from(demo_dir, tmp_path):
    """Stage 1 trains the connector alone; stage 2 starts from it under ZeRO-3 (one rank here: the
    LLM is still loaded partitioned, and the connector loaded before deepspeed.initialize) with the
    connector frozen, so it must end exactly as stage 1's."""
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    train_in_process(train_args(demo_dir, stage1, f"data_path={demo_dir}/pretrain.json", "template=plain",
                                "train_vision=false", "train_lm=false", "max_steps=3", "zero_stage=2"))
    s1 = read_weights(stage1 / "final")
    llm_base = read_weights(demo_dir / "backbones" / "tiny-llama")
    assert torch.equal(s1["language_model.model.layers.0.mlp.up_proj.weight"],
                       llm_base["model.layers.0.mlp.up_proj.weight"])  # stage 1 leaves the LLM alone
    output = train_in_process(train_args(demo_dir, stage2, f"init_from={stage1}", "train_vision=false",
                                         "train_connector=false", "train_lm=true", "zero_stage=3", "max_steps=2"))
    assert "connector loaded" in output
    s2 = read_weights(stage2 / "final")
    connector = [k for k in s1 if k.startswith("connector.")]
    assert connector and all(torch.equal(s1[k], s2[k]) for k in connector)
    assert not torch.equal(s1["language_model.model.layers.0.mlp.up_proj.weight"],
                           s2["language_model.model.layers.0.mlp.up_proj.weight"])
    saved = json.load(open(stage2 / "final" / "train_config.json"))
    assert saved["init_from"] == str(stage1) and saved["zero_stage"] == 3


def test_anyres_stage1_then_stage2_trains_and_carries_image_newline(demo_dir, tmp_path):
    """AnyRes end to end: stage 1 trains the connector and image_newline (the demo's 64x64 images
    become 2x2 tiles + base on the 32-pixel tower: 16 + 8 x 9 = 88 tokens); stage 2 under ZeRO-3,
    packed, with text-only records, starts from both."""
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    anyres = ["image_aspect=anyres", "max_seq_len=256"]
    output = train_in_process(train_args(demo_dir, stage1, f"data_path={demo_dir}/pretrain.json", "template=plain",
                                         *anyres, "train_vision=false", "train_lm=false", "max_steps=3",
                                         "zero_stage=2"))
    s1 = read_weights(stage1 / "final")
    model = VLMForCausalLM.from_pretrained(stage1 / "final")
    assert model.config.image_grid_pinpoints == [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    assert "connector_no_decay" in output and "image_newline" in s1
    import random

    import numpy as np

    random.seed(0)  # the newline the run started from: train.py seeds (seed=0), then builds
    np.random.seed(0)
    torch.manual_seed(0)
    start = train.build_training_model(Config(vision_model=f"{demo_dir}/backbones/tiny-clip", image_aspect="anyres",
                                              llm=f"{demo_dir}/backbones/tiny-llama", precision="fp32"),
                                       torch.device("cpu"))[0].image_newline.detach()
    moved = (s1["image_newline"] - start).abs().max()
    assert 0 < moved < 4 * 3 * 1e-3  # trained: Adam moves a weight by about lr (1e-3) per step, 3 steps

    output = train_in_process(train_args(demo_dir, stage2, f"init_from={stage1}", *anyres, "train_vision=false",
                                         "train_connector=false", "train_lm=true", "zero_stage=3",
                                         "pack_samples=true", "max_steps=2"))
    assert "connector and image_newline loaded" in output
    s2 = read_weights(stage2 / "final")
    assert torch.equal(s1["image_newline"], s2["image_newline"])  # frozen in stage 2: exactly stage 1's
    assert all(math.isfinite(loss) for loss in read_metrics(stage2).values())
    assert not torch.equal(s1["language_model.model.layers.0.mlp.up_proj.weight"],
                           s2["language_model.model.layers.0.mlp.up_proj.weight"])


def test_resume_gives_the_same_losses(demo_dir, tmp_path):
    """6 steps straight vs 3 steps (a checkpoint at 3, then stopped by SIGTERM-free means: a
    second run with resume=True continues) - per-step losses and final weights agree, to the bit."""
    import shutil

    straight, split = tmp_path / "straight", tmp_path / "split"
    train_in_process(train_args(demo_dir, straight, "save_every=3"))
    train_in_process(train_args(demo_dir, split, "save_every=3"))
    # roll the split run back to its step-3 checkpoint, as if it had stopped there
    ckpt = split / "checkpoints"
    shutil.rmtree(split / "final")
    shutil.rmtree(ckpt / "step00000006")
    (ckpt / "latest").write_text("step00000003")
    lines = open(split / "metrics.jsonl").readlines()[:3]
    (split / "metrics.jsonl").write_text("".join(lines))
    output = train_in_process(train_args(demo_dir, split, "save_every=3", "resume=true"))
    assert "resumed from" in output and "at step 3" in output
    a, b = read_metrics(straight), read_metrics(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)
    wa, wb = read_weights(straight / "final"), read_weights(split / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_packed_run_gives_the_unpacked_losses_with_less_padding(demo_dir, tmp_path):
    """pack_samples=True: the same per-step losses as the padded run (the same samples per
    micro-batch; attention never crosses samples), fewer padded positions."""
    runs = {}
    for pack in (False, True):
        out = tmp_path / f"pack_{pack}"
        train_in_process(train_args(demo_dir, out, f"pack_samples={pack}", "max_steps=4", "max_seq_len=512"))
        runs[pack] = [json.loads(line) for line in open(out / "metrics.jsonl")]
    padded, packed = runs[False], runs[True]
    assert [r["step"] for r in packed] == [1, 2, 3, 4]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-4 for a, b in zip(padded, packed)), (padded, packed)
    assert sum(r["padding"] for r in packed) < 0.5 * sum(r["padding"] for r in padded)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_losses(demo_dir, tmp_path):
    """compile=True (torch.compile of every block, inductor: train.py's default backend), packed
    rows of varying length: per-step losses equal to the eager run's."""
    runs = {}
    try:
        for compiled in (False, True):
            out = tmp_path / f"compile_{compiled}"
            output = train_in_process(train_args(demo_dir, out, f"compile={compiled}", "pack_samples=true",
                                                 "max_steps=3", "max_seq_len=512"))
            runs[compiled] = read_metrics(out)
    finally:
        torch.compiler.reset()  # forget the compiled code: other tests build other models
    assert "compiling 4 blocks" in output  # 2 LLM layers + 2 vision layers
    assert sorted(runs[True]) == [1, 2, 3]
    assert all(abs(runs[False][s] - runs[True][s]) <= 1e-4 for s in runs[False]), runs


# ---------------------------------------------------------------------------------------------
# The model as train.py builds it


def count_layer_calls(model, batch):
    """Runs of the LLM decoder layers and vision encoder layers during one forward + backward: 2 per
    layer when gradient checkpointing recomputes it in backward, 1 when it does not. Counted as each
    layer's MLP starts: transformers checkpoints a layer's forward, inside the layer's own hooks, and
    torch stops a recomputation as soon as it has the last saved tensor it needs."""
    calls = {"lm": 0, "vision": 0}
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_, part=part: calls.update({part: calls[part] + 1}))
             for part, layers in (("lm", model.language_model.get_decoder().layers),
                                  ("vision", model.vision_tower.encoder.layers)) for layer in layers]
    try:
        model(**batch).loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_training_model_recomputes_layers_when_checkpointing(tiny_backbones, stage, checkpointing):
    """train.py's own model builder: the LLM trains in training mode (a frozen one too: stage 1's
    gradients reach the connector through it), so gradient checkpointing recomputes every LLM layer
    in backward; the frozen vision tower runs once, in eval mode."""
    from PIL import Image

    vision, llm = tiny_backbones
    cfg = Config(vision_model=vision, llm=llm, template="vicuna_v1", precision="fp32", train_lm=stage == "finetune",
                 gradient_checkpointing=checkpointing)
    model, processor = train.build_training_model(cfg, torch.device("cpu"))
    assert model.training and model.language_model.training and model.connector.training
    assert not model.vision_tower.training
    batch = processor(text=["<image>\nWhat is it? a red square", "<image>\nAnd this? blue"],
                      images=[Image.new("RGB", (32, 32), "red"), Image.new("RGB", (40, 32), "blue")], padding_side="right")
    batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == processor.image_token_id, -100)
    layers = len(model.language_model.get_decoder().layers)
    assert count_layer_calls(model, batch) == {"lm": layers * (2 if checkpointing else 1), "vision": 2}


def test_loss_with_nothing_supervised_reaches_every_trained_parameter(tiny_backbones):
    """A micro-batch whose samples were all skipped trains as one pad token with no label: its zero
    loss must still give every trained parameter a gradient (the untied LM head included), as a
    normal step does, or ZeRO's reductions wait on the rank that lacks it."""
    vision, llm = tiny_backbones
    cfg = Config(vision_model=vision, llm=llm, precision="fp32", train_lm=True)
    model, processor = train.build_training_model(cfg, torch.device("cpu"))
    pad = processor.tokenizer.pad_token_id
    loss = model(input_ids=torch.tensor([[pad]]), labels=torch.tensor([[-100]]),
                 position_ids=torch.zeros(1, 1, dtype=torch.long)).loss
    assert loss.item() == 0.0
    loss.backward()
    assert model.language_model.lm_head.weight.grad is not None  # not tied to the embeddings here
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.slow
def test_python_train_py_without_the_launcher_trains(demo_dir, tmp_path):
    """nanoGPT's habit: `python train.py CONFIG` is one process, no launcher, no MPI."""
    out = tmp_path / "plain"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    job = subprocess.run([sys.executable, "train.py", *train_args(demo_dir, out, "max_steps=2")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    assert "1 processes x 4 samples x 2 accumulation" in job.stdout
    assert os.path.exists(out / "final" / "model.safetensors")


@pytest.mark.slow
def test_resume_on_fewer_processes_continues_with_the_next_samples(demo_dir, tmp_path):
    """2 ranks for 3 steps (the launcher), then resumed on 1 rank (in this process) with a smaller
    micro-batch (same batch_size): the epoch's 64 records are each trained exactly once (log_sample_ids)."""
    out = tmp_path / "run"
    first = launch(train_args(demo_dir, out, "max_steps=3", "save_every=0", "log_sample_ids=true"), procs=2)
    assert first.returncode == 0, first.out[-3000:]
    second = train_in_process(train_args(demo_dir, out, "max_steps=8", "micro_batch_size=2", "resume=true",
                                         "log_sample_ids=true"))
    assert "at step 3" in second and "1 processes x 2 samples x 4 accumulation" in second
    steps = {}
    for rank in (0, 1):
        for line in open(out / f"sample_ids_rank{rank}.jsonl"):
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(record["ids"])
    assert sorted(steps) == list(range(1, 9)) and all(len(ids) == 8 for ids in steps.values())
    records = json.load(open(demo_dir / "finetune.json"))
    assert sorted(sum(steps.values(), [])) == sorted(r["id"] for r in records)


@pytest.mark.slow
def test_micro_batch_with_every_sample_skipped_on_one_rank(demo_dir, tmp_path):
    """skip_bad_samples=True, 2 ranks, ZeRO-2, the LLM trained: rank 0's micro-batch holds only
    records whose image is missing (the 4 longest of a step go to rank 0), rank 1's only good ones.
    Rank 0 trains a nothing-supervised batch that must reach every parameter rank 1 updates."""
    good = [r for r in json.load(open(demo_dir / "finetune.json")) if r.get("image")][:4]
    long_question = "Look closely at every part of this picture and then tell me " * 5
    bad = [{"id": f"bad-{i}", "image": f"missing-{i}.png", "conversations": [
        {"from": "human", "value": "<image>\n" + long_question}, {"from": "gpt", "value": "red"}]} for i in range(4)]
    data = write_json(tmp_path / "half_bad.json", good + bad)
    out = tmp_path / "run"
    job = launch(train_args(demo_dir, out, f"data_path={data}", "skip_bad_samples=true", "zero_stage=2",
                            "train_lm=true", "max_steps=2", "batch_size=8", "micro_batch_size=4",
                            "log_sample_ids=true"), procs=2, timeout=300)
    assert job.returncode == 0, job.out[-3000:]
    trained = [json.loads(line)["ids"] for line in open(out / "sample_ids_rank0.jsonl")]
    assert trained == [[], []]  # rank 0 had nothing to train in either step
    final, llm_base = read_weights(out / "final"), read_weights(demo_dir / "backbones" / "tiny-llama")
    assert not torch.equal(final["language_model.lm_head.weight"][:llm_base["lm_head.weight"].shape[0]],
                           llm_base["lm_head.weight"])  # rank 1's gradients reached the head


def test_disk_full_while_saving_says_so(tmp_path):
    import errno

    from safetensors import SafetensorError

    partial = str(tmp_path / "checkpoints" / "step00000004.partial")
    with pytest.raises(UserError, match=r"cannot write .*step00000004\.partial \(the disk is full; .* MiB free\)"):
        with run.writing(partial):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(UserError, match="the disk is full"):  # how torch.save reports it
        with run.writing(partial):
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
    with pytest.raises(UserError, match="the disk is full"):  # how safetensors reports it (push.py's exports)
        with run.writing(partial):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(RuntimeError, match="something else"):  # other errors are not disguised
        with run.writing(partial):
            raise RuntimeError("something else")


# ---------------------------------------------------------------------------------------------
# Packing per attention implementation


def text_samples(tokenizer, image_size, n=6):
    """n text-only training samples of different lengths, as VLMDataset makes them."""
    samples = []
    for i in range(n):
        ids = tokenizer(" ".join(["a red square on the left"] * (i + 1))).input_ids
        samples.append({"id": f"s{i}", "input_ids": torch.tensor(ids), "labels": torch.tensor(ids),
                        "pixel_values": torch.zeros(0, 3, image_size, image_size),
                        "image_sizes": torch.zeros(0, 2, dtype=torch.long)})
    return samples


def test_flash_attention_gets_each_micro_batch_packed_into_one_row(tiny_vlm):
    """transformers derives per-sample attention from position_ids alone, for sdpa/flex/eager at any
    number of rows, but for flash_attention_2 only in a batch of one row: with two rows FA2 would
    run plain causal attention over each row and a sample would see the ones packed before it."""
    from transformers.masking_utils import find_packed_sequence_indices
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    model, processor = tiny_vlm
    samples = text_samples(processor.tokenizer, model.config.vision_config.image_size)
    lengths = {s["id"]: len(s["input_ids"]) for s in samples}
    cfg = Config(pack_samples=True, max_seq_len=max(lengths.values()) + 4)
    pad = processor.tokenizer.pad_token_id

    rows = train.make_collate(cfg, pad, "sdpa")(samples)
    assert rows["input_ids"].shape[0] >= 2 and rows["attention_mask"] is None
    segments = find_packed_sequence_indices(rows["position_ids"])  # how sdpa's mask will see it
    assert segments is not None
    assert not _is_packed_sequence(rows["position_ids"], rows["input_ids"].shape[0])  # FA2 would not

    one_row = train.make_collate(cfg, pad, "flash_attention_2")(samples)
    assert one_row["input_ids"].shape == (1, sum(lengths.values())) and one_row["attention_mask"] is None
    assert _is_packed_sequence(one_row["position_ids"], 1)
    (cu_seqlens, _), (longest, _) = prepare_fa_kwargs_from_position_ids(one_row["position_ids"])
    assert cu_seqlens.tolist() == [0, *itertools.accumulate(lengths[i] for i in one_row["ids"])]
    assert longest == max(lengths.values())
    unpacked = train.make_collate(Config(pack_samples=False), pad, "flash_attention_2")(samples)
    assert unpacked["attention_mask"] is not None and unpacked["input_ids"].shape[0] == len(samples)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_padded_loss_per_attention_implementation(tiny_backbones, attn):
    """Two or more packed rows, no attention mask: the same loss as one padded row per sample."""
    from model import build_vlm

    vision, llm = tiny_backbones
    model, processor = build_vlm(vision, llm, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    samples = text_samples(processor.tokenizer, model.config.vision_config.image_size)
    pad = processor.tokenizer.pad_token_id
    cfg = Config(pack_samples=True, max_seq_len=max(len(s["input_ids"]) for s in samples) + 4)
    losses = {}
    for name, collate_batch in (("padded", train.make_collate(Config(), pad, attn)),
                                ("packed", train.make_collate(cfg, pad, attn))):
        batch = collate_batch(samples)
        if name == "packed":
            assert batch["input_ids"].shape[0] >= 2
        with torch.no_grad():
            losses[name] = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"], labels=batch["labels"]).loss.item()
    assert abs(losses["padded"] - losses["packed"]) < 1e-5, losses


def test_every_tensor_collective_goes_through_sum_over_ranks():
    """A GPU run's process group has only NCCL, which carries GPU tensors alone: a CPU tensor in
    all_reduce stops the run at its first step. sum_over_ranks puts its tensor on the training
    device; every other tensor collective in train.py and bench.py would be a place to get it wrong.
    (Object collectives, e.g. all_gather_object, place their own tensors.)"""
    import ast

    tensor_collectives = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "broadcast",
                          "reduce", "send", "recv"}
    for path in ("run.py", "train.py", "bench.py"):
        tree = ast.parse(open(os.path.join(ROOT, path)).read())
        for function in [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)]:
            calls = [node.func.attr for node in ast.walk(function) if isinstance(node, ast.Call)
                     and isinstance(node.func, ast.Attribute) and node.func.attr in tensor_collectives]
            assert not calls or function.name == "sum_over_ranks", (path, function.name, calls)
    seen = []

    class Reduced(Exception):
        """Stops sum_over_ranks after its all_reduce: a meta tensor has no values to return."""

    def all_reduce(tensor):
        seen.append((tensor.device, tensor.dtype))
        if tensor.device.type == "meta":
            raise Reduced

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run.dist, "all_reduce", all_reduce)
        assert run.sum_over_ranks([1, 2.5], torch.device("cpu")) == [1.0, 2.5]
        # a device the default is not: were the device argument ignored, the tensor would be the CPU's
        with pytest.raises(Reduced):
            run.sum_over_ranks([1, 2.5], torch.device("meta"))
    assert seen == [(torch.device("cpu"), torch.float64), (torch.device("meta"), torch.float64)]
