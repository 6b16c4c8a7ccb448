"""manifest.json: the one schema that the artifact writer and every reader share.

Why a typed schema: the serving side used to guess at fields no writer produced
(``labels``, ``label_names``, ``config``); with one dataclass, a field is written,
validated on read and read back under the same name, and a new field is added in one
place. ``Manifest.from_dict`` refuses an unknown ``format_version`` or a field of the
wrong type with the manifest's path and the field's name.

``Manifest`` also reads like the parsed JSON (``manifest["id2label"]``,
``manifest.get("compression")``), because that is how users and the README reach it
through ``core.artifacts.load_artifact``.

Keys this engine does not know (a newer writer's additions, or ``extra`` passed to
``save_artifact``) are kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypedDict

from core import ENGINE_VERSION
from core.errors import ArtifactError

FORMAT_VERSION = 1
SUPPORTED_FORMATS = frozenset({1})

# file names inside an artifact directory
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
ONNX = "model.onnx"
REPORT = "report.json"
HF_DIR = "hf"

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_FORMATS",
    "MANIFEST",
    "WEIGHTS",
    "ONNX",
    "REPORT",
    "HF_DIR",
    "FileEntry",
    "BaseModelRef",
    "Manifest",
]


class FileEntry(TypedDict):
    sha256: str
    size: int


class BaseModelRef(TypedDict):
    id: str | None
    sha256: str | None  # content hash of the base weights (core.package.base_weights_hash)
    path: str | None


@dataclass(eq=False)
class Manifest(Mapping[str, Any]):
    """The parsed manifest.json (format_version 1). Field order is the file's key order."""

    family: str  # "bert" | "llama": which core.pruned class rebuilds the model
    model_config: dict[str, Any]  # the pruned config, per-layer shapes included
    files: dict[str, FileEntry]  # every file of the artifact except manifest.json
    format_version: int = FORMAT_VERSION
    engine_version: str | None = None
    model_type: str | None = None
    base_model: BaseModelRef = field(
        default_factory=lambda: BaseModelRef(id=None, sha256=None, path=None)
    )
    task: str | None = None
    id2label: dict[str, str] | None = None  # class index (as a string) -> label
    plan: dict[str, Any] | None = None  # the validated prune plan (kept indices)
    original_shape: dict[str, int] | None = None  # base geometry, for the dense reference
    training_config: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    compression: dict[str, Any] = field(default_factory=dict)
    hf_subfolder: str | None = None
    problem_type: str | None = None
    measured_sparsity: float | None = None
    max_length: int | None = None
    source_run: str | None = None
    # what a user reads first (core.package.run_results): target_reached, target and
    # measured sparsity, eval_metrics, the validation set, warnings, the summary sentence
    results: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # --- dict-like reading -------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key in _FIELDS:
            return getattr(self, key)
        return self.extra[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __contains__(self, key: object) -> bool:
        return key in _FIELDS or key in self.extra

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Manifest):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dict it reads as

    # --- typed helpers -----------------------------------------------------------------
    def labels(self) -> list[str] | None:
        """Labels in class-index order, or None for an artifact without a label set."""
        if not self.id2label:
            return None
        return [self.id2label[k] for k in sorted(self.id2label, key=int)]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format_version": self.format_version,
            "engine_version": self.engine_version,
            "family": self.family,
            "model_type": self.model_type,
            "model_config": self.model_config,
            "base_model": dict(self.base_model),
            "task": self.task,
            "id2label": self.id2label,
            "plan": self.plan,
            "original_shape": self.original_shape,
            "training_config": self.training_config,
            "metrics": self.metrics,
            "compression": self.compression,
            "hf_subfolder": self.hf_subfolder,
            "files": {k: dict(v) for k, v in self.files.items()},
            "problem_type": self.problem_type,
            "measured_sparsity": self.measured_sparsity,
            "max_length": self.max_length,
            "source_run": self.source_run,
            "results": self.results,
        }
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST) -> Manifest:
        """Validate parsed JSON; raises ArtifactError naming ``where`` and the field."""
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: manifest must be a JSON object")
        fv = data.get("format_version")
        if not isinstance(fv, int) or isinstance(fv, bool) or fv not in SUPPORTED_FORMATS:
            raise ArtifactError(
                f"{where}: unknown format_version {fv!r} (this engine {ENGINE_VERSION} reads "
                f"{sorted(SUPPORTED_FORMATS)})"
            )
        for key in ("family", "model_config", "files"):
            if key not in data:
                raise ArtifactError(f"{where}: manifest lacks required field '{key}'")
        v = _Validator(data, where)
        files = v.mapping("files")
        entries: dict[str, FileEntry] = {}
        for name, meta in files.items():
            if (
                not isinstance(meta, dict)
                or not isinstance(meta.get("sha256"), str)
                or not isinstance(meta.get("size"), int)
            ):
                raise ArtifactError(
                    f"{where}: files['{name}'] must be an object with sha256 (string) and "
                    "size (integer)"
                )
            entries[name] = FileEntry(sha256=meta["sha256"], size=meta["size"])
        if WEIGHTS not in entries:
            raise ArtifactError(f"{where}: manifest does not list {WEIGHTS}")
        base = v.mapping("base_model", none=True) or {}
        for key in ("id", "sha256", "path"):
            if base.get(key) is not None and not isinstance(base[key], str):
                raise ArtifactError(f"{where}: base_model.{key} must be a string or null")
        id2label = v.mapping("id2label", none=True)
        if id2label is not None:
            for k, lab in id2label.items():
                if not (isinstance(k, str) and k.lstrip("-").isdigit() and isinstance(lab, str)):
                    raise ArtifactError(
                        f"{where}: id2label must map class indices to label strings, "
                        f"got {k!r}: {lab!r}"
                    )
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            family=v.string("family"),
            model_config=v.mapping("model_config"),
            files=entries,
            format_version=int(fv),
            engine_version=v.string("engine_version", none=True),
            model_type=v.string("model_type", none=True),
            base_model=BaseModelRef(
                id=base.get("id"), sha256=base.get("sha256"), path=base.get("path")
            ),
            task=v.string("task", none=True),
            id2label=id2label,
            plan=v.mapping("plan", none=True),
            original_shape=v.mapping("original_shape", none=True),
            training_config=v.mapping("training_config", none=True),
            metrics=v.mapping("metrics", none=True) or {},
            compression=v.mapping("compression", none=True) or {},
            hf_subfolder=v.string("hf_subfolder", none=True),
            problem_type=v.string("problem_type", none=True),
            measured_sparsity=v.number("measured_sparsity"),
            max_length=v.integer("max_length"),
            source_run=v.string("source_run", none=True),
            results=v.mapping("results", none=True),
            extra={k: val for k, val in data.items() if k not in known},
        )


