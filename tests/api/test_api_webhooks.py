"""Webhooks: registered through the API, delivered by the worker's dispatcher to a real
local HTTP server, verified there with the secret (Standard Webhooks), retried."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select, update

from api.db.models import WebhookDelivery, utcnow
from tests.support.api import cls_bytes, job_body, succeed_job, upload


class Receiver:
    """A local endpoint: answers the statuses in ``answers`` in turn (then 200)."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers = list(answers or [])
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"headers": dict(self.headers), "body": body.decode()})
                code = outer.answers.pop(0) if outer.answers else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver(answers=[500])
    yield r
    r.close()


def _job(client, h) -> str:
    fid = upload(client, h, cls_bytes(6)).json()["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=h, json=job_body(fid))
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_a_webhook_is_signed_delivered_retried_and_listed(
    client, make_headers, app, sessions, receiver, tmp_path
):
    from standardwebhooks import Webhook

    from worker.webhooks import dispatch_once

    settings = app.state.settings
    settings.webhook_allow_private = True  # the receiver is on loopback
    h = make_headers("hooks")
    r = client.post("/v1/webhooks", headers=h, json={"url": receiver.url})
    assert r.status_code == 200, r.text
    hook = r.json()
    assert hook["id"].startswith("wh_") and hook["url"] == receiver.url
    assert hook["secret"].startswith("whsec_")
    assert set(hook["events"]) == {
        "fine_tuning.job.succeeded",
        "fine_tuning.job.failed",
        "fine_tuning.job.cancelled",
    }
    # the secret is shown once
    assert client.get(f"/v1/webhooks/{hook['id']}", headers=h).json()["secret"] is None
    assert [w["secret"] for w in client.get("/v1/webhooks", headers=h).json()["data"]] == [None]

    done = _job(client, h)
    succeed_job(sessions, done, "ft:minilm-l6:hooks:x", str(tmp_path / "art"))
    cancelled = _job(client, h)
    assert client.post(f"/v1/fine_tuning/jobs/{cancelled}/cancel", headers=h).status_code == 200
    _job(client, h)  # still queued: no event

    assert dispatch_once(settings, sessions) == 2
    assert len(receiver.requests) == 2  # the first answer was a 500
    with sessions() as s:  # make the retry due now instead of in 10 s
        s.execute(update(WebhookDelivery).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    assert dispatch_once(settings, sessions) == 1  # only the failed one is retried
    assert dispatch_once(settings, sessions) == 0  # nothing left to send

    verifier = Webhook(hook["secret"])
    events = {}
    for req in receiver.requests:
        headers = {k.lower(): v for k, v in req["headers"].items()}
        assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(headers)
        payload = verifier.verify(req["body"], headers)  # raises if the signature is wrong
        assert payload["id"] == headers["webhook-id"]
        events.setdefault(payload["data"]["id"], []).append(payload)
    assert set(events) == {done, cancelled}
    assert events[done][0]["type"] == "fine_tuning.job.succeeded"
    assert events[done][0]["data"]["fine_tuned_model"] == "ft:minilm-l6:hooks:x"
    assert events[cancelled][0]["type"] == "fine_tuning.job.cancelled"
    assert isinstance(events[done][0]["created_at"], int)
    # a retry is the same message (same id, same body)
    retried = [p for p in events.values() if len(p) == 2]
    assert len(retried) == 1 and retried[0][0] == retried[0][1]
    # a tampered body does not verify
    from standardwebhooks.webhooks import WebhookVerificationError

    req = receiver.requests[0]
    with pytest.raises(WebhookVerificationError):
        verifier.verify(
            req["body"].replace("job", "jab"), {k.lower(): v for k, v in req["headers"].items()}
        )

    listed = client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=h).json()["data"]
    assert len(listed) == 2 and {d["status"] for d in listed} == {"delivered"}
    codes = sorted([a["status_code"] for a in d["attempts"]] for d in listed)
    assert codes == [[200], [500, 200]]


def test_only_subscribed_events_are_sent(client, make_headers, app, sessions, tmp_path):
    from worker.webhooks import dispatch_once

    app.state.settings.webhook_allow_private = True
    rec = Receiver()
    try:
        h = make_headers("hooks-sub")
        body = {"url": rec.url, "events": ["fine_tuning.job.failed"]}
        hook = client.post("/v1/webhooks", headers=h, json=body).json()
        done = _job(client, h)
        succeed_job(sessions, done, "ft:minilm-l6:sub:x", str(tmp_path / "a"))
        assert dispatch_once(app.state.settings, sessions) == 0
        assert dispatch_once(app.state.settings, sessions) == 0
        assert rec.requests == []
        assert client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=h).json()["data"] == []
    finally:
        rec.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x",
        "ftp://example.com/x",
        "http://user:pw@example.com/x",
    ],
)
def test_private_and_odd_urls_are_refused(client, make_headers, url):
    h = make_headers("hooks-ssrf")
    r = client.post("/v1/webhooks", headers=h, json={"url": url})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_webhook_url" and err["param"] == "url"


def test_webhooks_are_tenant_scoped_and_deletable(client, make_headers, app):
    app.state.settings.webhook_allow_private = True
    ha, hb = make_headers("hooks-a"), make_headers("hooks-b")
    hook = client.post("/v1/webhooks", headers=ha, json={"url": "http://127.0.0.1:9/x"}).json()
    assert client.get(f"/v1/webhooks/{hook['id']}", headers=hb).status_code == 404
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=hb).status_code == 404
    assert client.get("/v1/webhooks", headers=hb).json()["data"] == []
    r = client.delete(f"/v1/webhooks/{hook['id']}", headers=ha)
    assert r.status_code == 200 and r.json() == {
        "id": hook["id"],
        "object": "webhook",
        "deleted": True,
    }
    assert client.get(f"/v1/webhooks/{hook['id']}", headers=ha).status_code == 404


def test_delivery_rechecks_the_address(app, client, make_headers, sessions, tmp_path):
    """A hook registered while private addresses were allowed is not sent once they are not."""
    from worker.webhooks import dispatch_once

    settings = app.state.settings
    settings.webhook_allow_private = True
    rec = Receiver()
    try:
        h = make_headers("hooks-rebind")
        hook = client.post("/v1/webhooks", headers=h, json={"url": rec.url}).json()
        done = _job(client, h)
        succeed_job(sessions, done, "ft:minilm-l6:rb:x", str(tmp_path / "a"))
        settings.webhook_allow_private = False
        assert dispatch_once(settings, sessions) == 1
        assert rec.requests == []
        d = client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=h).json()["data"][0]
        assert "private address" in d["attempts"][0]["error"] and d["status"] == "pending"
        with sessions() as s:
            row = s.execute(select(WebhookDelivery)).scalar_one()
            assert row.next_attempt_at > utcnow()
        assert json.dumps(d)  # the listing serialises
    finally:
        rec.close()
