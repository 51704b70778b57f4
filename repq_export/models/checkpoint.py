"""Reading (and, for tests and demos, writing) Swin Mask R-CNN / Cascade Mask R-CNN checkpoints.

Reading never executes code from the file: ``torch.load(weights_only=True)``, and where the
checkpoint's metadata holds objects of other libraries (mmengine's message hub, numpy arrays),
those are replaced by inert placeholders so that the weights still load. Two key layouts are
accepted: Swin-Transformer-Object-Detection / mmdet 2.x (our module names) and mmdet 3.x
(converted here, including the channel order of its nn.Unfold-based patch merging).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import pickletools
import pprint
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from repq_export.data.transforms import PreprocessSettings
from repq_export.errors import UserError
from repq_export.models.arch import Arch, arch_from_config, arch_from_state_dict
from repq_export.models.build import build_detector
from repq_export.models.checkpoint_checks import ARCH_KEYS, check_finite, sniff_file
from repq_export.models.config import load_config
from repq_export.models.detector import Detector
from repq_export.models.mmdet_config import config_from_arch
from repq_export.models.swin import WindowAttention
from repq_export.models.test_pipeline import preprocess_settings

LAYOUTS = ("swin-det", "mmdet3")
MAX_LISTED_KEYS = 10
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

# (Swin-Det name fragment, mmdet 3.x name fragment) for backbone keys; order matters for renaming.
_MMDET3_NAMES = (
    ("backbone.patch_embed.proj.", "backbone.patch_embed.projection."),
    ("backbone.layers.", "backbone.stages."),
    (".attn.", ".attn.w_msa."),
    (".mlp.fc1.", ".ffn.layers.0.0."),
    (".mlp.fc2.", ".ffn.layers.1."),
)


@dataclass
class LoadedCheckpoint:
    """What was read besides the weights: provenance, architecture, config and class names."""

    path: Path
    sha256: str
    layout: str  # key layout of the file: 'swin-det' or 'mmdet3'
    arch: Arch
    cfg: dict  # the config the detector was built from (the file's, or the reference defaults)
    config_path: Path | None
    classes: tuple[str, ...] | None  # from meta['CLASSES'] (mmdet 2) / meta['dataset_meta'] (mmdet 3)
    preprocess: PreprocessSettings
    meta: dict = field(default_factory=dict)  # the checkpoint's meta, plain values only


# ----------------------------------------------------------------------------- reading


def load_checkpoint(path: str | Path, config_path: str | Path | None = None
                    ) -> tuple[Detector, LoadedCheckpoint]:
    """Build the detector for a checkpoint and load its weights strictly (eval mode).

    Without ``config_path`` the architecture is read off the state dict and the reference's
    test-time settings are used. Every problem is a one-line UserError naming the file.
    """
    path = Path(path)
    state_dict, meta, layout = read_checkpoint(path)
    arch = _arch_of(state_dict, path)
    if config_path is not None:
        config_path = Path(config_path)
        cfg = load_config(config_path)
        config_arch = _with_source(config_path, arch_from_config, cfg)
        diffs = config_arch.differences(arch)
        if diffs:
            raise UserError(f"{path}: does not match config {config_path} (config vs checkpoint: "
                            f"{'; '.join(diffs)})")
        preprocess = _with_source(config_path, preprocess_settings, cfg)
    else:
        cfg = _with_source(path, config_from_arch, arch)
        preprocess = preprocess_settings(cfg)
    detector = _with_source(config_path or path, build_detector, cfg)
    load_state_dict_strict(detector, state_dict, path)
    info = LoadedCheckpoint(path=path, sha256=file_sha256(path), layout=layout, arch=arch, cfg=cfg,
                            config_path=config_path, classes=_classes(meta, arch, path),
                            preprocess=preprocess, meta=meta)
    return detector.eval(), info


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict, str]:
    """(state dict in Swin-Det layout, plain meta, original layout) of a checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    obj = _safe_torch_load(path)
    if not isinstance(obj, Mapping):
        raise UserError(f"{path}: not a detector checkpoint (holds a {type(obj).__name__}, "
                        "expected a dict with a state_dict)")
    if "state_dict" in obj:
        state_dict, meta = obj["state_dict"], obj.get("meta")
    elif obj and all(isinstance(v, Tensor) for v in obj.values()):
        state_dict, meta = obj, None  # a bare state dict
    else:
        raise UserError(f"{path}: not a detector checkpoint (no 'state_dict' entry; "
                        f"top-level keys: {_list_keys(sorted(map(str, obj)))})")
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise UserError(f"{path}: not a detector checkpoint (state_dict is empty or not a dict)")
    bad = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, Tensor))
    if bad:
        raise UserError(f"{path}: not a detector checkpoint (non-tensor state_dict entries: "
                        f"{_list_keys(bad)})")
    check_finite(state_dict, path)
    state_dict = _strip_module_prefix({str(k): v for k, v in state_dict.items()})
    layout = detect_layout(state_dict)
    if layout == "mmdet3":
        state_dict = mmdet3_to_swin_det(state_dict)
    return state_dict, _plain(meta) if isinstance(meta, Mapping) else {}, layout


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor], path: Path) -> None:
    """``model.load_state_dict(strict=True)`` with one-line messages for each kind of mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise UserError(f"{path}: missing keys in state_dict: {_list_keys(missing)}")
    if unexpected:
        raise UserError(f"{path}: unexpected keys in state_dict: {_list_keys(unexpected)}")
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if state_dict[k].shape != v.shape]
    if shapes:
        raise UserError(f"{path}: shape mismatch in state_dict: {_list_keys(shapes)}")
    model.load_state_dict(state_dict, strict=True)


def _list_keys(keys: list[str]) -> str:
    """At most ten keys, then 'and N more'."""
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return f"{shown} and {more} more" if more > 0 else shown


def _with_source(source: Path, fn, *args):
    """Call ``fn``; re-raise its 'config: ...' / 'arch: ...' UserErrors as '<source>: ...'."""
    try:
        return fn(*args)
    except UserError as exc:
        message = str(exc)
        for prefix in ("config: ", "arch: "):
            if message.startswith(prefix):
                message = message[len(prefix):]
        raise UserError(f"{source}: {message}") from None


def _arch_of(state_dict: Mapping[str, Tensor], path: Path) -> Arch:
    """The architecture of a Swin-Det-layout state dict, or a UserError saying what it is instead."""
    if not any(k.startswith("backbone.") for k in state_dict):
        raise UserError(f"{path}: not a detector checkpoint (no backbone.* keys; first keys: "
                        f"{_list_keys(list(state_dict)[:3])})")
    if "backbone.patch_embed.proj.weight" not in state_dict:
        example = next(k for k in state_dict if k.startswith("backbone."))
        raise UserError(f"{path}: another architecture: the backbone is not a Swin Transformer "
                        f"(has keys like '{example}'); only Swin Mask R-CNN / Cascade Mask R-CNN "
                        "checkpoints are supported")
    if not any(k.startswith("roi_head.") for k in state_dict) or \
            not any(k.startswith("rpn_head.") for k in state_dict):
        raise UserError(f"{path}: another architecture: no rpn_head/roi_head keys (only two-stage "
                        "Mask R-CNN / Cascade Mask R-CNN checkpoints are supported)")
    missing = [key for key in ARCH_KEYS if key not in state_dict]
    if missing:
        raise UserError(f"{path}: cannot read the architecture off the weights: {len(missing)} key(s) missing: "
                        f"{_list_keys(missing)}")
    try:
        return arch_from_state_dict(state_dict)
    except UserError as exc:
        raise UserError(f"{path}: not a Swin Mask R-CNN / Cascade Mask R-CNN checkpoint ({exc})") from None



def _classes(meta: Mapping, arch: Arch, path: Path) -> tuple[str, ...] | None:
    """Class names from the meta (mmdet 2: CLASSES; mmdet 3: dataset_meta.classes), checked."""
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, (list, tuple)) \
            or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: meta class names are not a list of strings")
    if len(names) != arch.num_classes:
        raise UserError(f"{path}: meta lists {len(names)} class names but the model has "
                        f"{arch.num_classes} classes")
    return tuple(names)


def _strip_module_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the 'module.' prefix that (Distributed)DataParallel wrappers add to every key."""
    if all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _plain(value: Any) -> Any:
    """Only str/number/bool/None and containers of them; placeholders and tensors are dropped."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            v = _plain(v)
            if v is not _DROP and isinstance(k, (str, int)):
                out[k] = v
        return out
    if isinstance(value, (list, tuple)):
        items = [v for v in map(_plain, value) if v is not _DROP]
        return items if isinstance(value, list) else tuple(items)
    return _DROP


_DROP = object()


# ----------------------------------------------------------------------------- safe torch.load


class _Opaque:
    """Inert stand-in for an object of a class we will not import; keeps only its pickled data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _placeholder(full_name: str) -> tuple[type, str]:
    """A distinct ``_Opaque`` subclass registered under ``full_name`` for the weights-only loader."""
    return type(f"Opaque[{full_name}]", (_Opaque,), {}), full_name


