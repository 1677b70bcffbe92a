"""A token issuer of the distribution auth spec on 127.0.0.1, for registries with token auth.

It generates an RSA key and a self-signed certificate with the ``openssl`` command, so the
registry can trust it through ``auth.token.rootcertbundle``. Tokens are RS256 JWTs that carry
the certificate in the ``x5c`` header. ``GET /token`` takes HTTP Basic credentials (or none, for
an anonymous token), and ``POST /token`` takes an OAuth2 form with ``grant_type`` ``password``
or ``refresh_token``. Every request is recorded for the tests to inspect.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

ISSUER = "servin-test-issuer"
SERVICE = "servin-test-registry"
TOKEN_SECONDS = 300


@dataclass
class TokenRequestRecord:
    """One request the issuer received."""

    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    authorization: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """The issuer: ``users`` maps names to passwords, ``refresh_tokens`` maps tokens to names.

    ``anonymous_repositories`` may be pulled with an anonymous token; other repositories need
    a known user.
    """

    users: dict[str, str] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    anonymous_repositories: set[str] = field(default_factory=set)
    requests: list[TokenRequestRecord] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="servin-tokens-"))
        self.key_path = self.workdir / "key.pem"
        self.cert_path = self.workdir / "cert.pem"
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._sign_lock = threading.Lock()

    @property
    def realm(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def registry_auth_config(self) -> dict[str, Any]:
        """Return the ``auth`` section of a docker-registry config that trusts this issuer."""
        return {
            "token": {
                "realm": self.realm,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(self.cert_path),
            }
        }

    def start(self) -> Self:
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                "-keyout", str(self.key_path), "-out", str(self.cert_path),
                "-days", "2", "-subj", "/CN=servin-test-issuer",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert_path), "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer._handle(self, "GET")

            def do_POST(self) -> None:
                issuer._handle(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("token server request: %s", format % args)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def token_for(self, user: str, repository: str) -> str:
        """Return a pull and push token for ``repository``, as a test's pusher needs."""
        return self._sign(user, self._access(f"repository:{repository}:pull,push", user))

    # --- request handling ------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        query = parse_qs(url.query)
        form: dict[str, list[str]] = {}
        if method == "POST":
            length = int(handler.headers.get("content-length") or 0)
            form = parse_qs(handler.rfile.read(length).decode())
        authorization = handler.headers.get("authorization") or ""
        self.requests.append(TokenRequestRecord(method, url.path, query, form, authorization))
        if url.path != "/token":
            self._reply(handler, 404, {"error": "not found"})
            return
        params = form if method == "POST" else query
        user = self._authenticate(method, authorization, form)
        if user is False:
            self._reply(handler, 401, {"error": "invalid credentials"})
            return
        scope = (params.get("scope") or [""])[0]
        access = self._access(scope, user or None)
        token = self._sign(user or "", access)
        self.issued.append(token)
        body: dict[str, Any] = {"expires_in": TOKEN_SECONDS}
        # The OAuth2 form returns access_token, the GET form returns token.
        body["access_token" if method == "POST" else "token"] = token
        self._reply(handler, 200, body)

    def _authenticate(self, method: str, authorization: str, form: dict[str, list[str]]) -> Any:
        """Return the user name, "" for anonymous, or False for bad credentials."""
        if method == "POST":
            grant = (form.get("grant_type") or [""])[0]
            if grant == "refresh_token":
                refresh = (form.get("refresh_token") or [""])[0]
                return self.refresh_tokens.get(refresh, False)
            if grant == "password":
                user = (form.get("username") or [""])[0]
                password = (form.get("password") or [""])[0]
                return user if self.users.get(user) == password and user else False
            return False
        if not authorization:
            return ""
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        user, _, password = base64.b64decode(encoded).decode().partition(":")
        return user if user and self.users.get(user) == password else False

    def _access(self, scope: str, user: str | None) -> list[dict[str, Any]]:
        parts = scope.split(":")
        if len(parts) != 3 or parts[0] != "repository":
            return []
        repository = parts[1]
        if user is None and repository not in self.anonymous_repositories:
            return []
        return [{"type": "repository", "name": repository, "actions": ["pull", "push"]}]

    def _sign(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + TOKEN_SECONDS,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        with self._sign_lock:
            signature = subprocess.run(
                ["openssl", "dgst", "-sha256", "-sign", str(self.key_path)],
                input=signing_input.encode(),
                check=True,
                capture_output=True,
            ).stdout
        return signing_input + "." + _b64url(signature)

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
