"""The inference engine: model resolution, the model cache, batchers, generation threads.

One engine lives on ``app.state.inference`` (created lazily by the routes). The API
process (embedded default) and a standalone ``finegates serve-inference`` process build
the same engine from the same settings; only where it runs differs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, deque
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from api.errors import APIError

from .backends import (
    CausalLMBackend,
    ClassifierBackend,
    ClassifyInput,
    Encoded,
    InputTooLongError,
    ModelSpec,
    UnsupportedTaskError,
    load_backend,
)
from .batcher import BatcherClosed, DirectRunner, MicroBatcher
from .cache import ModelCache
from .config import InferenceConfig
from .decode_batch import DecodeBatcher
from .generation import GenerationChunk, SamplingParams, generate_stream

log = logging.getLogger(__name__)

Resolver = Callable[[str | None, str], ModelSpec]


def model_not_found(model_id: str) -> APIError:
    return APIError(
        404,
        f"The model '{model_id}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


@dataclass
class LoadedModel:
    spec: ModelSpec
    backend: Any  # ClassifierBackend | CausalLMBackend
    runner: MicroBatcher | DirectRunner | None  # classifiers only

    @property
    def nbytes(self) -> int:
        return int(self.backend.nbytes)

    @property
    def task(self) -> str:
        return self.backend.task


class InferenceEngine:
    def __init__(self, config: InferenceConfig, resolver: Resolver) -> None:
        self.config = config
        self.resolver = resolver
        self._specs: dict[tuple[str, str], ModelSpec] = {}
        self._specs_lock = threading.Lock()
        self.cache: ModelCache[tuple[str, str], LoadedModel] = ModelCache(
            self._load, config.cache_max_bytes, lambda m: m.nbytes, self._evict
        )
        self._gen_pool = ThreadPoolExecutor(
            max_workers=config.generation_workers, thread_name_prefix="finegates-gen"
        )
        self._load_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="finegates-load")
        self.finish_reasons: Counter[str] = Counter()  # generation outcomes (tests, metrics)
        self.last_generations: deque[tuple[str, int]] = deque(maxlen=1000)

    # ------------------------------------------------------------ models

    def _load(self, key: tuple[str, str]) -> LoadedModel:
        with self._specs_lock:
            spec = self._specs[key]
        log.info("loading model %s from %s", spec.id, spec.path)
        backend = load_backend(spec, self.config.classifier_backend, self.config.serving_precision)
        runner: MicroBatcher | DirectRunner | None = None
        if isinstance(backend, ClassifierBackend):
            if self.config.batching:
                runner = MicroBatcher(
                    backend.predict,
                    self.config.max_batch_size,
                    self.config.max_wait_ms,
                    name=f"batch-{spec.id}",
                )
            else:
                runner = DirectRunner(backend.predict)
        return LoadedModel(spec, backend, runner)

    @staticmethod
    def _evict(key: tuple[str, str], model: LoadedModel) -> None:
        if model.runner is not None:
            model.runner.close()
        decoder = getattr(model.backend, "batch_decoder", None)
        if decoder is not None:
            decoder.close()

    def _batch_decoder(self, backend: CausalLMBackend) -> DecodeBatcher | None:
        """The model's shared decoding thread (FineGates decoders, when batched decoding
        is on); None: each stream decodes alone in a generation thread."""
        if not self.config.batched_decoding or backend.hf_style:
            return None
        with self._specs_lock:
            decoder = getattr(backend, "batch_decoder", None)
            if decoder is None:
                decoder = DecodeBatcher(backend.model, self.config.max_decode_batch)
                backend.batch_decoder = decoder
        return decoder

    def resolve(self, tenant_id: str | None, model_id: str) -> ModelSpec:
        if not isinstance(model_id, str) or not model_id:
            raise APIError(400, "'model' is required and must be a string", param="model")
        try:
            spec = self.resolver(tenant_id, model_id)
        except APIError:
            raise
        except LookupError as exc:
            raise model_not_found(model_id) from exc
        if spec is None or (spec.owner is not None and spec.owner != tenant_id):
            raise model_not_found(model_id)
        return spec

    def get_loaded(self, spec: ModelSpec) -> LoadedModel:
        key = spec.cache_key
        with self._specs_lock:
            self._specs[key] = spec
        try:
            return self.cache.get(key)
        except UnsupportedTaskError as exc:
            raise APIError(400, str(exc), param="model", code="unsupported_model") from exc

    def resolve_and_load(self, tenant_id: str | None, model_id: str) -> LoadedModel:
        return self.get_loaded(self.resolve(tenant_id, model_id))

    async def load(self, tenant_id: str | None, model_id: str) -> LoadedModel:
        """Resolve (a DB lookup) and load off the event loop; cold loads can take seconds."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._load_pool, self.resolve_and_load, tenant_id, model_id
        )

    @staticmethod
    def require_task(model: LoadedModel, task: str, route: str) -> None:
        if model.task != task:
            what = "a classification" if model.task == "classification" else "a causal LM"
            use = "/v1/classify" if model.task == "classification" else "/v1/completions"
            raise APIError(
                400,
                f"model '{model.spec.id}' is {what} model and cannot serve {route}; use {use}",
                param="model",
                code="wrong_model_task",
            )

    # ------------------------------------------------------------ classification

    async def classify(
        self, model: LoadedModel, inputs: Sequence[ClassifyInput], truncate: bool
    ) -> tuple[list[dict[str, Any]], int]:
        """Results in input order plus the prompt token count (for ``usage``)."""
        backend: ClassifierBackend = model.backend
        loop = asyncio.get_running_loop()
        try:
            encoded: list[Encoded] = await loop.run_in_executor(
                None, backend.encode, list(inputs), truncate
            )
        except InputTooLongError as exc:
            raise APIError(400, str(exc), param=exc.param, code="context_length_exceeded") from exc
        assert model.runner is not None
        try:
            results = await model.runner.run(encoded)
        except BatcherClosed:
            # The cache evicted this model between the request's load and its run: load
            # it again (same spec, same tokenizer) and retry once instead of a 500.
            fresh = await loop.run_in_executor(self._load_pool, self.get_loaded, model.spec)
            assert fresh.runner is not None
            results = await fresh.runner.run(encoded)
        return results, sum(len(e.input_ids) for e in encoded)

    # ------------------------------------------------------------ generation

    def check_generation(
        self, backend: CausalLMBackend, prompt_ids: list[int], max_tokens: int, param: str
    ) -> None:
        if len(prompt_ids) + max_tokens > backend.max_length:
            raise APIError(
                400,
                f"This model's maximum context length is {backend.max_length} tokens. However, "
                f"you requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in "
                f"the {param}, {max_tokens} for the completion). Shorten the {param} or "
                "reduce max_tokens.",
                param=param,
                code="context_length_exceeded",
            )

    def _record(self, reason: str, tokens: int) -> None:
        self.finish_reasons[reason] += 1
        self.last_generations.append((reason, tokens))

    async def generate(
        self, backend: CausalLMBackend, prompt_ids: list[int], params: SamplingParams
    ) -> tuple[str, int, str]:
        """Whole completion in a generation thread: (text, completion_tokens, finish_reason)."""
        if self._batch_decoder(backend) is not None:
            parts: list[str] = []
            tokens, reason = 0, "length"
            async for chunk in self.stream(backend, prompt_ids, params):
                parts.append(chunk.text)
                tokens = chunk.completion_tokens
                reason = chunk.finish_reason or reason
            return "".join(parts), tokens, reason

        def run() -> tuple[str, int, str]:
            parts: list[str] = []
            tokens, reason = 0, "length"
            for chunk in generate_stream(
                backend.new_stepper(len(prompt_ids) + params.max_tokens),
                prompt_ids,
                backend.decode,
                params,
                backend.eos_token_ids,
            ):
                parts.append(chunk.text)
                tokens = chunk.completion_tokens
                reason = chunk.finish_reason or reason
            self._record(reason, tokens)
            return "".join(parts), tokens, reason

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._gen_pool, run)

    async def stream(
        self, backend: CausalLMBackend, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[GenerationChunk, None]:
        """Chunks as the generation thread produces them.

        Closing this iterator (the client went away and the response task was cancelled)
        raises the cancel flag; the thread sees it before its next token and stops.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException | None] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: GenerationChunk | BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # loop closed: nobody is listening any more
                cancel.set()

        def run() -> None:
            reason, tokens = "length", 0
            try:
                for chunk in generate_stream(
                    backend.new_stepper(len(prompt_ids) + params.max_tokens),
                    prompt_ids,
                    backend.decode,
                    params,
                    backend.eos_token_ids,
                    cancelled=cancel.is_set,
                ):
                    tokens = chunk.completion_tokens
                    reason = chunk.finish_reason or reason
                    put(chunk)
            except BaseException as exc:  # noqa: BLE001 - forwarded to the response
                put(exc)
            finally:
                self._record(reason, tokens)
                put(None)

        decoder = self._batch_decoder(backend)
        if decoder is not None:
            counted: dict[str, Any] = {"reason": "length", "tokens": 0}

            def emit(item: GenerationChunk | BaseException | None) -> None:
                if isinstance(item, GenerationChunk):
                    counted["tokens"] = item.completion_tokens
                    counted["reason"] = item.finish_reason or counted["reason"]
                elif item is None:
                    self._record(str(counted["reason"]), int(counted["tokens"]))
                put(item)

            try:
                decoder.submit(
                    prompt_ids, params, backend.decode, backend.eos_token_ids, emit, cancel.is_set
                )
            except RuntimeError:  # the model was just evicted: decode this one alone
                self._gen_pool.submit(run)
        else:
            self._gen_pool.submit(run)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()

    def close(self) -> None:
        self.cache.clear()
        self._gen_pool.shutdown(wait=False, cancel_futures=True)
        self._load_pool.shutdown(wait=False, cancel_futures=True)


class StaticResolver:
    """A fixed id -> ModelSpec table (tests, the benchmark, single-model deployments)."""

    def __init__(self, specs: dict[str, ModelSpec]) -> None:
        self.specs = dict(specs)

    def __call__(self, tenant_id: str | None, model_id: str) -> ModelSpec:
        spec = self.specs.get(model_id)
        if spec is None:
            raise LookupError(model_id)
        return spec
