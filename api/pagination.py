"""One way to page a list: OpenAI's ``after`` cursor and ``limit``, answered as
``{"object": "list", "data", "has_more", "first_id", "last_id"}``.

Why keyset paging on an ordered column (an autoincrement ``pk``, or a checkpoint's step)
instead of OFFSET: a job's events grow while a client pages through them, and a keyset
page neither skips nor repeats rows when that happens. ``has_more`` costs no count: one
row more than ``limit`` is read.

A cursor is an object id the caller can see; resolving it is scoped like the list itself,
so another tenant's id is refused (400) exactly like one that never existed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from api.errors import APIError


def cursor_key(
    session: Session, after: str | None, key: Any, *where: ColumnElement[bool], kind: str
) -> Any | None:
    """The sort key of the object ``after`` names (found with ``where``), or None.

    ``where`` must select that object within the caller's scope, e.g.
    ``File.id == after, File.tenant_id == tenant``.
    """
    if not after:
        return None
    found = session.execute(select(key).where(*where)).scalar_one_or_none()
    if found is None:
        raise APIError(400, f"No {kind} with id '{after}' to page after", param="after")
    return found


def prefixed_pk_cursor(after: str | None, prefix: str) -> int | None:
    """For objects whose public id is ``<prefix><pk>`` (events, metric points)."""
    if not after:
        return None
    if not after.startswith(prefix) or not after[len(prefix) :].isdigit():
        raise APIError(400, f"after must be an id like '{prefix}123'", param="after")
    return int(after[len(prefix) :])


def paginate(
    session: Session,
    stmt: Select[Any],
    key: Any,
    item: Callable[[Any], Any],
    *,
    after: Any | None,
    limit: int,
    descending: bool,
) -> dict[str, Any]:
    """One page of ``stmt`` ordered by ``key``, starting past the ``after`` key.

    ``item`` turns each result row (a ``Row``) into the page's object (it needs an ``id``).
    """
    if after is not None:
        stmt = stmt.where(key < after if descending else key > after)
    stmt = stmt.order_by(key.desc() if descending else key.asc()).limit(limit + 1)
    rows = session.execute(stmt).all()
    data = [item(row) for row in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "has_more": len(rows) > limit,
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
    }


def count(session: Session, stmt: Select[Any]) -> int:
    """How many rows ``stmt`` (the list's filters, no cursor) matches over all pages."""
    return session.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
