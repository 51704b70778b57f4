"""GPTQ rounding after RepQ-ViT (--recon gptq): grid values only, lower weighted output error than nearest
rounding, steps and biases untouched, deterministic, exact export (tier 1, both forms), bit-identical reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from repq_export.commands import test_tool
from repq_export.commands.recon_options import recon_settings
from repq_export.export.forms import ONNXRUNTIME, TENSORRT
from repq_export.quant.gptq import gptq_weights, output_error, round_weights, weight_layers
from repq_export.quant.recipe import QuantSettings
from repq_export.quant.recon_settings import GptqSettings, ReconSettings, settings_from_dict
from repq_export.quant.state import read_quant_state
from repq_export.quant.uniform import fake_quant

from test_export import tiny_quant_model
from test_reconstruct import assert_exports_exactly, recon_inputs, saved_and_reloaded


def grid(rows: int = 6, cols: int = 40, bits: int = 4, seed: int = 0):
    """A random weight and a per-row 4-bit grid that covers it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    scale = (w.amax(1) - w.amin(1)) / (2**bits - 1)
    zero_point = torch.round(-w.amin(1) / scale)
    return w, scale, zero_point, bits


def test_uncorrelated_inputs_give_nearest_rounding():
    w, scale, zp, bits = grid()
    got = gptq_weights(w, scale, zp, bits, torch.eye(w.shape[1], dtype=torch.float64), GptqSettings())
    assert torch.equal(got, fake_quant(w.double(), scale.double()[:, None], zp.double()[:, None], bits))


@pytest.mark.parametrize("block", [7, 128])
def test_correlated_inputs_lower_the_output_error_on_the_grid(block):
    w, scale, zp, bits = grid()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64) @ torch.randn(8, w.shape[1], generator=g, dtype=torch.float64)
    x += 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    h = x.T @ x / x.shape[0]
    nearest = fake_quant(w.double(), scale.double()[:, None], zp.double()[:, None], bits)
    got = gptq_weights(w, scale, zp, bits, h, GptqSettings(block=block))
    assert output_error(w, got, h) < 0.5 * output_error(w, nearest, h)
    on_grid = fake_quant(got.float(), scale[:, None], zp[:, None], bits)
    assert torch.equal(on_grid.double(), got.float().double())  # the fake quantizer reproduces it
    codes = torch.round(got / scale.double()[:, None]) + zp.double()[:, None]
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1


@pytest.fixture(scope="module")
def gptq_pair():
    """(RepQ-ViT model, the same rounded by GPTQ, per-layer results, inputs)."""
    torch.set_num_threads(1)
    repq, img = tiny_quant_model("mask", 4)
    inputs = recon_inputs(img)
    rounded = copy.deepcopy(repq)
    results = round_weights(rounded, inputs, GptqSettings(group=3), progress=False)
    return repq, rounded, results, inputs


def test_every_layer_is_rounded_on_its_grid_with_less_output_error(gptq_pair):
    repq, rounded, results, _ = gptq_pair
    seen = [r for r in results if r.rows]
    assert len(results) == len(weight_layers(rounded)) and len(seen) >= len(results) - 2
    assert all(r.gptq <= r.nearest * (1 + 1e-9) for r in seen)
    assert sum(r.gptq for r in seen) < 0.8 * sum(r.nearest for r in seen)
    before = dict(repq.named_modules())
    changed = 0
    for name, layer in weight_layers(rounded):
        q, old = layer.weight_quantizer, before[name]
        assert torch.equal(q.scale, old.weight_quantizer.scale) and torch.equal(q.zero_point, old.weight_quantizer.zero_point)
        assert torch.equal(q(layer.weight), layer.weight)  # grid values: fake quant is the identity on them
        assert layer.bias is None or torch.equal(layer.bias, old.bias)
        changed += int(not torch.equal(layer.weight, old.weight_quantizer(old.weight)))
    assert changed >= len(seen) // 2  # most layers take other codes than nearest rounding


def test_gptq_is_deterministic_and_recorded(gptq_pair):
    repq, rounded, _, inputs = gptq_pair
    again = copy.deepcopy(repq)
    round_weights(again, inputs, GptqSettings(group=3), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(rounded.state_dict().values(), again.state_dict().values()))
    assert rounded.quant_settings.reconstruction == GptqSettings(group=3, images=3)


