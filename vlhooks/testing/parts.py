"""Tiny text encoders, tokenizers and VAEs shared by the tiny pipelines (tokenizer vocabularies built in memory,
so nothing is downloaded)."""

from __future__ import annotations

import string

from diffusers import AutoencoderKL
from tokenizers import pre_tokenizers
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, Qwen2Tokenizer,
                          T5Config, T5EncoderModel, T5Tokenizer)

BYTES = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for raw bytes

QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE with no merges (one token per byte) plus Qwen's chat special tokens."""
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(BYTES))}}
    return Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=QWEN_CHAT_TEMPLATE,
                          extra_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"])


def clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with no merges: every byte, alone and word-final (`</w>`), plus start/end tokens."""
    chars = sorted(BYTES)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: i + 2 for i, c in enumerate(chars)},
             **{c + "</w>": i + 2 + len(chars) for i, c in enumerate(chars)}}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """Unigram over printable ASCII characters and a few whole words; no sentinel tokens."""
    words = ["a", "an", "the", "of", "photo", "cat", "dog", "blurry", "low", "quality", "red", "blue"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -2.0) for w in words]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + c, -5.5) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip(tokenizer: CLIPTokenizer, hidden: int,
          projection: int | None) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Tiny CLIP text tower; `projection` set gives `CLIPTextModelWithProjection` (pooled width = projection)."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=projection or hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5(tokenizer: T5Tokenizer, d_model: int = 32) -> T5EncoderModel:
    """Tiny T5 encoder with output width `d_model`."""
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return T5EncoderModel(config).eval()


def vae(latent_channels: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """Three-block VAE (scale factor 4) without quant convs, like the Flux and SD3 VAEs."""
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                         latent_channels=latent_channels, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False).eval()


# ---------------------------------------------------------------------------------------------- Gemma (Lumina 2)
GEMMA_WORDS = (
    # Lumina2Pipeline's system prompt and its "<Prompt Start>" separator, then the tiny pipelines' prompts
    "You are an assistant designed to generate superior images with the superior degree of image-text alignment "
    "based on textual prompts or user prompts. <Prompt Start> a photo of cat dog blurry, low quality red blue"
).split()


def gemma_tokenizer(words=GEMMA_WORDS):
    """Gemma's BPE (byte fallback, spaces as `▁`) over printable ASCII characters, the 256 byte tokens and the
    `▁`-prefixed `words`, built by left-to-right merges that start at a `▁` (so one word's merges never fire
    inside another), so a prompt takes about a token per word."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for tok in [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + [c for c in string.printable if not c.isspace()]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for w in words:
        form = "▁" + w
        for i in range(2, len(form) + 1):
            left, right, whole = form[: i - 1], form[i - 1], form[:i]
            if whole not in vocab:
                vocab[whole] = len(vocab)
                merges.append((left, right))
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def gemma2(tokenizer, hidden: int) -> "Gemma2Model":
    """Tiny Gemma2 text model with output width `hidden` (2 layers, GQA 2 -> 1 heads)."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                          query_pre_attn_scalar=8, max_position_embeddings=512, sliding_window=64,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    return Gemma2Model(config).eval()


def vae8(latent_channels: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """Four-block VAE (scale factor 8, the factor Lumina2Pipeline assumes) without quant convs."""
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                         latent_channels=latent_channels, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False).eval()


# The words of QwenImagePipeline's prompt template as single tokens: with them the template's prefix (system turn and
# user header) is 34 tokens, the `prompt_template_encode_start_idx` the pipeline drops, as with Qwen's own tokenizer.
QWEN_IMAGE_WORDS = ["system", "Describe", " the", " image", " by", " detailing", " color", " shape", " size",
                    " texture", " quantity", " text", " spatial", " relationships", " of", " objects", " and",
                    " background", "user"]


def qwen_image_tokenizer() -> Qwen2Tokenizer:
    """`qwen_tokenizer()` plus the template words of `QwenImagePipeline` as added tokens, so that the pipeline drops
    exactly its template and the caption embeddings start at the prompt."""
    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens(QWEN_IMAGE_WORDS)
    return tokenizer


def qwen25_vl(tokenizer: Qwen2Tokenizer, hidden: int = 16):
    """Tiny `Qwen2_5_VLForConditionalGeneration` (text width `hidden`, 2 layers, head_dim 8, one vision block) for
    text-only use: the Qwen-Image pipelines' text encoder. The vision token ids stay at their defaults (outside the
    tiny vocabulary: no image is ever in the text)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    pad = tokenizer.pad_token_id
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                bos_token_id=pad, eos_token_id=pad, pad_token_id=pad,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]})  # sums to head_dim / 2
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=pad, eos_token_id=pad,
                              pad_token_id=pad)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_image_vae(z_dim: int = 4):
    """Tiny `AutoencoderKLQwenImage` (spatial scale factor 4, one temporal downsample), unit latent statistics."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.0] * z_dim,
                                  latents_std=[1.0] * z_dim).eval()


# ---------------------------------------------------------------------------------------------- DC-AE (Sana)
def dc_vae(latent_channels: int = 4, scaling_factor: float = 0.41407):
    """Three-stage deep-compression autoencoder (`AutoencoderDC`, scale factor 4: 32x32 images, 8x8 latents), with
    the block kinds of Sana's DC-AE (ResBlocks, then an EfficientViT block with multi-scale linear attention)."""
    from diffusers import AutoencoderDC

    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    return AutoencoderDC(in_channels=3, latent_channels=latent_channels, attention_head_dim=2,
                         encoder_block_types=blocks, decoder_block_types=blocks,
                         encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                         encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                         encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                         downsample_block_type="conv", upsample_block_type="interpolate",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=scaling_factor).eval()


