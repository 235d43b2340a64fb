"""The shared ingestion token, checked the same way for both protocols."""

from __future__ import annotations

import hmac

from aggregator.errors import UnauthenticatedError


def check_bearer(token: str, authorization: str | None) -> None:
    """Raise UnauthenticatedError unless `authorization` is `Bearer <token>`.

    No token configured: nothing is required. The comparison takes the same
    time whatever the presented value.
    """
    if not token:
        return
    presented = ""
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        presented = credentials.strip() if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(presented.encode(), token.encode()):
        raise UnauthenticatedError("missing or wrong token")