@pytest.mark.parametrize("form", [ONNXRUNTIME, TENSORRT])
def test_gptq_graph_has_zero_differing_codes(gptq_pair, tmp_path, form):
    _, rounded, _, inputs = gptq_pair
    assert_exports_exactly(rounded, inputs[0][0], tmp_path, form)


def test_quant_pth_records_gptq_and_reloads_bit_identical(gptq_pair, tmp_path):
    _, rounded, _, inputs = gptq_pair
    manifest = saved_and_reloaded(rounded, tmp_path, inputs)
    assert manifest["reconstruction"] == {"method": "gptq", "damp": 0.01, "group": 3, "block": 128, "images": 3}


def test_settings_and_options():
    settings = QuantSettings(4, 4, reconstruction=GptqSettings(images=8))
    assert QuantSettings.from_dict(settings.as_dict()) == settings
    assert settings_from_dict(ReconSettings().as_dict()) == ReconSettings()
    for key, bad in (("damp", -1), ("group", 0), ("block", "x"), ("images", True)):
        with pytest.raises(ValueError, match=key):
            GptqSettings.from_dict({**GptqSettings().as_dict(), key: bad})
    parse = test_tool.parser().parse_args
    assert recon_settings(parse(["c.py", "k.pth", "--recon", "gptq"])) == GptqSettings()
    assert recon_settings(parse(["c.py", "k.pth", "--recon"])) == ReconSettings()
    assert recon_settings(parse(["c.py", "k.pth"])) is None
    with pytest.raises(SystemExit):
        parse(["c.py", "k.pth", "--recon", "brecq"])


def test_repq_export_recon_gptq_writes_an_artifact_that_records_it(tmp_path):
    from cli_helpers import CLI, TINY_MASK, make_checkpoint, make_coco, run_cli

    ckpt = make_checkpoint(tmp_path / "tiny_mask.pth")
    _, img_dir = make_coco(tmp_path / "coco")
    out = tmp_path / "artifact"
    result = run_cli(CLI, "--ckpt", ckpt, "--config", TINY_MASK, "--bits", 4, "--calib", img_dir, "--calib-images",
                     2, "--recon", "gptq", "--out", out, "--quiet",
                     "--accept-accuracy-loss")  # a random model: no accuracy to check
    assert result.rc == 0, result.err[-3000:]
    assert "GPTQ took" in result.out, result.out
    manifest = json.loads((out / "repq.json").read_text())
    assert manifest["reconstruction"] == {**GptqSettings().as_dict(), "images": 2}
    assert read_quant_state(out / "quant.pth")[0]["reconstruction"] == manifest["reconstruction"]


def test_convs_with_batchnorm_folded_in_are_rounded_from_their_float_weight():
    """The Cascade heads' convs carry BN folded into codes and step; GPTQ rounds conv + BN's float weight on
    that folded grid, so those layers improve too instead of keeping their nearest codes."""
    from repq_export.quant.bn_fold import FOLDED_FLOAT_WEIGHT

    torch.set_num_threads(1)
    repq, img = tiny_quant_model("cascade", 4)
    folded = [n for n, m in weight_layers(repq) if hasattr(m, FOLDED_FLOAT_WEIGHT)]
    assert folded and FOLDED_FLOAT_WEIGHT not in "".join(repq.state_dict())  # kept in memory, not saved
    rounded = copy.deepcopy(repq)
    results = {r.name: r for r in round_weights(rounded, recon_inputs(img), GptqSettings(), progress=False)}
    layers, before = dict(weight_layers(rounded)), dict(weight_layers(repq))
    seen = [n for n in folded if results[n].rows]
    assert seen and all(results[n].gptq <= results[n].nearest * (1 + 1e-9) and results[n].nearest > 1e-9 for n in seen)
    for n in seen:
        q = layers[n].weight_quantizer
        assert torch.equal(q(layers[n].weight), layers[n].weight)
    assert any(not torch.equal(layers[n].weight, before[n].weight) for n in seen)
