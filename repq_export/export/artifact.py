"""The artifact directory: checkpoint in, model.onnx + quant.pth + repq.json (+ model.engine) out.

    load -> calibrate (fake quant, reparameterize) -> export ONNX -> check -> manifest -> engine
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
import torch

import repq_export

from ..data.calibration_choice import CalibrationSource, choose_calibration
from ..data.coco import CocoDataset
from ..data.images import blame_calibration_images, preprocess_file
from ..data.transforms import Preprocessed, PreprocessSettings
from ..deploy_config import TARGET_ANY, DeployConfig, load_deploy_config
from ..artifact.detector import apply_post_processing
from ..artifact.folder import ARTIFACT
from ..artifact.manifest_check import MANIFEST
from ..errors import UserError
from ..graph_targets import GraphForm
from ..evaluation.calibration_check import (CalibrationCheck, check_calibration, dataset_ids, format_check,
                                            image_pairs, model_outputs)
from ..files import file_sha256
from ..models.checkpoint import LoadedCheckpoint, load_checkpoint
from ..quant.calibrate import quantize
from ..quant.recon_settings import GptqSettings, ReconSettings
from ..quant.reconstruct import reconstruct
from ..quant.kinds import LOG_SQRT2, PER_CHANNEL, PER_TENSOR, kind_of
from ..quant.layers import named_quantizers
from ..quant.state import save_quant_state
from ..resources import DEFAULT_DEPLOY_CONFIG, MAX_PIXELS
from ..runtime.cpu_features import saturation_free
from ..output_dir import check_not_an_input, check_out_dir, staged_dir
from .deploy_settings import backend_entry, post_processing_entry
from .forms import (ONNXRUNTIME, OPENVINO, check_export_bits, form_for, log_sqrt2_lowering_for, roi_nan_guard_for, target_cpu_for,
                    unshared_weights_for)
from .onnx_export import count_qdq, export_onnx
from .ort_check import check_onnxruntime_form, format_ort_report
from .trt_check import check_tensorrt_compat, format_report

@dataclass
class ExportRequest:
    """Everything `repq-export` needs to write one artifact directory."""

    ckpt: Path
    out: Path
    w_bits: int
    a_bits: int
    config: Path | None = None
    calib_dir: Path | None = None
    calib_ann: Path | None = None
    calib_img_dir: Path | None = None
    calib_images: int = 1
    calib_paths: list[Path] = field(default_factory=list)  # used as given when set (the demo)
    holdout: int = 0  # images of the same set, disjoint from the calibration ones, for the calibration check
    holdout_paths: list[Path] = field(default_factory=list)  # used as given when set (the demo)
    accept_accuracy_loss: bool = False  # write the artifact even when the calibration check fails
    deploy_config: Path | None = None
    device: str = "cpu"
    force: bool = False
    make_parent: bool = False  # create a missing parent folder of `out` (the default --out)
    max_pixels: int = MAX_PIXELS  # pixel budget of each calibration image (--max-pixels)
    recon: ReconSettings | GptqSettings | None = None  # weight rounding after calibration (--recon)
    engine: bool = False  # a TensorRT engine follows (--engine): TensorRT must be here before any work
    bits_options: tuple[str, str] = ("--w-bits", "--a-bits")  # the options a bits error names

    def calibration_source(self) -> CalibrationSource:
        """Where this request's calibration images come from (data/calibration_choice.py)."""
        return CalibrationSource(self.calib_dir, self.calib_ann, self.calib_img_dir, tuple(self.calib_paths),
                                 tuple(self.holdout_paths))


@dataclass(frozen=True)
class CheckedExport:
    """An export request whose cheap checks passed, with the deploy config they read: what the writer starts from."""

    req: ExportRequest
    deploy: DeployConfig
    form: GraphForm


def check_export(req: ExportRequest) -> CheckedExport:
    """The checks that cost no model work, each run once: the deploy config read, the bits its form carries,
    TensorRT for --engine, and the output folder (replaceable, writable, none of the inputs)."""
    deploy = load_deploy_config(req.deploy_config or DEFAULT_DEPLOY_CONFIG)
    form = form_for(deploy)
    check_export_bits(req.w_bits, req.a_bits, form, *req.bits_options)
    if req.engine:
        from .tensorrt_builder import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            raise UserError(f"--engine: {why}; nothing was written (leave out --engine for the ONNX artifact)")
    check_export_out(req)
    return CheckedExport(req, deploy, form)


def request_inputs(req: ExportRequest) -> dict[str, Path | None]:
    """Every file and folder an export reads, by option: none of them may be its output."""
    return {"--ckpt": req.ckpt, "--config": req.config, "--calib": req.calib_dir, "--calib-ann": req.calib_ann,
            "--calib-img-dir": req.calib_img_dir, "--deploy-config": req.deploy_config,
            **{f"calibration image {p.name}": p for p in req.calib_paths}}


