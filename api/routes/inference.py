"""Hosted inference routes: /v1/classify, /v1/completions, /v1/chat/completions.

Request and response bodies follow OpenAI's shapes (classification follows TEI's input
convention); their models are in api/schemas.py. A bad body answers OpenAI's error shape
with ``param`` naming the field through the error handlers of api/errors.py, which both
apps that mount this router (the API, and the standalone inference app) install.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from api.deps import PrincipalDep
from api.errors import APIError
from api.inference.config import InferenceConfig
from api.inference.engine import InferenceEngine, LoadedModel
from api.inference.generation import SamplingParams, as_stop_list
from api.limits import inference_slot, run_cpu
from api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Classification,
    ClassificationList,
    ClassifyRequest,
    ClassifyUsage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    SamplingRequest,
    Usage,
)

log = logging.getLogger("finegates.inference")
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
            raise APIError(
                400,
                f"input[{i}] has {len(item)} texts; each input is a text or a [text, text_pair]",
                param=f"input[{i}]",
            )
    return out


# ---------------------------------------------------------------- classify


@router.post("/classify", response_model=ClassificationList)
async def classify(
    body: ClassifyRequest, request: Request, principal: PrincipalDep, engine: EngineDep
) -> ClassificationList:
    """Label, score and every label's score for each input (micro-batched across callers)."""
    inputs = _normalize_inputs(body.input)
    if not inputs:
        raise APIError(400, "input must not be empty", param="input")
    cap = engine.config.max_inputs_per_request
    if len(inputs) > cap:
        raise APIError(
            400,
            f"input has {len(inputs)} items; at most {cap} per request",
            param="input",
            code="too_many_inputs",
        )
    slots, tenant = inference_slot(request, principal)
    try:
        model = await engine.load(principal.tenant_id, body.model)
        engine.require_task(model, "classification", "/v1/classify")
        results, tokens = await engine.classify(model, inputs, body.truncate)
    finally:
        if slots is not None:
            slots.release(tenant)
    return ClassificationList(
        model=model.spec.id,
        data=[Classification(index=i, **r) for i, r in enumerate(results)],
        usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


# ---------------------------------------------------------------- generation


def _params(
    body: SamplingRequest, engine: InferenceEngine, max_tokens: int | None
) -> SamplingParams:
    cap = engine.config.max_tokens_cap
    wanted = max_tokens if max_tokens is not None else engine.config.default_max_tokens
    if wanted > cap:
        raise APIError(
            400,
            f"max_tokens is {wanted}; this server allows at most {cap}",
            param="max_tokens",
            code="max_tokens_exceeded",
        )
    stop = as_stop_list(body.stop)
    if len(stop) > 4:
        raise APIError(400, "stop takes at most 4 sequences", param="stop")
    return SamplingParams(
        max_tokens=wanted,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        seed=body.seed,
    )


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


async def _in_slot(request: Request, principal: Any, run: Any) -> Any:
    """Run ``run(tenant, slots)`` holding one of the caller's inference slots (429 when all
    are busy). On success ``run`` releases it (a stream: when the stream ends)."""
    slots, tenant = inference_slot(request, principal)
    try:
        return await run(tenant, slots)
    except BaseException:
        if slots is not None:
            slots.release(tenant)
        raise


async def _load_lm(engine: InferenceEngine, tenant_id: str, model_id: str, route: str) -> Any:
    model: LoadedModel = await engine.load(tenant_id, model_id)
    engine.require_task(model, "causal_lm", route)
    return model


@router.post("/completions", response_model=Completion)
async def completions(
    body: CompletionRequest, request: Request, principal: PrincipalDep, engine: EngineDep
) -> Any:
    """A completion per prompt, or (``stream: true``, one prompt) server-sent chunks."""
    params = _params(body, engine, body.max_tokens)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if len(prompts) > engine.config.max_prompts_per_request:
        raise APIError(
            400,
            f"prompt has {len(prompts)} items; at most "
            f"{engine.config.max_prompts_per_request} per request",
            param="prompt",
        )
    if body.stream and len(prompts) > 1:
        raise APIError(400, "stream: true takes a single prompt", param="prompt")
    return await _in_slot(
        request,
        principal,
        lambda t, sl: _completions(body, request, engine, params, prompts, t, sl),
    )


async def _completions(
    body: CompletionRequest,
    request: Request,
    engine: InferenceEngine,
    params: SamplingParams,
    prompts: list[str],
    tenant: str,
    slots: Any,
) -> Any:
    model = await _load_lm(engine, tenant, body.model, "/v1/completions")
    backend = model.backend
    settings = getattr(request.app.state, "settings", None)
    # tokenizing a long prompt takes seconds: never on the event loop
    encoded = [await run_cpu(settings, backend.encode_prompt, p) for p in prompts]
    for ids in encoded:
        engine.check_generation(backend, ids, params.max_tokens, "prompt")
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        base = {"id": rid, "object": "text_completion", "created": created, "model": model.spec.id}
        return _stream_response(
            request,
            engine,
            backend,
            encoded[0],
            params,
            body.include_usage,
            lambda text, reason: {
                **base,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            },
            base,
            release=(slots, tenant),
        )
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, ids in enumerate(encoded):
        text, n, reason = await engine.generate(backend, ids, params)
        choices.append(CompletionChoice(index=i, text=text, finish_reason=cast(Any, reason)))
        prompt_tokens += len(ids)
        completion_tokens += n
    if slots is not None:
        slots.release(tenant)
    return Completion(
        id=rid,
        created=created,
        model=model.spec.id,
        choices=choices,
        usage=_usage(prompt_tokens, completion_tokens),
    )


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, principal: PrincipalDep, engine: EngineDep
) -> Any:
    """One assistant message, or (``stream: true``) server-sent ``chat.completion.chunk``s."""
    params = _params(body, engine, body.max_completion_tokens or body.max_tokens)
    messages = [m.as_template_message() for m in body.messages]
    return await _in_slot(
        request, principal, lambda t, sl: _chat(body, request, engine, params, messages, t, sl)
    )


