"""`repq-export triton-repo`: a native Triton model repository for an artifact.

    repq_network/       the ONNX graph under Triton's onnxruntime backend
    repq_network_trt/   the TensorRT engine under Triton's tensorrt backend (where the artifact has one)
    repq_preprocess/    decode + resize + normalize + pad (Python backend, the project's own code)
    repq_postprocess/   rescale boxes, paste masks, RLE (Python backend)
    repq_detector/      the ensemble: image bytes in, the same response as `repq-export serve`
    repq_detector_trt/  the same over the engine (where there is one)

    repq-triton.json    what was written, with each file's sha256 (Triton reads only the folders)

Every config.pbtxt is built as Triton's own ModelConfig protobuf (shipped with tritonclient) and
checked by parsing the written text back; nothing here keeps its own copy of the schema. The
repository is written beside OUT and renamed into place whole (output_dir.staged_dir); --force
replaces only a repository this command wrote whose files are unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..artifact.artifact_file import Artifact
from ..files import file_sha256
from ..output_dir import FolderKind, check_not_an_input, check_out_dir, checked_records, staged_dir
from . import codec
from .repo_check import check_repository, parse_config, schema
from .triton_stages import NET_OUTPUTS, PRE_OUTPUTS, RESPONSE

NETWORK, NETWORK_TRT, PRE, POST = "repq_network", "repq_network_trt", "repq_preprocess", "repq_postprocess"
REPO_MANIFEST = "repq-triton.json"
REPO_FORMAT = "repq-export-triton-repository"
_MODELS = "|".join(re.escape(n) for n in (NETWORK, NETWORK_TRT, PRE, POST, codec.MODEL_NAME, f"{codec.MODEL_NAME}_trt"))
REPO_FILES = re.compile(rf"(?:{_MODELS})/(?:config\.pbtxt|1/model\.(?:onnx|plan|py))")


def repo_records(manifest: dict) -> dict[str, str]:
    """{relative path: sha256} of the files a repository's repq-triton.json records."""
    return checked_records(manifest.get("files"), REPO_FILES, "'files'")


TRITON_REPO = FolderKind("a Triton model repository", REPO_MANIFEST, REPO_FORMAT, repo_records, REPO_FILES,
                         re.compile(rf"(?:{_MODELS})(?:/1)?"))
MODEL_PY = ('"""Triton Python-backend model written by repq-export triton-repo (needs repq-export installed in '
            'Triton\'s Python environment)."""\n\nfrom repq_export.serving.triton_stages import TritonPythonModel  '
            '# noqa: F401\n')
_ONNX_TYPES = {1: "TYPE_FP32", 7: "TYPE_INT64", 6: "TYPE_INT32", 2: "TYPE_UINT8", 10: "TYPE_FP16"}


def add_tensor(field, name: str, data_type: str, dims: list[int], optional: bool = False) -> None:
    mc, _ = schema()
    entry = field.add(name=name, data_type=mc.DataType.Value(data_type), dims=dims)
    if optional:
        entry.optional = True


