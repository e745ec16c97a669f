"""An Onebox answer that is not JSON, or lacks fields the flow relies on, is a typed error."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
import requests
from requests.adapters import BaseAdapter

from fulfilment.config import Settings
from fulfilment.errors import OutcomeUnknownError, PermanentError, TransientError
from fulfilment.onebox.auth import TokenProvider
from fulfilment.onebox.client import OneboxClient

TOKEN = b'{"access_token": "t", "token_type": "bearer", "expires_in": 3600}'


class Scripted(BaseAdapter):
    """Answers each request with the next (status, body) of a script; no network."""

    def __init__(self, *answers: tuple[int, bytes]) -> None:
        super().__init__()
        self.answers = list(answers)

    def send(self, request: requests.PreparedRequest,  # type: ignore[override]
             **_: Any) -> requests.Response:
        status, body = self.answers.pop(0)
        response = requests.Response()
        response.status_code, response._content = status, body
        response.headers["Content-Type"] = "application/json"
        response.request, response.url = request, request.url or ""
        return response

    def close(self) -> None:
        pass


def client_with(*answers: tuple[int, bytes]) -> OneboxClient:
    settings = Settings.defaults()
    session = requests.Session()
    session.mount("http://", Scripted(*answers))
    tokens = TokenProvider(settings, fakeredis.FakeRedis(), session)
    return OneboxClient(settings, tokens, session)


@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b"", b"[1, 2]",
                                  b'{"id": "o-1"}', b'{"id": "o-1", "status": 7}'])
def test_an_unreadable_order_answer_to_a_post_is_an_unknown_outcome(body: bytes) -> None:
    client = client_with((200, TOKEN), (200, body))
    with pytest.raises(OutcomeUnknownError) as caught:
        client.create_order()
    assert caught.value.code == "MALFORMED_RESPONSE" and caught.value.step == "create"


def test_an_unreadable_order_answer_to_a_read_is_transient() -> None:
    client = client_with((200, TOKEN), (200, b"not json"))
    with pytest.raises(TransientError) as caught:
        client.get_order("AX59")
    assert caught.value.code == "MALFORMED_RESPONSE"


@pytest.mark.parametrize("body", [b"not json", b"{}", b'{"access_token": "t"}', b"null"])
def test_an_unreadable_token_answer_is_transient(body: bytes) -> None:
    client = client_with((200, body))
    with pytest.raises(TransientError) as caught:
        client.create_order()
    assert caught.value.code == "MALFORMED_RESPONSE" and caught.value.step == "token"


@pytest.mark.parametrize("body", [b"<html>oops</html>", b"[]", b'{"code": 5}'])
def test_an_error_answer_that_is_not_onebox_shaped_keeps_its_http_status(body: bytes) -> None:
    client = client_with((200, TOKEN), (409, body))
    with pytest.raises(PermanentError) as caught:
        client.create_order()
    assert caught.value.code == "HTTP_409" and caught.value.status == 409
