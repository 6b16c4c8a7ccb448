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
from api.model_ids import CHECKPOINT_MARK, is_checkpoint_id
from api.schemas import DeletedObject, ModelList, ModelObject
from api.settings import Settings

router = APIRouter(tags=["models"])

_BLOCK = tarfile.BLOCKSIZE  # 512
_CHUNK = 1024 * 1024


def _base_object(entry: Any) -> ModelObject:
    description = entry.description
    if getattr(entry, "source", None) == "registered":
        # the catalog's description names the server folder; tenants never see paths
        description = f"a model registered on this server ({entry.family or 'unknown'} family)"
    return ModelObject(
        id=entry.id,
        created=0,
        owned_by="finegates",
        kind="base",
        family=entry.family,
        description=description,
    )


def _finetuned_object(m: FineTunedModel) -> ModelObject:
    s = m.summary or {}
    reached = s.get("target_reached")
    step = s.get("checkpoint_step")
    return ModelObject(
        id=m.id,
        created=int(m.created_at.timestamp()),
        owned_by=m.tenant_id,
        kind="checkpoint" if is_checkpoint_id(m.id) else "fine-tuned",
        task=m.task,
        base_model=m.base_model,
        job_id=m.job_id,
        compression=m.summary,
        summary=s.get("summary"),
        target_reached=bool(reached) if reached is not None else None,
        eval_metrics=s.get("eval_metrics"),
        warnings=list(s.get("warnings") or []),
        checkpoint_step=int(step) if step is not None else None,
        downloads=s.get("downloads"),
    )


def artifact_path(m: FineTunedModel, settings: Settings) -> Path:
    p = Path(m.artifact_dir)
    return p if p.is_absolute() else settings.data_path / p


@router.get("/models", response_model=ModelList)
def list_all_models(
    principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> ModelList:
    data = [_base_object(e) for e in base_models(settings).values()]
    # checkpoints are listed with their job (GET /v1/fine_tuning/jobs/{id}/checkpoints)
    rows = session.execute(
        select(FineTunedModel)
        .where(
            FineTunedModel.tenant_id == principal.tenant_id,
            ~FineTunedModel.id.contains(CHECKPOINT_MARK, autoescape=True),
        )
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


# Left out of the default tar (each is a copy of the weights in another format):
# ``include=onnx`` (both ONNX files) / ``include=hf`` add them back.
_OPTIONAL = {"onnx": ("model.onnx", "model.int8.onnx"), "hf": ("hf/",)}


def _left_out(rel: str, include: set[str]) -> bool:
    return any(
        key not in include and (rel == name or (name.endswith("/") and rel.startswith(name)))
        for key, names in _OPTIONAL.items()
        for name in names
    )


def _download_manifest(root: Path, omitted: list[str]) -> bytes:
    """manifest.json for a tar without ``omitted``: the same manifest without their
    entries (so load_artifact's hash check passes on what was sent), saying what was
    left out."""
    data = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    files = data.get("files") or {}
    for rel in omitted:
        files.pop(rel, None)
    if any(rel.startswith("hf/") for rel in omitted):
        data["hf_subfolder"] = None
    data["download_omitted"] = sorted({r.split("/", 1)[0] for r in omitted})
    return (json.dumps(data, indent=2) + "\n").encode()


TarMember = tuple[Path | bytes, bytes, int]


def _tar_plan(root: Path, include: set[str] | None = None) -> tuple[list[TarMember], int]:
    """Members (a file, or bytes for a rewritten manifest) and the exact tar size.
    ``include=None``: every file."""
    paths, omitted = [], []
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if include is not None and _left_out(rel, include):
            omitted.append(rel)
        else:
            paths.append((p, rel))
    members: list[TarMember] = []
    total = 0
    for p, rel in paths:
        st = p.stat()
        body: Path | bytes = p
        size = st.st_size
        if rel == "manifest.json" and omitted:
            body = _download_manifest(root, omitted)
            size = len(body)
        header = _tar_member_header(rel, size, int(st.st_mtime))
        members.append((body, header, size))
        total += len(header) + size + (-size) % _BLOCK
    total += 2 * _BLOCK
    # tarfile pads the archive to a multiple of RECORDSIZE; readers do not need it.
    return members, total


def _tar_stream(members: list[TarMember]) -> Iterator[bytes]:
    for path, header, size in members:
        yield header
        if isinstance(path, bytes):
            yield path
            pad = (-size) % _BLOCK
            if pad:
                yield b"\0" * pad
            continue
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
    include: Annotated[str, Query(pattern="^((onnx|hf|all)(,(onnx|hf|all))*)?$")] = "",
) -> Any:
    """``format=tar`` (default): weights, manifest, tokenizer and report (``include=onnx``,
    ``include=hf`` or ``include=all`` add the ONNX files and the Hugging Face copy);
    ``safetensors``/``onnx``/``onnx-int8`` (model.int8.onnx, dynamic int8 of model.onnx):
    one file."""
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
    wanted = {x for x in include.split(",") if x}
    members, total = _tar_plan(root, set(_OPTIONAL) if "all" in wanted else wanted)
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
    # a model takes its checkpoints with it
    doomed = [m]
    if not is_checkpoint_id(m.id):
        doomed += session.execute(
            select(FineTunedModel).where(
                FineTunedModel.tenant_id == m.tenant_id,
                FineTunedModel.id.startswith(m.id + CHECKPOINT_MARK, autoescape=True),
            )
        ).scalars()
    roots = {artifact_path(x, settings) for x in doomed}
    for x in doomed:
        session.delete(x)
    session.commit()
    # A folder another model still uses stays (a checkpoint can share the final model's).
    still_used = {
        artifact_path(x, settings)
        for x in session.execute(
            select(FineTunedModel).where(
                FineTunedModel.artifact_dir.in_([x.artifact_dir for x in doomed])
            )
        ).scalars()
    }
    # Only delete folders inside the data directory; never an arbitrary absolute path.
    data = settings.data_path
    for root in roots - still_used:
        if root.is_dir() and data in root.resolve().parents:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    return DeletedObject(id=m.id, object="model", deleted=True)
