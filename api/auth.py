"""Tenants and API keys.

Keys look like ``fg-<43 url-safe chars>`` (256 random bits). Only their sha256 is stored:
a salt adds nothing for random keys, and sha256 keeps the lookup cheap under polling.
The first 12 characters (``prefix``) find candidate rows and are safe to show; the final
comparison uses ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.db.models import ApiKey, Tenant, new_id

KEY_PREFIX = "fg-"
PREFIX_LEN = 12


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    name = name.strip()
    if not name:
        raise ValueError("tenant name must not be empty")
    tenant = session.execute(select(Tenant).where(Tenant.name == name)).scalar_one_or_none()
    if tenant is not None:
        return tenant
    tenant = Tenant(id=new_id("org-"), name=name)
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError:  # created concurrently
        session.rollback()
        return session.execute(select(Tenant).where(Tenant.name == name)).scalar_one()
    return tenant


def create_api_key(session: Session, tenant_name: str, key_name: str | None = None) -> str:
    """Create the tenant if needed and a new key for it; returns the plaintext (shown once)."""
    tenant = get_or_create_tenant(session, tenant_name)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            id=new_id("key-"),
            tenant_id=tenant.id,
            name=key_name,
            prefix=plaintext[:PREFIX_LEN],
            key_hash=hash_key(plaintext),
        )
    )
    session.commit()
    return plaintext


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str
    # api.limits.TenantLimits, resolved with the key (and cached with it); None in tools
    limits: Any = None


def authenticate(session: Session, plaintext: str) -> Principal | None:
    if not plaintext.startswith(KEY_PREFIX) or len(plaintext) < PREFIX_LEN + 8:
        return None
    digest = hash_key(plaintext)
    rows = session.execute(
        select(ApiKey.id, ApiKey.tenant_id, ApiKey.key_hash).where(
            ApiKey.prefix == plaintext[:PREFIX_LEN], ApiKey.revoked_at.is_(None)
        )
    ).all()
    found: Principal | None = None
    for key_id, tenant_id, key_hash in rows:
        if hmac.compare_digest(key_hash, digest):
            found = Principal(tenant_id=tenant_id, key_id=key_id)
    return found


class AuthCache:
    """A short TTL cache of successful lookups keyed by the key's sha256.

    Why: every poll would otherwise pay one extra query. Revocation therefore takes
    effect after at most ``ttl`` seconds (settings.auth_cache_seconds; 0 disables).
    """

    def __init__(self, ttl: float, max_entries: int = 10_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._data: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Principal | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            hit = self._data.get(digest)
            if hit is None:
                return None
            if hit[0] < time.monotonic():
                self._data.pop(digest, None)
                return None
            return hit[1]

    def put(self, digest: str, principal: Principal) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._data) >= self.max_entries:
                self._data.clear()
            self._data[digest] = (time.monotonic() + self.ttl, principal)
