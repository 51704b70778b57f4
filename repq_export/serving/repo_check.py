"""Checks a Triton model repository without a server: every config.pbtxt parses into Triton's
ModelConfig, names and files are where Triton looks, and each ensemble's wiring is complete."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

MODEL_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.py"}


def load_configs(repo: Path) -> tuple[dict, list[str]]:
    """{model name: ModelConfig} of every model folder, and what is wrong with them."""
    from .triton_repo import parse_config

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