def _safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; on unknown globals, retry with inert placeholders.

    Modules torch blocks outright (os, sys, ...) still fail: such a file is refused.
    """
    kind = sniff_file(path)
    if kind != "torch":
        raise UserError(f"{path}: not a PyTorch checkpoint ({kind})")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: not the user's business
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_error = exc
    except Exception as exc:  # zip reader, EOF, bad magic number: not a (whole) torch file
        raise UserError(f"{path}: not a PyTorch checkpoint, or truncated ({_reason(exc)})") from None
    try:
        names = _pickled_globals(path)
    except Exception:
        raise UserError(f"{path}: not a PyTorch checkpoint, or truncated "
                        f"({_reason(first_error)})") from None
    try:
        with torch.serialization.safe_globals([_placeholder(n) for n in sorted(names)]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: refused: cannot be loaded without running code from it "
                        f"({_reason(exc)})") from None


def _pickled_globals(path: Path) -> set[str]:
    """'module.name' of every GLOBAL opcode in the checkpoint's pickle(s), found without loading."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            streams = [io.BytesIO(archive.read(n)) for n in archive.namelist() if n.endswith("data.pkl")]
        if not streams:
            raise ValueError("no data.pkl in the archive")
        pickles = [(s, 1) for s in streams]
    else:  # legacy format: magic number, protocol, sys info, then the object, in a row
        pickles = [(open(path, "rb"), 4)]
    names: set[str] = set()
    for stream, count in pickles:
        with stream:
            for _ in range(count):
                for opcode, arg, _pos in pickletools.genops(stream):
                    if opcode.name == "GLOBAL":
                        names.add(str(arg).replace(" ", "."))
    return names


