"""Extractors on tiny random-weight Qwen3-VL, Qwen2.5-VL, SigLIP, CLIP and DINOv2 models, offline.

Expected token counts come from the configs (patch size, merge size, image size); expected values come from the
model's own `output_hidden_states=True` run on inputs built here, not through the extractor.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import (BitImageProcessorPil, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPVisionConfig,
                          CLIPVisionModel, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                          Dinov2WithRegistersModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2Tokenizer, Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel)

from vlhooks.encoders import QwenVLExtractor, VisionExtractor, load_extractor, pick_layers
from vlhooks.errors import FeatureError
from vlhooks.features import VLFeatures

SPECIAL = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
# A Qwen-VL style template written for these tests (image part, text part, optional thinking block)
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking %}<think>\n{% endif %}{% endif %}"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and are not slowed by other processes' load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def nonet(monkeypatch):
    """Any socket connect or DNS lookup raises (as realdata.md's nonet.py)."""
    def blocked(*a, **k):
        raise OSError("NETWORK BLOCKED by test")
    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda *a, **k: 111)
    monkeypatch.setattr(socket, "getaddrinfo", blocked)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE without merges (one token per byte) plus Qwen's chat and vision special tokens."""
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    return Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=TEMPLATE, extra_special_tokens=SPECIAL)


def qwen(family: str):
    """(model, tokenizer, image processor, patch, merge) of a tiny random Qwen3-VL or Qwen2.5-VL."""
    tok = qwen_tokenizer()
    vs, ve, pad, vpad = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                   "<|video_pad|>"])
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
                pad_token_id=0)
    ids = dict(image_token_id=pad, video_token_id=vpad, vision_start_token_id=vs, vision_end_token_id=ve)
    torch.manual_seed(0)
    if family == "qwen3_vl":
        patch = 16
        cfg = Qwen3VLConfig(
            text_config=dict(text, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                 "mrope_interleaved": True}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                               num_position_embeddings=64, deepstack_visual_indexes=[0, 1]), **ids)
        model = Qwen3VLForConditionalGeneration(cfg).eval()
    else:
        patch = 14
        cfg = Qwen2_5_VLConfig(
            text_config=dict(text, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                               window_size=2 * patch * 2,
                               fullatt_block_indexes=[1]), **ids)
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    proc = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2)
    return model, tok, proc, patch, 2


def photo(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def reference_run(model, tok, proc, image, text: str, merge: int):
    """Independent inputs: hand-written chat text, expanded pads, the model's own hidden states."""
    vis = proc(images=[image], return_tensors="pt")
    n = int(vis["image_grid_thw"][0].prod()) // merge ** 2
    enc = tok([text.replace("<|image_pad|>", "<|image_pad|>" * n)], return_tensors="pt")
    ids = enc["input_ids"]
    mm = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=enc["attention_mask"], pixel_values=vis["pixel_values"],
                    image_grid_thw=vis["image_grid_thw"], mm_token_type_ids=mm, output_hidden_states=True)
    return out.hidden_states, ids[0]


def chat(prompt: str = "", thinking: bool = False) -> str:
    return ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + prompt + "<|im_end|>\n"
            "<|im_start|>assistant\n" + ("<think>\n" if thinking else ""))


# ------------------------------------------------------------------------------------------------ Qwen-VL
@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def qwen_parts(request):
    return (request.param,) + qwen(request.param)


