"""The dashboard in headless Chromium (Debian's ``chromium``, driven by Playwright's Python
package; no browser download) against the real API and a real worker (SQLite stack).

Sign in (a wrong key first), refuse a bad file with its line number, upload by drag and
drop, start a job on the tiny model, watch the loss chart gain points while it trains,
see the gate map (final: from the plan), the compression report and the playground's
answer, then cancel a second job from its page. Screenshots go to
$FINEGATES_SCREENSHOTS_DIR when set (docs/dashboard.md uses them).

Under CI=true a missing browser or driver FAILS the test instead of skipping it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

CHROMIUM = Path(os.environ.get("FINEGATES_CHROMIUM", "/usr/bin/chromium"))
IN_CI = os.environ.get("CI", "").lower() == "true"
WIDTH, HEIGHT = 1366, 900  # a laptop screen
JOB_WAIT_MS = 240_000


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true (.ci/run installs it)")
    pytest.skip(f"{what} is missing; skipped locally, fails under CI=true")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright's Python package (pip install playwright)")
    if not CHROMIUM.exists():
        _missing(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _shot(page: Any, name: str) -> None:
    out = os.environ.get("FINEGATES_SCREENSHOTS_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / f"{name}.png"), full_page=True)


def _drop_file(page: Any, zone: str, name: str, text: str) -> None:
    """A real drop event carrying a File, as when a user drags one onto the zone."""
    page.evaluate(
        """([zone, name, text]) => {
            const dt = new DataTransfer();
            dt.items.add(new File([text], name, { type: "application/jsonl" }));
            document.querySelector(zone).dispatchEvent(
                new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        }""",
        [zone, name, text],
    )


def _new_job(page: Any, stack: Any, reviews: bytes, **hp: str) -> str:
    page.click("a[data-nav=new]")
    page.wait_for_selector("#training-file-drop")
    _drop_file(page, "#training-file-drop", "reviews.jsonl", reviews.decode())
    page.wait_for_selector("#training-file-status:has-text('validated')")
    page.select_option("#model", stack.tiny_model)
    for name, value in hp.items():
        page.fill(f"#{name}", value)
    page.fill("#suffix", "browser")
    page.click("#create-job")
    page.wait_for_url(re.compile(r".*#/jobs/ftjob-\w+$"))
    return page.url.rsplit("/", 1)[-1]


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_dashboard_drives_a_job(stack: Any, reviews: bytes, browser: Any) -> None:
    from tests.support.e2e import TINY_MODEL_ID

    stack.tiny_model = TINY_MODEL_ID
    console: list[str] = []
    ctx = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    page = ctx.new_page()
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.set_default_timeout(60_000)

    # --- sign in: a wrong key is refused in words, the right one lands on the jobs list
    page.goto(stack.base_url + "/")
    _shot(page, "signin")
    page.fill("input[name=api_key]", "fg-not-a-key")
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-error:has-text('not accepted')")
    page.fill("input[name=api_key]", stack.key)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#jobs-table")
    assert stack.key not in page.url
    assert page.evaluate("sessionStorage.getItem('finegates.api_key')") == stack.key
    assert page.evaluate("localStorage.length") == 0

    # --- a bad file: the line number is shown
    page.click("a[data-nav=new]")
    page.wait_for_selector("#training-file-drop")
    bad = '{"text": "fine", "label": "positive"}\n{"text": "broken"\n'
    _drop_file(page, "#training-file-drop", "bad.jsonl", bad)
    err = page.wait_for_selector("#training-file-error:not([hidden])")
    assert "line 2" in err.inner_text(), err.inner_text()
    _shot(page, "new-job-error")

    # --- a job on the tiny model; the loss chart gains points while it trains
    hp = {"max_steps": "60", "batch_size": "8", "eval_interval": "15", "max_length": "32",
          "target_sparsity": "0.3"}  # fmt: skip
    job_id = _new_job(page, stack, reviews, **hp)
    page.wait_for_function(
        "() => Number(document.querySelector('#chart-loss')?.dataset.points || 0) > 0",
        timeout=JOB_WAIT_MS,
    )
    first = int(page.get_attribute("#chart-loss", "data-points") or 0)
    page.wait_for_function(
        f"() => Number(document.querySelector('#chart-loss').dataset.points) > {first}",
        timeout=JOB_WAIT_MS,
    )
    page.wait_for_selector("#gatemap-source", timeout=JOB_WAIT_MS)  # from an evaluation
    _shot(page, "job-running")
    page.wait_for_selector("#job-head .badge.succeeded", timeout=JOB_WAIT_MS)
    # final gate map from the plan, the report with its latency bars
    page.wait_for_selector("#gatemap-source[data-source=plan]", timeout=60_000)
    page.wait_for_selector("#report-figures")
    page.wait_for_selector("#report-latency .main-svg")
    assert page.locator("#gatemap-heads .main-svg").count() >= 1
    points = int(page.get_attribute("#chart-loss", "data-points") or 0)
    metrics = stack.list_all(f"/v1/fine_tuning/jobs/{job_id}/metrics")
    assert points == sum(1 for m in metrics if m["kind"] == "train") > first
    # incremental polling: later metric requests carry the `after` cursor
    metric_calls = [u for u in requests if f"/jobs/{job_id}/metrics" in u]
    with_cursor = [i for i, u in enumerate(metric_calls) if "after=ftmetric-" in u]
    assert with_cursor and with_cursor == list(range(with_cursor[0], len(metric_calls)))
    assert not [
        u for u in requests if not u.startswith(stack.base_url) and not u.startswith("blob:")
    ]
    assert all(stack.key not in u for u in requests)
    page.wait_for_selector("#events li")
    assert "Created fine-tuning job" in page.inner_text("#events")

    # --- the playground answers with the finetuned model
    page.fill("#play-input", "a gorgeous, moving film")
    page.click("#play-run")
    answer = page.wait_for_selector("[data-model=finetuned] .answer")
    assert answer.inner_text().split(" ")[0] in ("positive", "negative")
    assert re.search(r"\d+ ms", page.inner_text("[data-model=finetuned]"))
    page.wait_for_selector("[data-model=base] .answer, [data-model=base] .error")
    _shot(page, "job-succeeded")

    # --- a second job; the jobs list shows both; cancelled from its page
    long_id = _new_job(page, stack, reviews, max_steps="5000", batch_size="8", eval_interval="1000")
    page.wait_for_selector("#job-head .badge.running", timeout=JOB_WAIT_MS)
    page.click("a[data-nav=jobs]")
    assert "succeeded" in page.wait_for_selector(f"tr[data-job='{job_id}']").inner_text()
    page.wait_for_selector(f"tr[data-job='{long_id}'] .badge.running")
    page.wait_for_function(
        f"() => /step [1-9]/.test(document.querySelector(\"tr[data-job='{long_id}']\").innerText)"
    )
    _shot(page, "jobs")
    page.click(f"tr[data-job='{long_id}'] a")
    page.wait_for_selector("#job-head .badge.running")
    page.once("dialog", lambda d: d.accept())
    page.click("#cancel-job")
    page.wait_for_selector("#job-head .badge.cancelled", timeout=JOB_WAIT_MS)
    assert stack.get_job(long_id)["status"] == "cancelled"

    # --- sign out forgets the key
    page.click("#sign-out")
    page.wait_for_selector("#signin:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('finegates.api_key')") is None
    errors = [c for c in console if c.startswith(("error", "pageerror"))]
    # the only console errors allowed are the refused sign-in's 401 and a 404 for a missing
    # ONNX/base answer; nothing from the page's own code
    assert not [c for c in errors if "pageerror" in c], errors
    ctx.close()


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_playground_chat_streams_from_both_models(stack: Any, browser: Any, tmp_path: Path) -> None:
    """A decoder job (tiny Llama, causal_lm): the playground streams a chat answer from
    the fine-tuned model and from its dense base, each with its time."""
    import json

    from core.catalog import register_model
    from tests.support.tiny_models import save_tiny_llama

    register_model("tiny-llama-e2e", save_tiny_llama(tmp_path / "llama"), stack.settings.data_path)
    stack.tiny_model = "tiny-llama-e2e"
    chats = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in ["yes", "no", "maybe", "sure"] * 6
    ]
    data = "".join(json.dumps(c) + "\n" for c in chats).encode()
    ctx = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    page.goto(stack.base_url + "/#/new")
    page.fill("input[name=api_key]", stack.key)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#new-job-form")
    job_id = _new_job(page, stack, data, max_steps="6", batch_size="4", eval_interval="3")
    job = stack.wait_job(job_id, timeout=JOB_WAIT_MS / 1000)
    assert job["status"] == "succeeded", (job, stack.worker_log())
    page.wait_for_selector("#job-head .badge.succeeded")
    assert "causal_lm" in page.inner_text("#job-head")
    page.fill("#play-input", "say yes")
    page.click("#play-run")
    for side in ("finetuned", "base"):
        page.wait_for_function(
            f"() => /ms in all/.test(document.querySelector('[data-model={side}] .time')?.innerText || '')",
            timeout=120_000,
        )
        assert not page.locator(f"[data-model={side}] .error").count(), page.inner_text(
            f"[data-model={side}]"
        )
    _shot(page, "playground-chat")
    assert stack.get_job(job_id)["status"] == "succeeded"
    ctx.close()
