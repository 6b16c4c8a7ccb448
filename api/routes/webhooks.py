"""/v1/webhooks: register, list, get, delete an endpoint; list its delivery attempts.

The secret (``whsec_...``) is returned once, by the create call; receivers verify each
delivery with it (Standard Webhooks; e.g. ``standardwebhooks.Webhook(secret).verify``).
Deliveries are made by the worker (worker/webhooks.py), never by the API process.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from api.db.models import Webhook, WebhookDelivery, new_id
from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.errors import APIError, not_found
from api.limits import tenant_lock
from api.webhooks import EVENT_TYPES, WebhookURLError, check_url, new_secret

router = APIRouter(tags=["webhooks"])

EventType = Literal[
    "fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"
]
MAX_WEBHOOKS_PER_TENANT = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WebhookCreate(_Strict):
    url: str = Field(min_length=1, max_length=2048)
    events: list[EventType] | None = Field(None, min_length=1, max_length=len(EVENT_TYPES))


class WebhookObject(_Strict):
    id: str
    object: Literal["webhook"] = "webhook"
    url: str
    events: list[str]
    created_at: int
    secret: str | None = None  # only in the answer to the create call


class WebhookList(_Strict):
    object: Literal["list"] = "list"
    data: list[WebhookObject]


class DeliveryAttempt(_Strict):
    at: int
    status_code: int | None = None
    error: str | None = None
    duration_ms: int | None = None


class DeliveryObject(_Strict):
    id: str
    object: Literal["webhook.delivery"] = "webhook.delivery"
    webhook_id: str
    job_id: str
    type: str
    status: Literal["pending", "delivered", "failed"]
    created_at: int
    next_attempt_at: int | None = None
    attempts: list[DeliveryAttempt]
    payload: dict[str, Any]


class DeliveryList(_Strict):
    object: Literal["list"] = "list"
    data: list[DeliveryObject]


class WebhookDeleted(_Strict):
    id: str
    object: Literal["webhook"] = "webhook"
    deleted: bool


def _obj(w: Webhook, secret: str | None = None) -> WebhookObject:
    return WebhookObject(
        id=w.id,
        url=w.url,
        events=list(w.events),
        created_at=int(w.created_at.timestamp()),
        secret=secret,
    )


def get_owned_webhook(
    webhook_id: Annotated[str, Path(max_length=64)], principal: PrincipalDep, session: SessionDep
) -> Webhook:
    w = session.execute(
        select(Webhook).where(Webhook.id == webhook_id, Webhook.tenant_id == principal.tenant_id)
    ).scalar_one_or_none()
    if w is None:
        raise not_found("webhook", webhook_id)
    return w


OwnedWebhook = Annotated[Webhook, Depends(get_owned_webhook)]


@router.post("/webhooks", response_model=WebhookObject)
def create_webhook(
    body: WebhookCreate, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> WebhookObject:
    """Register an endpoint for job-end events; the answer carries the secret, once."""
    try:
        check_url(body.url, settings.webhook_allow_private)  # resolves DNS: a sync route
    except WebhookURLError as exc:
        raise APIError(400, str(exc), param="url", code="invalid_webhook_url") from None
    secret = new_secret()
    w = Webhook(
        id=new_id("wh_"),
        tenant_id=principal.tenant_id,
        url=body.url,
        events=list(dict.fromkeys(body.events or EVENT_TYPES)),
        secret=secret,
    )
    with tenant_lock(session, principal.tenant_id):
        n = session.execute(
            select(func.count()).select_from(Webhook).where(Webhook.tenant_id == w.tenant_id)
        ).scalar_one()
        if n >= MAX_WEBHOOKS_PER_TENANT:
            raise APIError(
                429,
                f"You have {n} webhooks (limit {MAX_WEBHOOKS_PER_TENANT}); delete one first",
                code="too_many_webhooks",
            )
        session.add(w)
        session.commit()
    return _obj(w, secret)


@router.get("/webhooks", response_model=WebhookList)
def list_webhooks(principal: PrincipalDep, session: SessionDep) -> WebhookList:
    rows = session.execute(
        select(Webhook).where(Webhook.tenant_id == principal.tenant_id).order_by(Webhook.pk)
    ).scalars()
    return WebhookList(data=[_obj(w) for w in rows])


@router.get("/webhooks/{webhook_id}", response_model=WebhookObject)
def get_webhook(w: OwnedWebhook) -> WebhookObject:
    return _obj(w)


@router.delete("/webhooks/{webhook_id}", response_model=WebhookDeleted)
def delete_webhook(w: OwnedWebhook, session: SessionDep) -> WebhookDeleted:
    session.delete(w)
    session.commit()
    return WebhookDeleted(id=w.id, deleted=True)


@router.get("/webhooks/{webhook_id}/deliveries", response_model=DeliveryList)
def list_deliveries(w: OwnedWebhook, session: SessionDep) -> DeliveryList:
    """Newest first (the last 100): every attempt with its time, HTTP status or error."""
    rows = session.execute(
        select(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == w.id, WebhookDelivery.status != "skipped")
        .order_by(WebhookDelivery.pk.desc())
        .limit(100)
    ).scalars()
    return DeliveryList(
        data=[
            DeliveryObject(
                id=d.id,
                webhook_id=d.webhook_id,
                job_id=d.job_id,
                type=d.type,
                status=d.status,  # type: ignore[arg-type]
                created_at=int(d.created_at.timestamp()),
                next_attempt_at=int(d.next_attempt_at.timestamp()) if d.next_attempt_at else None,
                attempts=[DeliveryAttempt(**a) for a in d.attempts or []],
                payload=d.payload,
            )
            for d in rows
        ]
    )
