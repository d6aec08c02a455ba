"""Trained adapters: the projector role of `apply_injection` with weights, saved as peft-style folders."""

from .base import (
    ADAPTER_TYPES,
    Adapter,
    AdapterConfig,
    Options,
    create_adapter,
    load_adapter,
    read_config,
    register_adapter,
)
from .ip_adapter import IPAdapter, IPAdapterOptions, import_ip_adapter
from .kv import KVAdapter, KVOptions
from .lora import LoRAAdapter, LoRAOptions
from .projection import ProjectionAdapter, ProjectionOptions

__all__ = ["ADAPTER_TYPES", "Adapter", "AdapterConfig", "Options", "create_adapter", "load_adapter", "read_config",
           "register_adapter", "KVAdapter", "KVOptions", "LoRAAdapter", "LoRAOptions", "ProjectionAdapter",
           "ProjectionOptions", "IPAdapter", "IPAdapterOptions", "import_ip_adapter"]
