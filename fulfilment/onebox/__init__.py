"""The Onebox distribution API client and its token provider."""

from fulfilment.onebox.auth import TokenProvider
from fulfilment.onebox.client import OneboxClient, build_client

__all__ = ["OneboxClient", "TokenProvider", "build_client"]