def check_export_out(req: ExportRequest) -> None:
    """The output folder's checks (replaceable, writable, none of the inputs), before any work."""
    check_not_an_input({"--out": req.out}, request_inputs(req), replaced=frozenset({"--out"}))
    check_out_dir(req.out, req.force, req.make_parent, kind=ARTIFACT)


def quantizer_table(qmodel: torch.nn.Module) -> list[dict]:
    """One row per quantizer: name, kind, bits, granularity, scale and zero point (lists if per-channel)."""
    rows = []
    for name, q in named_quantizers(qmodel):
        log = kind_of(q) == LOG_SQRT2
        scale = q.scale.flatten().tolist()
        rows.append({
            "name": name,
            "kind": kind_of(q),
            "bits": q.bits,
            "granularity": PER_TENSOR if log or not q.per_channel else PER_CHANNEL,
            "scale": scale[0] if q.scale.dim() == 0 else scale,
            "zero_point": None if log else (q.zero_point.item() if q.zero_point.dim() == 0
                                            else q.zero_point.flatten().tolist()),
        })
    return rows


def check_form_rules(proto: onnx.ModelProto, form: str) -> None:
    """The exported graph against its backend's rules; a broken rule is a bug of ours. The OpenVINO
    form has none to check: OpenVINO reads any Q/DQ graph and its verdict is the float64 rule."""
    if form == OPENVINO:
        return
    if form == ONNXRUNTIME:
        issues = check_onnxruntime_form(proto)
        if issues:
            raise RuntimeError("exported graph breaks the onnxruntime-form rules:\n" + format_ort_report(issues))
        return
    issues = [i for i in check_tensorrt_compat(proto) if i.severity == "error"]
    if issues:
        raise RuntimeError("exported graph breaks TensorRT rules:\n" + format_report(issues))


