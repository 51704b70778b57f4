"""Block reconstruction after RepQ-ViT (--recon): lower block error, hard in-range codes, learned steps within
their form, determinism, exact export (tier 1, both forms) and a bit-identical reload of quant.pth."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from repq_export.commands.recon_options import recon_settings
from repq_export.commands import test_tool
from repq_export.export.onnx_export import export_onnx
from repq_export.export.forms import ONNXRUNTIME, TENSORRT
from repq_export.quant.integer_bias import bias_grid
from repq_export.quant.layers import QuantConv2d, QuantLinear, quant_disabled
from repq_export.quant.recipe import QuantSettings
from repq_export.quant.log_sqrt2 import LogSqrt2Quantizer
from repq_export.quant.recon_settings import ReconSettings
from repq_export.quant.recon_units import recon_units
from repq_export.quant.reconstruct import reconstruct
from repq_export.quant.uniform import UniformQuantizer
from repq_export.quant.state import load_quant_state, read_quant_state, save_quant_state

from test_export import IMG_HW, tiny_float_model, tiny_quant_model
from test_export_forms import tier1

SETTINGS = ReconSettings(iters=40, seed=3)


def recon_inputs(img: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The calibration image and two more random ones of the same size."""
    g = torch.Generator().manual_seed(11)
    return [(img, IMG_HW)] + [(torch.randn(img.shape, generator=g), IMG_HW) for _ in range(2)]


@pytest.fixture(scope="module")
def recon_pair():
    """(RepQ-ViT model, the same reconstructed, per-block results, inputs)."""
    torch.set_num_threads(1)
    repq, img = tiny_quant_model("mask", 4)
    inputs = recon_inputs(img)
    recon = copy.deepcopy(repq)
    results = reconstruct(recon, inputs, SETTINGS, progress=False)
    return repq, recon, results, inputs


def backbone_error(model, reference, inputs) -> float:
    """Mean squared error of the backbone's four maps against ``reference`` in float, over ``inputs``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for img, _ in inputs:
            with quant_disabled(reference):
                want = reference.backbone(img)
            for got, ref in zip(model.backbone(img), want):
                total += float((got - ref).pow(2).sum())
                count += ref.numel()
    return total / count


def test_reconstruction_lowers_every_block_error_against_float(recon_pair):
    repq, recon, results, inputs = recon_pair
    names = [r.name for r in results]
    assert names == [u.name for u in recon_units(recon)] and len(results) == 15
    assert names[11:] == ["neck", "rpn_head", "roi_head.bbox_head", "roi_head.mask_head"]
    for r in results:
        assert r.mse_after <= r.mse_before, r
    improved = [r for r in results if not r.kept_nearest]
    assert len(improved) >= 12, results
    assert sum(r.mse_after for r in results) < 0.95 * sum(r.mse_before for r in results), results
    # end to end through the backbone, on the reconstruction images: closer to float than RepQ-ViT alone
    assert backbone_error(recon, repq, inputs) < 0.95 * backbone_error(repq, repq, inputs)


def test_weight_codes_are_hard_and_in_range(recon_pair):
    repq, recon, results, _ = recon_pair
    changed = 0
    for unit in recon_units(recon):
        kept = next(r.kept_nearest for r in results if r.name == unit.name)
        for _, layer in unit.module.named_modules():
            if not isinstance(layer, (QuantLinear, QuantConv2d)):
                continue
            q = layer.weight_quantizer
            codes = q.codes(layer.weight)
            assert bool(((codes >= 0) & (codes <= 2**q.bits - 1)).all())
            assert torch.equal(codes, torch.round(codes))
            if not kept:  # the stored weight IS the dequantized hard code: fake quant leaves it unchanged
                assert torch.equal(q(layer.weight), layer.weight)
    for (name, a), (_, b) in zip(repq.named_modules(), recon.named_modules()):
        if isinstance(a, (QuantLinear, QuantConv2d)) and name.startswith(("backbone.layers", "roi_head")):
            changed += int((a.weight_quantizer.codes(a.weight) != b.weight_quantizer.codes(b.weight)).sum())
    assert changed > 0
    # every bias is still on its int32 grid
    for module in recon.modules():
        grid = bias_grid(module) if isinstance(module, (QuantConv2d, QuantLinear)) else None
        if grid is not None and module.bias is not None:
            ratio = module.bias / grid
            assert torch.allclose(ratio, torch.round(ratio), atol=1e-3)


def test_only_per_tensor_activation_steps_move_and_zero_points_stay(recon_pair):
    repq, recon, _, _ = recon_pair
    before, after = dict(repq.named_modules()), dict(recon.named_modules())
    moved = 0
    for name, q in before.items():
        if not isinstance(q, (UniformQuantizer, LogSqrt2Quantizer)):
            continue
        r = after[name]
        assert torch.equal(q.zero_point, r.zero_point) if isinstance(q, UniformQuantizer) else True, name
        if isinstance(q, UniformQuantizer) and q.channel_axis is None:
            assert r.channel_axis is None and r.scale.dim() == 0 and float(r.scale) > 0, name
            assert torch.equal(r.zero_point, torch.round(r.zero_point)), name
            moved += int(not torch.equal(q.scale, r.scale))
        else:  # weights' per-channel steps and log-sqrt2 quantizers: untouched
            assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), r.state_dict().values())), name
    assert moved >= 10
    for name, buffer in repq.named_buffers():
        if name.endswith("pad_value"):  # exact padding: reparameterization's pad values unchanged
            assert torch.equal(buffer, dict(recon.named_buffers())[name]), name


def test_reconstruction_is_deterministic_for_a_seed(recon_pair):
    repq, recon, _, inputs = recon_pair
    again = copy.deepcopy(repq)
    reconstruct(again, inputs, SETTINGS, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(recon.state_dict().values(), again.state_dict().values()))
    other = copy.deepcopy(repq)
    reconstruct(other, inputs, ReconSettings(iters=SETTINGS.iters, seed=4), progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(recon.state_dict().values(), other.state_dict().values()))


def assert_exports_exactly(model, img: torch.Tensor, folder, form) -> None:
    """``model`` exported in ``form``: tier 1 finds codes, and none of them differs from fake quant's."""
    proto = export_onnx(model, folder / "model.onnx", img, IMG_HW, form=form)
    elements, mismatches = tier1(model, img, proto)
    assert elements > 0 and mismatches == 0


