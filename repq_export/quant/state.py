"""Saving and loading a quantized detector: one file, reloaded bit for bit without calibration.

The file is ``torch.save({"manifest": <JSON text>, "state_dict": <detector state dict>})``: the
reparameterized weights, every quantizer buffer (scale, zero_point, n_bits, initialized), the
SwinBlocks' ``pad_value`` buffers and everything else of the model. It is read back with
``torch.load(weights_only=True)`` (no code runs) and written to a temporary name, then renamed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

import repq_export
from repq_export.errors import UserError
from repq_export.files import write_atomically
from repq_export.files import file_sha256
from repq_export.quant.assign import quant_counts, quant_table
from repq_export.quant.calibrate import QuantDetector
from repq_export.quant.layers import named_quantizers
from repq_export.quant.recipe import QuantSettings, prepare_steps

FORMAT = "repq-export-quant-state"
VERSION = 1
_RESIZED_BUFFERS = ("scale", "zero_point")  # shapes come from the file (per-tensor or per-channel)


def build_manifest(
    detector: nn.Module, calibration_files: Sequence[str | Path] = (), source_checkpoint: str | Path | None = None
) -> dict[str, Any]:
    """The JSON-able description of how ``detector`` was quantized, and from what."""
    settings: QuantSettings | None = getattr(detector, "quant_settings", None)
    if settings is None:
        raise ValueError("save_quant_state: the detector has not been quantized (no quant_settings)")
    return {
        "format": FORMAT,
        "version": VERSION,
        **settings.as_dict(),
        "calibration_images": [{"name": Path(p).name, "sha256": file_sha256(p)} for p in calibration_files],
        "source_checkpoint_sha256": file_sha256(source_checkpoint) if source_checkpoint is not None else None,
        "quantizers": quant_counts(quant_table(detector)),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "repq_export_version": repq_export.__version__,
    }


def save_quant_state(
    detector: nn.Module,
    path: str | Path,
    calibration_files: Sequence[str | Path] = (),
    source_checkpoint: str | Path | None = None,
) -> None:
    """Write ``detector``'s quantized state and manifest to ``path`` (atomically)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path}: cannot write quantized state (folder {path.parent} does not exist)")
    payload = {
        "manifest": json.dumps(build_manifest(detector, calibration_files, source_checkpoint), sort_keys=True),
        "state_dict": detector.state_dict(),
    }
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def read_quant_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(manifest, state dict) of a saved quantized state; UserError if unreadable or not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: quantized state file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable quantized state (truncated or corrupt?): {first}") from None
    if not isinstance(payload, Mapping) or not isinstance(payload.get("state_dict"), Mapping):
        raise UserError(f"{path}: not a repq-export quantized state (no state_dict)")
    try:
        manifest = json.loads(payload.get("manifest", ""))
    except (TypeError, ValueError):
        raise UserError(f"{path}: the manifest is missing or not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a repq-export quantized state (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path}: quantized state version {manifest.get('version')!r}, this build reads {VERSION}")
    return manifest, dict(payload["state_dict"])


def load_quant_state(
    detector: nn.Module, path: str | Path, w_bits: int | None = None, a_bits: int | None = None
) -> QuantDetector:
    """Quantize the float ``detector`` in place with the structure recorded in ``path`` and load it.

    No calibration runs; outputs equal those of the detector that was saved, bit for bit.
    ``w_bits``/``a_bits``, if given, must equal the file's. On error the detector may be left
    half-converted and should be discarded.
    """
    path = Path(path)
    manifest, state = read_quant_state(path)
    return apply_quant_state(detector, manifest, state, path, w_bits, a_bits)


def apply_quant_state(detector: nn.Module, manifest: Mapping[str, Any], state: Mapping[str, Tensor], path: Path,
                      w_bits: int | None = None, a_bits: int | None = None) -> QuantDetector:
    """`load_quant_state` over a state already read by `read_quant_state` from ``path`` (named in errors)."""
    settings = _settings_from_manifest(manifest, path)
    for option, wanted, saved in (("w_bits", w_bits, settings.w_bits), ("a_bits", a_bits, settings.a_bits)):
        if wanted is not None and wanted != saved:
            raise UserError(f"{path}: holds {option}={saved}, but {option}={wanted} was asked for")
    if any(True for _ in named_quantizers(detector)):
        raise ValueError("load_quant_state: the detector is already quantized; pass a float detector")
    prepare_steps(detector, settings)
    expected_bits = {name: q.bits for name, q in named_quantizers(detector)}
    _check_keys_and_shapes(detector, state, path)
    try:
        detector.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise UserError(f"{path}: quantized state does not fit this model: {(details or [str(exc)])[0]}") from None
    for name, q in named_quantizers(detector):
        if q.bits != expected_bits[name] or not bool(q.initialized):
            raise UserError(
                f"{path}: {name} holds {q.bits} bits (initialized={bool(q.initialized)}), but the manifest "
                f"(w_bits={settings.w_bits}, a_bits={settings.a_bits}) implies {expected_bits[name]}"
            )
    detector.quant_settings = settings
    return detector.eval()


def _settings_from_manifest(manifest: Mapping[str, Any], path: Path) -> QuantSettings:
    """QuantSettings recorded in a manifest, validated."""
    try:
        return QuantSettings.from_dict(manifest)
    except KeyError as exc:
        raise UserError(f"{path}: manifest is incomplete (no {exc})") from None
    except (TypeError, ValueError, UserError) as exc:
        raise UserError(f"{path}: manifest is invalid ({exc})") from None


def _check_keys_and_shapes(detector: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """One-line UserError if ``state`` does not fit ``detector`` (other model or other structure)."""
    own = detector.state_dict()
    quantizer_names = {name for name, _ in named_quantizers(detector)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise UserError(f"{path}: quantized state does not fit this model: keys {', '.join(parts)}")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise UserError(f"{path}: {key} is not a tensor")
        owner, _, leaf = key.rpartition(".")
        if owner in quantizer_names and leaf in _RESIZED_BUFFERS:
            continue
        if value.shape != own[key].shape:
            raise UserError(
                f"{path}: quantized state does not fit this model: {key} has shape {tuple(value.shape)}, "
                f"the model {tuple(own[key].shape)}"
            )
