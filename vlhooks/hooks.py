"""The diffusers `ModelHook`s vlhooks registers, and their registration / exact removal.

- `ProgressHook` on the transformer: before each denoiser call it reads the timestep (progress), the batch
  layout and the diffusers cache context (`"cond"` / `"uncond"`), and plans which rows get extra K/V.
- `BlockHook` on each targeted block: before the block runs it sees what the attention never sees (`temb`,
  `adaln_input`), computes the extra K/V for this block and step, and hands them to the block's processor;
  after it runs it adds what the processor left for the block's output (placement `"block_output"`).

Both hand their work to an `Injector` (`injection.py`); they hold no logic of their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

if TYPE_CHECKING:
    from .injection import Injector
    from .models.base import Site

PROGRESS_HOOK = "vlhooks.progress"
BLOCK_HOOK = "vlhooks.block"


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


class BlockHook(ModelHook):
    """Block-level hook: computes this block's extra K/V for this call and hands them to its processor."""

    def __init__(self, injector: "Injector", site: "Site"):
        super().__init__()
        self.injector = injector
        self.site = site

    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple[Any], dict[str, Any]]:
        self.injector.prepare_block(self.site, args, kwargs)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return self.injector.finish_block(self.site, output)


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
