"""`repq-export triton-repo`: every written config.pbtxt parses into Triton's ModelConfig (tritonclient's
protobuf schema), the ensemble's wiring is complete, the checker catches a broken repository, and the
repository's pre/post-processing steps give the in-process detections."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import CLI, run_cli, tiny_artifact
from serving_helpers import needs_serving

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs the [serve] extra (tritonclient[grpc])")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tiny_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def repo(art, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    result = run_cli(CLI, "triton-repo", art.path, out)
    assert result.rc == 0, result.err
    return out


def test_every_config_parses_into_model_config(repo):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        configs[path.parent.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    assert set(configs) == {"repq_network", "repq_preprocess", "repq_postprocess", "repq_detector"}
    assert configs["repq_network"].backend == "onnxruntime"
    assert [i.name for i in configs["repq_network"].input] == ["img", "img_hw"]
    assert configs["repq_detector"].platform == "ensemble"
    assert [s.model_name for s in configs["repq_detector"].ensemble_scheduling.step] == [
        "repq_preprocess", "repq_network", "repq_postprocess"]
    assert (repo / "repq_network/1/model.onnx").is_file() and (repo / "repq_preprocess/1/model.py").is_file()


def test_checker_finds_a_broken_repository(repo, tmp_path):
    from repq_export.serving.repo_check import check_repository

    assert check_repository(repo) == []
    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    post = broken / "repq_postprocess/config.pbtxt"
    post.write_text(post.read_text().replace('name: "scale_factor"', 'name: "scale"'))
    (broken / "repq_network/1/model.onnx").unlink()
    problems = "\n".join(check_repository(broken))
    assert "'repq_postprocess' has no input 'scale_factor'" in problems
    assert "onnxruntime model without 1/model.onnx" in problems
    (broken / "repq_preprocess/config.pbtxt").write_text("name: \"repq_preprocess\"\nbogus_field: 1\n")
    assert "not a Triton ModelConfig" in "\n".join(check_repository(broken))


def test_refuses_to_overwrite(repo, art):
    result = run_cli(CLI, "triton-repo", art.path, repo)
    assert result.rc == 2 and "already exists" in result.err and len(result.err.strip().splitlines()) == 1


def test_steps_give_the_in_process_detections(art):
    """The Python steps around the network (what Triton runs) equal predict's path, on every test image."""
    import json

    from repq_export.artifact.artifact_file import Artifact
    from repq_export.runtime.build import runner_for
    from repq_export.evaluation.image_loop import run_image
    from repq_export.serving import codec
    from repq_export.serving.triton_stages import run_postprocess, run_preprocess

    manifest = json.loads((art.path / "repq.json").read_text())
    opened = Artifact.open(art.path)
    runner, settings = runner_for("ort", opened), opened.preprocess
    for path in sorted(art.img_dir.glob("*.png")):
        pre = run_preprocess(np.frombuffer(path.read_bytes(), np.uint8)[None], manifest["preprocess"])
        net = runner(torch.from_numpy(pre["img"]), torch.from_numpy(pre["img_hw"]))
        tensors = {**{k: v.numpy() for k, v in net._asdict().items()}, **pre}
        served = codec.decode_response(run_postprocess(tensors, manifest["classes"]))
        dets = run_image(runner, path, settings)[2]
        np.testing.assert_array_equal(served.boxes, dets.boxes)
        np.testing.assert_array_equal(served.scores, dets.scores)
        assert [m["counts"] for m in served.masks] == [m["counts"] for m in dets.masks]
    with pytest.raises(codec.BadRequest, match="cannot decode"):
        run_preprocess(np.frombuffer(b"not an image", np.uint8)[None], manifest["preprocess"])


@needs_serving
def test_python_steps_load_and_answer_in_tritonserver(art, repo, tmp_path):
    """PyTriton's tritonserver binary (it has the Python backend, not the onnxruntime one) loads the
    repository's pre/post steps from their config.pbtxt and model.py; with the network run here in
    between, the detections equal the in-process ones, and a bad image gets its own error."""
    import os
    import subprocess
    import sys
    import sysconfig
    import time

    import pytriton
    import tritonclient.http as http
    from serving_helpers import free_ports

    from repq_export.artifact.artifact_file import Artifact
    from repq_export.runtime.build import runner_for
    from repq_export.evaluation.image_loop import run_image
    from repq_export.serving import codec
    from repq_export.serving.triton_stages import RESPONSE

    dist = Path(pytriton.__file__).parent / "tritonserver"
    backends = tmp_path / "backends"
    shutil.copytree(dist / "backends", backends)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
    libs = [sysconfig.get_config_var("LIBDIR"), str(Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "LD_LIBRARY_PATH": ":".join(libs)}
    port, grpc, metrics = free_ports(3)
    proc = subprocess.Popen([dist / "bin/tritonserver", "--model-repository", repo, "--backend-directory", backends,
                             "--model-control-mode", "explicit", "--load-model", "repq_preprocess", "--load-model",
                             "repq_postprocess", "--http-port", str(port), "--grpc-port", str(grpc), "--metrics-port",
                             str(metrics), "--exit-timeout-secs", "3"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        client = http.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 180
        while True:
            try:
                if client.is_model_ready("repq_preprocess") and client.is_model_ready("repq_postprocess"):
                    break
            except Exception:  # not listening yet
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "tritonserver did not load the steps"
            time.sleep(1)

        def tensor(name, array):
            kind = {np.float32: "FP32", np.int64: "INT64", np.uint8: "UINT8"}[array.dtype.type]
            t = http.InferInput(name, list(array.shape), kind)
            t.set_data_from_numpy(array)
            return t

        opened = Artifact.open(art.path)
        runner, settings = runner_for("ort", opened), opened.preprocess
        for path in sorted(art.img_dir.glob("*.png")):
            result = client.infer("repq_preprocess", [tensor("image", np.frombuffer(path.read_bytes(), np.uint8)[None])])
            pre = {n: result.as_numpy(n) for n in ("img", "img_hw", "scale_factor", "ori_hw")}
            net = runner(torch.from_numpy(pre["img"].copy()), torch.from_numpy(pre["img_hw"].copy()))
            feeds = [tensor(k, v.numpy()) for k, v in net._asdict().items()]
            feeds += [tensor(k, pre[k]) for k in ("img_hw", "scale_factor", "ori_hw")]
            result = client.infer("repq_postprocess", feeds)
            served = codec.decode_response({n: result.as_numpy(n) for n in RESPONSE})
            dets = run_image(runner, path, settings)[2]
            np.testing.assert_array_equal(served.boxes, dets.boxes)
            np.testing.assert_array_equal(served.scores, dets.scores)
            assert [m["counts"] for m in served.masks] == [m["counts"] for m in dets.masks]
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="cannot decode image"):
            client.infer("repq_preprocess", [tensor("image", np.frombuffer(b"not an image", np.uint8)[None])])
        assert client.is_model_ready("repq_preprocess")
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
