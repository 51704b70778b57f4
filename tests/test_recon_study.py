"""tools/recon_study.py --ablate: the quantizers it switches off are exactly those named, and the output moves."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from cli_helpers import REPO, TINY_MASK
from repq_export.config_source import load_config
from repq_export.models.build import build_detector
from repq_export.quant.assign import quantize_modules
from repq_export.quant.calibrate import quantize
from repq_export.quant.layers import named_quantizers

sys.path.insert(0, str(REPO / "tools"))
import recon_study  # noqa: E402

IMG = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(0))
IMG_HW = torch.tensor([90.0, 150.0])


def tiny_quantized() -> torch.nn.Module:
    torch.manual_seed(0)
    detector = build_detector(load_config(TINY_MASK)).eval()
    quantize_modules(detector, 4, 4)
    return detector


@pytest.mark.parametrize("spec, expect", [
    ("neck", lambda n: n.startswith("neck")),
    ("neck:w", lambda n: n.startswith("neck") and n.endswith("weight_quantizer")),
    ("roi_head.mask_head:a", lambda n: n.startswith("roi_head.mask_head") and not n.endswith("weight_quantizer")),
])
def test_ablate_switches_off_exactly_the_named_quantizers(spec, expect):
    model = tiny_quantized()
    ablated, count = recon_study.without_quantizers(model, spec)
    off = [n for n, q in named_quantizers(ablated) if not q.enabled]
    assert off == [n for n, _ in named_quantizers(model) if expect(n)] and count == len(off) > 0
    assert all(q.enabled for _, q in named_quantizers(model))  # the original is left as it was


@pytest.mark.parametrize("spec", ["nothing_here", "neck:x"])
def test_ablate_refuses_a_spec_that_names_nothing(spec, capsys):
    with pytest.raises(SystemExit) as exc:
        recon_study.without_quantizers(tiny_quantized(), spec)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and f"--ablate {spec}" in err


def test_ablating_every_quantizer_gives_the_float_output():
    """Prefix '' names every quantizer: without reparameterization, bias snapping or BN folding the
    quantized model with all of them off computes the float model; with them on it does not."""
    torch.manual_seed(0)
    float_model = build_detector(load_config(TINY_MASK)).eval()
    quant = quantize(copy.deepcopy(float_model), [(IMG, IMG_HW)], 4, 4, progress=False, reparam=False,
                     integer_bias=False, fold_bn=False)
    ablated, count = recon_study.without_quantizers(quant, "")
    assert count == len(list(named_quantizers(quant)))
    with torch.no_grad():
        want, got, quantized = float_model(IMG, IMG_HW), ablated(IMG, IMG_HW), quant(IMG, IMG_HW)
    assert want[0].shape[0] > 0 and torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert not (quantized[1].shape == want[1].shape and torch.equal(quantized[1], want[1]))


def test_a_gptq_variant_takes_gptq_settings_and_refuses_other_fields(capsys):
    from repq_export.quant.recon_settings import GptqSettings, ReconSettings

    assert recon_study.parse_variant("gptq") == ("gptq", GptqSettings(), ())
    assert recon_study.parse_variant("gptq2:damp=0.05,group=4") == ("gptq2", GptqSettings(damp=0.05, group=4), ())
    assert recon_study.parse_variant("lsq:step_lr=0.01")[1] == ReconSettings(step_lr=0.01)
    with pytest.raises(SystemExit) as exc:
        recon_study.parse_variant("gptq:iters=3")
    assert exc.value.code == 2 and "no field 'iters'" in capsys.readouterr().err
