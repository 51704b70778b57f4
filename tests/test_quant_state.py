"""Saving and loading a quantized detector: bit-identical outputs, manifest, one-line errors."""

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from repq_export.config_source import load_config
from repq_export.errors import UserError
from repq_export.models.build import build_detector
from repq_export.quant.calibrate import quantize
from repq_export.quant.layers import named_quantizers
from repq_export.quant.state import load_quant_state, read_quant_state, save_quant_state

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
IMG = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(0))
IMG_HW = torch.tensor([90.0, 150.0])
IMG2 = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(1))
IMG2_HW = torch.tensor([128.0, 90.0])


def tiny_detector(name: str = "mask_rcnn_tiny.py") -> nn.Module:
    torch.manual_seed(0)
    return build_detector(load_config(CONFIGS / name)).eval()


@pytest.fixture(scope="module")
def float_detector() -> nn.Module:
    return tiny_detector()


@pytest.fixture(scope="module")
def saved(float_detector, tmp_path_factory) -> tuple[nn.Module, Path]:
    det = quantize(copy.deepcopy(float_detector), [(IMG, IMG_HW)], 4, 4, progress=False)
    folder = tmp_path_factory.mktemp("state")
    image, checkpoint = folder / "calib.jpg", folder / "model.pth"
    image.write_bytes(b"not really a jpeg")
    checkpoint.write_bytes(b"weights")
    path = folder / "w4a4.pt"
    save_quant_state(det, path, calibration_files=[image], source_checkpoint=checkpoint)
    return det, path


def outputs(det: nn.Module, img: torch.Tensor, img_hw: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return det(img, img_hw)


@pytest.mark.parametrize("flags", [dict(), dict(integer_zero_point=False, exact_padding=False), dict(reparam=False)])
def test_save_load_is_bit_identical(float_detector, tmp_path, flags):
    det = quantize(copy.deepcopy(float_detector), [(IMG, IMG_HW)], 3, 5, progress=False, **flags)
    path = tmp_path / "q.pt"
    save_quant_state(det, path)
    loaded = load_quant_state(copy.deepcopy(float_detector), path)
    for img, hw in ((IMG, IMG_HW), (IMG2, IMG2_HW)):  # the calibration image and another size
        a, b = outputs(det, img, hw), outputs(loaded, img, hw)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    sa, sb = det.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.quant_settings == det.quant_settings
    assert [p.name for p in tmp_path.iterdir()] == ["q.pt"]  # no temporary file left behind


def test_manifest_records_bits_flags_and_hashes(saved):
    det, path = saved
    manifest, state = read_quant_state(path)
    folder = path.parent
    assert (manifest["w_bits"], manifest["a_bits"]) == (4, 4)
    assert (manifest["reparam"], manifest["integer_zero_point"], manifest["exact_padding"]) == (True, True, True)
    assert manifest["calibration_images"] == [
        {"name": "calib.jpg", "sha256": hashlib.sha256(b"not really a jpeg").hexdigest()}
    ]
    assert manifest["source_checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert manifest["calibration_tensor_sha256"] == [hashlib.sha256(IMG.numpy().tobytes()).hexdigest()]
    assert manifest["torch_version"] == torch.__version__ and "torchvision_version" in manifest
    assert sum(manifest["quantizers"].values()) == len(list(named_quantizers(det)))
    assert "backbone.layers.0.blocks.0.pad_value" in state
    assert state["backbone.layers.0.downsample.reduction.bias"].shape == (32,)
    assert state["backbone.layers.0.blocks.0.attn.qkv.input_quantizer.scale"].shape == ()
    assert state["backbone.layers.0.blocks.0.attn.qkv.weight_quantizer.scale"].shape == (48,)
    assert folder.joinpath("w4a4.pt").is_file()


def test_wrong_model_is_a_user_error(saved):
    _, path = saved
    with pytest.raises(UserError, match="does not fit this model"):
        load_quant_state(tiny_detector("cascade_mask_rcnn_tiny.py"), path)


def test_other_bits_are_user_errors(saved, float_detector, tmp_path):
    _, path = saved
    with pytest.raises(UserError, match="holds w_bits=4, but w_bits=6 was asked for"):
        load_quant_state(copy.deepcopy(float_detector), path, w_bits=6)
    # a file whose manifest disagrees with the bits its quantizers hold
    payload = torch.load(path, weights_only=True)
    manifest = json.loads(payload["manifest"])
    manifest["a_bits"] = 6
    payload["manifest"] = json.dumps(manifest)
    tampered = tmp_path / "tampered.pt"
    torch.save(payload, tampered)
    with pytest.raises(UserError, match="holds 4 bits"):
        load_quant_state(copy.deepcopy(float_detector), tampered)


def test_unreadable_files_are_one_line_user_errors(saved, float_detector, tmp_path):
    _, path = saved
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("hello")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}, "manifest": json.dumps({"format": "other"})}, foreign)
    cases = [(truncated, "not a readable quantized state"), (garbage, "not a readable quantized state"),
             (foreign, "not a repq-export quantized state"), (tmp_path / "missing.pt", "not found")]
    for bad, message in cases:
        with pytest.raises(UserError, match=message) as info:
            load_quant_state(copy.deepcopy(float_detector), bad)
        assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_save_into_a_missing_folder_is_a_user_error(saved, tmp_path):
    det, _ = saved
    with pytest.raises(UserError, match="cannot write quantized state"):
        save_quant_state(det, tmp_path / "no" / "such" / "dir" / "q.pt")
