"""Tests for model.py, in the order of the file: parity with transformers' LLaVA, the splice,
connectors, vision towers, the loss, generation, save/load, the processor and build options.

Tiny random backbones (32x32 images, 8x8 patches -> 16 visual tokens, a 2-layer Llama of width 64),
built locally; no network."""
import contextlib
import glob
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration

from conftest import copy_weights_into, favour_token, supervise_text
from prepare import make_tiny_backbones
from model import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    VLMForCausalLM,
    VLMImageProcessor,
    VLMProcessor,
    build_connector,
    build_vlm,
    load_vision_tower,
)

RED = Image.new("RGB", (40, 20), (255, 0, 0))  # wide: padding and cropping differ
GREEN = Image.new("RGB", (24, 32), (0, 255, 0))
BLUE = Image.new("RGB", (32, 32), (0, 0, 255))


@pytest.fixture(scope="module")
def vlm(tiny_backbones):
    """One (model, processor) shared by the read-only tests of this file (CLIP + Llama, eval mode)."""
    torch.manual_seed(0)
    model, processor = build_vlm(*tiny_backbones)
    return model.eval(), processor


@pytest.fixture(scope="module")
def siglip_backbones(tmp_path_factory):
    """A SigLIP tower (no CLS token) and a Qwen2 LLM (tied embeddings)."""
    return make_tiny_backbones(str(tmp_path_factory.mktemp("siglip")), vision="siglip", llm="qwen2")


def mixed_batch(processor):
    """Three samples: two images, text only, one image (left padded)."""
    texts = [f"{IMAGE_TOKEN}\nWhat is in the image? {IMAGE_TOKEN}", "Describe the photo.", f"{IMAGE_TOKEN} 0 1 2"]
    return processor(text=texts, images=[[RED, GREEN], [], [BLUE]])




def image_runs(ids, image_token_id):
    """[(start, end)] of each contiguous run of image tokens in a 1-D id tensor."""
    runs, start = [], None
    for t, is_image in enumerate((ids == image_token_id).tolist() + [False]):
        if is_image and start is None:
            start = t
        if not is_image and start is not None:
            runs.append((start, t))
            start = None
    return runs


