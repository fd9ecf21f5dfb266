"""A local OpenID Connect realm standing in for Keycloak, to run MONAI Label with authentication on.

MONAI Label's auth (``MONAI_LABEL_AUTH_ENABLE``) reads three things from the realm at
``MONAI_LABEL_AUTH_REALM_URI``: the realm's RSA public key (``GET <realm>``), its token endpoint
(``GET <realm>/.well-known/openid-configuration``) and, through that endpoint, RS256 access
tokens for a username and password (``grant_type=password``), whose ``realm_access.roles`` claim
carries the user's roles. This serves exactly those from a fresh key pair, for tests and for
trying the app behind auth on a machine without Keycloak. It is not an identity provider to
deploy: users and passwords live in memory.

    .venv/bin/python scripts/oidc_realm.py --port 8080      # realm URI http://127.0.0.1:8080/realms/monailabel
"""

from __future__ import annotations

import argparse
import base64
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REALM = "monailabel"
ALL_ROLES = ["monailabel-admin", "monailabel-reviewer", "monailabel-annotator", "monailabel-user"]
DEFAULT_USERS = {  # username -> (password, roles)
    "admin": ("admin-pass", ALL_ROLES),
    "annotator": ("annotator-pass", ["monailabel-annotator", "monailabel-user"]),
    "viewer": ("viewer-pass", ["monailabel-user"]),
}


@dataclass
class Realm:
    """A running realm: its URI and the key that signs its tokens."""

    uri: str
    private_key: rsa.RSAPrivateKey
    server: ThreadingHTTPServer

    def token(self, username: str, roles: list[str], lifetime_s: int = 3600) -> str:
        """An access token as Keycloak issues it (signed RS256 by this realm)."""
        now = int(time.time())
        claims = {"iss": self.uri, "sub": username, "preferred_username": username, "email": f"{username}@example.org",
                  "name": username, "realm_access": {"roles": roles}, "iat": now, "exp": now + lifetime_s}
        return jwt.encode(claims, self.private_key, algorithm="RS256")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start(port: int = 0, users: dict[str, tuple[str, list[str]]] | None = None, host: str = "127.0.0.1") -> Realm:
    """Serve a realm on ``host:port`` (0: any free port) in a background thread."""
    users = DEFAULT_USERS if users is None else users
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_der = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    realm: Realm

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = f"/realms/{REALM}"
            if self.path == path:
                self._send(200, {"realm": REALM, "public_key": base64.b64encode(public_der).decode()})
            elif self.path == f"{path}/.well-known/openid-configuration":
                self._send(200, {"issuer": realm.uri, "token_endpoint": f"{realm.uri}/protocol/openid-connect/token"})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != f"/realms/{REALM}/protocol/openid-connect/token":
                self._send(404, {"error": "not found"})
                return
            form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
            username, password = form.get("username", [""])[0], form.get("password", [""])[0]
            known = users.get(username)
            if form.get("grant_type", [""])[0] != "password" or known is None or known[0] != password:
                self._send(401, {"error": "invalid_grant", "error_description": "Invalid user credentials"})
                return
            self._send(200, {"access_token": realm.token(username, known[1]), "token_type": "Bearer",
                             "expires_in": 3600})

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    realm = Realm(f"http://{host}:{server.server_address[1]}/realms/{REALM}", key, server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return realm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    realm = start(args.port)
    print(f"realm {realm.uri}; users: " + ", ".join(f"{u}/{p} ({', '.join(r)})" for u, (p, r) in DEFAULT_USERS.items()))
    print(f"start the server with MONAI_LABEL_AUTH_ENABLE=true MONAI_LABEL_AUTH_REALM_URI={realm.uri}")
    threading.Event().wait()


if __name__ == "__main__":
    main()