def onnx_io(path: Path) -> tuple[list, list]:
    """(inputs, outputs) of an ONNX graph as (name, Triton type, dims with -1 for dynamic)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def rows(values):
        return [(v.name, _ONNX_TYPES[v.type.tensor_type.elem_type],
                 [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
                for v in values]

    return rows(graph.input), rows(graph.output)


def network_config(name: str, backend: str, io: tuple[list, list], instances: int, kind: str):
    mc, _ = schema()
    cfg = mc.ModelConfig(name=name, backend=backend, max_batch_size=0)
    for field, rows in ((cfg.input, io[0]), (cfg.output, io[1])):
        for tensor_name, data_type, dims in rows:
            add_tensor(field, tensor_name, data_type, dims)
    group = mc.ModelInstanceGroup.KIND_GPU if kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(count=instances, kind=group)
    return cfg


def python_config(name: str, stage: str, artifact: Artifact, net_outputs: list, instances: int):
    mc, _ = schema()
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    cfg.parameters["stage"].string_value = stage
    cfg.parameters["preprocess"].string_value = json.dumps(artifact.preprocess.as_dict())
    cfg.parameters["classes"].string_value = json.dumps(artifact.classes)
    pre = [("img", "TYPE_FP32", [1, 3, -1, -1]), ("img_hw", "TYPE_FP32", [2]), ("scale_factor", "TYPE_FP32", [4]),
           ("ori_hw", "TYPE_INT64", [2])]
    if stage == "preprocess":
        add_tensor(cfg.input, codec.IMAGE, "TYPE_UINT8", [1, -1])
        for row in pre:
            add_tensor(cfg.output, *row)
    else:
        for row in [*net_outputs, *pre[1:]]:
            add_tensor(cfg.input, *row)
        add_tensor(cfg.input, codec.SCORE_THR, "TYPE_FP32", [1, 1], optional=True)
        for row in response_tensors():
            add_tensor(cfg.output, *row)
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    return cfg


def response_tensors() -> list[tuple[str, str, list[int]]]:
    """The response as `repq-export serve` sends it (one image per request, a leading dimension of 1)."""
    return [(codec.BOXES, "TYPE_FP32", [1, -1, 4]), (codec.SCORES, "TYPE_FP32", [1, -1]),
            (codec.LABELS, "TYPE_INT64", [1, -1]), (codec.CLASS_NAMES, "TYPE_STRING", [1, -1]),
            (codec.MASKS, "TYPE_STRING", [1, -1]), (codec.IMAGE_SIZE, "TYPE_INT64", [1, 2])]


def ensemble_config(name: str, network: str, net_io: tuple[list, list]):
    mc, _ = schema()
    cfg = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=0)
    add_tensor(cfg.input, codec.IMAGE, "TYPE_UINT8", [1, -1])
    add_tensor(cfg.input, codec.SCORE_THR, "TYPE_FP32", [1, 1], optional=True)
    for row in response_tensors():
        add_tensor(cfg.output, *row)
    steps = cfg.ensemble_scheduling.step
    steps.add(model_name=PRE, model_version=-1, input_map={codec.IMAGE: codec.IMAGE},
              output_map={n: n for n in PRE_OUTPUTS})
    (img_in, hw_in), outs = [r[0] for r in net_io[0]], [r[0] for r in net_io[1]]
    steps.add(model_name=network, model_version=-1, input_map={img_in: "img", hw_in: "img_hw"},
              output_map={o: f"net_{o}" for o in outs})
    post_in = {n: f"net_{n}" for n in NET_OUTPUTS} | {n: n for n in PRE_OUTPUTS[1:]}
    post_in[codec.SCORE_THR] = codec.SCORE_THR
    steps.add(model_name=POST, model_version=-1, input_map=post_in, output_map={n: n for n in RESPONSE})
    return cfg


def write_config(folder: Path, cfg) -> None:
    """config.pbtxt in Triton's text format, then parsed back into ModelConfig: the written text must
    mean exactly the message built."""
    mc, text_format = schema()
    text = text_format.MessageToString(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text)
    if parse_config(folder / "config.pbtxt") != cfg:
        raise RuntimeError(f"{folder}/config.pbtxt does not parse back into the config written")


def copy_file(src: Path, dst: Path) -> None:
    """Copy a model file into the repository being written (a full disk raises OSError, caught by staged_dir)."""
    shutil.copyfile(src, dst)


def write_model_repository(artifact: Artifact, out: Path, force: bool = False, instances: int = 1,
                           kind: str = "cpu") -> list[str]:
    """Write the repository for the opened `artifact` into `out`, staged beside it and renamed into place
    once complete; returns the model names written."""
    schema()
    check_not_an_input({"OUT": out}, {"ARTIFACT": artifact.path}, replaced=frozenset({"OUT"}))
    check_out_dir(out, force, option="OUT", kind=TRITON_REPO)
    with staged_dir(out, force, "OUT", kind=TRITON_REPO) as tmp:
        written = fill_repository(tmp, artifact, instances, kind)
        files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        record = {"format": REPO_FORMAT, "artifact": str(artifact.path.resolve()), "models": written,
                  "files": files}
        (tmp / REPO_MANIFEST).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return written


def fill_repository(out: Path, artifact: Artifact, instances: int, kind: str) -> list[str]:
    """Write every model folder of the repository into the (new, empty) folder `out`; the model names."""
    onnx_path = artifact.onnx_path
    io = onnx_io(onnx_path)
    write_config(out / NETWORK, network_config(NETWORK, "onnxruntime", io, instances, kind))
    (out / NETWORK / "1").mkdir()
    copy_file(onnx_path, out / NETWORK / "1" / "model.onnx")
    written = [NETWORK]
    engine = artifact.engine_path
    if engine is not None:
        write_config(out / NETWORK_TRT, network_config(NETWORK_TRT, "tensorrt", io, instances, "gpu"))
        (out / NETWORK_TRT / "1").mkdir()
        copy_file(engine, out / NETWORK_TRT / "1" / "model.plan")
        written.append(NETWORK_TRT)
    for name, stage in ((PRE, "preprocess"), (POST, "postprocess")):
        write_config(out / name, python_config(name, stage, artifact, io[1], instances))
        (out / name / "1").mkdir()
        (out / name / "1" / "model.py").write_text(MODEL_PY)
        written.append(name)
    ensembles = [(codec.MODEL_NAME, NETWORK)] + ([(f"{codec.MODEL_NAME}_trt", NETWORK_TRT)] if engine is not None else [])
    for name, network in ensembles:
        write_config(out / name, ensemble_config(name, network, io))
        (out / name / "1").mkdir()
        written.append(name)
    problems = check_repository(out)
    if problems:
        raise RuntimeError("the written repository is inconsistent:\n" + "\n".join(problems))
    return written
