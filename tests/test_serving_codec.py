"""The served detector's wire format, without a server: what is refused, and what a response carries."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from repq_export.data.postprocess import Detections
from repq_export.serving import codec
from repq_export.serving.client import error_reason, parse_url


def png(h: int = 20, w: int = 30) -> bytes:
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def tensor(data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8)[None]


def test_decode_image_matches_opencv():
    data = png()
    np.testing.assert_array_equal(codec.decode_image(tensor(data)), cv2.imdecode(np.frombuffer(data, np.uint8), 1))


@pytest.mark.parametrize("data, limit, reason", [
    (b"not an image at all", codec.MAX_IMAGE_BYTES, "cannot decode"),
    (b"", codec.MAX_IMAGE_BYTES, "empty image"),
    (png(), 100, "bytes is over"),
    (png()[:40], codec.MAX_IMAGE_BYTES, "cannot decode"),
])
def test_decode_image_refuses(data, limit, reason):
    with pytest.raises(codec.BadRequest, match=reason):
        codec.decode_image(tensor(data) if data else np.zeros((1, 0), np.uint8), max_bytes=limit)


def test_decode_image_refuses_a_header_that_claims_too_many_pixels():
    data = png()
    claimed = data[:16] + (90000).to_bytes(4, "big") + (90000).to_bytes(4, "big") + data[24:]
    assert codec.header_pixels(claimed) == 90000 * 90000
    with pytest.raises(codec.BadRequest, match="pixels is over"):
        codec.decode_image(tensor(claimed))
    jpeg = cv2.imencode(".jpg", np.zeros((21, 33, 3), np.uint8))[1].tobytes()
    assert codec.header_pixels(jpeg) == 21 * 33


def test_decode_image_refuses_two_images_in_one_request():
    with pytest.raises(codec.BadRequest, match="one image per request"):
        codec.decode_image(np.stack([tensor(png())[0]] * 2))


def test_score_threshold():
    assert codec.score_threshold({}) == 0.0
    assert codec.score_threshold({codec.SCORE_THR: np.array([[0.25]], np.float32)}) == 0.25
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(codec.BadRequest):
            codec.score_threshold({codec.SCORE_THR: np.array([[bad]], np.float32)})


def test_response_round_trip_keeps_detections_above_the_threshold():
    dets = Detections(boxes=np.arange(12, dtype=np.float32).reshape(3, 4), scores=np.array([0.9, 0.2, 0.5], np.float32),
                      labels=np.array([1, 0, 3], np.int64),
                      masks=[{"size": [7, 9], "counts": c} for c in ("a1", "b2", "c3")])
    out = codec.encode_response(dets, ["cat", "dog"], 0.5, (7, 9))
    assert all(v.shape[0] == 1 for v in out.values())  # Triton's batch dimension
    back = codec.decode_response(out)
    np.testing.assert_array_equal(back.boxes, dets.boxes[[0, 2]])
    np.testing.assert_array_equal(back.scores, dets.scores[[0, 2]])
    np.testing.assert_array_equal(back.labels, [1, 3])
    assert back.class_names == ["dog", "class 3"]
    assert back.masks == [{"size": [7, 9], "counts": "a1"}, {"size": [7, 9], "counts": "c3"}]
    assert back.image_size == (7, 9)


def test_error_reason_and_urls():
    wrapped = Exception("Model execute error: Traceback (most recent call last):\\n  File x\\n"
                        "repq_export.serving.codec.BadRequest: empty image\\n\\n")
    assert error_reason(wrapped) == "empty image"
    assert error_reason(Exception("... TypeError: memoryview: cannot cast\\n")) == "TypeError: memoryview: cannot cast"
    assert parse_url("grpc://localhost:8001") == ("grpc", "localhost:8001")
    assert parse_url("127.0.0.1:8000") == ("http", "127.0.0.1:8000")
    from repq_export.errors import UserError

    with pytest.raises(UserError):
        parse_url("ftp://x:1")


def test_serve_refuses_in_one_line_where_the_stack_cannot_work(tmp_path, capsys):
    """Without the [serve] extra, or under numpy 2, `serve` says which in one line (exit 2), loading nothing."""
    from serving_helpers import serving_skip_reason

    from repq_export import cli

    if serving_skip_reason() is None:
        pytest.skip("the serving stack works here (tests/test_serving.py covers it)")
    rc = cli.main(["serve", str(tmp_path / "no_artifact")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "[serve]" in err or "numpy<2" in err


def test_infer_without_a_server_is_one_line(tmp_path, capsys):
    """`infer` against a port nobody serves: one line naming the URL, exit 2, no picture."""
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]")
    from repq_export import cli

    image = tmp_path / "x.png"
    image.write_bytes(png())
    rc = cli.main(["infer", "grpc://127.0.0.1:1", str(image), "--save", str(tmp_path / "out.png"), "--timeout", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "error: grpc://127.0.0.1:1: no ready repq-export server there"
    assert not (tmp_path / "out.png").exists()
