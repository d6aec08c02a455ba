"""The tiny offline pipelines, from `vlhooks.testing` (kept so that test modules import them by these names)."""

from vlhooks.testing import SIZE, TEXT_LEN, pipeline, run_pipeline  # noqa: F401


def build_zimage_pipeline(seed: int = 0):
    return pipeline("z_image", seed)


def build_flux_pipeline(seed: int = 0):
    return pipeline("flux", seed)


def build_sd3_pipeline(seed: int = 0, variant: str = "sd3"):
    return pipeline(variant, seed)


PIPELINE_BUILDERS = {"z_image": build_zimage_pipeline, "flux": build_flux_pipeline, "sd3": build_sd3_pipeline}


def run(pipe, family: str, steps: int = 2, cfg: bool = False, seed: int = 0):
    return run_pipeline(pipe, family, steps=steps, cfg=cfg, seed=seed)
