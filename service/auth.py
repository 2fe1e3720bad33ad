"""The bearer-token rule both transports apply (HTTP's `Authorization` header, gRPC's `authorization`
metadata): `Bearer <token>`, the scheme in any case, the token compared in constant time."""

from __future__ import annotations

import hmac

from service.errors import Unauthenticated

REALM = "cnn-serve"


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether `header` carries `token`; always True when no token is configured."""
    if not token:
        return True
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def check_bearer(header: str | None, token: str, where: str = "'authorization'") -> None:
    """Unauthenticated unless `header` carries `token`."""
    if not bearer_ok(header, token):
        raise Unauthenticated(f"missing or wrong bearer token in {where}")
