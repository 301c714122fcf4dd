"""API keys: `Authorization: Bearer <key>`, stored only as SHA-256 hashes, with scopes.

Scopes: `read` (GET anything), `generate` (images, videos, chat, workflows, jobs), `train`
(datasets and fine-tuning) and `admin` (everything). `generate` and `train` include `read`.
When keys are configured, every route but `/healthz` and the web UI's static files needs one; with none configured the app
is open, which the ingress says at start-up.

    python -m deployments.auth new-key --name ci --scopes generate,train   # prints the key and its entry
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

from pydantic import BaseModel, Field, TypeAdapter

Scope = Literal["read", "generate", "train", "admin"]
IMPLIED: dict[str, set[str]] = {"read": {"read"}, "generate": {"read", "generate"}, "train": {"read", "train"},
                                "admin": {"read", "generate", "train", "admin"}}
OPEN_PATHS = ("/healthz", "/")
# The web UI's static shell holds no data; it asks for a key and sends it on every API call.
OPEN_PREFIXES = ("/ui/",)
TRAIN_PREFIXES = ("/v1/datasets", "/v1/fine_tuning")


class ApiKey(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key; the key itself is never stored")
    scopes: list[Scope] = Field(min_length=1)


class AuthConfig(BaseModel):
    keys: list[ApiKey] = Field(default_factory=list, description="Keys in the config (hashes only).")
    keys_env: str = Field("ATELIER_API_KEYS", description="Environment variable with more keys: a JSON list "
                                                          "of {name, sha256, scopes}.")

    def resolved_keys(self) -> list[ApiKey]:
        raw = os.environ.get(self.keys_env)
        extra = TypeAdapter(list[ApiKey]).validate_json(raw) if raw else []
        return [*self.keys, *extra]


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
    from fastapi.responses import JSONResponse

    from deployments import metrics

    metrics.rejected(type_)

    return JSONResponse({"error": {"type": type_, "message": message, "param": None}}, status_code=status,
                        headers=headers)


class AuthMiddleware:
    """Checks the key and its scope before anything reads the request body."""

    def __init__(self, app, keys_of):
        self.app = app
        self.keys_of = keys_of  # () -> list[ApiKey]: set once the replica has its config

    async def __call__(self, scope, receive, send):
        keys = self.keys_of() if scope["type"] == "http" else None
        path = scope.get("path", "")
        if not keys or path in OPEN_PATHS or (path.startswith(OPEN_PREFIXES) and scope["method"] in ("GET", "HEAD")):
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
    parser = argparse.ArgumentParser(prog="python -m deployments.auth")
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
