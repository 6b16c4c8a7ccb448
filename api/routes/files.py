"""/v1/files: upload (streamed, capped, hashed, validated), list, get, content, delete.

Invalid files are REJECTED at upload (400 naming the line) and nothing is kept, like
OpenAI's format checks: a user fixes the file and uploads again, and no job can ever
point at a file that cannot train. A stored file is therefore always ``processed``.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api import pagination
from api.db.models import File, Job, new_id
from api.deps import OwnedFile, PrincipalDep, SessionDep, SettingsDep, StorageDep
from api.errors import APIError
from api.jobstate import ACTIVE
from api.limits import check_storage, limits_for, tenant_lock
from api.schemas import CountedPage, DeletedObject, FileObject, has_control_characters
from api.storage import LocalStorage, StoredBlob, TooLargeError

router = APIRouter(tags=["files"])

PURPOSES = ("fine-tune",)
_SAFE_EXT = re.compile(r"^\.[a-z0-9]{1,8}$")
_MAX_FIELD_BYTES = 4096


def file_object(f: File) -> FileObject:
    return FileObject(
        id=f.id,
        bytes=f.bytes,
        created_at=int(f.created_at.timestamp()),
        filename=f.filename,
        purpose=f.purpose,
        status=f.status,
        status_details=f.status_details,
        format=f.format,
        task=f.task,
        n_rows=f.n_rows,
        sha256=f.sha256,
        report=f.report,
    )


class _MultipartSink:
    """Push-parser callbacks: the ``file`` part goes straight to storage, fields to memory.

    Why not ``request.form()``: Starlette spools the whole upload to a temp file before
    the handler runs, so the size cap and the hash would come after the disk was filled.
    """

    def __init__(self, storage: LocalStorage, key_base: str, max_bytes: int):
        self.storage = storage
        self.key_base = key_base
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.key: str | None = None
        self.blob: StoredBlob | None = None
        self._writer: Any = None
        self._headers: dict[bytes, bytes] = {}
        self._hname = b""
        self._hval = b""
        self._name: str | None = None
        self._buf = bytearray()
        self._is_file = False

    def on_part_begin(self) -> None:
        self._headers, self._name, self._buf, self._is_file = {}, None, bytearray(), False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hval += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._hname.lower()] = self._hval
        self._hname, self._hval = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _disp, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in opts and self._name == "file":
            if self._writer is not None or self.blob is not None:
                raise APIError(400, "Send exactly one 'file' part", param="file")
            self._is_file = True
            raw = opts[b"filename"].decode("utf-8", "replace")
            if has_control_characters(raw):
                # they break the Content-Disposition of GET /content and every log line
                raise APIError(
                    400,
                    "The file name contains control characters or NUL; rename the file",
                    param="file",
                    code="invalid_filename",
                )
            self.filename = FsPath(raw.replace("\\", "/")).name[:255] or "upload"
            ext = FsPath(self.filename).suffix.lower()
            self.key = self.key_base + (ext if _SAFE_EXT.match(ext) else "")
            self._writer = self.storage.writer(self.key, self.max_bytes)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self._writer.write(data[start:end])
        else:
            self._buf += data[start:end]
            if len(self._buf) > _MAX_FIELD_BYTES:
                raise APIError(400, f"form field '{self._name}' is too long", param=self._name)

    def on_part_end(self) -> None:
        if self._is_file:
            self.blob = self._writer.commit(self.key)
            self._writer = None
        elif self._name:
            self.fields[self._name] = self._buf.decode("utf-8", "replace")

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        if self.blob is not None:
            self.storage.delete(self.blob.key)


def _disposition(filename: str) -> str:
    """ASCII fallback plus RFC 5987 UTF-8 name: header values must be latin-1 safe."""
    from urllib.parse import quote

    ascii_name = filename.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"


def _data_error_message(filename: str, exc: Any) -> str:
    where = [filename]
    if getattr(exc, "line", None) is not None:
        where.append(f"line {exc.line}")
    if getattr(exc, "field", None):
        where.append(f"field '{exc.field}'")
    return f"{', '.join(where)}: {getattr(exc, 'reason', str(exc))}"


@router.post(
    "/files",
    response_model=FileObject,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "purpose"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "purpose": {"type": "string", "enum": list(PURPOSES)},
                        },
                    }
                }
            },
        }
    },
)
async def upload_file(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> FileObject:
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise APIError(
            415, "Upload as multipart/form-data with fields 'file' and 'purpose'", param="file"
        )
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 1024 * 1024:
        raise APIError(
            413,
            f"File is larger than the upload limit of {limit} bytes (FINEGATES_MAX_UPLOAD_BYTES)",
            param="file",
        )
    file_id = new_id("file-")
    sink = _MultipartSink(storage, f"files/{principal.tenant_id}/{file_id}", limit)
    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": sink.on_part_begin,
            "on_part_data": sink.on_part_data,
            "on_part_end": sink.on_part_end,
            "on_header_field": sink.on_header_field,
            "on_header_value": sink.on_header_value,
            "on_header_end": sink.on_header_end,
            "on_headers_finished": sink.on_headers_finished,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except TooLargeError:
        sink.abort()
        raise APIError(
            413,
            f"File is larger than the upload limit of {limit} bytes (FINEGATES_MAX_UPLOAD_BYTES)",
            param="file",
        ) from None
    except APIError:
        sink.abort()
        raise
    except OSError as exc:
        sink.abort()
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise APIError(
            507,
            "The server has no disk space left for this upload; nothing was stored. Retry later",
            param="file",
            code="insufficient_storage",
        ) from None
    except Exception as exc:  # malformed multipart
        sink.abort()
        raise APIError(400, f"Malformed multipart body: {exc}", param="file") from None

    if sink.blob is None or sink.filename is None:
        sink.abort()
        raise APIError(400, "Missing the 'file' part (multipart/form-data)", param="file")
    purpose = sink.fields.get("purpose")
    if purpose not in PURPOSES:
        sink.abort()
        raise APIError(
            400,
            f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}",
            param="purpose",
        )
    filename, blob = sink.filename, sink.blob
    if blob.size == 0:
        sink.abort()
        raise APIError(
            400, f"{filename}, line 1: the file is empty", param="file", code="invalid_file", line=1
        )

    from core.data import validate_file
    from core.errors import DataError

    try:
        report = await run_in_threadpool(validate_file, storage.path(blob.key))
    except DataError as exc:
        sink.abort()
        raise APIError(
            400,
            _data_error_message(filename, exc),
            param="file",
            code="invalid_file",
            line=exc.line,
            field=exc.field,
        ) from None
    except BaseException:
        sink.abort()
        raise
    rep = report.to_dict()
    row = File(
        id=file_id,
        tenant_id=principal.tenant_id,
        filename=filename,
        purpose=purpose,
        bytes=blob.size,
        sha256=blob.sha256,
        status="processed",
        status_details="; ".join(rep.get("warnings") or []) or None,
        format=rep.get("format"),
        task=rep.get("task"),
        n_rows=rep.get("n_rows"),
        report=rep,
        storage_key=blob.key,
    )

    def _save() -> None:
        # quota check and insert under the tenant's lock: concurrent uploads cannot pass it
        limits = principal.limits or limits_for(session, settings, principal.tenant_id)
        with tenant_lock(session, principal.tenant_id):
            check_storage(session, principal.tenant_id, limits, blob.size)
            session.add(row)
            session.commit()

    try:
        await run_in_threadpool(_save)
    except BaseException:
        sink.abort()
        raise
    return file_object(row)


@router.get("/files", response_model=CountedPage[FileObject])
def list_files(
    principal: PrincipalDep,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    purpose: str | None = None,
) -> dict[str, Any]:
    """Newest first by default; ``count`` is the number of the caller's files (of ``purpose``)."""
    tenant = principal.tenant_id
    where = [File.tenant_id == tenant]
    if purpose:
        where.append(File.purpose == purpose)
    cursor = pagination.cursor_key(
        session, after, File.pk, File.id == after, File.tenant_id == tenant, kind="file"
    )
    page = pagination.paginate(
        session,
        select(File).where(*where),
        File.pk,
        lambda row: file_object(row[0]),
        after=cursor,
        limit=limit,
        descending=order == "desc",
    )
    return {**page, "count": pagination.count(session, select(File.pk).where(*where))}


