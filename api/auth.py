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
import contextvars
import hashlib
import hmac
import json
import os
import secrets
import sys
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, TypeAdapter

from api.security import route_of
from deployments import metrics
from deployments.errors import AtelierError, UnauthorizedError

Scope = Literal["read", "generate", "train", "admin"]
IMPLIED: dict[str, set[str]] = {"read": {"read"}, "generate": {"read", "generate"}, "train": {"read", "train"},
                                "admin": {"read", "generate", "train", "admin"}}
ALL_SCOPES = frozenset(IMPLIED)
READ_METHODS = ("GET", "HEAD")


class RequireScope:
    """A route's access rule, attached to the route itself as a dependency (api/services.py
    includes each router with one: `dependencies=[Depends(RequireScope("train"))]`), never
    inferred from its path, so a route prefix in front of the app changes nothing.

    GET and HEAD need `read`; the other methods need one of `write` (a route that acts on things
    of several scopes, e.g. POST /v1/jobs/{id}/cancel, takes any of them and its service checks
    the thing's own). `public`: no key at all (the probes and the web UI's static shell).

    AuthMiddleware reads the rule before the body is read and answers 401/403; the dependency
    checks the middleware's verdict again, so a route never runs on a request it did not see.
    """

    def __init__(self, *write: Scope, public: bool = False):
        if not write and not public:
            raise ValueError("a scoped route needs at least one scope for its writes")
        self.write = tuple(write)
        self.public = public

    def needed(self, method: str) -> tuple[str, ...]:
        """Any one of these scopes lets `method` through; () for a public route."""
        if self.public:
            return ()
        return ("read",) if method in READ_METHODS else self.write

    def __repr__(self) -> str:
        return "RequireScope(public=True)" if self.public else f"RequireScope{self.write}"

    async def __call__(self, request: Request) -> None:
        needed = self.needed(request.method)
        if not needed:
            return
        state = request.scope.get("state") or {}
        if "api_scopes" not in state:  # no AuthMiddleware saw this request: refuse (fail closed)
            raise UnauthorizedError("a valid API key is required: send `Authorization: Bearer <key>`")
        if not set(needed) & state["api_scopes"]:
            raise PermissionDeniedError(scope_message(state.get("api_key"), request.method, request.url.path, needed))


PUBLIC = RequireScope(public=True)
# Routes that only read (GET): `read`; any other method there would need `admin`. FastAPI's schema
# and docs routes have this rule too.
READ_ONLY = RequireScope("admin")


def rule_of(route) -> RequireScope | None:
    """The access rule attached to a route: a RequireScope dependency, or `route.access` (mounts,
    FastAPI's docs routes); None if it has none."""
    rule = getattr(route, "access", None)
    if isinstance(rule, RequireScope):
        return rule
    for depends in getattr(route, "dependencies", None) or []:
        if isinstance(getattr(depends, "dependency", None), RequireScope):
            return depends.dependency
    return None


def granted(key: ApiKey | None) -> frozenset[str]:
    """Every scope a key holds, implied ones included; every scope in open mode (no key)."""
    if key is None:
        return ALL_SCOPES
    return frozenset(s for held in key.scopes for s in IMPLIED[held])


def granted_scopes(request: Request) -> frozenset[str]:
    """The scopes the request's key holds (AuthMiddleware's verdict); none without one."""
    return (request.scope.get("state") or {}).get("api_scopes", frozenset())


def scope_message(key_name: str | None, method: str, path: str, needed: tuple[str, ...] | str) -> str:
    needed = (needed,) if isinstance(needed, str) else needed
    wants = " or ".join(repr(n) for n in needed)
    who = f"API key {key_name!r}" if key_name else "this API key"
    return f"{who} does not have the scope for {method} {path}: it needs {wants}"


class PermissionDeniedError(AtelierError):
    status_code = 403
    error_type = "permission_error"


class ApiKey(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key; the key itself is never stored")
    scopes: list[Scope] = Field(min_length=1)
    owner: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.@-]+$",
                              description="The tenant whose resources this key sees and acts on; keys with the "
                                          "same owner share them. Default: the key's name.")

    @property
    def tenant(self) -> str:
        return self.owner or self.name


# --- who is asking: the owner of everything a request creates, and what it may see ---------------


@dataclass(frozen=True)
class Caller:
    """The tenant a request acts for. Every resource records its owner (the tenant of the key that
    made it); a caller sees and acts only on its own, and anything else is as unknown as a missing
    id (404: existence does not leak). `admin` keys see everything. In open mode (no keys, the
    trusted local machine) the one local user is admin and records no owner."""

    owner: str | None
    admin: bool = False
    key: str | None = None  # the API key's name (what rate limits count against); None in open mode

    def sees(self, owner: str | None, public: bool = False) -> bool:
        """Whether this caller may read a resource of `owner` (shared read-only when `public`)."""
        return self.admin or public or (owner is not None and owner == self.owner)

    def owns(self, owner: str | None) -> bool:
        """Whether this caller may change or delete a resource of `owner` (public or not)."""
        return self.admin or (owner is not None and owner == self.owner)


