"""The artifact folder as the output rules see it: the files repq-export writes there, the records in
repq.json that let ``--force`` replace it, and the record of a file added to it later (an engine, a
parity report)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..files import file_sha256, write_atomically
from ..output_dir import FolderKind, checked_records
from .manifest_check import ADDED_FILES, FORMAT, MANIFEST, parse_manifest, read_manifest

ARTIFACT_FILES = re.compile(r"quant\.pth|[A-Za-z0-9_][A-Za-z0-9_.-]*\.(?:onnx|engine)|parity_[a-z0-9]+\.json")


def artifact_records(manifest: dict) -> dict[str, str]:
    """{file: sha256} that an artifact's repq.json records: the graph, quant.pth and the files added later
    (a TensorRT engine, the demo's parity reports)."""
    records = {}
    for key in ("onnx", "quant_state"):
        entry = manifest.get(key)
        if isinstance(entry, dict) and "file" in entry:
            records[entry["file"]] = entry.get("sha256")
    records = checked_records(records, ARTIFACT_FILES, "'onnx'/'quant_state'")
    return records | checked_records(manifest.get(ADDED_FILES, {}), ARTIFACT_FILES, f"'{ADDED_FILES}'")


#: what --force may replace: a folder whose repq.json (parsed by the one parser) records every file in it
ARTIFACT = FolderKind("an artifact", MANIFEST, FORMAT, artifact_records, ARTIFACT_FILES, parse=parse_manifest)


def record_added_file(artifact: Path, path: Path) -> None:
    """Record a file written into an existing artifact (engine, parity report) with its sha256 in repq.json,
    so that --force may later delete it, and only while it is unchanged."""
    manifest = read_manifest(artifact)
    manifest[ADDED_FILES] = {**manifest.get(ADDED_FILES, {}), path.name: file_sha256(path)}
    write_atomically(artifact / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
