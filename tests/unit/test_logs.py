from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.logs import _TRIGGER, RedactingFilter, may_hold_credential


@pytest.mark.parametrize(
    ("line", "hidden"),
    [
        ("auth header was Bearer abc.def-123", "abc.def-123"),
        ("authorization: bearer s3cr3t-value", "s3cr3t-value"),
        ("key bst-0123abcd_QWERTYUIOPasdfghjkl given", "bst-0123abcd_QWERTYUIOPasdfghjkl"),
        ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl here", "eyJzdWIiOiJ4In0"),
        ("env VLLM_API_KEY=topsecretvalue", "topsecretvalue"),
        ("the registered internal-key-0123456789 leaked", "internal-key-0123456789"),
    ],
)
def test_credential_shapes_and_registered_secrets_are_redacted(line: str, hidden: str) -> None:
    redactor = RedactingFilter()
    redactor.add_secret("internal-key-0123456789")
    assert hidden not in redactor.redact(line)


def test_a_line_without_credentials_is_returned_as_is() -> None:
    line = 'POST /v1/chat/completions 200 {"model":"qwen2.5-7b-instruct"}'
    assert RedactingFilter().redact(line) is line


# Shapes, their pieces, other cases, and letters that fold to ASCII ones (a Kelvin sign, a dotted capital I).
FRAGMENTS = ["bearer", "BeArEr", "bst-", "BST-", "eyJ", "EYj", "vllm_api_key", "VLLM_API_KEY", "VLLM_API_\u212aEY",
             "bea", "rer", "bs", "t-", "ey", "J", "vllm_", "api_key", "x", " ", "-", "\u0130", "\u212a"]  # fmt: skip


@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=8).map("".join))
def test_the_fast_credential_check_answers_as_the_trigger_regex(text: str) -> None:
    assert may_hold_credential(text) == (_TRIGGER.search(text) is not None)


def test_a_request_id_without_credential_shapes_is_returned_as_is() -> None:
    request_id = "0123456789abcdef0123456789abcdef"
    assert RedactingFilter().redact(request_id) is request_id
    assert RedactingFilter().redact("id-bst-0123456789abc") == "id-bst-[redacted]"