def build_manifest(info: LoadedCheckpoint, qmodel: torch.nn.Module, calib: list[Path], prep: Preprocessed,
                   proto: onnx.ModelProto, deploy: DeployConfig, out: Path, pre: PreprocessSettings) -> dict:
    """repq.json: provenance, preprocessing, classes, graph facts, the quantizer table, versions."""
    import onnxruntime
    import torchvision

    settings = qmodel.quant_settings
    onnx_file = deploy.onnx.save_file
    return {
        "format": "repq-export-artifact",
        "version": 1,
        **settings.as_dict(),  # the quantization recipe's settings, as quant.pth's manifest has them
        "form": form_for(deploy),  # 'tensorrt' | 'onnxruntime' (export/forms.py)
        "source_checkpoint": {"name": info.path.name, "sha256": info.sha256, "layout": info.layout},
        "config": str(info.config_path) if info.config_path else None,
        "model_config": info.cfg,
        "architecture": {"kind": info.arch.kind, "embed_dim": info.arch.embed_dim, "depths": list(info.arch.depths),
                         "num_classes": info.arch.num_classes},
        "classes": list(info.classes) if info.classes else None,
        "calibration_images": [{"name": p.name, "sha256": file_sha256(p)} for p in calib],
        "preprocess": pre.as_dict(),
        "post_processing": post_processing_entry(deploy.codebase.post_processing),
        "backend": backend_entry(deploy),
        "onnx": {"file": onnx_file, "sha256": file_sha256(out / onnx_file), "opset": deploy.onnx.opset_version,
                 "inputs": ["img [1,3,H,W] float32", "img_hw [2] float32 (h, w) before padding"],
                 "outputs": ["boxes [N,4]", "scores [N]", "labels [N] int64", "masks [N,28,28]"],
                 "export_shape": list(prep.tensor.shape), "qdq": count_qdq(proto)},
        "deploy_config": str(deploy.path),
        "quant_state": {"file": "quant.pth", "sha256": file_sha256(out / "quant.pth")},
        "quantizers": quantizer_table(qmodel),
        "versions": {"repq_export": repq_export.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
    }


def export_artifact(req: ExportRequest, progress: bool = True, log=print) -> Path:
    """Check `req` (`check_export`), then write its artifact directory (`write_artifact`)."""
    return write_artifact(check_export(req), progress, log)


def write_artifact(job: CheckedExport, progress: bool = True, log=print) -> Path:
    """Write the artifact directory of a checked request; the directory appears only once complete."""
    req, deploy, form = job.req, job.deploy, job.form
    choice = choose_calibration(req.calibration_source(), req.calib_images, req.holdout, req.max_pixels)
    paths, held, dataset = choice.images, choice.held, choice.dataset
    if choice.unscorable:
        log(f"note: {choice.unscorable}; the calibration check judges matched detections only, not AP")
    detector, info = load_checkpoint(req.ckpt, req.config)
    apply_post_processing(detector, deploy.codebase.post_processing)
    pre = static_preprocess(info.preprocess, deploy)
    log(f"calibrating W{req.w_bits}A{req.a_bits} on {len(paths)} image(s): {', '.join(p.name for p in paths)}")
    try:
        qmodel, check, preps = calibrate_and_check(detector, paths, held, pre, dataset, req, progress, log)
    except UserError as exc:
        raise blame_calibration_images(exc, paths) from None
    log(format_check(check))
    if not held:
        log("WARNING: the calibration check ran on the calibration images only, which a calibration fits best "
            "(one small image gave a W8A8 model 25 AP worse than float while agreeing with it on that image): "
            "give a folder or annotation file with more images than --calib-images, and --holdout N")
    if req.calib_dir is not None:
        log("note: no annotations (--calib folder): the check judges matched detections only; with --calib-ann it "
            "also judges box/mask AP against float, which sees lost localization and scores that matching at IoU "
            "0.5 does not")
    if not check.ok:
        if not req.accept_accuracy_loss:
            raise UserError(f"calibration check FAILED, nothing was written: the W{req.w_bits}A{req.a_bits} model "
                            f"lost more than the bound against float ({'; '.join(check.failures)}); calibrate on "
                            "more or other images (--calib-images N, spread over the set), or pass "
                            "--accept-accuracy-loss to write the artifact anyway")
        log(f"WARNING: calibration check FAILED ({'; '.join(check.failures)}): the artifact is written because "
            "of --accept-accuracy-loss; it computes a model this much worse than float (repq.json: calibration_check)")
    qmodel = qmodel.cpu()
    with staged_dir(req.out, req.force, kind=ARTIFACT) as tmp:
        save_quant_state(qmodel, tmp / "quant.pth", paths, req.ckpt)
        target = target_cpu_for(deploy)
        log(f"exporting ONNX (QDQ, {form} form{f', target CPU {target}' if form == ONNXRUNTIME else ''}) ...")
        if form == ONNXRUNTIME and target == TARGET_ANY and req.w_bits == 8 and saturation_free():
            log("note: this CPU has VNNI/AMX; --deploy-config instance-seg_onnxruntime_cpu-vnni.py gives a "
                "W8A8 graph about 1.35x faster for such CPUs")
        try:
            proto = export_onnx(qmodel, tmp / deploy.onnx.save_file, preps[0].tensor, preps[0].img_hw_tensor,
                                deploy.onnx, form=form, target_cpu=target, roi_nan_guard=roi_nan_guard_for(deploy),
                                log_sqrt2=log_sqrt2_lowering_for(deploy), unshared_weights=unshared_weights_for(deploy))
        except UserError as exc:
            raise blame_calibration_images(exc, paths) from None
        check_form_rules(proto, form)
        manifest = build_manifest(info, qmodel, paths, preps[0], proto, deploy, tmp, pre)
        manifest["calibration_check"] = check.as_dict()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return req.out


def calibrate_and_check(detector: torch.nn.Module, paths: list[Path], held: list[Path], pre: PreprocessSettings,
                        dataset: CocoDataset | None, req: ExportRequest,
                        progress: bool, log=None) -> tuple[torch.nn.Module, CalibrationCheck, list[Preprocessed]]:
    """Quantize ``detector`` in place on ``paths`` and check it against its float self on ``paths`` and
    ``held``: (fake-quant model, check, the calibration images preprocessed)."""
    preps = [preprocess_file(p, pre, req.max_pixels) for p in paths]
    check_preps = preps + [preprocess_file(p, pre, req.max_pixels) for p in held]
    float_outs = model_outputs(detector.to(req.device), check_preps, req.device, "float", progress)
    qmodel = quantize(detector, [(p.tensor.to(req.device), p.img_hw_tensor.to(req.device))
                                 for p in preps], req.w_bits, req.a_bits, progress=progress)
    if req.recon is not None:  # the check then judges the reconstructed model
        reconstruct(qmodel, [(p.tensor.to(req.device), p.img_hw_tensor.to(req.device)) for p in preps],
                    req.recon, progress, log)
    return qmodel, judge_calibration(qmodel, paths, held, check_preps, float_outs, dataset, req, progress), preps


def judge_calibration(qmodel: torch.nn.Module, paths: list[Path], held: list[Path], preps: list[Preprocessed],
                      float_outs: list, dataset: CocoDataset | None, req: ExportRequest,
                      progress: bool) -> CalibrationCheck:
    """The calibration check (evaluation/calibration_check.py): fake quant against the float outputs
    ``float_outs`` on the calibration images and the held-out ones."""
    quant_outs = model_outputs(qmodel, preps, req.device, "quant", progress)
    ids = dataset_ids(dataset)
    n = len(paths)
    return check_calibration(image_pairs(paths, float_outs[:n], quant_outs[:n], ids),
                             image_pairs(held, float_outs[n:], quant_outs[n:], ids),
                             min(req.w_bits, req.a_bits), dataset)


def static_preprocess(pre: PreprocessSettings, deploy: DeployConfig) -> PreprocessSettings:
    """`pre`, padding to the deploy config's static size (onnx_config.input_shape, width first) if it has one."""
    if deploy.onnx.input_shape is None:
        return pre
    width, height = deploy.onnx.input_shape
    return replace(pre, pad_to=(height, width))
