"""The diffusers `ModelHook`s vlhooks registers, and their registration / exact removal.

- `ProgressHook` on the transformer: before each denoiser call it hands the call's arguments and diffusers'
  cache context (`"cond"` / `"uncond"`) to the injector, which plans which rows get extra K/V at what strength.
- Per targeted block, three hooks share one `SiteSlot` (the block's `BlockCall` of the current call):
  `BlockHook` on the block builds the call before the block runs (it sees what the attention never sees:
  `temb`, `adaln_input`) and, after it ran, adds what the processor left for the block's output;
  `ModulationHook` on the block's modulation layer records its output in the call (the extras' text path reuses
  it); `AttentionHook` on the attention module passes the call to the processor as its `block_call` argument.

The hooks hold no logic of their own: the injector builds and finishes calls, the processor uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

if TYPE_CHECKING:
    from .attention import BlockCall
    from .injector import Injector
    from .models.base import Site

PROGRESS_HOOK = "vlhooks.progress"
BLOCK_HOOK = "vlhooks.block"
MODULATION_HOOK = "vlhooks.modulation"
ATTENTION_HOOK = "vlhooks.attention"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class ProgressHook(ModelHook):
    """Transformer-level hook: plans the forward call (progress, conditional rows)."""

    _is_stateful = True  # so that `cache_context(name)` reaches `self.context`

    def __init__(self, injector: "Injector"):
        super().__init__()
        self.injector = injector
        self.context = StateManager(_NoState)

    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple[Any], dict[str, Any]]:
        ctx = self.context._context
        self.injector.begin_forward(args, kwargs, None if ctx is None else ctx.name)
        return args, kwargs

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.context.reset()
        return module


@dataclass
class SiteSlot:
    """The `BlockCall` of one site while its block runs (None outside the block, or when nothing is injected)."""

    call: "BlockCall | None" = None


class BlockHook(ModelHook):
    """Block-level hook: builds the block's `BlockCall` before it runs; finishes it after."""

    def __init__(self, injector: "Injector", site: "Site", slot: SiteSlot):
        super().__init__()
        self.injector, self.site, self.slot = injector, site, slot

    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple[Any], dict[str, Any]]:
        self.slot.call = self.injector.block_call(self.site, args, kwargs)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        call, self.slot.call = self.slot.call, None
        return output if call is None else self.injector.finish_block(call, output)


class ModulationHook(ModelHook):
    """On the block's modulation layer (`DiTFamily.modulation_module`): records its output in the block's call."""

    def __init__(self, slot: SiteSlot):
        super().__init__()
        self.slot = slot

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.slot.call is not None:
            self.slot.call.modulation = output
        return output


class AttentionHook(ModelHook):
    """On the block's attention module: passes the block's call to the processor (`block_call=`)."""

    def __init__(self, slot: SiteSlot):
        super().__init__()
        self.slot = slot

    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple[Any], dict[str, Any]]:
        if self.slot.call is not None:
            kwargs["block_call"] = self.slot.call
        return args, kwargs


class HookSet:
    """Registers hooks by name and removes them leaving each module as it was (no registry, no `forward`
    attribute left behind where there was none)."""

    def __init__(self) -> None:
        self._entries: list[tuple[nn.Module, str, bool, bool]] = []

    def add(self, module: nn.Module, hook: ModelHook, name: str) -> None:
        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in module.__dict__
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, name)
        self._entries.append((module, name, had_registry, had_forward))

    def remove_all(self) -> None:
        for module, name, had_registry, had_forward in reversed(self._entries):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            registry.remove_hook(name, recurse=False)
            if not registry.hooks:
                if not had_forward and "forward" in module.__dict__:
                    del module.__dict__["forward"]
                if not had_registry:
                    del module._diffusers_hook
        for module, *_ in self._entries:
            if hasattr(module, "_diffusers_hook"):
                module._diffusers_hook.invalidate_child_registries_cache()
        self._entries.clear()
