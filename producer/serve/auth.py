"""API keys: required when any is configured, as OpenAI's SDK sends them (Authorization: Bearer) or Anthropic's
(x-api-key); refusals in the caller's 401 shape (errors.error_response)."""

import hmac
from collections.abc import Callable, Sequence

from batchgen.producer.serve.errors import ApiError
from fastapi import Request

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def key_checker(api_keys: Sequence[str]) -> Callable[[Request], None]:
    """A FastAPI dependency; with no keys every request passes (the CLI then binds to loopback only)."""
    keys = [k.encode() for k in api_keys]

    def require_key(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = [token.strip()] if scheme.lower() == "bearer" else []
        given += [request.headers["x-api-key"].strip()] if "x-api-key" in request.headers else []
        # compare_digest against every key: the time taken does not tell how much of a key matched
        if any(hmac.compare_digest(g.encode(), k) for g in given for k in keys):
            return
        raise ApiError(401, "Incorrect API key provided. Pass one as 'Authorization: Bearer KEY' or 'x-api-key: KEY'.",
                       code="invalid_api_key")

    return require_key


def check_bind(host: str, api_keys: Sequence[str], allow_unauthenticated_remote: bool) -> None:
    """Without a key, only this machine may reach the server unless the operator says otherwise."""
    if not api_keys and host not in LOOPBACK_HOSTS and not allow_unauthenticated_remote:
        raise ValueError(f"refusing to serve on {host} without an API key: pass --api-key (or set "
                         "BATCHGEN_API_KEY), or --allow-unauthenticated-remote")
