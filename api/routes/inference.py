"""Hosted inference routes: /v1/classify, /v1/completions, /v1/chat/completions.

Request and response bodies follow OpenAI's shapes (classification follows TEI's input
convention). Bodies are parsed here rather than by FastAPI so every bad request gets
OpenAI's error shape with ``param`` naming the field, whichever app mounts this router
(the API, or the standalone inference app).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.deps import PrincipalDep
from api.inference.config import InferenceConfig
from api.inference.engine import InferenceEngine, InferenceError, LoadedModel
from api.inference.generation import SamplingParams, as_stop_list

router = APIRouter(tags=["inference"])

_ENGINE_LOCK = threading.Lock()


def get_engine(request: Request) -> InferenceEngine:
    """The app's engine, built on first use from the app's settings (never at import)."""
    engine = getattr(request.app.state, "inference", None)
    if engine is None:
        with _ENGINE_LOCK:
            engine = getattr(request.app.state, "inference", None)
            if engine is None:
                from api.inference.resolver import DbModelResolver

                settings = getattr(request.app.state, "settings", None)
                if settings is None:
                    from api.settings import get_settings

                    settings = get_settings()
                engine = InferenceEngine(
                    InferenceConfig.from_settings(settings),
                    DbModelResolver(settings, getattr(request.app.state, "sessionmaker", None)),
                )
                request.app.state.inference = engine
                hooks = getattr(request.app.state, "shutdown_hooks", None)
                if hooks is not None:
                    hooks.append(engine.close)
    return engine


EngineDep = Annotated[InferenceEngine, Depends(get_engine)]


# ---------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are ignored, not errors


class ClassifyRequest(_Body):
    model: str
    input: str | list[str | list[str]]
    truncate: bool = False


class _SamplingBody(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(_SamplingBody):
    prompt: str | list[str]


class ChatCompletionRequest(_SamplingBody):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InferenceError(400, f"request body is not valid JSON: {exc}") from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith("function-")]
        # drop pydantic's union-branch labels ("str", "list[...]") from the location
        loc = [p for p in loc if not (p.startswith(("str", "list[", "int", "dict[")) or p == "")]
        param = ".".join(loc) or None
        raise InferenceError(400, f"{param or 'body'}: {first.get('msg')}", param=param) from exc


def _error(exc: InferenceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _normalize_inputs(raw: str | list[Any]) -> list[str | tuple[str, str]]:
    """TEI convention: str; [a, b] = one pair; [[a], [a, b], ...] = a batch."""
    if isinstance(raw, str):
        return [raw]
    if all(isinstance(x, str) for x in raw):
        if len(raw) == 2:
            return [(raw[0], raw[1])]
        return list(raw)
    out: list[str | tuple[str, str]] = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            out.append(item)
        elif len(item) == 1:
            out.append(item[0])
        elif len(item) == 2:
            out.append((item[0], item[1]))
        else:
            raise InferenceError(
                400,
                f"input[{i}] has {len(item)} texts; each input is a text or a [text, text_pair]",
                param=f"input[{i}]",
            )
    return out


# ---------------------------------------------------------------- classify


@router.post("/classify")
async def classify(request: Request, principal: PrincipalDep, engine: EngineDep) -> Any:
    """Label, score and every label's score for each input (micro-batched across callers)."""
    try:
        body: ClassifyRequest = await _parse(request, ClassifyRequest)
        inputs = _normalize_inputs(body.input)
        if not inputs:
            raise InferenceError(400, "input must not be empty", param="input")
        cap = engine.config.max_inputs_per_request
        if len(inputs) > cap:
            raise InferenceError(
                400,
                f"input has {len(inputs)} items; at most {cap} per request",
                param="input",
                code="too_many_inputs",
            )
        model = await engine.load(principal.tenant_id, body.model)
        engine.require_task(model, "classification", "/v1/classify")
        results, tokens = await engine.classify(model, inputs, body.truncate)
    except InferenceError as exc:
        return _error(exc)
    data = [{"object": "classification", "index": i, **r} for i, r in enumerate(results)]
    return {
        "object": "list",
        "model": model.spec.id,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# ---------------------------------------------------------------- generation


def _params(body: _SamplingBody, engine: InferenceEngine, max_tokens: int | None) -> SamplingParams:
    cap = engine.config.max_tokens_cap
    wanted = max_tokens if max_tokens is not None else engine.config.default_max_tokens
    if wanted > cap:
        raise InferenceError(
            400,
            f"max_tokens is {wanted}; this server allows at most {cap}",
            param="max_tokens",
            code="max_tokens_exceeded",
        )
    stop = as_stop_list(body.stop)
    if len(stop) > 4:
        raise InferenceError(400, "stop takes at most 4 sequences", param="stop")
    return SamplingParams(
        max_tokens=wanted,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        seed=body.seed,
    )


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _load_lm(engine: InferenceEngine, tenant_id: str, model_id: str, route: str) -> Any:
    model: LoadedModel = await engine.load(tenant_id, model_id)
    engine.require_task(model, "causal_lm", route)
    return model


def _message_text(message: dict[str, Any], i: int) -> dict[str, str]:
    role = message.get("role")
    if role not in {"system", "developer", "user", "assistant", "tool"}:
        raise InferenceError(
            400,
            f"messages[{i}].role must be system, user or assistant, got {role!r}",
            param=f"messages[{i}].role",
        )
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise InferenceError(
            400, f"messages[{i}].content must be a string", param=f"messages[{i}].content"
        )
    return {"role": "system" if role == "developer" else role, "content": content}


@router.post("/completions")
async def completions(request: Request, principal: PrincipalDep, engine: EngineDep) -> Any:
    try:
        body: CompletionRequest = await _parse(request, CompletionRequest)
        params = _params(body, engine, body.max_tokens)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise InferenceError(400, "prompt must not be empty", param="prompt")
        if len(prompts) > engine.config.max_prompts_per_request:
            raise InferenceError(
                400,
                f"prompt has {len(prompts)} items; at most "
                f"{engine.config.max_prompts_per_request} per request",
                param="prompt",
            )
        if body.stream and len(prompts) > 1:
            raise InferenceError(400, "stream: true takes a single prompt", param="prompt")
        model = await _load_lm(engine, principal.tenant_id, body.model, "/v1/completions")
        backend = model.backend
        encoded = [backend.encode_prompt(p) for p in prompts]
        for ids in encoded:
            engine.check_generation(backend, ids, params.max_tokens, "prompt")
    except InferenceError as exc:
        return _error(exc)
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": model.spec.id}
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    if body.stream:
        return _stream_response(
            request,
            engine,
            backend,
            encoded[0],
            params,
            include_usage,
            lambda text, reason: {
                **base,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            },
            base,
        )
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, ids in enumerate(encoded):
        text, n, reason = await engine.generate(backend, ids, params)
        choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
        prompt_tokens += len(ids)
        completion_tokens += n
    return {**base, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


@router.post("/chat/completions")
async def chat_completions(request: Request, principal: PrincipalDep, engine: EngineDep) -> Any:
    try:
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        params = _params(body, engine, body.max_completion_tokens or body.max_tokens)
        messages = [_message_text(m, i) for i, m in enumerate(body.messages)]
        model = await _load_lm(engine, principal.tenant_id, body.model, "/v1/chat/completions")
        backend = model.backend
        ids = backend.encode_chat(messages)
        engine.check_generation(backend, ids, params.max_tokens, "messages")
    except InferenceError as exc:
        return _error(exc)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    base = {"id": rid, "created": created, "model": model.spec.id}
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    if body.stream:
        first = {"value": True}

        def chunk(text: str, reason: str | None) -> dict[str, Any]:
            delta: dict[str, Any] = {"content": text} if text or reason is None else {}
            if first["value"]:
                delta = {"role": "assistant", "content": text}
                first["value"] = False
            return {
                **base,
                "object": "chat.completion.chunk",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
                ],
            }

        return _stream_response(
            request,
            engine,
            backend,
            ids,
            params,
            include_usage,
            chunk,
            {**base, "object": "chat.completion.chunk"},
        )
    text, n, reason = await engine.generate(backend, ids, params)
    return {
        **base,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
        ],
        "usage": _usage(len(ids), n),
    }


def _stream_response(
    request: Request,
    engine: InferenceEngine,
    backend: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    include_usage: bool,
    make_chunk: Any,
    usage_base: dict[str, Any],
) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        completion_tokens = 0
        stream = engine.stream(backend, prompt_ids, params)
        try:
            async for piece in stream:
                if await request.is_disconnected():
                    break  # closing the stream below raises the cancel flag
                completion_tokens = piece.completion_tokens
                if piece.finish_reason == "cancelled":
                    break
                if piece.text or piece.finish_reason is not None:
                    yield _sse(make_chunk(piece.text, piece.finish_reason))
            else:
                if include_usage:
                    usage = _usage(len(prompt_ids), completion_tokens)
                    yield _sse({**usage_base, "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - the stream already started: report in-band
            err = InferenceError(500, f"generation failed: {exc}", type="server_error")
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
