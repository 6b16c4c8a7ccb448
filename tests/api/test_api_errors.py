"""One error shape everywhere, request bodies validated by their models, and response
models that refuse fields they do not declare."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.errors import APIError, _loc_to_param
from api.schemas import FileObject, JobEventObject


def _error(r):
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def test_inference_bodies_name_the_bad_field(client, make_headers):
    h = make_headers("errors-a")
    cases = [
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "robot"}]},
            "messages[1].role",
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": [{"text": "no type"}]}]},
            "messages[0].content[0].type",
        ),
        ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
        ("/v1/completions", {"model": "m", "prompt": "x", "stream": "maybe"}, "stream"),
        ("/v1/completions", {"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x"}, "model"),
        ("/v1/classify", {"model": "m", "input": 5}, "input"),
    ]
    for path, body, param in cases:
        r = client.post(path, headers=h, json=body)
        assert r.status_code == 400, (path, body, r.text)
        err = _error(r)
        assert (err["param"], err["type"], err["code"]) == (
            param,
            "invalid_request_error",
            "invalid_request",
        ), (path, body)
        assert err["message"].startswith(f"{param}: "), err["message"]


def test_unknown_openai_fields_are_ignored_by_inference_bodies(client, make_headers):
    """An OpenAI client may send fields this server does not use (user, logit_bias, ...):
    the request then fails on the model id, not on the body."""
    h = make_headers("errors-b")
    r = client.post(
        "/v1/completions",
        headers=h,
        json={"model": "ft:nope", "prompt": "x", "user": "u-1", "logit_bias": {}},
    )
    assert r.status_code == 404
    assert (_error(r)["param"], _error(r)["code"]) == ("model", "model_not_found")


def test_inference_and_api_errors_share_one_renderer(client, make_headers):
    h = make_headers("errors-c")
    job = _error(client.get("/v1/fine_tuning/jobs/ftjob-none", headers=h))
    assert job == {
        "message": "No job with id 'ftjob-none'",
        "type": "invalid_request_error",
        "param": None,
        "code": "job_not_found",
    }
    r = client.post("/v1/classify", headers=h, json={"model": "ft:nope", "input": "x"})
    assert _error(r) == {
        "message": "The model 'ft:nope' does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert APIError(500, "boom").body()["error"]["type"] == "server_error"
    assert APIError(429, "slow down").body()["error"]["code"] == "rate_limit_exceeded"


def test_job_bodies_refuse_unknown_fields(client, make_headers):
    h = make_headers("errors-d")
    r = client.post(
        "/v1/fine_tuning/jobs",
        headers=h,
        json={"model": "minilm-l6", "training_file": "file-x", "hyperparameter": {}},
    )
    assert r.status_code == 400 and _error(r)["param"] == "hyperparameter"


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "messages", 0, "role"), "messages[0].role"),
        (("body", "input", "str"), "input"),
        (("body", "input", "list[union[str,list[str]]]", 2, "list[str]", 1), "input[2][1]"),
        (("body", "stream"), "stream"),
        (("query", "limit"), "limit"),
        (("body",), None),
    ],
)
def test_validation_locations_become_params(loc, param):
    assert _loc_to_param(loc) == param


def test_response_models_refuse_undeclared_fields():
    event = {
        "id": "ftevent-1",
        "created_at": 0,
        "level": "info",
        "message": "m",
        "type": "message",
    }
    assert JobEventObject.model_validate(event).object == "fine_tuning.job.event"
    with pytest.raises(ValidationError, match="surprise"):
        JobEventObject.model_validate({**event, "surprise": 1})
    with pytest.raises(ValidationError, match="level"):
        JobEventObject.model_validate({**event, "level": "debug"})
    with pytest.raises(ValidationError, match="sha256"):
        FileObject.model_validate(
            {"id": "file-1", "bytes": 1, "created_at": 0, "filename": "a", "purpose": "p"}
            | {"status": "processed"}
        )


def test_openapi_documents_the_request_and_list_shapes(client):
    doc = client.get("/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ChatCompletionRequest")
    schemas = doc["components"]["schemas"]
    assert {"ChatCompletion", "Completion", "ClassificationList"} <= set(schemas)
    jobs = doc["paths"]["/v1/fine_tuning/jobs"]["get"]["responses"]["200"]["content"]
    page = schemas[jobs["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]]
    assert set(page["properties"]) == {
        "object",
        "data",
        "has_more",
        "first_id",
        "last_id",
        "count",
    }
