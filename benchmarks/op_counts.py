"""The aten ops one patched forward adds to the plain one (tiny models, CPU, zero-shot joint, 16 tokens, every
block), per block, for the tree at PATH: compare two commits' op counts without a GPU (each op is a GPU kernel
launch or a view on the device).

    git worktree add /tmp/old <commit>
    .venv/bin/python benchmarks/op_counts.py /tmp/old flux z_image
    .venv/bin/python benchmarks/op_counts.py . flux z_image
"""
import sys, collections, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
torch.set_num_threads(1)
import vlhooks as vh
try:
    from vlhooks.testing import build, inputs, caption_width
except ImportError:
    from tiny import build, inputs, caption_width
from torch.profiler import profile, ProfilerActivity
for fam in sys.argv[2:]:
    m = build(fam).eval()
    kw = inputs(fam)
    feats = vh.VLFeatures(torch.randn(1, 16, caption_width(fam)))
    def count(fn):
        with torch.no_grad():
            fn(); fn()
            with profile(activities=[ProfilerActivity.CPU]) as p:
                fn()
        c = collections.Counter(e.name for e in p.events() if e.name.startswith("aten::"))
        return sum(c.values()), c
    plain, cp = count(lambda: m(**kw))
    with vh.inject(m, feats, vh.InjectionConfig(blocks="all", mode="joint")):
        patched, cq = count(lambda: m(**kw))
    n = len(vh.list_sites(m))
    diff = cq - cp
    print(fam, "blocks", n, "aten ops plain", plain, "patched", patched, "extra per block", round((patched - plain) / n, 1))
    print("   top extra:", diff.most_common(12))
