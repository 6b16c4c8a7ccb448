"""GET /v1/fine_tuning/jobs/{id}/gates: the gate map of a job (core.gatemap).

Per layer: the attention heads (and KV groups) kept, the q/k and v/o widths kept per head
and the FFN neurons kept, out of the base model's totals.

- Once the job has a model, the map comes from the prune plan in the artifact's manifest
  (``source: "plan"``): exactly what was cut.
- Before that, from the latest evaluation (``source: "eval"``): the worker stores a
  compact snapshot in each evaluation's metric point (under ``core.gatemap.METRICS_KEY``,
  kept out of the /metrics answers), so this is one indexed row read per poll.
- A job that has not been evaluated yet answers ``source: null`` with no layers.

Tenant-scoped through ``OwnedJob``: another tenant's job is a 404 like a missing one.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import FineTunedModel, Job, JobMetric
from api.deps import OwnedJob, SessionDep, SettingsDep, find_owned_model
from api.settings import Settings

log = logging.getLogger("finegates.api")
router = APIRouter(tags=["fine-tuning"])

GATES_KEY = "gates"  # == core.gatemap.METRICS_KEY (not imported: that pulls in torch)


def latest_snapshot(session: Session, job_id: str) -> dict[str, Any] | None:
    """The newest evaluation's gate map of a job, or None."""
    rows = session.execute(
        select(JobMetric.metrics)
        .where(JobMetric.job_id == job_id, JobMetric.kind == "eval")
        .order_by(JobMetric.pk.desc())
        .limit(20)
    ).scalars()
    for metrics in rows:
        if metrics and isinstance(metrics.get(GATES_KEY), dict):
            return metrics[GATES_KEY]
    return None


def _plan_map(
    model: FineTunedModel, settings: Settings, totals: dict[str, Any] | None
) -> dict[str, Any] | None:
    from api.routes.models import artifact_path
    from core import gatemap
    from core.artifacts import read_manifest
    from core.errors import FineGatesError

    try:
        manifest = read_manifest(artifact_path(model, settings))
    except FineGatesError:
        log.warning("model %s: no readable manifest for the gate map", model.id)
        return None
    if not manifest.plan:
        return None
    return gatemap.from_plan(manifest.plan, source="plan", totals=totals)


def gates_object(job: Job, snapshot: dict[str, Any] | None, model_id: str | None) -> dict:
    body: dict[str, Any] = snapshot or {"source": None, "step": None, "layers": []}
    return {
        "object": "fine_tuning.job.gates",
        "job_id": job.id,
        "status": job.status,
        "fine_tuned_model": model_id,
        **body,
    }


@router.get("/fine_tuning/jobs/{job_id}/gates")
def get_gates(job: OwnedJob, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """Heads / KV groups / q-k and v-o dims / FFN neurons kept per layer (see module doc)."""
    latest = latest_snapshot(session, job.id)
    if job.fine_tuned_model:
        model = find_owned_model(session, job.fine_tuned_model, job.tenant_id)
        if model is not None:
            final = _plan_map(model, settings, latest)
            if final is not None:
                final["step"] = job.step
                return gates_object(job, final, model.id)
    return gates_object(job, latest, job.fine_tuned_model)
