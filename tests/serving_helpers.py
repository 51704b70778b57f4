"""Shared by the serving tests: whether the serving stack can run here, free loopback ports, the
in-process detections a served response must equal."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest


def serving_skip_reason() -> str | None:
    """Why the serving tests cannot run here (None where they can)."""
    try:
        import pytriton  # noqa: F401
        import tritonclient  # noqa: F401
    except ImportError as exc:
        return f"needs the [serve] extra ({exc.name} not installed)"
    if int(np.__version__.split(".")[0]) >= 2:
        return f"PyTriton's Python backend needs numpy<2 (found {np.__version__}); install '.[serve]' in its own venv"
    return None


needs_serving = pytest.mark.skipif(serving_skip_reason() is not None, reason=str(serving_skip_reason()))


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that nothing listens on right now."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def in_process(artifact: Path, images: list[Path]) -> dict[Path, object]:
    """Each image's detections from the artifact's onnxruntime runner in this process (what predict does)."""
    from repq_export.artifact.artifact_file import Artifact
    from repq_export.evaluation.image_loop import run_image
    from repq_export.runtime.build import runner_for

    opened = Artifact.open(artifact)
    runner = runner_for("ort", opened)
    return {p: run_image(runner, p, opened.preprocess)[2] for p in images}


def assert_same(served, dets, classes, score_thr: float = 0.0) -> None:
    """A served response equals in-process detections bit for bit (boxes, scores, labels, masks, names)."""
    keep = np.flatnonzero(dets.scores >= score_thr)
    assert len(served) == len(keep) > 0
    np.testing.assert_array_equal(served.boxes, dets.boxes[keep])
    np.testing.assert_array_equal(served.scores, dets.scores[keep])
    np.testing.assert_array_equal(served.labels, dets.labels[keep])
    assert [m["counts"] for m in served.masks] == [dets.masks[i]["counts"] for i in keep]
    assert all(m["size"] == dets.masks[0]["size"] for m in served.masks)
    assert served.class_names == [classes[int(dets.labels[i])] for i in keep]
