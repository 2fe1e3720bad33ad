"""The bearer-token rule both transports apply (HTTP's `Authorization` header, gRPC's `authorization`
metadata): `Bearer <token>`, the scheme in any case, the token compared in constant time."""

from __future__ import annotations

import hmac

from service.errors import PermissionDenied, Unauthenticated

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


def check_admin(header: str | None, admin_token: str, where: str = "'authorization'") -> None:
    """The repository's load and unload: PermissionDenied while no admin token is configured (they are off),
    Unauthenticated unless `header` carries it. The inference token never opens them."""
    if not admin_token:
        raise PermissionDenied(
            "loading and unloading models is off: start the server with --admin-token TOKEN "
            "(or CNN_SERVE_ADMIN_TOKEN) and send it as the bearer token of these calls"
        )
    check_bearer(header, admin_token, where)
