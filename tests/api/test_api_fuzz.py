"""The OpenAPI document is the truth: schemathesis fuzzes every operation of the API's
spec, bounded (FINEGATES_FUZZ_EXAMPLES examples per operation, default 25), with the
checks not_a_server_error, status_code_conformance and response_schema_conformance.

Each operation is one test; every database variant runs it (tests/support/db.py)."""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.api import cls_bytes, upload

EXAMPLES = int(os.environ.get("FINEGATES_FUZZ_EXAMPLES", "25"))


def test_the_spec_holds(app, client, make_headers):
    """Every operation, fuzzed; all failures are collected and reported together."""
    from hypothesis import given

    app.state.settings.rate_limit_per_minute = 0  # reach the handlers, not the limiter
    h = make_headers("fuzz")
    assert upload(client, h, cls_bytes(6)).status_code == 200  # something to list
    spec = schemathesis.openapi.from_asgi("/openapi.json", app)
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    failures: dict[str, str] = {}
    operations = 0
    for result in spec.get_all_operations():
        op = result.ok()
        operations += 1

        @given(case=op.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case) -> None:
            case.call_and_validate(headers=h, checks=checks)

        try:
            run()
        except Exception as exc:  # one line per failing operation, all of them reported
            failures[op.label] = str(exc)[:2000]
    assert operations >= 21
    assert failures == {}, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
