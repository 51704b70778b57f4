"""Triton and the OpenVINO artifact: Triton's ModelConfig check accepts an OpenVINO-backend network config,
so the schema is not what keeps it out; triton-repo writes an OpenVINO artifact's graph under the onnxruntime
backend only (docs/serving.md: Triton's OpenVINO backend cannot set inference precision f32)."""

from __future__ import annotations

import pytest
from cli_helpers import CLI, make_checkpoint, make_coco, run_cli, TINY_MASK

from repq_export.resources import DEPLOY_CONFIGS_DIR

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs the [serve] extra (tritonclient[grpc])")


def openvino_network_config():
    """The network as Triton's OpenVINO backend would take it: backend 'openvino', the ONNX file, latency settings."""
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = mc.ModelConfig(name="repq_network_ov", backend="openvino", max_batch_size=0,
                         default_model_filename="model.onnx")
    for key, value in (("NUM_STREAMS", "1"), ("PERFORMANCE_HINT", "LATENCY")):
        cfg.parameters[key].string_value = value
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    return cfg


def test_model_config_check_accepts_an_openvino_network(tmp_path):
    """The repository check passes an OpenVINO-backend folder, and catches the same folder with a bad field."""
    from repq_export.serving.repo_check import check_repository
    from repq_export.serving.triton_repo import write_config

    repo = tmp_path / "repo"
    write_config(repo / "repq_network_ov", openvino_network_config())
    (repo / "repq_network_ov" / "1").mkdir()
    (repo / "repq_network_ov" / "1" / "model.onnx").write_bytes(b"")
    assert check_repository(repo) == []
    path = repo / "repq_network_ov" / "config.pbtxt"
    path.write_text(path.read_text() + "inference_precision: \"f32\"\n")
    assert "not a Triton ModelConfig" in "\n".join(check_repository(repo))


@pytest.fixture(scope="module")
def ov_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("ov_art")
    ckpt = make_checkpoint(root / "tiny_mask.pth")
    _, img_dir = make_coco(root / "coco")
    result = run_cli(CLI, "--ckpt", ckpt, "--config", TINY_MASK, "--bits", 4, "--calib", img_dir, "--calib-images", 1,
                     "--accept-accuracy-loss", "--deploy-config", DEPLOY_CONFIGS_DIR / "instance-seg_openvino_cpu.py",
                     "--out", root / "artifact", "--quiet")
    assert result.rc == 0, result.err[-3000:]
    return root / "artifact"


def test_triton_repo_writes_an_openvino_artifact_under_onnxruntime_only(ov_artifact, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out = tmp_path / "repo"
    result = run_cli(CLI, "triton-repo", ov_artifact, out)
    assert result.rc == 0, result.err
    backends = {p.parent.name: text_format.Parse(p.read_text(), model_config_pb2.ModelConfig()).backend
                for p in out.glob("*/config.pbtxt")}
    assert backends["repq_network"] == "onnxruntime"
    assert "openvino" not in backends.values()
    assert (out / "repq_network/1/model.onnx").read_bytes() == (ov_artifact / "model.onnx").read_bytes()
