"""Trained adapters: the projector role of `apply_injection` with weights, saved as peft-style folders."""

from .base import Adapter, AdapterConfig, AdapterError, load_adapter
from .kv import KVAdapter
from .lora import LoRAAdapter
from .projection import ProjectionAdapter

__all__ = ["Adapter", "AdapterConfig", "AdapterError", "load_adapter", "KVAdapter", "LoRAAdapter", "ProjectionAdapter"]