@contextlib.contextmanager
def transformers_warnings():
    """Collects the messages transformers logs (its loggers do not propagate to pytest's caplog)."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger("transformers").removeHandler(handler)


# ----------------------------------------------------------------------------------------------
# Parity with transformers' LlavaForConditionalGeneration

def to_llava(model):
    """The same weights in a LlavaForConditionalGeneration (fp32, eval)."""
    config = LlavaConfig(
        vision_config=model.config.vision_config.to_dict(),
        text_config=model.config.text_config.to_dict(),
        image_token_id=model.config.image_token_id,
        image_seq_length=model.config.num_image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return copy_weights_into(LlavaForConditionalGeneration(config), model)


def test_same_logits_and_loss_as_transformers_llava(vlm):
    model, processor = vlm
    llava = to_llava(model)
    batch = processor(text=[f"{IMAGE_TOKEN}\nWhat is in the image?", f"Describe {IMAGE_TOKEN} the photo."],
                      images=[RED, GREEN])
    labels = supervise_text(batch, model.config.image_token_id)
    with torch.no_grad():
        ours, theirs = model(**batch), llava(**batch)
        ours_loss, theirs_loss = model(**batch, labels=labels).loss, llava(**batch, labels=labels).loss
    assert ours.logits.shape == theirs.logits.shape == (2, batch["input_ids"].shape[1], len(processor.tokenizer))
    assert (ours.logits - theirs.logits).abs().max() <= 1e-5
    assert torch.isclose(ours_loss, theirs_loss, atol=1e-5), (ours_loss, theirs_loss)


# ----------------------------------------------------------------------------------------------
# The splice


def test_image_features_land_exactly_at_image_tokens(tiny_vlm, monkeypatch):
    model, processor = tiny_vlm  # a model of its own: the test replaces get_image_features
    batch = mixed_batch(processor)  # 3 images: sample 0 has 2, sample 1 none, sample 2 one
    n, p, d = 3, model.config.num_image_tokens, model.config.text_config.hidden_size
    known = torch.arange(n * p * d, dtype=torch.float32).view(n, p, d)  # every value distinct
    monkeypatch.setattr(model, "get_image_features", lambda pixel_values, image_sizes: known[: len(pixel_values)].flatten(0, 1))
    seen = {}
    hook = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()

    ids, embeds = batch["input_ids"], seen["embeds"]
    runs = [image_runs(row, model.config.image_token_id) for row in ids]
    assert [len(r) for r in runs] == [2, 0, 1] and all(e - s == p for row in runs for s, e in row)
    (s0, e0), (s1, e1) = runs[0]
    (s2, e2), = runs[2]
    assert torch.equal(embeds[0, s0:e0], known[0]) and torch.equal(embeds[0, s1:e1], known[1])
    assert torch.equal(embeds[2, s2:e2], known[2])
    text = ids != model.config.image_token_id  # every other position keeps its token embedding
    assert torch.equal(embeds[text], model.get_input_embeddings()(ids)[text])


def test_image_token_and_feature_count_mismatch_names_both_counts(vlm):
    model, processor = vlm
    batch = processor(text=[f"{IMAGE_TOKEN} What is in the image?"], images=[RED])
    p = model.config.num_image_tokens
    one_short = batch["input_ids"].clone()  # the first image token overwritten: p - 1 left
    one_short[0, (one_short[0] == model.config.image_token_id).nonzero()[0]] = processor.tokenizer.pad_token_id
    with pytest.raises(ValueError, match=rf"{p - 1} <image> tokens.*{p} features"):
        model(input_ids=one_short, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    text_only = processor(text=["What is in the image?"])
    with pytest.raises(ValueError, match=rf"0 <image> tokens.*{p} features"):
        model(**text_only, pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=rf"{p} <image> tokens.*0 features"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_text_only_batch_is_the_plain_llm(vlm):
    model, processor = vlm
    batch = processor(text=["Describe the photo.", "The quick brown fox"])
    assert "pixel_values" not in batch
    with torch.no_grad():
        ours = model(**batch).logits
        llm = model.language_model(**batch).logits
    assert torch.equal(ours, llm)


def test_gradients_reach_vision_and_connector_only_when_trainable(tiny_vlm):
    model, processor = tiny_vlm
    model.train()
    batch = mixed_batch(processor)  # multi-image and text-only samples in one training batch
    labels = supervise_text(batch, model.config.image_token_id)
    patch_embedding = model.vision_tower.embeddings.patch_embedding.weight

    def backward(vision_trainable, connector_trainable, **inputs):
        model.zero_grad(set_to_none=True)
        model.vision_tower.requires_grad_(vision_trainable)
        model.connector.requires_grad_(connector_trainable)
        loss = model(**inputs).loss
        assert torch.isfinite(loss)
        loss.backward()

    backward(False, True, **batch, labels=labels)  # stage 1 / 2: frozen vision tower
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.parameters())

    backward(True, False, **batch, labels=labels)
    assert patch_embedding.grad is not None and patch_embedding.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.connector.parameters())

    # Text only: the dummy blank-image pass still gives the connector a gradient, of zero.
    text = processor(text=["Describe the photo.", "The quick brown fox"])
    backward(True, True, **text, labels=supervise_text(text, model.config.image_token_id))
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in model.connector.parameters())
    assert patch_embedding.grad is not None and torch.all(patch_embedding.grad == 0)


# ----------------------------------------------------------------------------------------------
# Connectors


@pytest.mark.parametrize("name, widths, activation", [
    ("linear", [(32, 64)], None),
    ("mlp1x_gelu", [(32, 64)], None),
    ("mlp2x_gelu", [(32, 64), (64, 64)], nn.GELU),
    ("mlp3x_relu", [(32, 64), (64, 64), (64, 64)], nn.ReLU),
    ("mlp2x_silu", [(32, 64), (64, 64)], nn.SiLU),
])
def test_connector_shapes(name, widths, activation):
    connector = build_connector(name, 32, 64)
    linears = [m for m in connector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == widths
    activations = [m for m in connector.modules() if isinstance(m, (nn.GELU, nn.ReLU, nn.SiLU))]
    assert len(activations) == len(widths) - 1 and all(type(m) is activation for m in activations)
    assert connector(torch.randn(2, 5, 32)).shape == (2, 5, 64)  # (N, P, D_vision) -> (N, P, D_llm)


def test_identity_connector_needs_equal_widths():
    x = torch.randn(2, 5, 64)
    assert torch.equal(build_connector("identity", 64, 64)(x), x)
    with pytest.raises(ValueError, match="equal widths.*32.*64"):
        build_connector("identity", 32, 64)


@pytest.mark.parametrize("name", ["mlp2x_foo", "conv", "mlp0x_gelu", "mlp2x"])
def test_unknown_connector_lists_valid_names(name):
    with pytest.raises(ValueError, match=name) as error:
        build_connector(name, 32, 64)
    for valid in ("identity", "linear", "mlp", "gelu", "relu", "silu"):
        assert valid in str(error.value)


# ----------------------------------------------------------------------------------------------
# Vision towers


def test_full_clip_checkpoint_yields_its_vision_tower(tiny_backbones):
    vision_dir, llm_dir = tiny_backbones  # make_tiny_backbones(vision='clip') saves a full CLIPModel
    full = CLIPModel.from_pretrained(vision_dir)
    tower = load_vision_tower(vision_dir)
    assert isinstance(tower, CLIPVisionModel)
    expected = full.vision_model.state_dict()
    loaded = tower.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="llama.*CLIP and SigLIP"):
        load_vision_tower(llm_dir)


def test_a_vision_tower_given_as_the_llm_is_named(tiny_backbones):
    """(An LLM as the vision tower is the test above.) The message names the model type it is."""
    vision_dir, _ = tiny_backbones
    with pytest.raises(ValueError, match=r"llm='.*tiny-clip' is a 'clip' model, not a causal language model"):
        build_vlm(vision_dir, vision_dir)


def test_siglip_has_one_token_per_patch(siglip_backbones):
    model, processor = build_vlm(*siglip_backbones)
    assert model.config.num_image_tokens == processor.num_image_tokens == (32 // 8) ** 2
    batch = processor(text=[f"{IMAGE_TOKEN} What?"], images=[RED])
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 16
    assert model.get_image_features(batch["pixel_values"]).shape == (16, 64)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**batch).logits).all()


def test_clip_keeping_cls_has_patches_plus_one_tokens(tiny_backbones):
    model, processor = build_vlm(*tiny_backbones, drop_cls=False)
    assert model.config.num_image_tokens == processor.num_image_tokens == 16 + 1
    batch = processor(text=[f"{IMAGE_TOKEN} What?"], images=[RED])
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 17
    assert model.get_image_features(batch["pixel_values"]).shape == (17, 64)
    with torch.no_grad():
        model.eval()(**batch)


@pytest.mark.parametrize("layer", [-1, -2, 0])
def test_vision_feature_layer_picks_that_hidden_state(tiny_vlm, layer):
    model, processor = tiny_vlm  # a model of its own: the test replaces a submodule
    pixel_values = processor.image_processor([RED, GREEN])["pixel_values"]
    model.connector = nn.Identity()  # see the raw vision features
    model.config.vision_feature_layer = layer
    with torch.no_grad():
        hidden_states = model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        features = model.encode_tiles(pixel_values)
    assert torch.equal(features, hidden_states[layer][:, 1:])  # CLS dropped
    others = [h[:, 1:] for i, h in enumerate(hidden_states) if i != layer % len(hidden_states)]
    assert not any(torch.allclose(features, h) for h in others)


# ----------------------------------------------------------------------------------------------
# The loss


def test_supervised_logits_give_the_full_logit_loss(vlm):
    model, processor = vlm
    batch = mixed_batch(processor)
    labels = supervise_text(batch, model.config.image_token_id)
    with torch.no_grad():
        out = model(**batch, labels=labels)
        full = model(**batch).logits  # (B, T, V)
    targets = labels[:, 1:]  # position t predicts token t+1
    expected = F.cross_entropy(full[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.isclose(out.loss, expected, atol=1e-6)
    supervised = targets != IGNORE_INDEX
    assert out.logits.shape == (int(supervised.sum()), full.shape[-1])  # (K, V), K = supervised tokens
    assert (out.logits - full[:, :-1][supervised]).abs().max() <= 1e-5


def test_nothing_supervised_gives_zero_loss_that_backpropagates(tiny_vlm):
    model, processor = tiny_vlm
    batch = processor(text=[f"{IMAGE_TOKEN} What?"], images=[RED])
    loss = model.train()(**batch, labels=torch.full_like(batch["input_ids"], IGNORE_INDEX)).loss
    assert loss.item() == 0.0
    loss.backward()
    for module in (model.language_model.lm_head, model.language_model.model.layers[0], model.connector):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and not g.any() for g in grads)  # reached, and zero


def random_samples(processor, shapes, seed=0):
    """Training samples (as data.py makes them) of (images, text tokens) each: [BOS, <image> x 16
    per image, text], the text supervised."""
    g = torch.Generator().manual_seed(seed)
    samples, P, image_id = [], processor.num_image_tokens, processor.image_token_id
    for i, (n_images, n_text) in enumerate(shapes):
        text = torch.randint(3, 200, (n_text,), generator=g)
        ids = torch.cat([torch.tensor([1]), torch.full((n_images * P,), image_id), text])
        labels = ids.clone()
        labels[:1 + n_images * P] = IGNORE_INDEX
        samples.append({"id": str(i), "input_ids": ids, "labels": labels,
                        "pixel_values": torch.randn(n_images, 3, 32, 32, generator=g),
                        "image_sizes": torch.full((n_images, 2), 32)})
    return samples


SHAPES = [(1, 20), (0, 35), (1, 7), (2, 12), (0, 5)]  # 37, 36, 24, 45, 6 tokens


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_unpacked_loss_and_gradients(tiny_backbones, attn):
    from data import collate

    model, processor = build_vlm(*tiny_backbones, attn_implementation=attn)
    samples = random_samples(processor, SHAPES)
    for sample in samples:  # a sample's first token is never a target, even when labelled
        sample["labels"][0] = sample["input_ids"][0]
    padded, packed = collate(samples, 0), collate(samples, 0, pack_length=64)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # really packed: 5 samples in fewer rows
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model.train()(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels",
                                                      "pixel_values")}).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.isclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("connector" in n for n in grads_a)
    assert all((grads_a[n] - grads_b[n]).abs().max() <= 1e-6 for n in grads_a)


def test_packed_samples_do_not_see_each_other(vlm):
    from data import collate

    model, processor = vlm
    samples = random_samples(processor, SHAPES)
    batch = collate(samples, 0, pack_length=200)  # all five in one row
    assert batch["input_ids"].shape[0] == 1
    changed = [dict(s) for s in samples]
    changed[2] = dict(samples[2], input_ids=samples[2]["input_ids"].flip(0),
                      pixel_values=torch.randn_like(samples[2]["pixel_values"]))
    with torch.no_grad():
        logits = [model(**{k: b[k] for k in ("input_ids", "position_ids", "pixel_values")}, use_cache=False).logits[0]
                  for b in (batch, collate(changed, 0, pack_length=200))]  # (T, V) each
    owner = torch.cat([torch.full((len(samples[int(i)]["input_ids"]),), int(i)) for i in batch["ids"]])  # (T,)
    assert (logits[0][owner == 2] - logits[1][owner == 2]).abs().max() > 1e-3  # the changed sample changed
    assert (logits[0][owner != 2] - logits[1][owner != 2]).abs().max() <= 1e-5  # no other sample did


# ----------------------------------------------------------------------------------------------
# Generation


def new_tokens(output, prompt_len, eos_token_id):
    """Generated ids after the prompt, up to and including the first EOS."""
    tokens = output[prompt_len:].tolist()
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


def test_batched_left_padded_generation_equals_one_at_a_time(vlm):
    model, processor = vlm
    texts = [f"{IMAGE_TOKEN}\nWhat is in the image?", "Describe the photo.", f"0 1 {IMAGE_TOKEN} 2 3"]
    images = [[RED], [], [GREEN]]
    eos = model.generation_config.eos_token_id
    batch = processor(text=texts, images=images)
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left padded
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=6, do_sample=False)
        for i in range(len(texts)):
            alone = processor(text=[texts[i]], images=images[i])
            expected = model.generate(**alone, max_new_tokens=6, do_sample=False)[0]
            prompt_len = alone["input_ids"].shape[1]
            got = new_tokens(together[i], batch["input_ids"].shape[1], eos)
            assert got == new_tokens(expected, prompt_len, eos), f"sample {i}"


def test_cached_generation_equals_uncached_argmax(vlm):
    model, processor = vlm
    batch = processor(text=[f"{IMAGE_TOKEN}\nWhat is in the image?"], images=[RED])
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True,
                                eos_token_id=None, min_new_tokens=6)
        ids = batch["input_ids"]
        for _ in range(6):  # re-run the whole sequence, image included, at every step
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=batch["pixel_values"], use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_generation_stops_at_eos(tiny_vlm):
    model, processor = tiny_vlm  # a model of its own: the test replaces the LM head
    single = processor(text=[f"{IMAGE_TOKEN} What?"], images=[RED])
    prompt_len = single["input_ids"].shape[1]
    with torch.no_grad():
        free = model.generate(**single, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, prompt_len:]
        # A stop token chosen from the free run: generation must end right after its first occurrence.
        j = next(j for j in range(1, len(free)) if free[j] not in free[:j])
        stopped = model.generate(**single, max_new_tokens=8, do_sample=False, eos_token_id=int(free[j]))
    assert stopped[0, prompt_len:].tolist() == free[: j + 1].tolist()

    # The model's own EOS: a head biased towards it makes it the first token, and both samples stop.
    eos = model.generation_config.eos_token_id
    head = model.language_model.lm_head
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[eos] = 1e4
    model.language_model.lm_head = biased
    batch = processor(text=[f"{IMAGE_TOKEN} What?", "Describe the photo."], images=[RED])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 1) and out[:, -1].tolist() == [eos, eos]


def test_saved_model_never_generates_the_image_token(tiny_vlm, tmp_path):
    """build_vlm's generation_config suppresses <image>, and a saved folder keeps it: rigged to want
    <image> next (favour_token), the reloaded model generates, greedy and sampled, with no error and no
    image token. A generated <image> would reach merge_image_features with no image features behind it."""
    model, processor = tiny_vlm
    image_token_id = model.config.image_token_id
    model.save_pretrained(tmp_path)
    model = favour_token(VLMForCausalLM.from_pretrained(tmp_path).eval(), image_token_id)
    batch = processor(text=[f"{IMAGE_TOKEN}\nWhat is in the image?", "Describe the photo."], images=[RED])
    torch.manual_seed(0)
    for sampling in (dict(do_sample=False), dict(do_sample=True, temperature=1.0)):
        with torch.no_grad():
            new = model.generate(**batch, max_new_tokens=4, **sampling)[:, batch["input_ids"].shape[1]:]
        assert new.shape[1] > 0 and not (new == image_token_id).any(), sampling


# ----------------------------------------------------------------------------------------------
# Save / load


def test_save_and_load_round_trip_offline(vlm, tmp_path, monkeypatch):
    model, processor = vlm
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with transformers_warnings() as warnings:
        loaded = VLMForCausalLM.from_pretrained(tmp_path).eval()
        loaded_processor = VLMProcessor.from_pretrained(tmp_path)
    assert not [w for w in warnings if "to instantiate a model of type" in w], warnings

    texts, images = [f"{IMAGE_TOKEN}\nWhat is in the image?", "Describe the photo."], [RED]
    batch, loaded_batch = processor(text=texts, images=images), loaded_processor(text=texts, images=images)
    assert batch.keys() == loaded_batch.keys()
    assert all(torch.equal(batch[k], loaded_batch[k]) for k in batch)
    assert loaded_processor.num_image_tokens == processor.num_image_tokens
    assert loaded_processor.image_token_id == model.config.image_token_id
    assert loaded_processor.tokenizer.chat_template == processor.tokenizer.chat_template
    assert vars(loaded_processor.image_processor).items() >= {
        "size": 32, "aspect": "pad", "image_mean": processor.image_processor.image_mean}.items()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_sharded_checkpoint_reloads(vlm, tmp_path, monkeypatch):
    model, processor = vlm
    model.save_pretrained(tmp_path, max_shard_size="200KB")  # the tiny model is ~1 MB in fp32
    shards = glob.glob(os.path.join(tmp_path, "model-*-of-*.safetensors"))
    assert len(shards) >= 3 and os.path.exists(os.path.join(tmp_path, "model.safetensors.index.json"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = VLMForCausalLM.from_pretrained(tmp_path).eval()
    batch = processor(text=[f"{IMAGE_TOKEN}\nWhat is in the image?"], images=[RED])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_tied_embedding_llm_round_trip(siglip_backbones, tmp_path, monkeypatch):
    model, processor = build_vlm(*siglip_backbones)  # Qwen2 ties lm_head to the input embeddings
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = VLMForCausalLM.from_pretrained(tmp_path).eval()
    llm = loaded.language_model
    assert llm.lm_head.weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()
    batch = VLMProcessor.from_pretrained(tmp_path)(text=[f"{IMAGE_TOKEN} What?"], images=[RED])
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, loaded(**batch).logits)


# ----------------------------------------------------------------------------------------------
# The processor


def test_processor_expands_each_image_marker(vlm):
    model, processor = vlm
    texts = [f"{IMAGE_TOKEN} one {IMAGE_TOKEN} two", "none", f"three {IMAGE_TOKEN}"]
    flat = processor(text=texts, images=[RED, GREEN, BLUE])
    per_text = processor(text=texts, images=[[RED, GREEN], [], [BLUE]])
    assert flat.keys() == per_text.keys() == {"input_ids", "attention_mask", "pixel_values"}
    assert all(torch.equal(flat[k], per_text[k]) for k in flat)
    assert flat["pixel_values"].shape == (3, 3, 32, 32)
    p = processor.num_image_tokens
    runs = [image_runs(row, processor.image_token_id) for row in flat["input_ids"]]
    assert [[e - s for s, e in row] for row in runs] == [[p, p], [], [p]]
    assert processor.image_token_id == model.config.image_token_id
    single = processor(text=f"{IMAGE_TOKEN} one", images=RED)  # a bare string and a bare image
    assert single["input_ids"].shape[0] == 1 and single["pixel_values"].shape == (1, 3, 32, 32)


def test_processor_rejects_wrong_image_count(vlm):
    _, processor = vlm
    with pytest.raises(ValueError, match="2 '<image>' markers in the text but 1 images"):
        processor(text=[f"{IMAGE_TOKEN} a", f"{IMAGE_TOKEN} b"], images=[RED])
    with pytest.raises(ValueError, match="0 '<image>' markers in the text but 1 images"):
        processor(text=["a"], images=[RED])
    with pytest.raises(ValueError, match="needs text"):
        processor(images=[RED])


def test_processor_pads_on_the_left_by_default(vlm):
    _, processor = vlm
    batch = processor(text=["a", "The quick brown fox jumps over the lazy dog."])
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].tolist() == [1, 1]
    assert batch["input_ids"][0, 0] == processor.tokenizer.pad_token_id


def test_pad_and_resize_aspect():
    mean = VLMImageProcessor().image_mean
    pad = VLMImageProcessor(size=32, aspect="pad")([RED])["pixel_values"]
    resize = VLMImageProcessor(size=32, aspect="resize")([RED])["pixel_values"]
    assert pad.shape == resize.shape == (1, 3, 32, 32)
    # pad: the 40x20 image sits centred on a mean-colour square, so the top rows normalize to ~0;
    # resize: short side to 32 then centre crop, so every pixel is the image's red.
    assert pad[0, :, 0].abs().max() < 0.02 and pad[0, 0, 16].min() > 1.5
    red = (1.0 - mean[0]) / VLMImageProcessor().image_std[0]
    assert torch.allclose(resize[0, 0], torch.full((32, 32), red), atol=1e-3)
    assert VLMImageProcessor(size=32)(GREEN)["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="'pad', 'resize' or 'anyres'"):
        VLMImageProcessor(aspect="square")


# ----------------------------------------------------------------------------------------------
# Build options: dtype and attention implementation


def test_bf16_build_gives_bf16_connector(tiny_backbones):
    model, processor = build_vlm(*tiny_backbones, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = processor(text=[f"{IMAGE_TOKEN} What?"], images=[RED])
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_eager_and_sdpa_attention_agree(vlm, tiny_backbones):
    sdpa, processor = vlm
    eager, _ = build_vlm(*tiny_backbones, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())  # the connector is freshly initialized in each build
    for module in (eager, eager.language_model, eager.vision_tower):
        assert module.config._attn_implementation == "eager"
    assert sdpa.language_model.config._attn_implementation == "sdpa"
    batch = mixed_batch(processor)
    with torch.no_grad():
        a, b = sdpa(**batch).logits, eager.eval()(**batch).logits
    real = batch["attention_mask"].bool()  # padded rows attend to nothing; compare real tokens
    assert (a[real] - b[real]).abs().max() <= 1e-5


def test_processor_adds_no_second_bos_when_the_prompt_has_one(tiny_vlm):
    """A chat template that writes <s> itself (Llama-3, Mistral) must not get another: the
    inference prompt must tokenize like the training prompt (data.tokenize_conversation)."""
    _, processor = tiny_vlm
    bos = processor.tokenizer.bos_token_id
    plain = processor(text=["hello"])["input_ids"][0].tolist()
    templated = processor(text=["<s>hello"])["input_ids"][0].tolist()
    assert plain[0] == bos and plain.count(bos) == 1
    assert templated == plain


# ----------------------------------------------------------------------------------------------
# Real backbones' shapes: a SentencePiece-only tokenizer, an LLM saved in bf16


def test_vicuna_shaped_tokenizer_loads_and_splits_like_sentencepiece(vicuna_like_tokenizer, tiny_backbones):
    """Vicuna ships tokenizer.model and no tokenizer.json. It must load, and its pieces must be
    SentencePiece's: runs of spaces merge last (`▁Hello ▁ ▁world`, not `▁Hello ▁▁ world`)."""
    import sentencepiece

    from model import load_tokenizer

    assert not os.path.exists(os.path.join(vicuna_like_tokenizer, "tokenizer.json"))
    tokenizer = load_tokenizer(vicuna_like_tokenizer)
    reference = sentencepiece.SentencePieceProcessor(model_file=os.path.join(vicuna_like_tokenizer, "tokenizer.model"))
    texts = ["Hello  world", "the   world\tis  round", "def add(a, b):\n    return a + b\n\n\n  x", "cafe 12345 東京 😀"]
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id == reference.bos_id()


