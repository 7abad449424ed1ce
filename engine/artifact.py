"""The ``.ds`` artifact: one zip file holding a manifest and, per backend,
what it needs to run the model (a saved ExportedProgram for PyTorch, an ONNX
graph for ONNX Runtime).

The manifest records inputs and outputs (names, dtypes, dynamic dims),
precision, the passes applied, the measured conversion error, the source hash,
the versions that wrote it, and a SHA-256 of every member, so a corrupt,
truncated or foreign file is refused with a clear error instead of failing
somewhere inside a backend.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ArtifactError",
    "TensorSpec",
    "Manifest",
    "write_artifact",
    "read_manifest",
    "read_member",
    "update_extra",
]

FORMAT = "dsstream-engine"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """A file that is not a valid, intact .ds artifact of a supported version."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int | str, ...]  # ints are fixed; strings name dynamic dims
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)  # dim name -> [min, max]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(
            d["name"],
            d["dtype"],
            tuple(d["shape"]),
            {k: (int(v[0]), int(v[1])) for k, v in d.get("dims", {}).items()},
        )


@dataclass(frozen=True)
class Manifest:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str  # "fp32", "fp16" or "bf16"
    backends: tuple[str, ...]  # members present: "torch", "onnx"
    source_hash: str  # sha256 of the source model's weights and graph
    versions: dict[str, str]  # torch, engine, onnx, onnxruntime at conversion
    conversion_error: dict[str, dict[str, float]]  # per backend: max_abs, max_rel vs eager
    passes: tuple[dict[str, Any], ...] = ()  # each pass: name and what it changed
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. vocabulary, frontend config
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self, checksums: dict[str, str]) -> str:
        d = asdict(self)
        d["checksums"] = checksums
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> tuple[Manifest, dict[str, str]]:
        d = json.loads(text)
        checksums = d.pop("checksums")
        d["inputs"] = tuple(TensorSpec.from_dict(t) for t in d["inputs"])
        d["outputs"] = tuple(TensorSpec.from_dict(t) for t in d["outputs"])
        d["backends"] = tuple(d["backends"])
        d["passes"] = tuple(d.get("passes", ()))
        return cls(**d), checksums


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_artifact(path: str | Path, manifest: Manifest, members: dict[str, bytes]) -> Path:
    """Write ``manifest`` and ``members`` (name -> bytes) atomically to ``path``."""
    path = Path(path)
    checksums = {name: _sha256(data) for name, data in members.items()}
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST, manifest.to_json(checksums))
        for name, data in members.items():
            zf.writestr(name, data)
    tmp.replace(path)  # readers never see a half-written artifact
    return path


def _open(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ArtifactError(f"{path} is not a .ds artifact (not a zip container)") from None


def read_manifest(path: str | Path) -> tuple[Manifest, dict[str, str]]:
    """The manifest and member checksums; raises :class:`ArtifactError`."""
    path = Path(path)
    with _open(path) as zf:
        try:
            raw = zf.read(MANIFEST).decode("utf-8")
        except KeyError:
            raise ArtifactError(f"{path} has no {MANIFEST}: not a .ds artifact") from None
        except zipfile.BadZipFile as exc:
            raise ArtifactError(f"{path} is corrupt: {exc}") from None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({exc})") from None
    if obj.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a {FORMAT} artifact (format {obj.get('format')!r})")
    if obj.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {obj.get('format_version')}; this engine reads "
            f"version {FORMAT_VERSION}: convert the model again"
        )
    try:
        return Manifest.from_json(raw)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: invalid manifest ({exc})") from None


def read_member(path: str | Path, name: str, checksums: dict[str, str]) -> bytes:
    """One member's bytes, verified against the manifest's checksum."""
    path = Path(path)
    if name not in checksums:
        raise ArtifactError(f"{path} has no {name!r} member")
    with _open(path) as zf:
        try:
            data = zf.read(name)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ArtifactError(f"{path}: cannot read {name!r} ({exc})") from None
    if _sha256(data) != checksums[name]:
        raise ArtifactError(f"{path}: member {name!r} fails its checksum (corrupt file)")
    return data


def update_extra(path: str | Path, **changes: Any) -> Path:
    """Rewrite an artifact with ``changes`` merged into its manifest's ``extra``
    (facts about the model added after conversion, e.g. the questions a VQA
    model was trained on); the members are copied as they are, checksums
    verified, atomically."""
    manifest, checksums = read_manifest(path)
    members = {name: read_member(path, name, checksums) for name in checksums}
    return write_artifact(path, replace(manifest, extra={**manifest.extra, **changes}), members)


def torch_save_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.export.save(obj, buf)
    return buf.getvalue()
