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