def test_llm_saved_in_bf16_builds_a_model_that_runs(tiny_backbones, tmp_path):
    """Qwen2.5 ships bf16 weights, Vicuna fp16, CLIP fp32: build_vlm(dtype=None) must give one dtype
    throughout, so the image features meet the LLM's embeddings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vision, llm = tiny_backbones
    AutoModelForCausalLM.from_pretrained(llm, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16-llm")
    AutoTokenizer.from_pretrained(llm).save_pretrained(tmp_path / "bf16-llm")
    model, processor = build_vlm(vision, str(tmp_path / "bf16-llm"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = processor(text=[f"{IMAGE_TOKEN}\nWhat is it?"], images=[RED])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_very_tall_image_is_padded_on_a_bounded_canvas(monkeypatch):
    """A 200x6000 image would be padded onto a 6000x6000 canvas; past MAX_PAD_SIDE it is shrunk first,
    and the picture stays what LLaVA's full-size padding gives, up to resampling."""
    import model

    rng = np.random.default_rng(0)
    tall = Image.fromarray(rng.integers(0, 256, (6000, 200, 3), dtype=np.uint8))
    processor = VLMImageProcessor(size=32, aspect="pad")
    bounded = processor.transform(tall)
    monkeypatch.setattr(model, "MAX_PAD_SIDE", 10**6)
    full = processor.transform(tall)
    assert bounded.shape == full.shape == (1, 3, 32, 32)
    assert (bounded - full).abs().mean() < 0.05  # normalized units: a few levels in 255 on average
