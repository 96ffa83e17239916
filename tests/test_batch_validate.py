"""Batch input files are checked before any GPU time: every problem, with its line number."""

from __future__ import annotations

import json

from sage_mq.batch.validate import MAX_ERRORS, check_lines

CHAT = "/v1/chat/completions"


def line(custom_id: str, url: str = CHAT, **body: object) -> str:
    payload = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": payload})


def test_a_good_file_gives_its_requests_in_order_skipping_blank_lines() -> None:
    requests, errors = check_lines([line("a"), "", line("b"), "  "], CHAT)
    assert errors == []
    assert [(r.line, r.custom_id) for r in requests] == [(1, "a"), (3, "b")]
    assert requests[0].body["model"] == "demo"


def test_every_problem_is_named_with_its_line_and_field() -> None:
    lines = [
        line("a"),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"method": "POST", "url": CHAT, "body": {"model": "m"}}),
        line("b", url="/v1/embeddings"),
        json.dumps({"custom_id": "c", "method": "GET", "url": CHAT, "body": {"model": "m"}}),
        json.dumps({"custom_id": "d", "url": CHAT, "body": {"messages": []}}),
        line("a"),
        line("e", stream=True),
    ]
    requests, errors = check_lines(lines, CHAT)
    assert requests == []
    found = [(e.line, e.code, e.param) for e in errors]
    assert found == [
        (2, "invalid_json_line", None),
        (3, "invalid_json_line", None),
        (4, "missing_custom_id", "custom_id"),
        (5, "mismatched_url", "url"),
        (6, "invalid_method", "method"),
        (7, "missing_model", "body.model"),
        (8, "duplicate_custom_id", "custom_id"),
        (9, "invalid_body", "body.stream"),
    ]
    assert "also on line 1" in errors[6].message
    assert errors[0].as_dict()["line"] == 2


def test_endpoint_empty_file_size_and_error_count_limits() -> None:
    _, errors = check_lines([line("a")], "/v1/images")
    assert errors[0].code == "invalid_endpoint" and "/v1/embeddings" in errors[0].message
    assert check_lines(["", "\n"], CHAT)[1][0].code == "empty_file"
    _, errors = check_lines([line(str(i)) for i in range(11)], CHAT, max_requests=10)
    assert errors[0].code == "too_many_requests" and "at most 10" in errors[0].message
    _, errors = check_lines(["x"] * (MAX_ERRORS + 7), CHAT)
    assert len(errors) == MAX_ERRORS + 1 and "7 more" in errors[-1].message
