"""Webhooks: what the API stores and what the worker sends (Standard Webhooks signing).

A tenant registers ``POST /v1/webhooks {"url", "events"?}`` and gets a ``whsec_`` secret
once. When one of its jobs ends, the worker's dispatcher (worker/webhooks.py) sends
``{"id", "type", "created_at", "data": {"id": job_id, ...}}`` signed with the
``standardwebhooks`` package (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``
headers), retrying with backoff; every attempt is recorded and listable.

SSRF: a URL whose host resolves to a loopback, private, link-local, multicast or reserved
address is refused, at registration and again before each delivery (DNS can change),
unless FINEGATES_WEBHOOK_ALLOW_PRIVATE=true. No fastapi here: the worker imports it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import secrets
import socket
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

EVENT_TYPES = (
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
)
STATUS_EVENT = {
    "succeeded": "fine_tuning.job.succeeded",
    "failed": "fine_tuning.job.failed",
    "cancelled": "fine_tuning.job.cancelled",
}
# seconds after attempt n (1-based) before the next one: 10 s, 1 min, 5 min, 30 min, 2 h
BACKOFF_S = (10, 60, 300, 1800, 7200)


class WebhookURLError(ValueError):
    """A URL that cannot receive webhooks (why in the message, written for the tenant)."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def check_url(url: str, allow_private: bool) -> None:
    """Raise WebhookURLError unless ``url`` is http(s) to a public address."""
    if len(url) > 2048:
        raise WebhookURLError("url is longer than 2048 characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise WebhookURLError("url must not contain control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookURLError("url must start with https:// (or http://)")
    host = parts.hostname
    if not host:
        raise WebhookURLError("url has no host")
    if parts.username or parts.password:
        raise WebhookURLError("url must not carry a user name or password")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookURLError("url has an invalid port") from None
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise WebhookURLError(f"the host '{host}' does not resolve") from None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if _blocked(ip):
            raise WebhookURLError(
                f"the host '{host}' resolves to a loopback or private address; webhooks go "
                "to public addresses only"
            )


def event_payload(event_id: str, event_type: str, job: Any) -> dict[str, Any]:
    finished = job.finished_at or job.created_at
    data: dict[str, Any] = {"id": job.id, "object": "fine_tuning.job", "status": job.status}
    if job.fine_tuned_model:
        data["fine_tuned_model"] = job.fine_tuned_model
    if job.error_code:
        data["error"] = {"code": job.error_code, "message": job.error_message or ""}
    return {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created_at": int(finished.timestamp()),
        "data": data,
    }


def signed_request(
    secret: str, msg_id: str, payload: dict[str, Any], when: datetime
) -> tuple[str, dict[str, str]]:
    """(body, headers) per Standard Webhooks, signed with the ``standardwebhooks`` package."""
    from standardwebhooks import Webhook

    body = json.dumps(payload, separators=(",", ":"))
    signature = Webhook(secret).sign(msg_id, when, body)
    return body, {
        "content-type": "application/json",
        "user-agent": "FineGates-Webhooks/1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signature,
    }
