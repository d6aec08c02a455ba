"""benchmarks/log_to_results.py: a cut-short gpu_bench run's printed lines become the keys gpu_bench would write."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("log_to_results", ROOT / "benchmarks" / "log_to_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LOG = """2.11.0+cu130 NVIDIA H200 diffusers 0.42.1
zimage: Z-Image joint 64 tok x 30 blocks                             plain   147.08 ms  variant   149.55 ms  ratio 1.0165 [1.0145, 1.0219] n=8
zimage_joint_64_kv_kernel_minus_cublas: median +0.0010 [-0.0037, +0.0044]
flux_imported_vlhooks_minus_diffusers: median -0.0058 [-0.0110, -0.0033]
peak memory zimage_joint_64_peak_memory_ratio: plain 12.077 GiB patched 12.092 GiB ratio 1.0013
[zimage: 90s, total 90s]
"""


def test_lines_become_keys():
    res = _tool().parse(LOG, calls=5)
    assert res["zimage_joint_64_ratio"] == 1.0165
    assert res["zimage_joint_64_ratio_minmax"] == [1.0145, 1.0219]
    assert res["zimage_joint_64_ratio_reps"] == 8 and res["zimage_joint_64_ratio_calls_per_timing"] == 5
    assert res["zimage_joint_64_ratio_ms"] == [147.08, 149.55]
    # a paired difference is below in every repeat only where its largest repeat is
    assert res["zimage_joint_64_kv_kernel_minus_cublas_below_every_repeat"] is False
    assert res["flux_imported_vlhooks_minus_diffusers_below_every_repeat"] is True
    assert res["flux_imported_vlhooks_minus_diffusers_minmax"] == [-0.011, -0.0033]
    assert res["zimage_joint_64_peak_memory_ratio"] == 1.0013
    assert len(res) == 12


def test_unknown_label_is_refused():
    with pytest.raises(SystemExit, match="no variant labelled"):
        _tool().parse("zimage: a variant gpu_bench lacks  plain 1.00 ms  variant 1.01 ms  ratio 1.0100 [1.0, 1.02] "
                      "n=8\n", calls=5)
