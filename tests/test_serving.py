"""`repq-export serve` on loopback: a real Triton server (PyTriton) answers several client threads with
exactly the in-process detections, refuses bad requests while good ones keep succeeding, and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from cli_helpers import CLI, REPO, tiny_artifact
from serving_helpers import assert_same, free_ports, in_process, needs_serving

pytestmark = needs_serving


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tiny_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def server(art):
    """A server over the tiny artifact with two instances and a 1 MiB image limit, in this process."""
    from repq_export.artifact.artifact_file import Artifact
    from repq_export.serving.server import ServeOptions, start_server

    http, grpc, metrics = free_ports(3)
    options = ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, instances=2,
                           max_image_bytes=1 << 20)
    triton = start_server(Artifact.open(art.path), options, log=lambda _: None)
    yield {"http": f"http://127.0.0.1:{http}", "grpc": f"grpc://127.0.0.1:{grpc}"}
    triton.stop()


@pytest.fixture(scope="module")
def expected(art):
    images = sorted(art.img_dir.glob("*.png"))
    classes = json.loads((art.path / "repq.json").read_text())["classes"]
    return images, in_process(art.path, images), classes


def detect(url: str, data: bytes, score_thr=None):
    from repq_export.serving.client import DetectionClient

    with DetectionClient(url) as client:
        return client.detect(data, score_thr)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_equals_in_process(server, expected, protocol):
    """Four client threads, every image three times: each response equals the in-process detections."""
    images, dets, classes = expected
    jobs = [p for p in images for _ in range(3)]
    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(lambda p: detect(server[protocol], p.read_bytes()), jobs))
    for path, response in zip(jobs, served):
        assert_same(response, dets[path], classes)


def test_score_threshold(server, expected):
    """The server leaves out detections below the request's threshold (here the median score)."""
    images, dets, classes = expected
    thr = float(sorted(dets[images[0]].scores)[len(dets[images[0]]) // 2])
    served = detect(server["http"], images[0].read_bytes(), thr)
    assert_same(served, dets[images[0]], classes, thr)
    assert 0 < len(served) < len(dets[images[0]])


def bad_requests(images) -> dict[str, tuple[bytes, float | None, str]]:
    png = images[0].read_bytes()
    huge_header = png[:16] + (100000).to_bytes(4, "big") + (100000).to_bytes(4, "big") + png[24:]
    return {
        "not an image": (b"this is not an image" * 10, None, "cannot decode image"),
        "too many bytes": (png + bytes(2 << 20), None, "over the server's limit"),
        "too many pixels": (huge_header, None, "pixels is over the server's limit"),
        "truncated": (png[: len(png) // 3], None, "cannot decode image"),
        "threshold": (png, 1.5, "score_thr"),
    }


def test_bad_requests_fail_and_good_ones_keep_succeeding(server, expected):
    """Bad and good requests interleaved from four threads: every bad one gets its reason, every good one
    its exact detections, and the server is still ready afterwards."""
    from repq_export.serving.client import DetectionClient, ServerError

    images, dets, classes = expected
    bad = bad_requests(images)
    jobs = [("good", p) for p in images] + [("bad", k) for k in bad] + [("good", p) for p in images]

    def run(job):
        kind, what = job
        try:
            if kind == "good":
                return detect(server["http"], what.read_bytes())
            return detect(server["http"], bad[what][0], bad[what][1])
        except ServerError as exc:
            return exc

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, jobs))
    for (kind, what), result in zip(jobs, results):
        if kind == "good":
            assert_same(result, dets[what], classes)
        else:
            assert isinstance(result, ServerError), what
            assert bad[what][2] in str(result), (what, str(result))
            assert "Traceback" not in str(result)
    with DetectionClient(server["http"]) as client:
        assert client.ready()
        assert_same(client.detect(images[0].read_bytes()), dets[images[0]], classes)


def test_empty_request(server, expected):
    """An empty image tensor sent past the client's own check gets an error; the server keeps serving."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from repq_export.serving.client import DetectionClient, error_reason

    with DetectionClient(server["http"]) as client:
        with pytest.raises(ValueError, match="empty image"):
            client.detect(b"")
        empty = http.InferInput("image", [1, 0], "UINT8")
        empty.set_data_from_numpy(np.zeros((1, 0), np.uint8))
        with pytest.raises(InferenceServerException) as caught:
            client.client.infer("repq_detector", [empty])
        assert "Traceback" not in error_reason(caught.value)
        images, dets, classes = expected
        assert_same(client.detect(images[1].read_bytes()), dets[images[1]], classes)


def test_serve_command_stops_on_sigterm(art, expected, tmp_path):
    """`repq-export serve` as a user starts it; `infer` draws a picture; SIGTERM ends it with exit 0 and
    frees the port."""
    from repq_export.serving.client import DetectionClient

    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, *CLI, "serve", art.path, "--http-port", str(http), "--grpc-port",
                             str(grpc), "--metrics-port", str(metrics)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{http}"
        client = DetectionClient(url)
        deadline = time.monotonic() + 120
        while not client.ready():
            assert proc.poll() is None and time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.5)
        client.close()
        out = tmp_path / "served.png"
        infer = subprocess.run([sys.executable, *CLI, "infer", url, expected[0][0], "--save", out, "--score-thr",
                                "0.5"], env=env, capture_output=True, text=True, timeout=120)
        assert infer.returncode == 0, infer.stderr
        assert out.is_file() and "detections with score >= 0.5" in infer.stdout
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        log = proc.stdout.read()
        assert rc == 0, log[-2000:]
        assert time.monotonic() - start < 30
        assert "SIGTERM received" in log and "stopped" in log
        assert not DetectionClient(url).ready()
    finally:
        if proc.poll() is None:
            proc.kill()
