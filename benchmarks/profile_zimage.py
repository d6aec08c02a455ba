"""Where does the time of a patched Z-Image forward go? Kernel-level profile, plain vs joint 64 tokens."""

import torch
from diffusers import ZImageTransformer2DModel
from torch.profiler import ProfilerActivity, profile

import vlhooks as vh

DEV, DT = "cuda", torch.bfloat16
torch.manual_seed(0)
with torch.device(DEV):
    m = ZImageTransformer2DModel().to(DT).eval()
lat = torch.randn(16, 1, 128, 128, device=DEV, dtype=DT)
t = torch.tensor([0.5], device=DEV)
cap = torch.randn(128, 2560, device=DEV, dtype=DT)


@torch.no_grad()
def fwd():
    m([lat], t, [cap], return_dict=False)


def prof(label):
    for _ in range(3):
        fwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fwd()
        torch.cuda.synchronize()
    print(f"===== {label}")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


prof("plain")
h = vh.apply_injection(m, vh.VLFeatures(torch.randn(1, 64, 2560, device=DEV, dtype=DT)), vh.InjectionConfig())
prof("joint 64")
h.remove()
