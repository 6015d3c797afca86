from __future__ import annotations

import pytest

from bastion.logs import RedactingFilter


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
