"""Real Z-Image, Flux and SD3 diffusers pipelines built offline from tiny random-weight parts.

Transformers come from `tiny.build` (which seeds torch), so `tests/` must be on sys.path, as under pytest; text
encoders, VAEs and tokenizers are built here, the tokenizers' vocabularies in memory, so nothing is downloaded.
Every pipeline takes 32x32 images: all VAEs have three blocks (scale factor 4), so latents are 8x8, the shapes
`tiny.inputs` uses.
"""

from __future__ import annotations

import string

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline,
                       ZImagePipeline)
from tokenizers import pre_tokenizers
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, Qwen2Tokenizer,
                          Qwen3Config, Qwen3Model, T5Config, T5EncoderModel, T5Tokenizer)

from tiny import build as build_transformer

SIZE = 32  # height and width for every family
TEXT_LEN = 64  # max_sequence_length passed by `run` (pipeline defaults pad T5 / Qwen to 256-512 tokens)
PROMPT, NEGATIVE = "a photo of a cat", "blurry, low quality"
BYTES = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for raw bytes

QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE with no merges (one token per byte) plus Qwen's chat special tokens."""
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(BYTES))}}
    return Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=QWEN_CHAT_TEMPLATE,
                          extra_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"])


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with no merges: every byte, alone and word-final (`</w>`), plus start/end tokens."""
    chars = sorted(BYTES)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: i + 2 for i, c in enumerate(chars)},
             **{c + "</w>": i + 2 + len(chars) for i, c in enumerate(chars)}}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram over printable ASCII characters and a few whole words; no sentinel tokens."""
    words = ["a", "an", "the", "of", "photo", "cat", "dog", "blurry", "low", "quality", "red", "blue"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -2.0) for w in words]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + c, -5.5) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip(tokenizer: CLIPTokenizer, hidden: int,
          projection: int | None) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Tiny CLIP text tower; `projection` set gives `CLIPTextModelWithProjection` (pooled width = projection)."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=projection or hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(tokenizer: T5Tokenizer, d_model: int = 32) -> T5EncoderModel:
    """Tiny T5 encoder with output width `d_model`."""
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """Three-block VAE (scale factor 4) without quant convs, like the Flux and SD3 VAEs."""
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                         latent_channels=latent_channels, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False).eval()


def _quiet(pipe):
    """Turn off the pipeline's progress bar."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_zimage_pipeline(seed: int = 0) -> ZImagePipeline:
    """Z-Image with a tiny Qwen3 encoder (caption width 16). Use height=width=32 (multiple of 8; latents 8x8).

    CFG (cond + uncond batched through the transformer) runs when guidance_scale > 0; guidance_scale=0 turns it off.
    """
    transformer = build_transformer("z_image", seed)
    tokenizer = _qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                          head_dim=8, pad_token_id=tokenizer.pad_token_id)).eval()
    return _quiet(ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(16, 0.3611, 0.1159),
                                 text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer))


def build_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """Flux with tiny CLIP (pooled 32) and T5 (32). Use height=width=32 (multiple of 8; latents 8x8 = 16 tokens).

    True CFG (a second transformer pass on the negative prompt) runs when true_cfg_scale > 1 and a negative_prompt is
    given; guidance_scale is unused (no guidance embedding).
    """
    transformer = build_transformer("flux", seed)
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    return _quiet(FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1, 0.3611, 0.1159),
                               text_encoder=_clip(clip_tokenizer, 32, None), tokenizer=clip_tokenizer,
                               text_encoder_2=_t5(t5_tokenizer), tokenizer_2=t5_tokenizer, transformer=transformer))


def build_sd3_pipeline(seed: int = 0, variant: str = "sd3") -> StableDiffusion3Pipeline:
    """SD3 (variant "sd3") or SD3.5-style (variant "sd35": dual attention in block 0, RMS qk-norm).

    Two CLIPs of width 16 (concatenated to 32) and projection 32 (pooled 64), T5 of width 32.
    Use height=width=32 (multiple of 4; latents 8x8). CFG ([uncond, cond] batched) runs when guidance_scale > 1;
    pass guidance_scale=1 to turn it off (the pipeline default is 7).
    """
    transformer = build_transformer(variant, seed)
    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    return _quiet(StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4, 1.5305, 0.0609),
        text_encoder=_clip(tokenizer, 16, 32), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer_2, 16, 32), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(tokenizer_3), tokenizer_3=tokenizer_3, transformer=transformer))


PIPELINE_BUILDERS = {"z_image": build_zimage_pipeline, "flux": build_flux_pipeline, "sd3": build_sd3_pipeline}


def run(pipe, family: str, steps: int = 2, cfg: bool = False, seed: int = 0) -> torch.Tensor:
    """One 32x32 image of `PROMPT`, shape (1, 3, 32, 32) in [0, 1]; `cfg` turns on classifier-free guidance.

    `family` is a `PIPELINE_BUILDERS` key or "sd35". Guidance: Z-Image guidance_scale 2 (off: 0), Flux
    true_cfg_scale 2 with `NEGATIVE` (off: 1), SD3 guidance_scale 3 (off: 1).
    """
    kwargs = dict(num_inference_steps=steps, height=SIZE, width=SIZE, max_sequence_length=TEXT_LEN,
                  generator=torch.Generator().manual_seed(seed), output_type="pt")
    if family == "z_image":
        kwargs.update(guidance_scale=2.0 if cfg else 0.0)
    elif family == "flux":
        kwargs.update(true_cfg_scale=2.0 if cfg else 1.0, negative_prompt=NEGATIVE if cfg else None)
    else:
        kwargs.update(guidance_scale=3.0 if cfg else 1.0)
    return pipe(PROMPT, **kwargs).images
