import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(2)

FAMILIES = ["z_image", "flux", "sd3", "sd35"]
MODES = ["joint", "decoupled"]


def snapshot(model: torch.nn.Module) -> dict:
    """Everything about a model that patching could change: per module its attribute names and processor."""
    out = {}
    for name, m in model.named_modules():
        out[name] = (sorted(vars(m).keys()), id(getattr(m, "processor", None)), sorted(m._forward_pre_hooks),
                     sorted(m._forward_hooks))
    return out


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(params=MODES)
def mode(request):
    return request.param
