"""The opened artifact: typed fields read once from repq.json, every named file (added ones too) checked
against its sha256, runners built from it with the settings it recorded, tier 1 probed in the backend's session."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from cli_helpers import tiny_artifact
from repq_export.artifact.artifact_file import Artifact
from repq_export.data.transforms import PreprocessSettings
from repq_export.errors import UserError
from repq_export.graph_targets import GraphForm, TargetCpu
from repq_export.artifact.folder import ARTIFACT, record_added_file
from repq_export.output_dir import check_replaceable
from repq_export.runtime.build import RunnerSettings, runner_for


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tiny_artifact(tmp_path_factory)


def copy_of(art, tmp_path):
    out = tmp_path / "artifact"
    shutil.copytree(art.path, out)
    return out


def test_open_gives_the_manifest_as_typed_fields(art):
    opened = Artifact.open(art.path)
    manifest = json.loads((art.path / "repq.json").read_text())
    assert opened.form is GraphForm.ONNXRUNTIME and manifest["form"] == "onnxruntime"
    assert opened.target_cpu is TargetCpu.ANY and opened.backend.type == "onnxruntime"
    assert opened.precision == "W4A4" and opened.onnx_path == art.path / manifest["onnx"]["file"]
    assert opened.preprocess == PreprocessSettings.from_dict(manifest["preprocess"], "repq.json")
    assert len(opened.quantizers) > 10
    assert all(f"{row['name']}.scale" in opened.quant_state for row in opened.quantizers)


def test_a_changed_or_missing_added_file_is_refused(art, tmp_path):
    out = copy_of(art, tmp_path)
    report = out / "parity_ort.json"
    report.write_text("{}\n")
    record_added_file(out, report)
    Artifact.open(out)  # recorded and unchanged: opens
    report.write_text('{"pass": true}\n')
    with pytest.raises(UserError, match="parity_ort.json: does not match the sha256"):
        Artifact.open(out)
    report.unlink()
    with pytest.raises(UserError, match="parity_ort.json named in repq.json is missing"):
        Artifact.open(out)


def test_force_reads_repq_json_through_the_one_parser(art, tmp_path):
    """--force deletes exactly the recorded, unchanged files; a repq.json the parser refuses (not JSON, not an
    object) leaves the folder alone, as does one that records no file."""
    out = copy_of(art, tmp_path)
    owned = check_replaceable(out, True, kind=ARTIFACT)
    assert sorted(owned) == sorted(p.name for p in out.iterdir())
    good = (out / "repq.json").read_text()
    for text in (good[:-20], "[1, 2]", json.dumps({"format": "repq-export-artifact"})):
        (out / "repq.json").write_text(text)
        with pytest.raises(UserError, match="left alone"):
            check_replaceable(out, True, kind=ARTIFACT)


def test_recording_an_added_file_needs_a_valid_manifest(art, tmp_path):
    out = copy_of(art, tmp_path)
    report = out / "parity_ort.json"
    report.write_text("{}\n")
    manifest = json.loads((out / "repq.json").read_text())
    manifest["post_processing"]["keep_top_k"] = -3
    (out / "repq.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="keep_top_k"):
        record_added_file(out, report)
    assert "parity_ort.json" not in (out / "repq.json").read_text()


def test_an_added_file_outside_the_folder_is_refused(art, tmp_path):
    out = copy_of(art, tmp_path)
    manifest = json.loads((out / "repq.json").read_text())
    manifest["added_files"] = {"../notes.txt": "0" * 64}
    (out / "repq.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="added_files key"):
        Artifact.open(out)


def test_a_folder_without_manifest_runs_its_model_onnx(art, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(art.path / "model.onnx", bare / "model.onnx")
    img, img_hw = torch.randn(1, 3, 160, 224), torch.tensor([150.0, 210.0])
    got = runner_for("ort", bare)(img, img_hw)
    want = runner_for("ort", Artifact.open(art.path))(img, img_hw)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="need a model"):
        runner_for("quant", Artifact.open(art.path))


def test_tier1_probe_runs_in_the_session_the_backend_runs(art):
    import onnxruntime as ort

    runner = runner_for("ort", Artifact.open(art.path), RunnerSettings(ort_opt_level="basic"))
    probe = runner.with_graph(onnx.load(art.path / "model.onnx").SerializeToString())
    options = probe.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert probe.session.get_providers() == runner.session.get_providers() and probe.codes_exact
    feeds = {"img": np.zeros((1, 3, 160, 224), np.float32), "img_hw": np.array([150.0, 210.0], np.float32)}
    assert set(probe.run_all(feeds)) == {"boxes", "scores", "labels", "masks"}
