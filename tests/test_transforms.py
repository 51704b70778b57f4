"""preprocess must equal mmdet 2.11's test pipeline (Resize keep_ratio, Normalize, Pad 32)."""
import cv2
import numpy as np
import pytest
import torch

from repq_export.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    preprocess,
    rescale_size,
)


@pytest.mark.parametrize(
    "wh, expected",
    [
        ((640, 427), (1199, 800)),  # COCO 000000397133: the reference's calibration image
        ((150, 100), (1200, 800)),  # short side limited: factor 8
        ((640, 480), (1067, 800)),  # 640 * 5/3 = 1066.67 -> rounded half up
        ((480, 640), (800, 1067)),  # portrait
        ((3000, 1000), (1333, 444)),  # long side limited: 1000 * 1333/3000 = 444.33
    ],
)
def test_rescale_size(wh, expected):
    assert rescale_size(*wh, (1333, 800)) == expected


def mmcv_style(img, scale=(1333, 800)):
    """The reference's steps written with the cv2 calls mmcv 1.x makes."""
    new_w, new_h = rescale_size(img.shape[1], img.shape[0], scale)
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    x = resized.copy().astype(np.float32)
    mean = np.float64(np.array(IMAGENET_MEAN, np.float32).reshape(1, -1))
    stdinv = 1 / np.float64(np.array(IMAGENET_STD, np.float32).reshape(1, -1))
    cv2.cvtColor(x, cv2.COLOR_BGR2RGB, x)
    cv2.subtract(x, mean, x)
    cv2.multiply(x, stdinv, x)
    pad_h, pad_w = -(-new_h // 32) * 32, -(-new_w // 32) * 32
    return cv2.copyMakeBorder(x, 0, pad_h - new_h, 0, pad_w - new_w, cv2.BORDER_CONSTANT, value=0)


def test_matches_mmcv_bit_for_bit():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (427, 640, 3), dtype=np.uint8)  # covers every value per channel
    prep = preprocess(img)
    assert prep.tensor.shape == (1, 3, 800, 1216) and prep.tensor.dtype == torch.float32
    assert prep.img_hw == (800, 1199) and prep.ori_hw == (427, 640) and prep.pad_hw == (800, 1216)
    expected = torch.from_numpy(mmcv_style(img).transpose(2, 0, 1))[None]
    assert torch.equal(prep.tensor, expected)


def test_scale_factor_is_measured_on_the_output_size():
    prep = preprocess(np.zeros((427, 640, 3), np.uint8))
    expected = np.array([1199 / 640, 800 / 427, 1199 / 640, 800 / 427], np.float32)
    assert prep.scale_factor.dtype == np.float32
    np.testing.assert_array_equal(prep.scale_factor, expected)
    assert prep.img_hw_tensor.dtype == torch.float32
    assert prep.img_hw_tensor.tolist() == [800.0, 1199.0]


def test_normalization_values_and_channel_order():
    img = np.zeros((100, 150, 3), np.uint8)
    img[:] = (10, 20, 30)  # B, G, R
    prep = preprocess(img)  # factor 8 -> 800 x 1200, padded to 800 x 1216
    assert prep.img_hw == (800, 1200) and prep.tensor.shape[-2:] == (800, 1216)
    rgb_expected = [(30 - 123.675) / 58.395, (20 - 116.28) / 57.12, (10 - 103.53) / 57.375]
    for c in range(3):
        values = prep.tensor[0, c, :800, :1200].unique().tolist()
        assert values == pytest.approx([rgb_expected[c]], abs=1e-6)
    assert torch.count_nonzero(prep.tensor[..., 1200:]) == 0  # padding is exactly zero
    bgr = preprocess(img, to_rgb=False)
    assert bgr.tensor[0, 0, 0, 0].item() == pytest.approx((10 - 123.675) / 58.395, abs=1e-6)


def test_no_padding_when_already_a_multiple():
    prep = preprocess(np.zeros((64, 96, 3), np.uint8), scale=(96, 64))
    assert prep.img_hw == (64, 96) and prep.pad_hw == (64, 96)
    np.testing.assert_array_equal(prep.scale_factor, np.ones(4, np.float32))


def test_rejects_non_bgr_images():
    with pytest.raises(ValueError):
        preprocess(np.zeros((10, 10), np.uint8))
