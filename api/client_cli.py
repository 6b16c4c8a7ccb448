"""The client commands of ``finegates``: talk to any FineGates server over its REST API.

  files upload PATH                      upload + validate a dataset (prints the file id last)
  jobs create --model ID --training-file FILE_ID [...]   start a job (prints the job id last)
  jobs list | get ID | cancel ID         read or cancel jobs (``--json`` for scripts)
  jobs watch ID                          a live progress bar until the job ends; exit code 0
                                         when it succeeded, 1 when it failed, 2 cancelled
  models download MODEL_ID --output DIR [--format tar|safetensors|onnx]

The server and key come from ``--api-url`` / ``--api-key`` or ``FINEGATES_API_URL`` /
``FINEGATES_API_KEY`` (default URL http://127.0.0.1:8000). Nothing here imports the
server's code: only httpx (requests) and tqdm (the progress bars, on stderr, so that
stdout stays parseable; the id a script wants is always stdout's last line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = {"succeeded", "failed", "cancelled"}
EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 2
CHUNK = 1 << 20


class ClientError(Exception):
    """A refused or failed request, already worded for the user."""


# ----------------------------------------------------------------------------- HTTP
def _client(args: argparse.Namespace) -> Any:
    import httpx

    url = (args.api_url or os.environ.get("FINEGATES_API_URL") or DEFAULT_URL).rstrip("/")
    key = args.api_key or os.environ.get("FINEGATES_API_KEY")
    if not key:
        raise ClientError(
            "no API key: pass --api-key or set FINEGATES_API_KEY (finegates serve prints one "
            "and saves it to <data dir>/local-api-key.txt)"
        )
    base = url if url.endswith("/v1") else url + "/v1"
    return httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(60.0)
    )


def _error_text(resp: Any) -> str:
    try:
        err = resp.json().get("error") or {}
    except ValueError:
        err = {}
    msg = err.get("message") or f"the server answered HTTP {resp.status_code}"
    if err.get("line") is not None and f"line {err['line']}" not in msg:
        msg += f" (line {err['line']})"
    if err.get("param"):
        msg += f" [parameter: {err['param']}]"
    if resp.status_code == 401:
        msg = f"the API key was not accepted: {msg}"
    return msg


def _request(c: Any, method: str, path: str, **kw: Any) -> Any:
    import httpx

    try:
        resp = c.request(method, path, **kw)
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach the server at {c.base_url}: {exc}") from None
    if resp.status_code >= 400:
        raise ClientError(_error_text(resp))
    return resp.json()


def _bar(total: int | None, desc: str, unit: str = "B") -> Any:
    from tqdm import tqdm

    scale = unit == "B"
    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
        file=sys.stderr, dynamic_ncols=True, leave=True,
    )  # fmt: skip


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str, last: str | None = None) -> int:
    """The API's JSON (--json) or the human text, then the id scripts read (last line)."""
    if getattr(args, "json", False):
        _print_json(obj)
    else:
        print(text)
    if last is not None:
        print(last)
    return 0


# ----------------------------------------------------------------------------- files
class _ProgressReader:
    """A file object that advances a progress bar as httpx reads it for the request body."""

    def __init__(self, fh: Any, bar: Any):
        self.fh, self.bar = fh, bar

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.bar.update(len(data))
        return data

    def __getattr__(self, name: str) -> Any:  # seek/tell/name for httpx's length probe
        return getattr(self.fh, name)


