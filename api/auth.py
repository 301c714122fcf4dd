"""API keys: `Authorization: Bearer <key>`, stored only as SHA-256 hashes, with scopes.

Scopes: `read` (GET anything), `generate` (images, videos, chat, workflows, jobs), `train`
(datasets and fine-tuning) and `admin` (everything). `generate` and `train` include `read`.

`auth.mode` is `keys` unless a config says `open`: every route but the probes (`/healthz`,
`/readyz`) and the web UI's static files needs a key, and an ingress that finds no key refuses to start (fail closed), so a
key variable that never reached the replicas cannot leave the API open. Only configs/local.yaml,
for a trusted local machine, says `open`.

    python -m api.auth new-key --name ci --scopes generate,train   # prints the key and its entry
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import sys
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, TypeAdapter

from deployments import metrics

Scope = Literal["read", "generate", "train", "admin"]
IMPLIED: dict[str, set[str]] = {"read": {"read"}, "generate": {"read", "generate"}, "train": {"read", "train"},
                                "admin": {"read", "generate", "train", "admin"}}
OPEN_PATHS = ("/healthz", "/readyz", "/")  # probes and the UI shell carry no data
# The web UI's static shell holds no data; it asks for a key and sends it on every API call.
OPEN_PREFIXES = ("/ui/",)
TRAIN_PREFIXES = ("/v1/datasets", "/v1/fine_tuning")


class ApiKey(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key; the key itself is never stored")
    scopes: list[Scope] = Field(min_length=1)


class AuthConfigError(RuntimeError):
    """The ingress cannot start safely with this auth config."""


class AuthConfig(BaseModel):
    mode: Literal["keys", "open"] = Field(
        "keys", description="keys: every route but /healthz and the UI shell needs a key, and the ingress refuses "
                            "to start without one. open: nothing is checked (a trusted local machine only).")
    keys: list[ApiKey] = Field(default_factory=list, description="Keys in the config (hashes only).")
    keys_env: str = Field("ATELIER_API_KEYS", description="Environment variable with more keys: a JSON list "
                                                          "of {name, sha256, scopes}.")

    def resolved_keys(self) -> list[ApiKey]:
        raw = os.environ.get(self.keys_env)
        extra = TypeAdapter(list[ApiKey]).validate_json(raw) if raw else []
        return [*self.keys, *extra]

    def enforced_keys(self) -> list[ApiKey] | None:
        """The keys the ingress checks; None in open mode. In keys mode, no key is an error."""
        if self.mode == "open":
            return None
        keys = self.resolved_keys()
        if not keys:
            raise AuthConfigError(
                f"auth.mode is 'keys' but no API key is configured: {self.keys_env} is unset or empty in the "
                f"ingress replica's environment and ingress.auth.keys is empty. Set {self.keys_env} where the "
                f"replicas run (the cluster's environment, or runtime_env.env_vars), or set ingress.auth.mode: "
                f"open for a trusted local machine.")
        return keys


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def required_scope(method: str, path: str) -> str:
    if method in ("GET", "HEAD", "OPTIONS"):
        return "read"
    return "train" if path.startswith(TRAIN_PREFIXES) else "generate"


def find_key(keys: list[ApiKey], presented: str) -> ApiKey | None:
    """The key whose hash matches; every entry is compared in constant time, with no early exit."""
    digest = hash_key(presented)
    found = None
    for key in keys:
        if hmac.compare_digest(digest, key.sha256):
            found = key
    return found


def _error(status: int, type_: str, message: str, headers: dict | None = None):
    metrics.rejected(type_)

    return JSONResponse({"error": {"type": type_, "message": message, "param": None}}, status_code=status,
                        headers=headers)


class AuthMiddleware:
    """Checks the key and its scope before anything reads the request body."""

    def __init__(self, app, keys_of):
        self.app = app
        # () -> list[ApiKey] | None: None only in open mode. An empty list refuses every key, so the
        # app is closed until the replica has its config.
        self.keys_of = keys_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        keys = self.keys_of()
        path = scope.get("path", "")
        if keys is None or path in OPEN_PATHS or (path.startswith(OPEN_PREFIXES) and scope["method"] in ("GET", "HEAD")):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        kind, _, presented = header.partition(" ")
        key = find_key(keys, presented.strip()) if kind.lower() == "bearer" and presented.strip() else None
        if key is None:
            response = _error(401, "authentication_error",
                              "a valid API key is required: send `Authorization: Bearer <key>`",
                              {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        needed = required_scope(scope["method"], scope["path"])
        if not any(needed in IMPLIED[s] for s in key.scopes):
            response = _error(403, "permission_error",
                              f"API key {key.name!r} has scopes {key.scopes}; {scope['method']} {scope['path']} "
                              f"needs {needed!r}")
            return await response(scope, receive, send)
        scope.setdefault("state", {})["api_key"] = key.name
        await self.app(scope, receive, send)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.auth")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new-key", help="make a key; prints it once, and the entry for the config")
    new.add_argument("--name", required=True)
    new.add_argument("--scopes", default="read,generate", help="comma-separated: read, generate, train, admin")
    args = parser.parse_args(argv)
    key = "atl-" + secrets.token_urlsafe(32)
    entry = ApiKey(name=args.name, sha256=hash_key(key), scopes=args.scopes.split(","))
    print(f"key (shown once): {key}")
    print(f"entry: {json.dumps(entry.model_dump())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
