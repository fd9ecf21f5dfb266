"""Lets MONAI Label verify access tokens when its authentication is on.

monailabel 0.8.5 checks a token with ``jwt.decode(token, key, options=...)`` and no ``algorithms``
argument, which PyJWT 2 (that monailabel requires) refuses for every token: with
``MONAI_LABEL_AUTH_ENABLE`` every request then answers 401. The module that does the check gets a
``jwt`` whose ``decode`` names the RSA algorithms Keycloak signs with when the caller names none;
a monailabel that passes its own ``algorithms`` is left as it is.
"""

from __future__ import annotations

import logging
import types

logger = logging.getLogger(__name__)

RSA_ALGORITHMS = ["RS256", "RS384", "RS512"]


def name_token_algorithms() -> None:
    """Make monailabel's token check pass ``algorithms`` to PyJWT (idempotent)."""
    import jwt
    from monailabel.endpoints.user import auth

    if getattr(auth.jwt, "names_algorithms", False):
        return

    def decode(token, key=None, *args, **kwargs):
        kwargs.setdefault("algorithms", RSA_ALGORITHMS)
        return jwt.decode(token, key, *args, **kwargs)

    proxy = types.SimpleNamespace(**{name: getattr(jwt, name) for name in dir(jwt) if not name.startswith("__")})
    proxy.decode, proxy.names_algorithms = decode, True
    auth.jwt = proxy
    logger.info("auth: access tokens are verified with %s", ", ".join(RSA_ALGORITHMS))
