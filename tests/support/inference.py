"""A running inference server for tests: SQLite DB, two tenants, tiny models, uvicorn thread.

Why a real server: the openai SDK needs a real HTTP endpoint, and disconnect/streaming
behaviour only shows up over a socket.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class Deployment:
    settings: Any
    keys: dict[str, str]  # tenant name -> API key
    tenant_ids: dict[str, str]
    model_ids: dict[str, str] = field(default_factory=dict)  # role -> public model id
    paths: dict[str, Path] = field(default_factory=dict)


def make_deployment(
    root: Path, bert_dir: Path, llama_dir: Path, base_lm_dir: Path | None = None
) -> Deployment:
    """Tenants alice and bob; alice owns a classifier and an LM; 'tiny-base-lm' is shared."""
    from sqlalchemy import select

    from api.auth import create_api_key
    from api.db.models import Base, FineTunedModel, Tenant
    from api.db.session import make_engine, make_sessionmaker
    from api.settings import Settings
    from core.catalog import register_model

    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(data_dir=data_dir, auth_cache_seconds=0)
    engine = make_engine(settings)
    Base.metadata.create_all(engine)
    maker = make_sessionmaker(engine)
    keys, tenants = {}, {}
    with maker() as session:
        for name in ("alice", "bob"):
            keys[name] = create_api_key(session, name)
            tenants[name] = session.execute(
                select(Tenant.id).where(Tenant.name == name)
            ).scalar_one()
        session.add_all(
            [
                FineTunedModel(
                    id="ft:tiny-bert:alice:cls1",
                    tenant_id=tenants["alice"],
                    base_model="tiny-bert",
                    task="classification",
                    artifact_dir=str(bert_dir),
                ),
                FineTunedModel(
                    id="ft:tiny-llama:alice:lm1",
                    tenant_id=tenants["alice"],
                    base_model="tiny-llama",
                    task="causal_lm",
                    artifact_dir=str(llama_dir),
                ),
            ]
        )
        session.commit()
    engine.dispose()
    if base_lm_dir is not None or (llama_dir / "config.json").is_file():
        register_model("tiny-base-lm", base_lm_dir or llama_dir, data_dir)
    return Deployment(
        settings=settings,
        keys=keys,
        tenant_ids=tenants,
        model_ids={
            "cls": "ft:tiny-bert:alice:cls1",
            "lm": "ft:tiny-llama:alice:lm1",
            "base_lm": "tiny-base-lm",
        },
        paths={"cls": bert_dir, "lm": llama_dir},
    )