@router.get("/files/{file_id}", response_model=FileObject)
def get_file(f: OwnedFile) -> FileObject:
    return file_object(f)


@router.get("/files/{file_id}/content", response_class=StreamingResponse)
def get_file_content(f: OwnedFile, storage: StorageDep) -> StreamingResponse:
    path = storage.path(f.storage_key)
    if not path.is_file():
        raise APIError(404, f"The content of file '{f.id}' is missing from storage")

    def _chunks():
        with path.open("rb") as fh:
            while chunk := fh.read(1024 * 1024):
                yield chunk

    return StreamingResponse(
        _chunks(),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(path.stat().st_size),
            "Content-Disposition": _disposition(f.filename),
        },
    )


@router.delete("/files/{file_id}", response_model=DeletedObject)
def delete_file(f: OwnedFile, session: SessionDep, storage: StorageDep) -> DeletedObject:
    busy = session.execute(
        select(Job.id)
        .where(
            Job.tenant_id == f.tenant_id,
            Job.status.in_(list(ACTIVE)),
            (Job.training_file == f.id) | (Job.validation_file == f.id),
        )
        .limit(1)
    ).scalar_one_or_none()
    if busy is not None:
        raise APIError(
            409,
            f"File '{f.id}' is used by job '{busy}', which has not finished; "
            "cancel the job or wait for it to end",
            param="file_id",
            code="file_in_use",
        )
    key = f.storage_key
    session.delete(f)
    session.commit()
    storage.delete(key)
    return DeletedObject(id=f.id, object="file", deleted=True)