def _reason(exc: BaseException) -> str:
    """The informative line of a (often multi-paragraph) torch.load error, shortened."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "weights_only" not in ln]
    pick = next((ln for ln in lines if "GLOBAL" in ln or "blocked" in ln), lines[0] if lines else "")
    pick = pick or type(exc).__name__
    if isinstance(exc, EOFError):
        return "the file ends early"
    if "zip archive" in pick:
        return "the zip archive is truncated or corrupt"
    if isinstance(exc, KeyError) or len(pick) < 12:  # pickle's bare "101": bytes that are not a pickle
        return f"unreadable bytes ({type(exc).__name__})"
    return pick if len(pick) <= 200 else pick[:197] + "..."


# ----------------------------------------------------------------------------- key layouts


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """'mmdet3' if the backbone uses mmdet 3.x names (stages, projection), else 'swin-det'."""
    mmdet3 = any(k.startswith(("backbone.stages.", "backbone.patch_embed.projection."))
                 for k in state_dict)
    return "mmdet3" if mmdet3 else "swin-det"


def concat_order(channels: int) -> Tensor:
    """Index ``p`` with ``swin[..., s] = mmdet3[..., p[s]]`` for patch-merging inputs of 4C channels.

    Swin concatenates the 2x2 neighbours as x0 (row 0, col 0), x1 (1, 0), x2 (0, 1), x3 (1, 1),
    each C channels: s = k * C + c. mmdet 3.x's nn.Unfold(2, stride 2) yields u = c * 4 + (2 * row
    + col). Neighbour k = (row, col) thus sits at unfold offset q = (0, 2, 1, 3)[k].
    """
    c = channels // 4
    k = torch.arange(4).repeat_interleave(c)
    q = torch.tensor([0, 2, 1, 3])[k]
    return torch.arange(c).repeat(4) * 4 + q


def mmdet3_to_swin_det(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename mmdet 3.x backbone keys to Swin-Det's and reorder the patch-merging channels."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            for ours, theirs in reversed(_MMDET3_NAMES):
                key = key.replace(theirs, ours)
            value = _reorder_downsample(key, value, to_mmdet3=False)
        out[key] = value
    return out


def swin_det_to_mmdet3(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``mmdet3_to_swin_det`` (how mmdet 3.x would name and order the same weights)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            value = _reorder_downsample(key, value, to_mmdet3=True)
            for ours, theirs in _MMDET3_NAMES:
                key = key.replace(ours, theirs)
        out[key] = value
    return out


def _reorder_downsample(key: str, value: Tensor, to_mmdet3: bool) -> Tensor:
    """Permute the 4C input channels of ``downsample.reduction.weight`` / ``downsample.norm.*``."""
    if ".downsample.reduction." in key:
        dim = 1
    elif ".downsample.norm." in key:
        dim = 0
    else:
        return value
    order = concat_order(value.shape[dim])
    if to_mmdet3:
        order = torch.argsort(order)
    return value.index_select(dim, order).contiguous()


# ----------------------------------------------------------------------------- writing


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
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