async def _chat(
    body: ChatCompletionRequest,
    request: Request,
    engine: InferenceEngine,
    params: SamplingParams,
    messages: list[Any],
    tenant: str,
    slots: Any,
) -> Any:
    model = await _load_lm(engine, tenant, body.model, "/v1/chat/completions")
    backend = model.backend
    # rendering the chat template and tokenizing: off the event loop
    ids = await run_cpu(getattr(request.app.state, "settings", None), backend.encode_chat, messages)
    engine.check_generation(backend, ids, params.max_tokens, "messages")
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        base = {"id": rid, "created": created, "model": model.spec.id}
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
            body.include_usage,
            chunk,
            {**base, "object": "chat.completion.chunk"},
            release=(slots, tenant),
        )
    text, n, reason = await engine.generate(backend, ids, params)
    if slots is not None:
        slots.release(tenant)
    return ChatCompletion(
        id=rid,
        created=created,
        model=model.spec.id,
        choices=[
            ChatChoice(
                index=0,
                message=AssistantMessage(content=text),
                finish_reason=cast(Any, reason),
            )
        ],
        usage=_usage(len(ids), n),
    )


def _stream_response(
    request: Request,
    engine: InferenceEngine,
    backend: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    include_usage: bool,
    make_chunk: Any,
    usage_base: dict[str, Any],
    release: tuple[Any, str] | None = None,
) -> StreamingResponse:
    """``release``: the caller's inference slot, held until the stream ends."""
    released = {"done": False}

    def _release() -> None:
        if release is not None and release[0] is not None and not released["done"]:
            released["done"] = True
            release[0].release(release[1])

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
                    usage = _usage(len(prompt_ids), completion_tokens).model_dump()
                    yield _sse({**usage_base, "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"
        except Exception:  # the stream already started: report in-band, details to the log
            log.exception("generation failed mid-stream")
            err = APIError(500, "The server had an error while generating; the output is cut off.")
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            _release()
            await stream.aclose()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