def cmd_files_upload(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.is_file():
        raise ClientError(f"{path}: no such file")
    with _client(args) as c, path.open("rb") as fh, _bar(path.stat().st_size, path.name) as bar:
        f = _request(
            c, "POST", "/files", data={"purpose": args.purpose},
            files={"file": (path.name, _ProgressReader(fh, bar), "application/octet-stream")},
        )  # fmt: skip
    rows = f" · {f['n_rows']} rows" if f.get("n_rows") is not None else ""
    text = f"validated {f['filename']}: {f.get('format') or '?'}, task {f.get('task')}{rows}"
    return _emit(args, f, text, last=f["id"])


# ----------------------------------------------------------------------------- jobs
def _hp_value(raw: str) -> Any:
    try:
        return json.loads(raw)  # 0.3, 100, true, null, "x", [..]
    except json.JSONDecodeError:
        return raw


def cmd_jobs_create(args: argparse.Namespace) -> int:
    hp: dict[str, Any] = {}
    for item in args.hp or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ClientError(f"--hp {item!r}: expected NAME=VALUE, e.g. --hp target_sparsity=0.3")
        hp[name.strip()] = _hp_value(value.strip())
    fg: dict[str, Any] = {"hyperparameters": hp}
    if args.task:
        fg["task"] = args.task
    body: dict[str, Any] = {
        "model": args.model,
        "training_file": args.training_file,
        "method": {"type": "finegates", "finegates": fg},
    }
    if args.validation_file:
        body["validation_file"] = args.validation_file
    if args.suffix:
        body["suffix"] = args.suffix
    with _client(args) as c:
        job = _request(c, "POST", "/fine_tuning/jobs", json=body)
    text = f"created {job['id']} ({job['task']} on {job['model']}): {job['status']}"
    return _emit(args, job, text, last=job["id"])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ts(t: int | None) -> str:
    return "-" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _progress_text(j: dict[str, Any]) -> str:
    p = j.get("progress") or {}
    if not p.get("total_steps"):
        return "-"
    eta = f", eta {p['eta_seconds']}s" if p.get("eta_seconds") is not None else ""
    return f"{p['step']}/{p['total_steps']} ({p.get('percent') or 0:.0f}%{eta})"


def cmd_jobs_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    with _client(args) as c:
        page = _request(c, "GET", "/fine_tuning/jobs", params=params)
    if args.json:
        _print_json(page)
        return 0
    if not page["data"]:
        print("no jobs yet (finegates jobs create ...)")
        return 0
    head = ("ID", "STATUS", "MODEL", "PROGRESS", "SPARSITY T/M", "CREATED")
    rows = [
        (j["id"], j["status"], j["model"], _progress_text(j),
         f"{_pct(j['sparsity']['target'])}/{_pct(j['sparsity']['measured'])}", _ts(j["created_at"]))
        for j in page["data"]
    ]  # fmt: skip
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _describe_job(j: dict[str, Any]) -> list[str]:
    lines = [
        f"{j['id']}  {j['status']}",
        f"  model        {j['model']} ({j['task']})",
        f"  progress     {_progress_text(j)}",
        f"  sparsity     target {_pct(j['sparsity']['target'])}, "
        f"measured {_pct(j['sparsity']['measured'])}",
        f"  created      {_ts(j['created_at'])}   finished {_ts(j.get('finished_at'))}",
    ]
    if j.get("queue_position") is not None:
        lines.append(f"  queue        #{j['queue_position']}")
    if j.get("fine_tuned_model"):
        lines.append(f"  model id     {j['fine_tuned_model']}")
    if j.get("error"):
        e = j["error"]
        param = f" (parameter {e['param']})" if e.get("param") else ""
        lines.append(f"  error        [{e.get('code')}] {e.get('message')}{param}")
    return lines


def cmd_jobs_get(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = _request(c, "GET", f"/fine_tuning/jobs/{args.job_id}")
    return _emit(args, job, "\n".join(_describe_job(job)))


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = _request(c, "POST", f"/fine_tuning/jobs/{args.job_id}/cancel")
    requested = " (cancel requested)" if job.get("cancel_requested") else ""
    return _emit(args, job, f"{job['id']}: {job['status']}{requested}")


def _summary_lines(c: Any, job: dict[str, Any]) -> list[str]:
    """The compression summary: the model's report, else the job's compression block."""
    model = job.get("fine_tuned_model")
    lines = [f"fine-tuned model: {model}"]
    try:
        r = _request(c, "GET", f"/models/{model}/report")
    except ClientError:
        r = {}
    comp = {**(job.get("compression") or {}), **{k: v for k, v in r.items() if v is not None}}
    if comp.get("params_before") and comp.get("params_after"):
        lines.append(
            f"parameters: {comp['params_before']:,} -> {comp['params_after']:,}"
            + (f" ({_pct(comp.get('params_removed_fraction'))} removed)" if comp.get("params_removed_fraction") is not None else "")
        )  # fmt: skip
    if comp.get("gated_removed_fraction") is not None:
        lines.append(f"gated weights removed: {_pct(comp['gated_removed_fraction'])}")
    sizes = comp.get("file_sizes") or {}
    if sizes.get("model.safetensors"):
        dense = sizes.get("dense_fp32_estimate")
        lines.append(
            f"model.safetensors: {sizes['model.safetensors'] / 1e6:.2f} MB"
            + (f" (dense fp32 {dense / 1e6:.2f} MB)" if dense else "")
        )
    for row in comp.get("latency") or []:
        lines.append(
            f"latency {row['backend']} batch {row['batch']} x {row['seq_len']}: dense "
            f"{row['dense_ms']:.2f} ms, pruned {row['pruned_ms']:.2f} ms "
            f"({row['ratio']:.2f}x; FLOP-ideal {row['flop_ideal_ratio']:.2f}x)"
        )
    if len(lines) == 1 and comp:
        lines += [f"{k}: {v}" for k, v in sorted(comp.items()) if not isinstance(v, dict | list)]
    return lines


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    """Poll the job (and its new metric points, by cursor) until it ends."""
    after: str | None = None
    last: dict[str, Any] = {}
    bar = None
    try:
        with _client(args) as c:
            while True:
                job = _request(c, "GET", f"/fine_tuning/jobs/{args.job_id}")
                while True:  # only the points after the last one seen
                    params: dict[str, Any] = {"limit": 1000}
                    if after:
                        params["after"] = after
                    page = _request(
                        c, "GET", f"/fine_tuning/jobs/{args.job_id}/metrics", params=params
                    )
                    for p in page["data"]:
                        if p["kind"] == "train" and p.get("loss") is not None:
                            last["loss"] = f"{p['loss']:.4f}"
                        if p["kind"] == "eval":
                            m = {
                                k: v
                                for k, v in (p.get("metrics") or {}).items()
                                if isinstance(v, int | float) and k != "eval_loss"
                            }
                            if m:
                                name = sorted(m)[0]
                                last[name] = f"{m[name]:.4f}"
                    if page["data"]:
                        after = page["data"][-1]["id"]
                    if not page.get("has_more"):
                        break
                prog = job.get("progress") or {}
                if bar is None and prog.get("total_steps"):
                    bar = _bar(prog["total_steps"], job["id"], unit="step")
                if bar is not None:
                    bar.update(max(0, int(prog.get("step") or 0) - bar.n))
                    post = dict(last)
                    post["sparsity"] = _pct(job["sparsity"]["measured"])
                    if prog.get("eta_seconds") is not None:
                        post["eta"] = f"{prog['eta_seconds']}s"
                    post["status"] = job["status"]
                    bar.set_postfix(post, refresh=True)
                elif not args.quiet:
                    print(f"{job['id']}: {job['status']}"
                          + (f" (queue #{job['queue_position']})" if job.get("queue_position") else ""),
                          file=sys.stderr)  # fmt: skip
                if job["status"] in TERMINAL:
                    break
                time.sleep(args.interval)
            if bar is not None:
                bar.close()
                bar = None
            print(f"{job['id']}: {job['status']}")
            if job["status"] == "succeeded":
                print("\n".join(_summary_lines(c, job)))
                return EXIT_OK
    finally:
        if bar is not None:
            bar.close()
    err = job.get("error") or {}
    if job["status"] == "failed":
        print(f"error [{err.get('code')}]: {err.get('message')}", file=sys.stderr)
        return EXIT_FAILED
    print("the job was cancelled", file=sys.stderr)
    return EXIT_CANCELLED


# ----------------------------------------------------------------------------- models
def cmd_models_download(args: argparse.Namespace) -> int:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    import httpx

    name = {"tar": "artifact.tar", "safetensors": "model.safetensors", "onnx": "model.onnx"}
    dest = out / name[args.format]
    with _client(args) as c:
        try:
            with c.stream(
                "GET", f"/models/{args.model_id}/artifact", params={"format": args.format}
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise ClientError(_error_text(resp))
                _save_stream(resp, out, dest, args)
        except httpx.HTTPError as exc:
            raise ClientError(f"the download from {c.base_url} failed: {exc}") from None
    print(f"saved {args.model_id} ({args.format}) to {out}")
    print(str(out if args.format == "tar" else dest))
    return 0


def _save_stream(resp: Any, out: Path, dest: Path, args: argparse.Namespace) -> None:
    """Body -> a temporary file beside the destination (never a half-written file under
    its real name) -> extracted (tar) or renamed into place."""
    total = int(resp.headers.get("content-length") or 0) or None
    fd, tmp = tempfile.mkstemp(prefix=".download-", dir=out)
    try:
        with os.fdopen(fd, "wb") as fh, _bar(total, f"{args.model_id} ({args.format})") as bar:
            for chunk in resp.iter_bytes(CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
        if args.format == "tar":
            with tarfile.open(tmp) as tar:
                tar.extractall(out, filter="data")
        else:
            os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- parser
def _wrap(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED

    return run


def _common(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument(
        "--api-url", default=None, help=f"server URL (FINEGATES_API_URL; default {DEFAULT_URL})"
    )
    p.add_argument("--api-key", default=None, help="API key (FINEGATES_API_KEY)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the API's JSON instead")


def register(subparsers: Any, models_subparsers: Any) -> None:
    """Add ``files`` and ``jobs`` to ``subparsers`` and ``download`` to ``models``."""
    sp = subparsers.add_parser("files", help="datasets on a FineGates server (client)")
    fsub = sp.add_subparsers(dest="files_command", metavar="COMMAND", required=True)
    p = fsub.add_parser("upload", help="upload and validate a dataset; prints its id last")
    p.add_argument("path")
    p.add_argument("--purpose", default="fine-tune")
    _common(p)
    p.set_defaults(func=_wrap(cmd_files_upload))

    sp = subparsers.add_parser("jobs", help="fine-tuning jobs on a FineGates server (client)")
    jsub = sp.add_subparsers(dest="jobs_command", metavar="COMMAND", required=True)
    p = jsub.add_parser("create", help="start a job; prints its id last")
    p.add_argument("--model", required=True, help="base model id (e.g. minilm-l6)")
    p.add_argument("--training-file", required=True, help="file id from `files upload`")
    p.add_argument("--validation-file", default=None)
    p.add_argument("--task", default=None, choices=["classification", "causal_lm", "sparsify"])
    p.add_argument("--hp", action="append", metavar="NAME=VALUE",
                   help="a hyperparameter, repeatable: --hp target_sparsity=0.3 --hp max_steps=200")  # fmt: skip
    p.add_argument("--suffix", default=None)
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_create))
    p = jsub.add_parser("list", help="your jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--status", default=None)
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_list))
    for name, func, text in (
        ("get", cmd_jobs_get, "one job"),
        ("cancel", cmd_jobs_cancel, "cancel a job"),
    ):
        p = jsub.add_parser(name, help=text)
        p.add_argument("job_id")
        _common(p)
        p.set_defaults(func=_wrap(func))
    p = jsub.add_parser(
        "watch", help="a live progress bar; exit 0 succeeded, 1 failed, 2 cancelled"
    )
    p.add_argument("job_id")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    p.add_argument("--quiet", action="store_true", help="no status lines while queued")
    _common(p, json_flag=False)
    p.set_defaults(func=_wrap(cmd_jobs_watch))

    p = models_subparsers.add_parser("download", help="download a fine-tuned model (client)")
    p.add_argument("model_id")
    p.add_argument("--output", "-o", required=True, help="folder (the tar is extracted into it)")
    p.add_argument("--format", default="tar", choices=["tar", "safetensors", "onnx"])
    _common(p, json_flag=False)
    p.set_defaults(func=_wrap(cmd_models_download))
