"""The test pipeline of an mmdet 2.x config, as the ``PreprocessSettings`` every runner is fed with."""

from __future__ import annotations

from typing import Mapping

from repq_export.data.transforms import PreprocessSettings, checked_settings
from repq_export.errors import UserError
from repq_export.models.config_fields import expect_value, get_field


def preprocess_settings(cfg: Mapping) -> PreprocessSettings:
    """Resize scale, normalization and padding of the config's test pipeline.

    Reads ``data.test.pipeline`` (else ``test_pipeline``); refuses test-time augmentation and
    anything but keep-ratio resize, since the deployed network sees exactly one image.
    """
    data = cfg.get("data")
    test = data.get("test") if isinstance(data, Mapping) else None
    pipeline = test.get("pipeline") if isinstance(test, Mapping) else None
    if pipeline is None:
        pipeline = cfg.get("test_pipeline")
    if not isinstance(pipeline, (list, tuple)):
        raise UserError("config: no test pipeline (data.test.pipeline or test_pipeline)")
    steps: list[Mapping] = []
    scale = None
    for step in pipeline:
        if isinstance(step, Mapping) and step.get("type") == "MultiScaleFlipAug":
            expect_value(step.get("flip", False), (False,), "test pipeline MultiScaleFlipAug.flip")
            scale = step.get("img_scale")
            steps.extend(step.get("transforms", []))
        elif isinstance(step, Mapping):
            steps.append(step)
    by_type = {s.get("type"): s for s in steps}
    resize, norm, pad = by_type.get("Resize"), by_type.get("Normalize"), by_type.get("Pad")
    if resize is None or norm is None or pad is None:
        raise UserError("config: the test pipeline needs Resize, Normalize and Pad steps")
    expect_value(resize.get("keep_ratio", True), (True,), "test pipeline Resize.keep_ratio")
    scale = resize.get("img_scale", scale)
    if isinstance(scale, list) and len(scale) == 1:
        scale = scale[0]
    where = "config: test pipeline "
    raw = {"scale": scale, "mean": get_field(norm, "mean", "test pipeline Normalize"),
           "std": get_field(norm, "std", "test pipeline Normalize"), "to_rgb": norm.get("to_rgb", True),
           "size_divisor": get_field(pad, "size_divisor", "test pipeline Pad"), "pad_to": None}
    return checked_settings(raw, {"scale": f"{where}img_scale", "mean": f"{where}Normalize.mean",
                                  "std": f"{where}Normalize.std", "to_rgb": f"{where}Normalize.to_rgb",
                                  "size_divisor": f"{where}Pad.size_divisor", "pad_to": f"{where}Pad"})
