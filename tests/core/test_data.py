"""Data readers: formats are detected, and every error names the file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.data import load_records, split_validation, validate_file
from core.errors import DataError


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_detects_classification_with_string_labels(tmp_path):
    p = _jsonl(tmp_path, [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    rep = validate_file(p)
    assert (rep.format, rep.task, rep.kind, rep.n_rows) == (
        "jsonl",
        "classification",
        "text_label",
        2,
    )
    assert rep.labels == ["neg", "pos"]
    assert rep.problem_type == "single_label_classification"


def test_int_labels_are_classes_float_labels_regression(tmp_path):
    p = _jsonl(tmp_path, [{"text": "a", "label": 10}, {"text": "b", "label": 2}])
    rep = validate_file(p)
    assert rep.labels == ["2", "10"]  # numeric order, not string order
    q = _jsonl(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": 0.5}], "r.jsonl")
    rep = validate_file(q)
    assert rep.problem_type == "regression" and rep.labels is None


def test_text_pair_and_lm_formats(tmp_path):
    rep = validate_file(_jsonl(tmp_path, [{"text": "a", "text_pair": "b", "label": 1}]))
    assert rep.kind == "text_pair_label"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    rep = validate_file(_jsonl(tmp_path, [chat], "c.jsonl"))
    assert (rep.task, rep.kind) == ("causal_lm", "messages")
    rep = validate_file(_jsonl(tmp_path, [{"prompt": "a", "completion": "b"}], "pc.jsonl"))
    assert rep.kind == "prompt_completion"
    rep = validate_file(_jsonl(tmp_path, [{"text": "plain"}], "t.jsonl"), task="sparsify")
    assert (rep.task, rep.kind) == ("sparsify", "text")


@pytest.mark.parametrize(
    ("rows", "line", "field", "fragment"),
    [
        (['{"text": "a", "label": 1}', '{"text": "b", "label": 2'], 2, None, "malformed JSON"),
        ([{"text": "a", "label": 1}, {"text": "", "label": 2}], 2, "text", "empty"),
        ([{"text": "a", "label": 1}, {"text": 5, "label": 2}], 2, "text", "must be a string"),
        ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": 3}],
         3, "label", "mixed label types"),
        ([{"text": "a", "label": 1}, {"text": "b", "label": None}], 2, "label", "label must be"),
        ([{"text": "a", "label": 1}, {"txt": "b"}], 2, None, "unrecognised record"),
        ([{"text": "a", "label": 1}, {"prompt": "p", "completion": "c"}], 2, None, "differs"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], 1, "messages[0].role", "role"),
        ([{"messages": [{"role": "user", "content": "x"}]}], 1, "messages", "assistant"),
        (["[1, 2]"], 1, None, "JSON object"),
    ],
)  # fmt: skip
def test_errors_name_line_and_field(tmp_path, rows, line, field, fragment):
    p = _jsonl(tmp_path, rows)
    with pytest.raises(DataError) as ei:
        validate_file(p)
    e = ei.value
    assert e.line == line and e.field == field and fragment in e.reason
    assert str(p) in str(e) and f"line {line}" in str(e)


def test_non_utf8_bytes_report_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 2}\n')
    with pytest.raises(DataError) as ei:
        validate_file(p)
    assert ei.value.line == 2 and "UTF-8" in ei.value.reason
    c = tmp_path / "bad.csv"
    c.write_bytes(b"text,label\nok,1\nfine,0\ncaf\xe9,1\n")
    with pytest.raises(DataError) as ei:
        validate_file(c)
    assert ei.value.line == 4


def test_empty_file_and_caps(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("")
    with pytest.raises(DataError, match="empty"):
        validate_file(p)
    p = _jsonl(tmp_path, [{"text": "a" * 100, "label": 1}] * 3, "long.jsonl")
    with pytest.raises(DataError) as ei:
        validate_file(p, max_line_bytes=50)
    assert ei.value.line == 1 and "limit" in ei.value.reason
    with pytest.raises(DataError) as ei:
        validate_file(p, max_rows=2)
    assert ei.value.line == 3 and "row limit" in ei.value.reason


def test_csv_reader(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text('text,label\n"hello, world",pos\nbye,neg\n')
    data = load_records(c)
    assert data.report.format == "csv" and data.report.labels == ["neg", "pos"]
    assert data.records[0]["text"] == "hello, world"
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\na,1\nb,2,3\n")
    with pytest.raises(DataError) as ei:
        validate_file(bad)
    assert ei.value.line == 3 and "expected 2 columns" in ei.value.reason
    reg = tmp_path / "reg.csv"
    reg.write_text("text,label\na,0.5\nb,1\n")
    assert validate_file(reg).problem_type == "regression"


def test_custom_columns_and_task_mismatch(tmp_path):
    p = _jsonl(tmp_path, [{"sentence": "a", "y": "pos"}, {"sentence": "b", "y": "neg"}])
    data = load_records(p, text_column="sentence", label_column="y")
    assert data.records[0]["text"] == "a" and data.report.labels == ["neg", "pos"]
    q = _jsonl(tmp_path, [{"text": "plain"}], "t.jsonl")
    with pytest.raises(DataError) as ei:
        validate_file(q, task="classification")
    assert ei.value.field == "label" and ei.value.line == 1


def test_seeded_validation_split_is_stable_and_disjoint():
    recs = [{"text": str(i), "label": "a"} for i in range(50)]
    tr1, va1 = split_validation(recs, 0.1, seed=3)
    tr2, va2 = split_validation(recs, 0.1, seed=3)
    _, va3 = split_validation(recs, 0.1, seed=4)
    assert va1 == va2 and len(va1) == 5 and len(tr1) == 45
    assert va1 != va3
    assert not ({r["text"] for r in tr1} & {r["text"] for r in va1})
    _, capped = split_validation(recs, 0.5, max_rows=3, seed=3)
    assert len(capped) == 3


# ----------------------------------------------------------------------------- tokenization
def _llama_tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def _decode_labelled(tok, ex):
    return tok.decode(
        [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100]
    )


def test_chat_loss_only_on_assistant_tokens(tiny_llama_dir):
    from core.tokenize import encode_lm

    tok = _llama_tok(tiny_llama_dir)
    rec = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello", "weight": 1},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "skip me", "weight": 0},
        {"role": "user", "content": "last"},
        {"role": "assistant", "content": "bye", "weight": 1},
    ]}  # fmt: skip
    enc = encode_lm([rec], tok, 256, "messages")
    ex = enc.examples[0]
    learned = _decode_labelled(tok, ex)
    # the assistant turns (with their end-of-turn token), nothing from system/user/weight-0
    assert "hello" in learned and "bye" in learned
    for absent in ("brief", "there", "again", "skip", "last"):
        assert absent not in learned
    n_eos = sum(1 for t, lab in zip(ex["input_ids"], ex["labels"], strict=True)
                if lab == tok.eos_token_id)  # fmt: skip
    assert n_eos == 2
    full = tok.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in rec["messages"]], tokenize=False
    )
    assert tok.decode(ex["input_ids"], skip_special_tokens=False).replace(" ", "") == full.replace(
        " ", ""
    )


def test_prompt_completion_and_text(tiny_llama_dir):
    from core.tokenize import Collator, encode_lm

    tok = _llama_tok(tiny_llama_dir)
    enc = encode_lm([{"prompt": "Q: two plus two? A:", "completion": " four"}], tok, 64,
                    "prompt_completion")  # fmt: skip
    ex = enc.examples[0]
    assert _decode_labelled(tok, ex).strip().startswith("four")
    assert ex["labels"][-1] == tok.eos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    assert "two" not in _decode_labelled(tok, ex)
    # a long text is cut into max_length windows with loss on every token
    txt = encode_lm([{"text": "abcdefghij" * 5}], tok, 16, "text")
    assert len(txt.examples) >= 3
    assert all(len(e["input_ids"]) <= 16 for e in txt.examples)
    assert all(e["labels"] == e["input_ids"] for e in txt.examples)
    # completions truncated away are dropped, not trained on as all-ignored rows
    gone = encode_lm([{"prompt": "x" * 40, "completion": "y"}], tok, 8, "prompt_completion")
    assert gone.dropped == 1 and not gone.examples
    batch = Collator(tok.pad_token_id, lm=True)(txt.examples[-1:] + txt.examples[:1])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = int(batch["attention_mask"][0].sum())
    assert (batch["labels"][0, short:] == -100).all()
    assert (batch["input_ids"][0, short:] == tok.pad_token_id).all()


def test_classification_encoding_and_dynamic_padding(tiny_bert_dir):
    from transformers import AutoTokenizer

    from core.tokenize import Collator, encode_classification

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    recs = [{"text": "good", "label": "pos"}, {"text": "the movie was very bad", "label": "neg"},
            {"text": "fine", "text_pair": "okay", "label": "pos"}]  # fmt: skip
    enc = encode_classification(recs, tok, 5, {"neg": 0, "pos": 1})
    assert [e["labels"] for e in enc.examples] == [1, 0, 1]
    assert max(len(e["input_ids"]) for e in enc.examples) == 5  # truncated
    assert 1 in enc.examples[2]["token_type_ids"]  # the pair is segment 1
    b = Collator(tok.pad_token_id, lm=False)(enc.examples[:1])
    assert b["input_ids"].shape[1] == len(enc.examples[0]["input_ids"])  # no fixed padding
    assert b["labels"].dtype.is_floating_point is False
    with pytest.raises(DataError):
        encode_classification([{"text": "x", "label": "other", "_line": 7}], tok, 8, {"a": 0})


# --- bounded memory (issue 12) ------------------------------------------------------------


def _peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _big_csv(path: Path, n_rows: int) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        fh.write("text,label\n")
        for i in range(n_rows):
            fh.write(f'"row {i}, with a comma and some words to make it longer",{"ab"[i % 2]}\n')
    return path


def test_validation_memory_does_not_grow_with_the_file(tmp_path):
    small = _big_csv(tmp_path / "small.csv", 5_000)  # ~0.3 MB
    large = _big_csv(tmp_path / "large.csv", 50_000)  # ~3 MB
    peak_small = _peak_bytes(lambda: validate_file(small))
    peak_large = _peak_bytes(lambda: validate_file(large))
    assert validate_file(large).n_rows == 50_000
    # 10x the rows, about the same peak (the old reader held the whole file, decoded, and
    # every record: ~9x the file's size)
    assert peak_large < 1.5 * peak_small + 256 * 1024, (peak_small, peak_large)
    assert peak_large < large.stat().st_size / 4
    # loading for training keeps the records, so it does grow
    assert _peak_bytes(lambda: load_records(large)) > 4 * peak_large


def test_a_file_without_newlines_is_refused_without_reading_it_whole(tmp_path):
    p = tmp_path / "one_line.csv"
    p.write_bytes(b"text,label\n" + b"x" * (6 * 1024 * 1024))
    with pytest.raises(DataError, match="line 2: line is over the") as e:
        validate_file(p)
    assert e.value.line == 2
    p2 = tmp_path / "one_line.jsonl"
    p2.write_bytes(b'{"text": "' + b"y" * (20 * 1024 * 1024))
    box: dict = {}

    def run() -> None:
        try:
            validate_file(p2)
        except DataError as exc:
            box["exc"] = exc

    peak = _peak_bytes(run)
    # at most a line's limit (2 MiB) read, twice over: not the 20 MB file
    assert box["exc"].line == 1 and peak < 6 * 1024 * 1024, peak


def test_csv_with_lone_carriage_returns_and_quoted_newlines_still_reads(tmp_path):
    p = tmp_path / "mac.csv"
    p.write_bytes(b'text,label\r"a\nb",x\r"c",y\r')
    rep = validate_file(p)
    assert rep.n_rows == 2 and rep.labels == ["x", "y"]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\nok,a\n\xff\xfe,b\n")
    with pytest.raises(DataError, match="line 3: not valid UTF-8") as e:
        validate_file(bad)
    assert e.value.line == 3