_FIELDS = frozenset(f.name for f in fields(Manifest)) - {"extra"}


class _Validator:
    """Typed access to one parsed manifest; every refusal names the field."""

    def __init__(self, data: dict[str, Any], where: str):
        self.data, self.where = data, where

    def _bad(self, key: str, what: str) -> ArtifactError:
        got = type(self.data.get(key)).__name__
        return ArtifactError(f"{self.where}: manifest field '{key}' must be {what}, got {got}")

    def string(self, key: str, none: bool = False) -> Any:
        x = self.data.get(key)
        if isinstance(x, str) or (none and x is None):
            return x
        raise self._bad(key, "a string" + (" or null" if none else ""))

    def mapping(self, key: str, none: bool = False) -> Any:
        x = self.data.get(key)
        if isinstance(x, dict) or (none and x is None):
            return x
        raise self._bad(key, "an object" + (" or null" if none else ""))

    def number(self, key: str) -> float | None:
        x = self.data.get(key)
        if x is None:
            return None
        if isinstance(x, int | float) and not isinstance(x, bool):
            return float(x)
        raise self._bad(key, "a number or null")

    def integer(self, key: str) -> int | None:
        x = self.data.get(key)
        if x is None:
            return None
        if isinstance(x, int) and not isinstance(x, bool):
            return x
        raise self._bad(key, "an integer or null")
