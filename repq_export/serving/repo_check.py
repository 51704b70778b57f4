"""Triton's ModelConfig schema, and a model repository checked without a server: every config.pbtxt
parses into ModelConfig, names and files are where Triton looks, and each ensemble's wiring is complete."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

MODEL_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.py"}


def schema():
    """Triton's ModelConfig protobuf module and protobuf's text_format (from the [serve] extra)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise UserError("triton-repo needs the [serve] extra (tritonclient[grpc]): pip install "
                        "'repq-export[serve]'") from None
    return model_config_pb2, text_format


def parse_config(path: Path):
    """A config.pbtxt parsed into Triton's ModelConfig (UserError where it does not parse)."""
    mc, text_format = schema()
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise UserError(f"{path}: not a Triton ModelConfig ({exc})") from None


def load_configs(repo: Path) -> tuple[dict, list[str]]:
    """{model name: ModelConfig} of every model folder, and what is wrong with them."""
    configs, problems = {}, []
    for folder in sorted(p for p in repo.iterdir() if p.is_dir()):
        path = folder / "config.pbtxt"
        if not path.is_file():
            problems.append(f"{folder.name}: no config.pbtxt")
            continue
        try:
            cfg = parse_config(path)
        except UserError as exc:
            problems.append(str(exc))
            continue
        if cfg.name != folder.name:
            problems.append(f"{folder.name}: config names the model '{cfg.name}'")
        kind = cfg.backend or cfg.platform
        wanted = MODEL_FILES.get(kind)
        if wanted and not (folder / "1" / wanted).is_file():
            problems.append(f"{folder.name}: {kind} model without 1/{wanted}")
        configs[folder.name] = cfg
    return configs, problems


def ensemble_problems(name: str, cfg, configs: dict) -> list[str]:
    """What keeps an ensemble from running: unknown models or tensors, inputs nobody produces."""
    problems = []
    available = {i.name for i in cfg.input}
    for step in cfg.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"{name}: step model '{step.model_name}' is not in the repository")
            continue
        inputs, outputs = {i.name for i in model.input}, {o.name for o in model.output}
        required = {i.name for i in model.input if not i.optional}
        for key, value in step.input_map.items():
            if key not in inputs:
                problems.append(f"{name}: '{step.model_name}' has no input '{key}'")
            if value not in available:
                problems.append(f"{name}: '{value}' (for {step.model_name}.{key}) is produced by no earlier step")
        for missing in sorted(required - set(step.input_map)):
            problems.append(f"{name}: required input '{step.model_name}.{missing}' is not fed")
        for key, value in step.output_map.items():
            if key not in outputs:
                problems.append(f"{name}: '{step.model_name}' has no output '{key}'")
            available.add(value)
    for out in cfg.output:
        if out.name not in available:
            problems.append(f"{name}: output '{out.name}' is produced by no step")
    return problems


def check_repository(repo: Path) -> list[str]:
    """Every problem found in the repository at `repo` (empty: consistent)."""
    configs, problems = load_configs(repo)
    for name, cfg in configs.items():
        if cfg.platform == "ensemble":
            problems += ensemble_problems(name, cfg, configs)
    return problems
