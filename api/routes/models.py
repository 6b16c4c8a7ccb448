"""/v1/models: the base catalog plus the caller's finetuned models; artifacts and reports.

Why a hand-built tar stream: the artifact (model.safetensors can be hundreds of MB) is sent
file by file in 1 MiB chunks with an exact Content-Length, never built in memory or in a
temp file. Members sit at the archive ROOT (model.safetensors, manifest.json, tokenizer
files ...), which is the artifact layout clients unpack. Only regular files are sent (no
symlinks).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from sqlalchemy import select

from api.db.models import FineTunedModel
from api.deps import ModelDep, ModelRef, PrincipalDep, SessionDep, SettingsDep, base_models
from api.errors import APIError
from api.schemas import DeletedObject, ModelList, ModelObject
from api.settings import Settings

router = APIRouter(tags=["models"])

_BLOCK = tarfile.BLOCKSIZE  # 512
_CHUNK = 1024 * 1024


def _base_object(entry: Any) -> ModelObject:
    return ModelObject(
        id=entry.id,
        created=0,
        owned_by="finegates",
        kind="base",
        family=entry.family,
        description=entry.description,
    )


def _finetuned_object(m: FineTunedModel) -> ModelObject:
    return ModelObject(
        id=m.id,
        created=int(m.created_at.timestamp()),
        owned_by=m.tenant_id,
        kind="fine-tuned",
        task=m.task,
        base_model=m.base_model,
        job_id=m.job_id,
        compression=m.summary,
    )


def artifact_path(m: FineTunedModel, settings: Settings) -> Path:
    p = Path(m.artifact_dir)
    return p if p.is_absolute() else settings.data_path / p


@router.get("/models", response_model=ModelList)
def list_all_models(
    principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> ModelList:
    data = [_base_object(e) for e in base_models(settings).values()]
    rows = session.execute(
        select(FineTunedModel)
        .where(FineTunedModel.tenant_id == principal.tenant_id)
        .order_by(FineTunedModel.pk.desc())
    ).scalars()
    data.extend(_finetuned_object(m) for m in rows)
    return ModelList(data=data)


def _finetuned_only(ref: ModelRef, what: str, code: str) -> FineTunedModel:
    """The caller's finetuned model; a base model has no artifact, report, or delete."""
    if ref.finetuned is None:
        raise APIError(
            404,
            f"'{ref.id}' is a base model; {what} exist for fine-tuned models only",
            param="model",
            code=code,
        )
    return ref.finetuned


def _tar_member_header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _tar_plan(root: Path) -> tuple[list[tuple[Path, bytes, int]], int]:
    members: list[tuple[Path, bytes, int]] = []
    total = 0
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not p.is_file():
            continue
        st = p.stat()
        header = _tar_member_header(p.relative_to(root).as_posix(), st.st_size, int(st.st_mtime))
        pad = (-st.st_size) % _BLOCK
        members.append((p, header, st.st_size))
        total += len(header) + st.st_size + pad
    total += 2 * _BLOCK
    # tarfile pads the archive to a multiple of RECORDSIZE; readers do not need it.
    return members, total


def _tar_stream(members: list[tuple[Path, bytes, int]]) -> Iterator[bytes]:
    for path, header, size in members:
        yield header
        sent = 0
        with path.open("rb") as fh:
            while sent < size:
                chunk = fh.read(min(_CHUNK, size - sent))
                if not chunk:
                    raise OSError(f"{path.name} shrank while being sent")
                sent += len(chunk)
                yield chunk
        pad = (-size) % _BLOCK
        if pad:
            yield b"\0" * pad
    yield b"\0" * (2 * _BLOCK)


_SINGLE_FILES = {
    "safetensors": "model.safetensors",
    "onnx": "model.onnx",
    "onnx-int8": "model.int8.onnx",  # core.quantize.INT8_ONNX
}


@router.get("/models/{model_id:path}/artifact")
def download_artifact(
    ref: ModelDep,
    settings: SettingsDep,
    format: Annotated[str, Query(pattern="^(tar|safetensors|onnx|onnx-int8)$")] = "tar",
) -> Any:
    """``format=tar`` (default): the whole artifact directory; ``safetensors``/``onnx``/
    ``onnx-int8`` (model.int8.onnx, dynamic int8 of model.onnx): one file."""
    m = _finetuned_only(ref, "artifacts", "artifact_not_found")
    model_id = m.id
    root = artifact_path(m, settings)
    if not root.is_dir():
        raise APIError(
            404,
            f"The artifact of model '{model_id}' is missing from storage",
            code="artifact_not_found",
        )
    safe = model_id.replace(":", "_").replace("/", "_")
    if format in _SINGLE_FILES:
        fname = _SINGLE_FILES[format]
        f = root / fname
        if not f.is_file() or f.is_symlink():
            why = (
                "its model.safetensors is missing"
                if format == "safetensors"
                else f"no {fname} was produced for it (ONNX export or its int8 quantization "
                "may be unavailable for this model family, or it failed; see the job's events)"
            )
            raise APIError(
                404,
                f"Model '{model_id}' has no {format} file: {why}",
                param="format",
                code="artifact_not_found",
            )
        return FileResponse(
            f,
            media_type="application/octet-stream",
            filename=f"{safe}.{'int8.onnx' if format == 'onnx-int8' else format}",
        )
    members, total = _tar_plan(root)
    return StreamingResponse(
        _tar_stream(members),
        media_type="application/x-tar",
        headers={
            "Content-Length": str(total),
            "Content-Disposition": f'attachment; filename="{safe}.tar"',
        },
    )


@router.get("/models/{model_id:path}/report")
def get_report(ref: ModelDep, settings: SettingsDep) -> JSONResponse:
    """The compression report (report.json of the artifact)."""
    m = _finetuned_only(ref, "compression reports", "report_not_found")
    path = artifact_path(m, settings) / "report.json"
    if not path.is_file():
        if m.summary:
            return JSONResponse({"model": m.id, "partial": True, "summary": m.summary})
        raise APIError(404, f"Model '{m.id}' has no compression report", code="report_not_found")
    return JSONResponse(json.loads(path.read_text(encoding="utf-8")))


@router.get("/models/{model_id:path}", response_model=ModelObject)
def get_model(ref: ModelDep) -> ModelObject:
    if ref.finetuned is not None:
        return _finetuned_object(ref.finetuned)
    return _base_object(ref.base)


@router.delete("/models/{model_id:path}", response_model=DeletedObject)
def delete_model(ref: ModelDep, session: SessionDep, settings: SettingsDep) -> DeletedObject:
    if ref.finetuned is None:
        raise APIError(
            403,
            f"'{ref.id}' is a base model and cannot be deleted",
            param="model",
            code="model_not_deletable",
        )
    m = ref.finetuned
    root = artifact_path(m, settings)
    session.delete(m)
    session.commit()
    # Only delete folders inside the data directory; never an arbitrary absolute path.
    data = settings.data_path
    if root.is_dir() and data in root.resolve().parents:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return DeletedObject(id=m.id, object="model", deleted=True)
