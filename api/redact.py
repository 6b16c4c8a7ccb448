"""What a tenant may see of an internal message: no server paths, hostnames or pids.

Why a scrubber and not only hand-written messages: engine errors (core.errors) are
written for the command line, where naming ``/srv/finegates/.data/storage/files/...`` is
helpful; the same text reaching a tenant through the API or a job's events tells them
the server's layout. ``scrub`` keeps the last part of each absolute path (the file a user
can recognise) and drops the rest. No fastapi imports: the worker uses it too.
"""

from __future__ import annotations

import re
import secrets
import socket

# An absolute POSIX path of two or more parts that does not continue a URL or a word
# (http://host/x and owner/name hub ids are left alone), or a Windows drive path.
_POSIX_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"`()<>\[\]{},;:/]+/)+[^\s'\"`()<>\[\]{},;:/]*")
_WIN_PATH = re.compile(r"\b[A-Za-z]:\\(?:[^\s'\"`<>|\\]+\\)*[^\s'\"`<>|\\]*")


def _last_part(m: re.Match[str]) -> str:
    text = m.group(0).rstrip("/\\")
    name = re.split(r"[/\\]", text)[-1]
    return name or "<path>"


def scrub(text: str | None) -> str:
    """``text`` with every absolute path cut to its last part and this host's name removed."""
    if not text:
        return text or ""
    out = _WIN_PATH.sub(_last_part, _POSIX_PATH.sub(_last_part, text))
    host = socket.gethostname()
    if host and len(host) >= 3:
        out = out.replace(host, "<host>")
    return out


def reference_id() -> str:
    """A correlation id for an internal error: in the tenant's message and the server log."""
    return "err_" + secrets.token_hex(8)


def internal_error_message(ref: str, what: str = "processing your request") -> str:
    return (
        f"The server had an internal error while {what} (reference {ref}); the details are "
        "in the server log under that reference."
    )