@pytest.mark.parametrize("grid", [(2, 3), (4, 2)])
def test_qwen_token_counts(qwen_parts, grid):
    family, model, tok, proc, patch, merge = qwen_parts
    h, w = grid[0] * patch * merge, grid[1] * patch * merge  # multiples of patch*merge: no resize
    img = photo(h, w)
    n_image = (h // patch) * (w // patch) // merge ** 2  # merged image tokens, from the config
    prompt = "a cat"
    n_text = len(tok(chat(prompt).replace("<|vision_start|><|image_pad|><|vision_end|>", "")).input_ids)
    ex = QwenVLExtractor(model, tok, proc, layer=-1, prompt=prompt)
    counts = {s: ex(img, select=s).num_tokens for s in ("all", "image", "image_no_markers", "text")}
    assert counts == {"all": n_text + n_image + 2, "image": n_image + 2, "image_no_markers": n_image, "text": n_text}


def test_qwen_inputs_match_hand_written_chat(qwen_parts):
    family, model, tok, proc, patch, merge = qwen_parts
    img = photo(2 * patch * merge, 2 * patch * merge)
    for thinking in (False, True):
        ex = QwenVLExtractor(model, tok, proc, prompt="red", enable_thinking=thinking)
        got = ex.prepare(img)
        _, ids = reference_run(model, tok, proc, img, chat("red", thinking), merge)
        assert torch.equal(got["input_ids"][0], ids)
        assert torch.equal(got["mm_token_type_ids"][0], (ids == model.config.image_token_id).int())
    n_think = len(tok("<think>\n").input_ids)
    on = QwenVLExtractor(model, tok, proc, layer=-1, enable_thinking=True)(img).num_tokens
    off = QwenVLExtractor(model, tok, proc, layer=-1, enable_thinking=False)(img).num_tokens
    assert on - off == n_think == 2


@pytest.mark.parametrize("layer", [0, 1, 2, 3, -1, -2, -4])
def test_qwen_layer_equals_output_hidden_states(qwen_parts, layer):
    family, model, tok, proc, patch, merge = qwen_parts
    img = photo(2 * patch * merge, 3 * patch * merge, seed=3)
    hs, ids = reference_run(model, tok, proc, img, chat("dog"), merge)
    ex = QwenVLExtractor(model, tok, proc, layer=layer, prompt="dog")
    f = ex(img)
    assert isinstance(f, VLFeatures) and f.mask is None
    torch.testing.assert_close(f.tokens[0], hs[layer][0], rtol=0, atol=0)
    img_pos = (ids == model.config.image_token_id)
    markers = (ids == model.config.vision_start_token_id) | (ids == model.config.vision_end_token_id)
    torch.testing.assert_close(ex(img, select="image_no_markers").tokens[0], hs[layer][0][img_pos], rtol=0, atol=0)
    torch.testing.assert_close(ex(img, select="image").tokens[0], hs[layer][0][img_pos | markers], rtol=0, atol=0)
    torch.testing.assert_close(ex(img, select="text").tokens[0], hs[layer][0][~(img_pos | markers)], rtol=0, atol=0)
    assert f.source["layer"] == layer and f.source["token_selection"] == "all"


def test_qwen_layer_lists_mean_and_concat(qwen_parts):
    family, model, tok, proc, patch, merge = qwen_parts
    img = photo(2 * patch * merge, 2 * patch * merge, seed=4)
    hs, _ = reference_run(model, tok, proc, img, chat(), merge)
    ex = QwenVLExtractor(model, tok, proc, layer=[-1, -3])
    mean = ex(img).tokens[0]
    cat = ex(img, combine="concat").tokens[0]
    torch.testing.assert_close(mean, (hs[-1][0] + hs[-3][0]) / 2)
    assert cat.shape[-1] == 2 * hs[-1].shape[-1]
    torch.testing.assert_close(cat[:, :32], hs[-1][0], rtol=0, atol=0)
    torch.testing.assert_close(cat[:, 32:], hs[-3][0], rtol=0, atol=0)
    assert ex(img).source["layer"] == [-1, -3] and ex(img).source["combine"] == "mean"


def test_qwen_batch_pads_with_mask(qwen_parts):
    family, model, tok, proc, patch, merge = qwen_parts
    a, b = photo(2 * patch * merge, 2 * patch * merge, 1), photo(2 * patch * merge, 4 * patch * merge, 2)
    ex = QwenVLExtractor(model, tok, proc, layer=-1, select="image_no_markers")
    f = ex([a, b])
    assert f.tokens.shape[:2] == (2, 8) and f.mask.sum(1).tolist() == [4, 8]
    torch.testing.assert_close(f.tokens[0, :4], ex(a).tokens[0])
    assert float(f.tokens[0, 4:].abs().sum()) == 0.0


def test_qwen_errors(qwen_parts):
    family, model, tok, proc, patch, merge = qwen_parts
    img = photo(2 * patch * merge, 2 * patch * merge)
    with pytest.raises(FeatureError, match="valid indices -4..3"):
        QwenVLExtractor(model, tok, proc, layer=-6)(img)
    with pytest.raises(FeatureError, match="use one of all, image"):
        QwenVLExtractor(model, tok, proc, select="patches")
    with pytest.raises(FeatureError, match="does not match the model"):
        QwenVLExtractor(model, tok, Qwen2VLImageProcessorPil(patch_size=patch + 2, merge_size=2))
    with pytest.raises(FeatureError, match="kept no token"):  # a template that renders nothing but the image
        QwenVLExtractor(model, tok, proc, layer=-1, select="text", chat_template="{{ '<|image_pad|>' }}")(img)


def test_qwen_from_pretrained_folder_offline(tmp_path, nonet):
    model, tok, proc, patch, merge = qwen("qwen3_vl")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    img = photo(2 * patch * merge, 2 * patch * merge, 5)
    loaded = load_extractor(str(tmp_path), layer=-2, select="image", prompt="x", local_files_only=True)
    assert isinstance(loaded, QwenVLExtractor)
    ref = QwenVLExtractor(model, tok, proc, layer=-2, select="image", prompt="x")(img)
    torch.testing.assert_close(loaded(img).tokens, ref.tokens)


class ListProcessor:
    """Stand-in for a full Qwen-VL processor (which needs torchvision): expands each `<|image_pad|>` like it does."""

    def __init__(self, tok, proc):
        self.tokenizer, self.image_processor, self.chat_template, self.calls = tok, proc, None, 0

    def __call__(self, text, images, return_tensors):
        self.calls += 1
        vis = self.image_processor(images=images, return_tensors=return_tensors)
        n = int(vis["image_grid_thw"][0].prod()) // self.image_processor.merge_size ** 2
        enc = self.tokenizer([t.replace("<|image_pad|>", "<|image_pad|>" * n) for t in text], return_tensors="pt")
        return {**enc, **vis}


def test_qwen_full_processor_route_matches(qwen_parts):
    family, model, tok, proc, patch, merge = qwen_parts
    img = photo(2 * patch * merge, 3 * patch * merge, 6)
    full = ListProcessor(tok, proc)
    a = QwenVLExtractor(model, processor=full, layer=-1, prompt="sky")(img)
    b = QwenVLExtractor(model, tok, proc, layer=-1, prompt="sky")(img)
    assert full.calls == 1 and torch.equal(a.tokens, b.tokens)


def test_qwen_template_from_chat_template_json(tmp_path, nonet):
    """Real Qwen-VL checkpoints keep the template in the processor's chat_template.json."""
    import json

    model, tok, proc, patch, merge = qwen("qwen2_5_vl")
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    bare = qwen_tokenizer()
    bare.chat_template = None
    bare.save_pretrained(tmp_path)
    for f in tmp_path.glob("chat_template.jinja"):
        f.unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    ex = QwenVLExtractor.from_pretrained(str(tmp_path), layer=-1, enable_thinking=True, local_files_only=True)
    assert ex.chat_template == TEMPLATE
    img = photo(2 * patch * merge, 2 * patch * merge, 8)
    _, ids = reference_run(model, tok, proc, img, chat("", thinking=True), merge)
    assert torch.equal(ex.prepare(img)["input_ids"][0], ids)


# ------------------------------------------------------------------------------------------------ vision
def vision(family: str):
    """(model, image processor, input side, patch, prefix tokens) for tiny random vision towers."""
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
    if family == "siglip":
        m = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, **common))
        return m.eval(), SiglipImageProcessorPil(size={"height": 32, "width": 32}), 32, 8, 0
    if family == "clip":
        m = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **common))
        proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return m.eval(), proc, 32, 8, 1
    dino_proc = BitImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48},
                                     do_center_crop=True)
    if family == "dinov2":  # 48 px input on a 32 px config: position embeddings get interpolated
        return Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **common)).eval(), dino_proc, 48, 8, 1
    m = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(image_size=32, patch_size=8, num_register_tokens=2,
                                                           **common))
    return m.eval(), dino_proc, 48, 8, 3


