"""Dataset readers (JSONL and CSV) that validate before anything trains.

Why so strict: a job that fails after an hour on line 40,213 is the worst experience a
hosted service can give (users.md: "errors say what is wrong and where"). Every problem
found here raises ``DataError`` with the file, the 1-based line and the field.

Formats (one record per line / row):
- classification: {"text", "label"} or {"text", "text_pair", "label"}; string or int
  labels are classes, float labels mean regression.
- causal LM: {"messages": [{"role", "content"}, ...]} (chat template), {"prompt",
  "completion"} or {"text"}.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DataError

MAX_LINE_BYTES = 2 * 1024 * 1024
MAX_ROWS = 1_000_000
MAX_FILE_BYTES = 2 * 1024**3
ROLES = ("system", "user", "assistant", "tool")

# kinds of records
KIND_LABEL = "text_label"
KIND_PAIR = "text_pair_label"
KIND_CHAT = "messages"
KIND_PC = "prompt_completion"
KIND_TEXT = "text"
LM_KINDS = (KIND_CHAT, KIND_PC, KIND_TEXT)


@dataclass
class FileReport:
    """What validate_file found; the service stores it with the uploaded file."""

    format: str  # "jsonl" | "csv"
    task: str  # "classification" | "causal_lm" | "sparsify"
    kind: str  # text_label | text_pair_label | messages | prompt_completion | text
    n_rows: int
    columns: list[str]
    labels: list[str] | None = None  # class names (sorted) for classification
    problem_type: str | None = None  # "single_label_classification" | "regression"
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedData:
    report: FileReport
    records: list[dict[str, Any]]


# ----------------------------------------------------------------------------- reading
def _detect_format(path: Path) -> str:
    suf = path.suffix.lower()
    if suf in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suf in (".csv", ".tsv"):
        return "csv"
    # sniff: JSONL lines start with "{"
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    return "jsonl" if head.startswith(b"{") else "csv"


def _raw_lines(fh: Any, path: Path, max_line_bytes: int):
    """(line_no, bytes) of a binary file, never reading more than one line's limit: a
    file without newlines cannot make validation hold the whole file."""
    line_no = 0
    while True:
        raw = fh.readline(max_line_bytes + 3)
        if not raw:
            return
        line_no += 1
        if len(raw.rstrip(b"\r\n")) > max_line_bytes:
            raise DataError(
                f"line is over the {max_line_bytes}-byte limit", file=str(path), line=line_no
            )
        yield line_no, raw


def _iter_jsonl(path: Path, max_line_bytes: int, max_rows: int):
    """Yield (line_no, dict); blank lines are skipped."""
    n = 0
    with open(path, "rb") as fh:
        for line_no, raw in _raw_lines(fh, path, max_line_bytes):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                    file=str(path), line=line_no,
                ) from None  # fmt: skip
            if line_no == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"malformed JSON: {exc.msg} at column {exc.colno}", file=str(path), line=line_no
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"each line must be a JSON object, got {type(obj).__name__}",
                    file=str(path), line=line_no,
                )  # fmt: skip
            n += 1
            if n > max_rows:
                raise DataError(
                    f"more than {max_rows} rows (the row limit)", file=str(path), line=line_no
                )
            yield line_no, obj


def _csv_lines(path: Path, max_line_bytes: int):
    """Decoded lines, read one at a time (memory does not grow with the file).

    Lines keep their endings (what csv.reader wants); a lone CR also ends a line, as it
    does for text read with newline="". Each line is length-checked and decoded on its
    own, so an error names its physical line."""
    with open(path, "rb") as fh:
        for line_no, raw in _raw_lines(fh, path, max_line_bytes):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})", file=str(path), line=line_no
                ) from None
            if "\r" in text.rstrip("\r\n"):
                yield from io.StringIO(text, newline="")
            else:
                yield text


def _iter_csv(path: Path, max_line_bytes: int, max_rows: int):
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    # csv's default field limit (128 KiB) is below the documented line limit; a long
    # but legal field must not read as "malformed CSV". (Process-wide; only ever raised.)
    if csv.field_size_limit() < max_line_bytes:
        csv.field_size_limit(max_line_bytes)
    reader = csv.reader(_csv_lines(path, max_line_bytes), delimiter=delim, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError("file is empty", file=str(path), line=1) from None
    except csv.Error as exc:
        raise DataError(f"malformed CSV: {exc}", file=str(path), line=1) from None
    header = [h.strip() for h in header]
    if len(set(header)) != len(header) or any(not h for h in header):
        raise DataError(f"CSV header has empty or repeated column names: {header}",
                        file=str(path), line=1)  # fmt: skip
    n = 0
    while True:
        # errors name the line a record STARTS on (line_num is its last line when a
        # quoted field spans several lines)
        line_no = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"malformed CSV: {exc}", file=str(path), line=line_no) from None
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(
                f"expected {len(header)} columns ({', '.join(header)}), got {len(row)}",
                file=str(path), line=line_no,
            )  # fmt: skip
        n += 1
        if n > max_rows:
            raise DataError(f"more than {max_rows} rows (the row limit)", file=str(path),
                            line=line_no)  # fmt: skip
        yield line_no, dict(zip(header, row, strict=True))


# ----------------------------------------------------------------------------- checking
def _kind_of(obj: dict, cols: dict[str, str]) -> str | None:
    if "messages" in obj:
        return KIND_CHAT
    if "prompt" in obj and "completion" in obj:
        return KIND_PC
    if cols["text"] in obj and cols["label"] in obj:
        return KIND_PAIR if cols["text_pair"] in obj else KIND_LABEL
    if cols["text"] in obj:
        return KIND_TEXT
    return None


def _need_text(obj: dict, key: str, path: Path, line: int) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise DataError(f"must be a string, got {type(v).__name__}", file=str(path), line=line,
                        field=key)  # fmt: skip
    if not v.strip():
        raise DataError("is empty", file=str(path), line=line, field=key)
    return v


def _check_messages(obj: dict, path: Path, line: int) -> list[dict]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError("must be a non-empty list of {role, content} objects", file=str(path),
                        line=line, field="messages")  # fmt: skip
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError("must be an object with role and content", file=str(path),
                            line=line, field=where)  # fmt: skip
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"role must be one of {', '.join(ROLES)}, got {role!r}",
                            file=str(path), line=line, field=f"{where}.role")  # fmt: skip
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(f"must be a string, got {type(content).__name__}", file=str(path),
                            line=line, field=f"{where}.content")  # fmt: skip
        if role == "assistant" and not content.strip():
            raise DataError("assistant content is empty", file=str(path), line=line,
                            field=f"{where}.content")  # fmt: skip
        weight = m.get("weight", 1)
        if role == "assistant" and weight not in (0, 1):
            raise DataError(f"weight must be 0 or 1, got {weight!r}", file=str(path), line=line,
                            field=f"{where}.weight")  # fmt: skip
        msg = {"role": role, "content": content}
        if role == "assistant":
            msg["weight"] = int(weight)
        out.append(msg)
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in out):
        raise DataError("needs at least one assistant message to learn from", file=str(path),
                        line=line, field="messages")  # fmt: skip
    return out


def _label_value(v: Any, fmt: str, path: Path, line: int, key: str) -> str | int | float:
    if fmt == "csv":
        s = str(v).strip()
        if not s:
            raise DataError("label is empty", file=str(path), line=line, field=key)
        try:
            return int(s)
        except ValueError:
            pass
        try:
            f = float(s)
            if math.isfinite(f):
                return f
        except ValueError:
            pass
        return s
    if v is None or isinstance(v, bool) or not isinstance(v, str | int | float):
        raise DataError(f"label must be a string, integer or float, got {json.dumps(v)}",
                        file=str(path), line=line, field=key)  # fmt: skip
    if isinstance(v, float) and not math.isfinite(v):
        raise DataError(f"label must be finite, got {v}", file=str(path), line=line, field=key)
    if isinstance(v, str) and not v.strip():
        raise DataError("label is empty", file=str(path), line=line, field=key)
    return v


MAX_CLASSES = 10_000


def _scan(
    path: Path | str,
    task: str | None,
    keep: list[dict[str, Any]] | None,
    *,
    text_column: str = "text",
    text_pair_column: str = "text_pair",
    label_column: str = "label",
    max_line_bytes: int = MAX_LINE_BYTES,
    max_rows: int = MAX_ROWS,
) -> FileReport:
    """Read and check every record, one at a time; append the normalised ones to
    ``keep`` (None: keep nothing, so peak memory does not grow with the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    size = path.stat().st_size
    if size == 0:
        raise DataError("file is empty", file=str(path))
    if size > MAX_FILE_BYTES:
        raise DataError(f"file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit",
                        file=str(path))  # fmt: skip
    if task is not None and task not in ("classification", "causal_lm", "sparsify"):
        raise DataError(f"unknown task {task!r}", file=str(path))
    fmt = _detect_format(path)
    cols = {"text": text_column, "text_pair": text_pair_column, "label": label_column}
    rows = (_iter_jsonl if fmt == "jsonl" else _iter_csv)(path, max_line_bytes, max_rows)
    n_records = 0
    kind: str | None = None
    first_line = 0
    label_types: set[str] = set()
    first_label_line: dict[str, int] = {}
    classes: set[str] = set()  # distinct non-float labels (bounded by MAX_CLASSES)
    columns: list[str] = []
    warnings: list[str] = []
    for line, obj in rows:
        k = _kind_of(obj, cols)
        if k is None:
            raise DataError(
                f"unrecognised record with keys {sorted(obj)}; expected {{{text_column!r}, "
                f"{label_column!r}}}, {{'messages'}}, {{'prompt', 'completion'}} or "
                f"{{{text_column!r}}}",
                file=str(path), line=line,
            )  # fmt: skip
        if kind is None:
            kind, first_line, columns = k, line, sorted(obj)
            if task == "classification" and kind in LM_KINDS:
                raise DataError(
                    f"task is classification but the record has no {label_column!r} field",
                    file=str(path), line=line, field=label_column,
                )  # fmt: skip
            if task in ("causal_lm", "sparsify") and kind in (KIND_LABEL, KIND_PAIR):
                # An LM task may read text+label files as plain text.
                kind = KIND_TEXT
        elif k != kind and not (kind == KIND_TEXT and k in (KIND_LABEL, KIND_PAIR)):
            raise DataError(
                f"record format '{k}' differs from the file's format '{kind}' (set by line "
                f"{first_line})",
                file=str(path), line=line,
            )  # fmt: skip
        rec: dict[str, Any]
        if kind == KIND_CHAT:
            rec = {"messages": _check_messages(obj, path, line)}
        elif kind == KIND_PC:
            prompt = obj.get("prompt")
            if not isinstance(prompt, str):
                raise DataError("must be a string", file=str(path), line=line, field="prompt")
            rec = {"prompt": prompt, "completion": _need_text(obj, "completion", path, line)}
        elif kind == KIND_TEXT:
            rec = {"text": _need_text(obj, text_column, path, line)}
        else:
            rec = {"text": _need_text(obj, text_column, path, line)}
            if kind == KIND_PAIR:
                rec["text_pair"] = _need_text(obj, text_pair_column, path, line)
            lab = _label_value(obj.get(label_column), fmt, path, line, label_column)
            t = "float" if isinstance(lab, float) else "int" if isinstance(lab, int) else "str"
            label_types.add(t)
            first_label_line.setdefault(t, line)
            if "str" in label_types and len(label_types) > 1:
                other = min(first_label_line[x] for x in label_types if x != "str")
                raise DataError(
                    f"mixed label types: strings and numbers (first number on line {other}, "
                    f"first string on line {first_label_line['str']})",
                    file=str(path), line=line, field=label_column,
                )  # fmt: skip
            if "float" not in label_types:
                classes.add(str(lab))
                if len(classes) > MAX_CLASSES:
                    raise DataError(
                        f"more than {MAX_CLASSES} distinct labels; use float labels for "
                        "regression",
                        file=str(path), line=line, field=label_column,
                    )  # fmt: skip
            rec["label"] = lab
            rec["_line"] = line
        n_records += 1
        if keep is not None:
            keep.append(rec)
    if n_records == 0:
        raise DataError("file has no records", file=str(path))
    assert kind is not None
    if task is None:
        task = "classification" if kind in (KIND_LABEL, KIND_PAIR) else "causal_lm"
    labels: list[str] | None = None
    problem_type: str | None = None
    if kind in (KIND_LABEL, KIND_PAIR):
        if "float" in label_types:
            problem_type = "regression"
        else:
            problem_type = "single_label_classification"
            labels = sorted(classes, key=int) if "int" in label_types else sorted(classes)
            if len(labels) < 2:
                warnings.append(f"only one class ({labels[0]!r}) in this file")
    if n_records < 10:
        warnings.append(f"only {n_records} rows; results will be noisy")
    return FileReport(
        format=fmt,
        task=task,
        kind=kind,
        n_rows=n_records,
        columns=columns,
        labels=labels,
        problem_type=problem_type,
        warnings=warnings,
    )


def load_records(
    path: Path | str,
    task: str | None = None,
    *,
    text_column: str = "text",
    text_pair_column: str = "text_pair",
    label_column: str = "label",
    max_line_bytes: int = MAX_LINE_BYTES,
    max_rows: int = MAX_ROWS,
) -> LoadedData:
    """Read, check and normalise every record; the first problem raises DataError.

    Normalised records: classification {"text", ["text_pair"], "label", "_line"}; chat
    {"messages"}; prompt/completion {"prompt", "completion"}; text {"text"}.
    """
    records: list[dict[str, Any]] = []
    report = _scan(
        path, task, records, text_column=text_column, text_pair_column=text_pair_column,
        label_column=label_column, max_line_bytes=max_line_bytes, max_rows=max_rows,
    )  # fmt: skip
    if report.problem_type == "regression":
        for r in records:
            r["label"] = float(r["label"])
    elif report.problem_type is not None:
        for r in records:
            r["label"] = str(r["label"])
    return LoadedData(report=report, records=records)


def validate_file(path: Path | str, task: str | None = None, **columns: Any) -> FileReport:
    """Check a dataset file end to end and describe it (used by the service on upload);
    ``columns``: load_records' keyword options.

    Streaming: records are checked one at a time and not kept, so the extra memory is
    one line plus the set of class names, whatever the file's size
    (bench/bench_limits.py measures it)."""
    return _scan(path, task, None, **columns)


def split_validation(
    records: list[dict[str, Any]],
    fraction: float = 0.1,
    max_rows: int = 1000,
    seed: int = 1948,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Carve a seeded validation set out of the training records (train, val).

    At least one record stays on each side when there are two or more records; with a
    single record, it is used for both (a toy run must still evaluate).
    """
    n = len(records)
    if fraction <= 0:
        return list(records), []
    if n < 2:
        return list(records), list(records)
    n_val = min(max_rows, max(1, int(round(n * fraction))), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [records[i] for i in sorted(val_idx)]
    return train, val
