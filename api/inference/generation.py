"""Token sampling, stop strings and the streaming generation loop.

The loop is written once against a tiny ``Stepper`` protocol (prefill, then one token at a
time with a KV cache) so dense Hugging Face models and pruned FineGates decoders stream the
same way, with the same sampling, seeds and stop handling. It checks a cancel flag between
tokens: a client that disconnects mid-stream stops the generation at the next token.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from core.sampling import sample


class Stepper(Protocol):
    """One decoding session with its own KV cache."""

    def prefill(self, input_ids: list[int]) -> torch.Tensor:
        """Run the prompt; return next-token logits, shape (vocab,)."""

    def step(self, token_id: int) -> torch.Tensor:
        """Append one token; return next-token logits, shape (vocab,)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None


@dataclass
class GenerationChunk:
    """A piece of streamed output. ``finish_reason`` is set on the last chunk only."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
    return gen


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise temperature + nucleus (top_p) sampling."""
    logits = logits.detach().float().reshape(-1).cpu()
    return int(sample(logits, params.temperature, params.top_p, generator))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that may still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class StreamDecoder:
    """One stream's sampling and stop rules, fed one logits vector at a time.

    Written once for both ways of decoding: alone (``generate_stream`` with a Stepper)
    and in a shared batch (api.inference.decode_batch), so a stream gets the same
    tokens, text and finish_reason whichever runs it.

    ``feed(logits)`` samples the next token and returns the chunks to emit; ``done`` is
    set after the last chunk (finish_reason "stop", "length" or "cancelled"), else
    ``next_token`` is the token to run through the model next.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        params: SamplingParams,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self.decode = decode
        self.params = params
        self.stops = [s for s in params.stop if s]
        self.eos = set(eos_token_ids)
        self.generator = make_generator(params.seed)
        self.generated: list[int] = []
        self.emitted = 0  # characters of the decoded text already sent
        self.done = False
        self.next_token: int | None = None

    def _finish(self, chunk: GenerationChunk) -> list[GenerationChunk]:
        self.done = True
        self.next_token = None
        return [chunk]

    def cancel(self) -> list[GenerationChunk]:
        return self._finish(GenerationChunk("", len(self.generated), "cancelled"))

    def empty(self) -> list[GenerationChunk]:
        """max_tokens <= 0: nothing to generate."""
        return self._finish(GenerationChunk("", 0, "length"))

    def feed(self, logits: torch.Tensor) -> list[GenerationChunk]:
        token = sample_next(logits, self.params, self.generator)
        if token in self.eos:
            text = self.decode(self.generated)
            return self._finish(GenerationChunk(text[self.emitted :], len(self.generated), "stop"))
        self.generated.append(token)
        n = len(self.generated)
        text = self.decode(self.generated)
        if self.stops:
            cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                return self._finish(GenerationChunk(text[self.emitted : cut], n, "stop", [token]))
        if n >= self.params.max_tokens:
            return self._finish(GenerationChunk(text[self.emitted :], n, "length", [token]))
        self.next_token = token
        # hold back an incomplete UTF-8 sequence and a possible stop-string prefix
        safe = len(text.rstrip("\ufffd"))
        safe -= _held_back(text[:safe], self.stops)
        if safe > self.emitted:
            chunk = GenerationChunk(text[self.emitted : safe], n, None, [token])
            self.emitted = safe
            return [chunk]
        return []


def generate_stream(
    stepper: Stepper,
    prompt_ids: list[int],
    decode: Callable[[list[int]], str],
    params: SamplingParams,
    eos_token_ids: Sequence[int] = (),
    cancelled: Callable[[], bool] | None = None,
) -> Iterator[GenerationChunk]:
    """Yield text deltas as tokens are generated; the last chunk carries finish_reason.

    finish_reason is "stop" (EOS or a stop string), "length" (max_tokens) or "cancelled"
    (the caller's flag was raised, e.g. the client disconnected). Text is decoded from all
    generated ids each step so multi-byte characters split across tokens come out whole,
    and any tail that could be the start of a stop string is held back until it is decided.
    """
    dec = StreamDecoder(decode, params, eos_token_ids)
    if params.max_tokens <= 0:
        yield from dec.empty()
        return
    with torch.inference_mode():
        logits = stepper.prefill(list(prompt_ids))
        while True:
            if cancelled is not None and cancelled():
                yield from dec.cancel()
                return
            yield from dec.feed(logits)
            if dec.done:
                return
            assert dec.next_token is not None
            logits = stepper.step(dec.next_token)


def as_stop_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    return [str(s) for s in stop]
