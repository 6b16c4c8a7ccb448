"""Who is calling, and what a model id means for them.

Model ids resolve in this order: the base catalog (minilm-l6, smollm2-135m, and models an
operator registered), served dense to every tenant; then the caller's own finetuned models
(the ``models`` table: id -> artifact directory). Another tenant's model id answers 404
exactly like an id that never existed. Paths and hub ids are NOT accepted as model ids
here, unlike the training catalog: an inference caller must not make the server read an
arbitrary folder.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from .backends import ModelSpec


class DbModelResolver:
    """Base catalog ids -> dense HF folders; the tenant's finetuned ids -> artifacts."""

    def __init__(self, settings: Any, sessionmaker: Any = None) -> None:
        self.settings = settings
        self._sessionmaker = sessionmaker
        self._lock = threading.Lock()

    @property
    def data_dir(self) -> Path:
        return Path(getattr(self.settings, "data_path", None) or self.settings.data_dir)

    def _session(self) -> Any:
        with self._lock:
            if self._sessionmaker is None:
                from api.db.session import make_sessionmaker

                self._sessionmaker = make_sessionmaker(self.settings)
        return self._sessionmaker()

    def catalog_ids(self) -> set[str]:
        from core.catalog import list_models

        return {m.id for m in list_models(self.data_dir)}

    def __call__(self, tenant_id: str | None, model_id: str) -> ModelSpec:
        if model_id in self.catalog_ids():
            from core.catalog import resolve_model

            path = resolve_model(model_id, self.data_dir)
            return ModelSpec(id=model_id, path=Path(path), kind="dense", owner=None)
        from api.deps import find_owned_model

        if tenant_id is None:  # no caller, no finetuned models
            raise LookupError(model_id)
        with self._session() as session:
            row = find_owned_model(session, model_id, tenant_id)
        if row is None:
            raise LookupError(model_id)
        path = Path(row.artifact_dir)
        if not path.is_absolute():
            path = self.data_dir / path
        return ModelSpec(id=row.id, path=path, kind="artifact", owner=row.tenant_id, task=row.task)
