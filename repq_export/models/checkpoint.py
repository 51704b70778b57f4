"""Reading a Swin Mask R-CNN / Cascade Mask R-CNN checkpoint (+ optional config) into a Detector.

Never executes code from the file (``safe_load.py``); both key layouts are accepted
(``key_layout.py``); the architecture comes from the config or off the state dict (``arch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from repq_export.config_source import load_config
from repq_export.data.transforms import PreprocessSettings
from repq_export.errors import UserError
from repq_export.files import check_input_file, file_sha256
from repq_export.models.arch import Arch, arch_from_config, arch_from_state_dict
from repq_export.models.build import build_detector
from repq_export.models.checkpoint_checks import ARCH_KEYS, check_finite, check_tensors
from repq_export.models.detector import Detector
from repq_export.models.key_layout import detect_layout, mmdet3_to_swin_det
from repq_export.models.mmdet_config import config_from_arch
from repq_export.models.safe_load import safe_torch_load
from repq_export.models.test_pipeline import preprocess_settings

MAX_LISTED_KEYS = 10


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
    meta: dict = field(default_factory=dict)  # the meta's top-level plain values and class names (_meta)


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


def read_checkpoint(path: str | Path, option: str | None = None) -> tuple[dict[str, Tensor], dict, str]:
    """(state dict in Swin-Det layout, meta, original layout) of a checkpoint file; of everything
    else in it (optimizer, message_hub, param_schedulers) nothing is kept."""
    path = Path(path)
    check_input_file(path, "checkpoint", option)
    obj = safe_torch_load(path)
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
    check_tensors(state_dict, path)
    check_finite(state_dict, path)
    state_dict = _strip_module_prefix({str(k): v for k, v in state_dict.items()})
    layout = detect_layout(state_dict)
    if layout == "mmdet3":
        state_dict = mmdet3_to_swin_det(state_dict)
    return state_dict, _meta(meta), layout


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


def _meta(meta: Any) -> dict:
    """What is kept of a checkpoint's meta: its top-level plain values (epoch, versions, CLASSES) and
    dataset_meta's class names. Never walked further, so a meta that refers to itself any number of
    times costs nothing (a deep copy of one would grow without end)."""
    if not isinstance(meta, Mapping):
        return {}
    kept: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(key, str) and (isinstance(value, (str, int, float, bool)) or value is None):
            kept[key] = value
    if _is_names(meta.get("CLASSES")):
        kept["CLASSES"] = tuple(meta["CLASSES"])
    elif "CLASSES" in meta:
        kept["CLASSES"] = _NOT_NAMES
    dataset_meta = meta.get("dataset_meta")
    if isinstance(dataset_meta, Mapping) and "classes" in dataset_meta:
        names = dataset_meta["classes"]
        kept["dataset_meta"] = {"classes": tuple(names) if _is_names(names) else _NOT_NAMES}
    return kept


def _is_names(value: Any) -> bool:
    """A list or tuple of strings."""
    return isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value)


_NOT_NAMES = "<not a list of strings>"  # kept where meta's class names are something else, to be refused