# ---------------------------------------------------------------------------------------------- Qwen3 LM (Flux.2 Klein)
def qwen3_lm(tokenizer: Qwen2Tokenizer, hidden: int = 16, layers: int = 27):
    """Tiny `Qwen3ForCausalLM` (width `hidden`, head_dim 8): the Flux.2 Klein pipelines' text encoder. They stack its
    hidden states 9, 18 and 27 (their default `text_encoder_out_layers`), so `layers` must be at least 27."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                         pad_token_id=tokenizer.pad_token_id)
    return Qwen3ForCausalLM(config).eval()


# ---------------------------------------------------------------------------------------------- Mistral3 (Flux.2 dev)
MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]",
                   "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'system' %}[SYSTEM_PROMPT]{% elif m.role == 'user' %}[INST]{% endif %}"
    "{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}{% else %}[IMG]{% endif %}{% endfor %}"
    "{% if m.role == 'system' %}[/SYSTEM_PROMPT]{% elif m.role == 'user' %}[/INST]{% endif %}{% endfor %}"
)


def mistral_tokenizer():
    """Byte-level BPE with no merges (one token per byte) plus Mistral's control tokens and a chat template over
    the content lists `Flux2Pipeline` sends (`[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]`). A text-only
    stand-in for the Pixtral processor of FLUX.2-dev (which needs torchvision): `Flux2Pipeline` only calls its
    `apply_chat_template`, which a tokenizer has too."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(MISTRAL_SPECIAL)}
    for c in sorted(BYTES):
        vocab[c] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=MISTRAL_SPECIAL[4:])
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


def mistral3(tokenizer, hidden: int = 16, layers: int = 30):
    """Tiny `Mistral3ForConditionalGeneration` (text width `hidden`, head_dim 8, a one-layer Pixtral vision tower
    that text-only prompts never reach): FLUX.2-dev's text encoder. `Flux2Pipeline` stacks its hidden states 10,
    20 and 30 (its default `text_encoder_out_layers`), so `layers` must be at least 30."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=8, patch_size=16, image_size=64)
    config = Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=2,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))
    return Mistral3ForConditionalGeneration(config).eval()
