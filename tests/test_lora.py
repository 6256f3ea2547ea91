"""LoRA: the adapters start as the base model, merge into a model that computes the same logits
(ours, the native LLaVA export, peft on the base LLM), leave every frozen weight as it was, and
resume after a kill; bad LoRA settings are one line each. The LoRA run the tests share is trained
in this process (conftest.reference_run); the killed runs go through the launcher."""
import json
import os
import re
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import eval as evaluation
import push
import run
import train
from conftest import (assert_same_run, exit_code, last_step, launch, read_weights, smooth_image, stop_job,
                      train_args, train_in_process, wait_for)
from model import LoRALinear, VLMForCausalLM, VLMProcessor, add_lora, build_vlm, lora_target_names, merge_lora
from run import Config, UserError

LORA = ["lora_r=8", "lora_alpha=16", "train_vision=false", "train_connector=true", "train_lm=true"]


def image_inputs(processor, question="What colour is the shape?"):
    prompt = f"USER: <image>\n{question} ASSISTANT:"
    return processor(text=prompt, images=smooth_image(40, 24))


def test_adapters_start_as_the_base_model_and_merge_into_the_same_logits(tiny_vlm):
    """B = 0 at the start: the same logits, to the bit. After B moves, merge_lora's plain model gives
    the adapted model's logits (1e-5, fp32)."""
    model, processor = tiny_vlm
    inputs = image_inputs(processor)
    with torch.no_grad():
        base = model(**inputs).logits
        names = lora_target_names(model.language_model, "all-linear")
        add_lora(model.language_model, names, r=4, alpha=8.0, dropout=0.0)
        assert torch.equal(model(**inputs).logits, base)
        assert "lm_head" not in " ".join(names) and all(isinstance(model.language_model.get_submodule(n), LoRALinear)
                                                        for n in names)
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.normal_(0, 0.5)
        adapted = model(**inputs).logits
        assert (adapted - base).abs().max() > 1e-2  # the adapters change the model
        plain = VLMForCausalLM(model.config).eval()
        assert plain.load_state_dict(merge_lora(model.state_dict(), model), strict=True)
        torch.testing.assert_close(plain(**inputs).logits, adapted, atol=1e-5, rtol=0)


def test_lora_vision_adds_the_towers_adapters_in_their_own_row_and_peft_loads_both(tiny_vlm, tiny_backbones,
                                                                                   tmp_path):
    """lora_vision: the tower's linear layers get adapters too (vision_lora row, lr_vision); only
    adapters and the connector train; save_adapters writes both in peft's layout, and peft on each
    base model computes what our adapted parts compute."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model, _ = tiny_vlm
    vision_dir, llm_dir = tiny_backbones
    cfg = Config(lora_r=4, lora_alpha=8.0, lora_dropout=0.0, train_lm=True, train_vision=True, lora_vision=True,
                 vision_model=vision_dir, llm=llm_dir)
    train.add_adapters(model, cfg)
    train.freeze_components(model, cfg)
    groups = train.build_param_groups(model, cfg)
    assert [(g["name"], g["lr"]) for g in groups] == [("vision_lora", cfg.lr_vision), ("lm_lora", cfg.lr_lm),
                                                      ("connector", cfg.lr_connector),
                                                      ("connector_no_decay", cfg.lr_connector)]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(train.is_adapter(n) or n.startswith("connector.") for n in trained)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.normal_(0, 0.3)
    train.save_adapters(model.state_dict(), cfg, tmp_path / "adapters")
    model.eval()
    vision_config = AutoConfig.from_pretrained(vision_dir).vision_config
    tower = PeftModel.from_pretrained(AutoModel.from_pretrained(vision_dir, config=vision_config),
                                      tmp_path / "adapters" / "vision").eval()
    llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm_dir), tmp_path / "adapters").eval()
    pixels = torch.randn(1, 3, vision_config.image_size, vision_config.image_size)
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        ours = model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1], ours,
                                   atol=1e-5, rtol=0)
        vocab = llm.config.vocab_size
        torch.testing.assert_close(llm(ids).logits, model.language_model(ids).logits[..., :vocab], atol=1e-5, rtol=0)


@pytest.fixture
def lora_run(reference_run):
    """A ZeRO-2 LoRA run of 6 steps on one rank (checkpoints every 2), made once per session:
    final/, what it printed, and the reference the killed runs must match."""
    return reference_run(*LORA, "zero_stage=2", "save_every=2")


def test_only_the_adapters_and_the_connector_move(lora_run, demo_dir):
    """train_vision=False: the tower is bit-identical to its base. Every LLM weight without an
    adapter is bit-identical to the base LLM's, and every weight with one is exactly base + (alpha /
    r) B A: the base under it did not move either. The table shows the adapters' own row."""
    out, output = lora_run.out, lora_run.output
    assert re.findall(r"^(lm\w*|vision\w*) +\d+ ", output, flags=re.M) == ["lm_lora"]  # no row for the base weights
    final = read_weights(out / "final")
    vision = read_weights(demo_dir / "backbones" / "tiny-clip")
    llm = read_weights(demo_dir / "backbones" / "tiny-llama")
    adapters = load_file(out / "final" / "adapters" / "adapter_model.safetensors")
    adapted = {k[len("base_model.model."):-len(".lora_A.weight")] for k in adapters if k.endswith(".lora_A.weight")}
    assert len(adapted) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    for key, value in final.items():
        part, _, name = key.partition(".")
        if part == "vision_tower":
            assert torch.equal(value, vision[f"vision_model.{name}"]), key
        elif part == "language_model" and name[:-len(".weight")] in adapted:
            A = adapters[f"base_model.model.{name[:-len('.weight')]}.lora_A.weight"]
            B = adapters[f"base_model.model.{name[:-len('.weight')]}.lora_B.weight"]
            assert B.abs().max() > 0, f"{key}: its adapter did not train"
            assert torch.equal(value, (llm[name].float() + 16 / 8 * (B.float() @ A.float())).to(value.dtype)), key
        elif part == "language_model":
            base = llm[name]
            assert torch.equal(value[:len(base)], base), key  # embeddings: the <image> row is new
    connector = load_file(out / "final" / "adapters" / "connector.safetensors")
    assert connector and all(torch.equal(connector[k], final[k]) for k in connector)


