"""Records -> token ids, and a collate function with dynamic padding.

Why character offsets for loss masks: chat templates and prompt/completion pairs are
tokenised as ONE string (exactly what the model sees at inference), then each token is
labelled by where its characters came from. Tokenising pieces separately would put
different tokens at the seams than inference does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from core.data import KIND_CHAT, KIND_LABEL, KIND_PAIR, KIND_PC, KIND_TEXT
from core.errors import DataError

IGNORE = -100
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template a plain ChatML one (documented default)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def _render(tokenizer: Any, messages: list[dict], gen: bool) -> str:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def _chat_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss."""
    full = _render(tokenizer, messages, gen=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m.get("weight", 1):
            continue
        span = None
        try:
            prefix = _render(tokenizer, messages[:i], gen=True) if i else None
            upto = _render(tokenizer, messages[: i + 1], gen=False)
            if prefix is not None and full.startswith(upto) and upto.startswith(prefix):
                span = (len(prefix), len(upto))
        except Exception:  # templates that reject partial conversations
            span = None
        if span is None:
            # Fallback: locate the content itself after the previous span.
            idx = full.find(m["content"], cursor)
            if idx < 0:
                raise DataError(
                    f"message {i}: could not locate the assistant content in the chat template"
                )
            span = (idx, idx + len(m["content"]))
        spans.append(span)
        cursor = span[1]
    return full, spans


def _label_by_spans(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], max_length: int, add_eos: bool
) -> tuple[list[int], list[int]]:
    enc = tokenizer(
        text,
        add_special_tokens=False,
        return_offsets_mapping=True,
        truncation=True,
        max_length=max_length,
    )
    ids = list(enc["input_ids"])
    labels = []
    for tid, (s, e) in zip(ids, enc["offset_mapping"], strict=True):
        inside = e > s and any(a <= s < b for a, b in spans)
        labels.append(tid if inside else IGNORE)
    if add_eos and tokenizer.eos_token_id is not None and len(ids) < max_length:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def _adds_bos(tokenizer: Any) -> bool:
    """Whether plain tokenisation starts with BOS (then prompt/completion should too)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos_id


@dataclass
class Encoded:
    examples: list[dict[str, Any]]
    dropped: int = 0  # examples whose loss tokens were all truncated away
    n_tokens: int = 0


def encode_classification(
    records: list[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    label2id: dict[str, int] | None,
) -> Encoded:
    """Tokenise text (or text pairs); labels become class ids, or floats for regression."""
    out = []
    n_tok = 0
    for r in records:
        enc = tokenizer(
            r["text"],
            r.get("text_pair"),
            truncation=True,
            max_length=max_length,
        )
        ex: dict[str, Any] = {
            k: list(v) for k, v in enc.items() if k in ("input_ids", "token_type_ids")
        }
        if label2id is None:
            ex["labels"] = float(r["label"])
        else:
            key = str(r["label"])
            if key not in label2id:
                raise DataError(
                    f"label {key!r} is not one of the classes {sorted(label2id)}",
                    line=r.get("_line"),
                    field="label",
                )
            ex["labels"] = label2id[key]
        n_tok += len(ex["input_ids"])
        out.append(ex)
    return Encoded(out, 0, n_tok)


def encode_lm(records: list[dict[str, Any]], tokenizer: Any, max_length: int, kind: str) -> Encoded:
    """Causal-LM examples with loss only where the model should learn to write.

    - chat: assistant turns (incl. their end-of-turn token); weight-0 turns are context.
    - prompt/completion: completion tokens + EOS.
    - text: every token; long texts are cut into max_length windows (no tokens wasted).
    """
    out: list[dict[str, Any]] = []
    dropped = 0
    n_tok = 0
    if kind == KIND_CHAT:
        ensure_chat_template(tokenizer)
    for r in records:
        if kind == KIND_CHAT:
            text, spans = _chat_spans(tokenizer, r["messages"])
            pieces = [_label_by_spans(tokenizer, text, spans, max_length, add_eos=False)]
        elif kind == KIND_PC:
            text = r["prompt"] + r["completion"]
            spans = [(len(r["prompt"]), len(text))]
            bos = getattr(tokenizer, "bos_token", None)
            if bos is not None and _adds_bos(tokenizer):
                text = bos + text
                spans = [(a + len(bos), b + len(bos)) for a, b in spans]
            pieces = [_label_by_spans(tokenizer, text, spans, max_length, add_eos=True)]
        elif kind in (KIND_TEXT, KIND_LABEL, KIND_PAIR):
            ids = list(tokenizer(r["text"], add_special_tokens=True)["input_ids"])
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            pieces = []
            for s in range(0, len(ids), max_length):
                chunk = ids[s : s + max_length]
                if len(chunk) >= 2:
                    pieces.append((chunk, list(chunk)))
        else:
            raise DataError(f"unsupported record kind {kind!r} for a language-model task")
        for ids, labels in pieces:
            if sum(1 for x in labels if x != IGNORE) == 0:
                dropped += 1
                continue
            n_tok += len(ids)
            out.append({"input_ids": ids, "labels": labels})
    return Encoded(out, dropped, n_tok)


class Collator:
    """Pads a list of examples to the longest one in the batch (dynamic padding)."""

    def __init__(self, pad_token_id: int, lm: bool):
        self.pad = int(pad_token_id)
        self.lm = lm

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(ex["input_ids"]) for ex in batch)
        ids = torch.full((len(batch), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        out: dict[str, torch.Tensor] = {}
        has_tt = "token_type_ids" in batch[0]
        tt = torch.zeros((len(batch), n), dtype=torch.long) if has_tt else None
        lab = torch.full((len(batch), n), IGNORE, dtype=torch.long) if self.lm else None
        for i, ex in enumerate(batch):
            L = len(ex["input_ids"])
            ids[i, :L] = torch.tensor(ex["input_ids"], dtype=torch.long)
            mask[i, :L] = 1
            if tt is not None:
                tt[i, :L] = torch.tensor(ex["token_type_ids"], dtype=torch.long)
            if lab is not None:
                lab[i, :L] = torch.tensor(ex["labels"], dtype=torch.long)
        out["input_ids"] = ids
        out["attention_mask"] = mask
        if tt is not None:
            out["token_type_ids"] = tt
        if lab is not None:  # exactly when self.lm
            out["labels"] = lab
        else:
            first = batch[0]["labels"]
            dtype = torch.float32 if isinstance(first, float) else torch.long
            out["labels"] = torch.tensor([ex["labels"] for ex in batch], dtype=dtype)
        return out