VISION = ["siglip", "clip", "dinov2", "dinov2_registers"]


@pytest.mark.parametrize("family", VISION)
def test_vision_token_counts(family):
    model, proc, side, patch, prefix = vision(family)
    n = (side // patch) ** 2
    img = photo(40, 56)
    assert VisionExtractor(model, proc)(img).tokens.shape == (1, n, 32)
    assert VisionExtractor(model, proc)([img, photo(50, 50)]).tokens.shape == (2, n, 32)
    if family == "siglip":
        with pytest.raises(FeatureError, match="no CLS"):
            VisionExtractor(model, proc, include_cls=True)
    else:
        assert VisionExtractor(model, proc, include_cls=True)(img).num_tokens == n + 1


@pytest.mark.parametrize("family", VISION)
@pytest.mark.parametrize("layer", ["last", 0, 2, -1, -3, [-1, -2]])
def test_vision_layers_equal_output_hidden_states(family, layer):
    model, proc, side, patch, prefix = vision(family)
    img = photo(45, 60, seed=7)
    pv = proc(images=[img], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pv, output_hidden_states=True)
    if layer == "last":
        ref = out.last_hidden_state
    elif isinstance(layer, list):
        ref = (out.hidden_states[layer[0]] + out.hidden_states[layer[1]]) / 2
    else:
        ref = out.hidden_states[layer]
    f = VisionExtractor(model, proc, layer=layer)(img)
    torch.testing.assert_close(f.tokens, ref[:, prefix:])
    if family != "siglip":
        g = VisionExtractor(model, proc, layer=layer, include_cls=True)(img)
        torch.testing.assert_close(g.tokens[:, 0], ref[:, 0])
        torch.testing.assert_close(g.tokens[:, 1:], ref[:, prefix:])
        assert g.source["token_selection"] == "cls+patches"


def test_vision_concat_and_range():
    model, proc, *_ = vision("clip")
    img = photo(32, 32)
    pv = proc(images=[img], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hs = model(pixel_values=pv, output_hidden_states=True).hidden_states
    f = VisionExtractor(model, proc, layer=[1, -1], combine="concat")(img)
    torch.testing.assert_close(f.tokens, torch.cat([hs[1], hs[-1]], -1)[:, 1:])
    with pytest.raises(FeatureError, match="valid indices -4..3"):
        VisionExtractor(model, proc, layer=4)(img)


def test_vision_full_clip_model_uses_its_vision_tower():
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(common, num_hidden_layers=1, vocab_size=50),
                     vision_config=dict(common, num_hidden_layers=2, image_size=32, patch_size=8), projection_dim=16)
    model = CLIPModel(cfg).eval()
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    img = photo(32, 32, 9)
    pv = proc(images=[img], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model.vision_model(pixel_values=pv).last_hidden_state
    torch.testing.assert_close(VisionExtractor(model, proc)(img).tokens, ref[:, 1:])


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
def test_vision_from_pretrained_folder_offline(tmp_path, nonet, family):
    model, proc, side, patch, prefix = vision(family)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    ex = load_extractor(str(tmp_path), layer=-2, local_files_only=True)
    assert isinstance(ex, VisionExtractor)
    img = photo(50, 40, 11)
    torch.testing.assert_close(ex(img).tokens, VisionExtractor(model, proc, layer=-2)(img).tokens)
    assert ex.settings()["model"] == str(tmp_path)


def test_pick_layers_formula():
    hs = tuple(torch.randn(1, 3, 4) for _ in range(5))
    torch.testing.assert_close(pick_layers(hs, [0, 2, -1]), (hs[0] + hs[2] + hs[4]) / 3)
    assert pick_layers(hs, -5) is hs[0]
    with pytest.raises(FeatureError, match="combine must be"):
        pick_layers(hs, [0, 1], "sum")


def test_load_extractor_unknown_name(tmp_path):
    with pytest.raises(FeatureError, match="dinov2-small, efficientnet-lite0, minilm"):
        load_extractor(str(tmp_path / "nothing-here"), local_files_only=True)
