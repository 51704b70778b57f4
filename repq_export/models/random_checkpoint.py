"""Random-weight checkpoints laid out as real ones (both key layouts, real metadata), for tests, demos
and benchmarks: never on the path that loads a user's checkpoint."""

from __future__ import annotations

import io
import math
import pprint
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from repq_export.errors import UserError
from repq_export.files import write_atomically
from repq_export.models.arch import arch_from_config
from repq_export.models.build import build_detector
from repq_export.models.key_layout import LAYOUTS, swin_det_to_mmdet3
from repq_export.models.swin import WindowAttention

# meta['CLASSES'] of the reference's COCO checkpoints (mmdet 2.x CocoDataset.CLASSES).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


def init_random_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights that keep activations non-degenerate, for tests and demos.

    Backbone linears: trunc-normal 0.02 (the reference's init). Head layers: zero-mean normal
    scaled by fan-in so that every level stays near unit RMS: gain sqrt(2) before a ReLU, 1 for
    FPN and class logits, 0.1 for box deltas (so that proposals and boxes stay inside sensible
    ranges). Biases, LayerNorm/BatchNorm affines, BatchNorm running statistics and the
    relative-position tables are all non-trivial, so a wrong key mapping or channel order
    changes the outputs.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(t: Tensor, mean: float, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("backbone."):
                nn.init.trunc_normal_(module.weight, std=0.02, generator=gen)
            elif isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                normal(module.weight, 0.0, _gain(name) / math.sqrt(_fan_in(module)))
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                normal(module.weight, 1.0, 0.1)
            elif isinstance(module, WindowAttention):
                normal(module.relative_position_bias_table, 0.0, 0.2)
            if isinstance(module, nn.BatchNorm2d):
                normal(module.running_mean, 0.0, 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
                module.num_batches_tracked.fill_(1000)
            bias = getattr(module, "bias", None)
            if isinstance(bias, Tensor) and isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d,
                                                                nn.LayerNorm, nn.BatchNorm2d)):
                normal(bias, 0.0, 0.1 if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)) else 0.02)


def _fan_in(module: nn.Module) -> int:
    """Inputs per output of a Linear, Conv2d (C_in * k * k) or ConvTranspose2d (C_in)."""
    if isinstance(module, nn.ConvTranspose2d):
        return module.in_channels
    return module.weight[0].numel()


def _gain(name: str) -> float:
    """Weight scale (times 1/sqrt(fan_in)) for a head layer, by what follows it."""
    if name.endswith(("rpn_reg", "fc_reg")):
        return 0.1
    if name.startswith(("neck.", "backbone.")) or name.endswith(("rpn_cls", "fc_cls", "conv_logits")):
        return 1.0
    return math.sqrt(2.0)  # followed by a ReLU


def config_text(cfg: Mapping) -> str:
    """A flat Python config (``name = value`` lines) that ``load_config`` reads back to ``cfg``."""
    return "".join(f"{k} = {pprint.pformat(v, width=100, sort_dicts=False)}\n" for k, v in cfg.items())


def config_classes(cfg: Mapping) -> tuple[str, ...] | None:
    """Class names a config names (``data.test.classes`` or top-level ``classes``), if any."""
    data = cfg.get("data")
    test = data.get("test") if isinstance(data, Mapping) else None
    names = test.get("classes") if isinstance(test, Mapping) else None
    names = names if names is not None else cfg.get("classes")
    return tuple(names) if isinstance(names, (list, tuple)) else None


def make_random_checkpoint(cfg: Mapping, layout: str = "swin-det", seed: int = 0,
                           classes: tuple[str, ...] | None = None) -> dict:
    """A checkpoint dict with random weights laid out as a real one of ``layout``.

    Swin-Det: ``{'state_dict', 'meta': {mmdet_version, mmcv_version, CLASSES, config, epoch, iter}}``;
    mmdet 3.x: ``{'state_dict', 'meta': {mmengine_version, dataset_meta: {classes}, cfg, epoch, iter}}``.
    Class names: ``classes``, else the config's, else COCO's for 80 classes, else 'class<i>'.
    """
    if layout not in LAYOUTS:
        raise UserError(f"--layout: '{layout}' is not one of {', '.join(LAYOUTS)}")
    detector = build_detector(cfg)
    init_random_weights(detector, seed)
    num_classes = arch_from_config(cfg).num_classes
    if classes is None:
        classes = config_classes(cfg)
    if classes is None:
        classes = COCO_CLASSES if num_classes == len(COCO_CLASSES) \
            else tuple(f"class{i}" for i in range(num_classes))
    if len(classes) != num_classes:
        raise UserError(f"classes: {len(classes)} names for {num_classes} classes")
    state_dict = {k: v.detach().clone() for k, v in detector.state_dict().items()}
    text = config_text(cfg)
    if layout == "mmdet3":
        meta = dict(mmengine_version="0.10.7", dataset_meta=dict(classes=tuple(classes)),
                    cfg=text, seed=seed, epoch=36, iter=0)
        return dict(meta=meta, state_dict=swin_det_to_mmdet3(state_dict))
    meta = dict(mmdet_version="2.11.0", mmcv_version="1.3.1", CLASSES=tuple(classes),
                config=text, epoch=36, iter=0)
    return dict(meta=meta, state_dict=state_dict)


def save_checkpoint(checkpoint: Mapping, out: str | Path) -> Path:
    """``torch.save`` to a temporary name in the same folder, renamed when complete. Serialized
    through a buffer: ``torch.save`` to a path names the archive after the file, so the same
    checkpoint written under two names would differ in bytes."""
    out = Path(out)
    if out.parent and not out.parent.is_dir():
        raise UserError(f"{out}: folder {out.parent} does not exist")
    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)
    return write_atomically(out, buffer.getvalue())