LOCAL_OPERATOR = Caller(owner=None, admin=True)
_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("atelier_caller", default=LOCAL_OPERATOR)


def caller() -> Caller:
    """The caller of the request being served: set by AuthMiddleware for every HTTP request, and
    carried into threads (asyncio.to_thread and Starlette's threadpool copy the context). Outside a
    request (CLIs, the job runners, service-level tests) it is the local operator, who sees all."""
    return _caller.get()


def acting_as(who: Caller) -> contextvars.Token:
    """Make `who` the caller of the current context (reset with `_caller.reset(token)`)."""
    return _caller.set(who)


def reset_caller(token: contextvars.Token) -> None:
    _caller.reset(token)


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


class _NoLimits:
    @staticmethod
    def request(key: str) -> None:
        return None


NO_LIMITS = _NoLimits()


class AuthMiddleware:
    """Checks the key and the scope its route asks for (`RequireScope`), before anything reads the
    request body. The route is the one the router will dispatch to (api/security.py `route_of`):
    a path the app has no route for still needs a valid key (then 404/405); a route without a
    rule needs `admin` (fail closed).

    Open mode (no keys) checks no key, but refuses a browser's cross-origin write (an `Origin`
    that is neither this server's nor a configured CORS origin): any web page could otherwise
    drive the open local API (CSRF)."""

    def __init__(self, app, keys_of, routes_of=lambda: (), trusted_origins: tuple[str, ...] = (),
                 limiter_of=lambda: NO_LIMITS):
        self.app = app
        self.limiter_of = limiter_of  # () -> the per-key rate limiter (api/ratelimit.py)
        # () -> list[ApiKey] | None: None only in open mode. An empty list refuses every key, so the
        # app is closed until the replica has its config.
        self.keys_of = keys_of
        self.routes_of = routes_of
        self.trusted_origins = frozenset(o.rstrip("/").lower() for o in trusted_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        keys = self.keys_of()
        state = scope.setdefault("state", {})
        method = scope["method"]
        if keys is None:
            if method not in ("GET", "HEAD", "OPTIONS") and not self._same_or_trusted_origin(scope):
                response = _error(403, "permission_error",
                                  "cross-origin request refused: this server's API is open (no keys), so it "
                                  "only takes writes from its own pages and configured CORS origins")
                return await response(scope, receive, send)
            state["api_scopes"] = ALL_SCOPES
            return await self._as(LOCAL_OPERATOR, scope, receive, send)
        route = route_of(scope, self.routes_of())
        rule = rule_of(route) if route is not None else None
        if rule is not None and rule.public:  # the probes and the UI shell: nobody's data
            return await self._as(Caller(owner=None, admin=False), scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        kind, _, presented = header.partition(" ")
        key = find_key(keys, presented.strip()) if kind.lower() == "bearer" and presented.strip() else None
        if key is None:
            response = _error(401, "authentication_error",
                              "a valid API key is required: send `Authorization: Bearer <key>`",
                              {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        held = granted(key)
        if route is not None:
            needed = rule.needed(method) if rule is not None else ("admin",)
            if not set(needed) & held:
                response = _error(403, "permission_error", scope_message(key.name, method, scope["path"], needed))
                return await response(scope, receive, send)
        state["api_key"] = key.name
        state["api_scopes"] = held
        try:
            self.limiter_of().request(key.name)
        except AtelierError as exc:  # over the key's request budget: 429 + Retry-After
            response = _error(exc.status_code, exc.error_type, exc.message, exc.headers)
            return await response(scope, receive, send)
        await self._as(Caller(owner=key.tenant, admin="admin" in held, key=key.name), scope, receive, send)

    async def _as(self, who: Caller, scope, receive, send) -> None:
        token = acting_as(who)
        try:
            await self.app(scope, receive, send)
        finally:
            reset_caller(token)

    def _same_or_trusted_origin(self, scope) -> bool:
        """No Origin (curl, SDKs: not a browser), this server's own, or a configured CORS origin."""
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin")
        if origin is None:
            return True
        origin = origin.decode("latin-1").strip().rstrip("/").lower()
        if origin in self.trusted_origins:
            return True
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        parsed = urlsplit(origin)
        if not host or parsed.scheme not in ("http", "https") or not parsed.netloc:
            return False  # "null" (a sandboxed frame, a file: page) is no origin to trust
        default = {"http": ":80", "https": ":443"}[parsed.scheme]
        return parsed.netloc in (host, host.removesuffix(default)) or parsed.netloc + default == host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.auth")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new-key", help="make a key; prints it once, and the entry for the config")
    new.add_argument("--name", required=True)
    new.add_argument("--scopes", default="read,generate", help="comma-separated: read, generate, train, admin")
    new.add_argument("--owner", default=None, help="the tenant whose resources the key shares (default: its name)")
    args = parser.parse_args(argv)
    key = "atl-" + secrets.token_urlsafe(32)
    entry = ApiKey(name=args.name, sha256=hash_key(key), scopes=args.scopes.split(","), owner=args.owner)
    print(f"key (shown once): {key}")
    print(f"entry: {json.dumps(entry.model_dump(exclude_none=True))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
