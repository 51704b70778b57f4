"""Reconstruction's per-unit judging on held-out images, its output bias correction, its pooled map loss and
the mask head's probability target: each one changes what it claims to, and a bad learned state is refused."""

from __future__ import annotations

import copy

import pytest
import torch

from repq_export.quant.layers import set_quant_enabled
from repq_export.quant.recon_settings import LSQ_METHOD, METHOD, ReconSettings
from repq_export.quant.recon_units import recon_units
from repq_export.quant.reconstruct import _loss, _split, correct_biases, reconstruct_unit, unit_data

from test_export import IMG_HW, tiny_quant_model


@pytest.fixture(scope="module")
def block_data():
    """(quantized tiny Mask R-CNN, its first Swin block unit, the block's quantized inputs, float targets)."""
    torch.set_num_threads(1)
    model, img = tiny_quant_model("mask", 4)
    reference = copy.deepcopy(model)
    set_quant_enabled(reference, False)
    g = torch.Generator().manual_seed(5)
    inputs = [(img, IMG_HW)] + [(torch.randn(img.shape, generator=g), IMG_HW) for _ in range(3)]
    unit = recon_units(model)[0]
    args_list, targets = unit_data(unit, model, reference, inputs)
    return model, unit, args_list, targets


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_split_judges_every_kth_image_and_falls_back_without_one():
    args, targets = list(range(8)), [f"t{i}" for i in range(8)]
    learn, learn_t, judge, judge_t = _split(args, targets, 0.25)
    assert judge == [3, 7] and learn == [0, 1, 2, 4, 5, 6] and judge_t == ["t3", "t7"]
    assert learn_t == [f"t{i}" for i in learn]
    assert _split(args[:3], targets[:3], 0.25)[2] == [0, 1, 2]  # no 4th image: all learn and judge
    assert _split(args, targets, 0.0)[0] == args


def test_bias_correction_zeroes_the_mean_output_error_per_channel(block_data):
    _, unit, args_list, targets = block_data
    saved = _state(unit.module)

    def mean_error() -> torch.Tensor:
        with torch.no_grad():
            diffs = [(t - unit.run(unit.module, *a)).reshape(-1, t.shape[-1]) for a, t in zip(args_list, targets)]
        return torch.cat(diffs).mean(0)

    try:
        start = mean_error()
        assert float(start.abs().max()) > 1e-3  # W4A4 leaves a per-channel mean error to correct
        assert correct_biases(unit, args_list, targets) == 1  # the block's fc2
        assert float(mean_error().abs().max()) < 1e-2 * float(start.abs().max())
    finally:
        unit.module.load_state_dict(saved)


def test_a_learned_state_worse_on_the_judging_images_is_refused(block_data):
    _, unit, args_list, targets = block_data
    saved = _state(unit.module)
    settings = ReconSettings(iters=30, seed=1, holdout=0.5)  # images 1 and 3 judge, 0 and 2 learn
    try:
        wrong = [-t if i % 2 == 0 else t for i, t in enumerate(targets)]  # learn a target far from float
        before, after, kept = reconstruct_unit(unit, args_list, wrong, settings, torch.Generator().manual_seed(0))
        assert kept and after == before
        assert all(torch.equal(v, saved[k]) for k, v in unit.module.state_dict().items())
        before, after, kept = reconstruct_unit(unit, args_list, targets, settings, torch.Generator().manual_seed(0))
        assert not kept and after < before  # the true target generalizes to the judging images
    finally:
        unit.module.load_state_dict(saved)


def test_pooled_loss_weighs_positions_not_maps():
    big, small = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)
    out = (big + 1, small)  # error only in the big map: 16 positions, 2 channels of 1 each
    target = (big, small)
    assert float(_loss(out, target)) == pytest.approx(2.0 / 2)  # mean of the maps' errors: (2 + 0) / 2
    assert float(_loss(out, target, pooled=True)) == pytest.approx(2.0 * 16 / 20)  # over 20 positions


def test_mask_head_target_is_probabilities_when_asked():
    model, _ = tiny_quant_model("mask", 4)
    logits_unit = recon_units(model)[-1]
    probs_unit = recon_units(model, mask_probs=True)[-1]
    assert probs_unit.name == logits_unit.name == "roi_head.mask_head"
    x = torch.randn(3, model.roi_head.mask_head.convs[0].conv.in_channels, 14, 14)
    with torch.no_grad():
        assert torch.allclose(probs_unit.run(probs_unit.module, x), logits_unit.run(logits_unit.module, x).sigmoid())
    assert logits_unit.out_layers == ("conv_logits",) and probs_unit.out_layers == ()


def test_the_new_method_records_its_fields_and_an_older_manifest_reads_as_it_ran():
    settings = ReconSettings(holdout=0.5, images_per_step=2, bias_correction=True)
    raw = settings.as_dict()
    assert raw["method"] == METHOD and raw["holdout"] == 0.5 and raw["images_per_step"] == 2
    assert ReconSettings.from_dict(raw) == settings
    old = {"method": LSQ_METHOD, "iters": 100, "seed": 0, "drop_prob": 0.5, "lr": 0.01, "round_weight": 0.01,
           "warmup": 0.2, "beta_start": 20.0, "beta_end": 2.0, "images": 8, "step_lr": 0.004, "heads": True}
    read = ReconSettings.from_dict(old)
    assert read.holdout == 0 and read.images_per_step == 1 and not read.bias_correction and not read.mask_probs
    assert read.as_dict() == old
    with pytest.raises(ValueError, match="holdout"):
        ReconSettings.from_dict({**raw, "holdout": "half"})