def rebuilt_with_adapters(demo_dir, adapters_dir):
    """Base tower + base LLM + the adapters and connector of final/adapters, unmerged."""
    model, processor = build_vlm(demo_dir / "backbones" / "tiny-clip", demo_dir / "backbones" / "tiny-llama",
                                 dtype=torch.float32)
    config = json.load(open(adapters_dir / "adapter_config.json"))
    names = [n for n in lora_target_names(model.language_model, "all-linear")
             if n.rsplit(".", 1)[-1] in config["target_modules"]]
    add_lora(model.language_model, names, config["r"], config["lora_alpha"], dropout=0.0)
    state = {"language_model." + k[len("base_model.model."):]: v
             for k, v in load_file(adapters_dir / "adapter_model.safetensors").items()}
    state.update(load_file(adapters_dir / "connector.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k or k.startswith("connector")]
    return model.eval(), processor


def test_merged_final_equals_the_adapted_model_in_ours_native_and_peft(lora_run, demo_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    out = lora_run.out
    final = VLMForCausalLM.from_pretrained(out / "final").eval()
    processor = VLMProcessor.from_pretrained(out / "final")
    unmerged, _ = rebuilt_with_adapters(demo_dir, out / "final" / "adapters")
    inputs = image_inputs(processor)
    text_columns = torch.arange(len(processor.tokenizer)) != processor.image_token_id
    with torch.no_grad():
        logits = final(**inputs).logits
        # all but the <image> column: its row is new and random in every build_vlm, and never generated
        torch.testing.assert_close(unmerged(**inputs).logits[..., text_columns], logits[..., text_columns],
                                   atol=1e-5, rtol=0)

        assert push.main([str(out), "--repo", "me/lora", "--format", "llava", "--local-dir", str(tmp_path / "llava")]) == 0
        llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
        torch.testing.assert_close(llava(**inputs).logits, logits, atol=1e-5, rtol=0)

        base = AutoModelForCausalLM.from_pretrained(demo_dir / "backbones" / "tiny-llama")
        peft = PeftModel.from_pretrained(base, out / "final" / "adapters").eval()
        text = processor.tokenizer("USER: What colour is the square? ASSISTANT:", return_tensors="pt")["input_ids"]
        vocab = base.config.vocab_size  # the base LLM has no <image> row
        torch.testing.assert_close(peft(text).logits, final.language_model(text).logits[..., :vocab], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_then_resume_gives_the_uninterrupted_lora_run(demo_dir, tmp_path, lora_run, stage):
    """Checkpoints hold the adapters and their optimizer state (not the frozen weights): a LoRA run
    killed by SIGKILL (a one-rank launcher job) and resumed (in this process: one rank, as it was
    killed, so its dropout draws go on from the saved generators) logs the uninterrupted ZeRO-2
    run's losses and ends with its weights (ZeRO-3: to 1e-5, its sums run in another order)."""
    out = tmp_path / "run"
    args = train_args(demo_dir, out, *LORA, f"zero_stage={stage}", "save_every=2")
    proc = launch(args, wait=False)
    wait_for(lambda: last_step(out) >= 3, proc)
    stop_job(proc, signal.SIGKILL, out)
    assert "resumed from" in train_in_process(args + ["resume=true"])
    assert_same_run(out, lora_run, tolerance=0.0 if stage == 2 else 1e-5)
    saved = os.listdir(out / "checkpoints" / (out / "checkpoints" / "latest").read_text())
    assert not any("vision" in f for f in saved)


@pytest.mark.parametrize("overrides, message", [
    (dict(lora_alpha=16.0), "lora_alpha=16.0 is set but lora_r=0"),
    (dict(lora_targets="q_proj"), "lora_targets='q_proj' is set but lora_r=0"),
    (dict(lora_r=8, train_lm=False), "lora_r=8 puts adapters on the LLM but train_lm=False"),
    (dict(lora_r=8, train_lm=True, lora_vision=True), "lora_vision=True .* train_vision=False"),
    (dict(lora_r=8, train_lm=True, lora_alpha=0.0), "lora_alpha=0 scales"),
    (dict(lora_r=-1), "lora_r=-1 is out of range"),
    (dict(lora_r=8, train_lm=True, qlora=True), "qlora=True needs a CUDA GPU"),
])
def test_bad_lora_settings_are_one_line_each(overrides, message):
    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match=message):
        run.check_config(Config(data_path="x", **overrides), 1)


def test_a_lora_target_that_matches_nothing_names_the_layers_there_are(tiny_vlm):
    model, _ = tiny_vlm
    cfg = Config(lora_r=8, train_lm=True, lora_targets="query,value", llm="tiny-llama")
    with pytest.raises(UserError, match=r"lora_targets='query,value' matches no linear layer of llm='tiny-llama'; "
                                        r"its linear layers are named down_proj, gate_proj, .*q_proj"):
        train.add_adapters(model, cfg)
    cfg.lora_targets = "q_proj,vproj"  # one typo in a list: refused, not silently left out
    with pytest.raises(UserError, match=r"lora_targets='q_proj,vproj' has 'vproj', which matches no linear layer of "
                                        r"llm='tiny-llama'; its linear layers are named .*v_proj"):
        train.add_adapters(model, cfg)
    assert not any(".lora_A." in name for name, _ in model.named_parameters())


def test_bad_lora_setting_from_the_command_line_is_one_error_line(demo_dir, tmp_path, capsys):
    """`python train.py ... lora_targets=qproj` (train.main through exit_after, in this process)."""
    code = exit_code(train.main, train_args(demo_dir, tmp_path / "run", "lora_r=8", "train_lm=true",
                                            "lora_targets=qproj"))
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors and "lora_targets='qproj' matches no linear layer" in errors[0], err[-2000:]
    assert "Traceback" not in err


def test_push_publishes_the_adapters_alone_and_refuses_a_run_without_them(lora_run, tmp_path, capsys):
    out = lora_run.out
    folder = tmp_path / "adapters"
    assert push.main([str(out), "--repo", "me/lora", "--format", "adapters", "--local-dir", str(folder)]) == 0
    assert "peft reads the 14 adapters (r=8) of tiny-llama" in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                          "connector.safetensors"]
    assert json.load(open(folder / "adapter_config.json"))["base_model_name_or_path"] == "tiny-llama"  # no local path
    assert "library_name: peft" in (folder / "README.md").read_text()
    with pytest.raises(UserError, match="holds LoRA adapters .*, not a whole model; evaluate the run they came from"):
        evaluation.load_model(str(folder))  # the adapters folder given where a model is expected

    plain = tmp_path / "plain"
    shutil.copytree(out / "final", plain, ignore=shutil.ignore_patterns("adapters"))
    with pytest.raises(UserError, match=r"has no adapters/adapter_config.json: only a LoRA run \(lora_r > 0\) writes"):
        push.main([str(plain), "--repo", "me/lora", "--format", "adapters", "--local-dir", str(tmp_path / "x")])