def saved_and_reloaded(model, folder, inputs) -> dict:
    """Save ``model``'s quant.pth, reload it onto a float tiny model, check settings, state and outputs are
    bit-identical, and return the saved manifest."""
    path = folder / "quant.pth"
    save_quant_state(model, path)
    manifest, _ = read_quant_state(path)
    loaded = load_quant_state(tiny_float_model("mask"), path)
    assert loaded.quant_settings == model.quant_settings
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with torch.no_grad():
        for got, want in zip(loaded(*inputs[1]), model(*inputs[1])):
            assert torch.equal(got, want)
    return manifest


@pytest.mark.parametrize("form", [ONNXRUNTIME, TENSORRT])
def test_reconstructed_graph_has_zero_differing_codes(recon_pair, tmp_path, form):
    _, recon, _, inputs = recon_pair
    assert_exports_exactly(recon, inputs[0][0], tmp_path, form)


def test_quant_pth_records_the_method_and_reloads_bit_identical(recon_pair, tmp_path):
    _, recon, _, inputs = recon_pair
    manifest = saved_and_reloaded(recon, tmp_path, inputs)
    assert manifest["reconstruction"] == {**SETTINGS.as_dict(), "images": 3}
    assert manifest["reconstruction"]["method"] == "adaround-qdrop-lsq-v2"


def test_repq_vit_alone_records_no_reconstruction():
    settings = QuantSettings(4, 4)
    assert "reconstruction" not in settings.as_dict()
    assert QuantSettings.from_dict(settings.as_dict()) == settings
    assert recon_settings(test_tool.parser().parse_args(["c.py", "k.pth"])) is None
    args = test_tool.parser().parse_args(["c.py", "k.pth", "--recon", "--recon-iters", "7", "--recon-seed", "5"])
    assert recon_settings(args) == ReconSettings(iters=7, seed=5)
    with pytest.raises(ValueError, match="method"):
        ReconSettings.from_dict({**ReconSettings().as_dict(), "method": "brecq"})
    with pytest.raises(ValueError, match="heads"):
        ReconSettings.from_dict({**ReconSettings().as_dict(), "heads": "yes"})
    assert ReconSettings.from_dict(ReconSettings(step_lr=0.01, heads=False).as_dict()) == ReconSettings(step_lr=0.01, heads=False)


def test_a_weights_only_manifest_still_reads():
    old = {"method": "adaround-qdrop", "iters": 100, "seed": 0, "drop_prob": 0.5, "lr": 0.01, "round_weight": 0.01,
           "warmup": 0.2, "beta_start": 20.0, "beta_end": 2.0, "images": 8}
    settings = ReconSettings.from_dict(old)
    assert settings.method == "adaround-qdrop" and settings.step_lr == 0 and not settings.heads
    assert settings.as_dict() == old


def test_repq_export_recon_writes_an_artifact_that_records_it(tmp_path):
    from cli_helpers import CLI, TINY_MASK, make_checkpoint, make_coco, run_cli

    ckpt = make_checkpoint(tmp_path / "tiny_mask.pth")
    _, img_dir = make_coco(tmp_path / "coco")
    out = tmp_path / "artifact"
    result = run_cli(CLI, "--ckpt", ckpt, "--config", TINY_MASK, "--bits", 4, "--calib", img_dir, "--calib-images",
                     2, "--recon", "--recon-iters", 3, "--recon-seed", 9, "--out", out, "--quiet",
                     "--accept-accuracy-loss")  # a random model: no accuracy to check
    assert result.rc == 0, result.err[-3000:]
    assert "neck: output MSE vs float" in result.out and "reconstruction took" in result.out
    manifest = json.loads((out / "repq.json").read_text())
    assert manifest["reconstruction"] == {**ReconSettings(iters=3, seed=9).as_dict(), "images": 2}
    assert read_quant_state(out / "quant.pth")[0]["reconstruction"] == manifest["reconstruction"]
