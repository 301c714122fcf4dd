"""Image sources to collect datasets from: Unsplash and Pexels, on their official REST APIs.

* Unsplash: ``GET {base_url}/search/photos`` with ``Authorization: Client-ID <access key>``
  (``Accept-Version: v1``). Each imported photo's ``links.download_location`` is called once
  (with the same key), as the API guidelines ask: that counts the download for the photographer.
* Pexels: ``GET {base_url}/v1/search`` with ``Authorization: <key>``.

Keys come only from the environment of the process (``api_key_env`` names the variable), never
from a request and never into a job record: the import job reads the same variable to ping
Unsplash. A source whose variable is unset is listed as unavailable, with that reason.

Results are normalised (:class:`SourceResult`): id (``<source>:<its id>``), thumbnail, full and
download URLs, size, description, photographer with profile and photo page URLs, and licence.
Each answer's rate-limit headers (``X-Ratelimit-Limit``/``-Remaining``/``-Reset``) come back as
:class:`RateLimit`; a 429 (or Unsplash's 403 with no requests left) is a
:class:`SourceRateLimitedError` carrying the reset time. Each source remembers the last headers
it saw (:class:`RateLimitState`, in this process): while they say no request is left and the
reset is still ahead, a search is refused with that same error without calling the source.
Unsplash sends no reset time; a spent window without one is waited out for ``EXHAUSTED_WAIT_S``.

A search page is remembered per owner (:class:`CollectRecords`, one small JSON object per result
under ``collect/<owner>/results/``): an import takes only result ids this server returned to that
owner, with what the source said about them, so a client cannot slip in other URLs or credits.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from pydantic import BaseModel, Field, ValidationInfo, field_validator

from storage.fs import ObjectNotFoundError, Storage
from storage.keys import owner_tag

__all__ = [
    "COLLECT_PREFIX",
    "SOURCE_NAMES",
    "CollectConfig",
    "CollectRecords",
    "RateLimit",
    "RateLimitState",
    "SearchPage",
    "Source",
    "SourceConfig",
    "SourceError",
    "SourceRateLimitedError",
    "SourceResult",
    "SourceStatus",
    "build_sources",
    "host_allowed",
    "ping_download",
]

COLLECT_PREFIX = "collect/"
SOURCE_NAMES = ("unsplash", "pexels")
ORIENTATIONS = ("landscape", "portrait", "square")
EXHAUSTED_WAIT_S = 60.0  # a spent window whose reset the source does not say (Unsplash) is not retried sooner


# --- config ------------------------------------------------------------------------------------


class SourceConfig(BaseModel):
    enabled: bool = True
    api_key_env: str = Field(description="The environment variable that holds the API key.")
    base_url: str = Field(description="The API's root (a loopback stand-in in tests).")
    download_hosts: list[str] = Field(
        description="Host names the source's image files may be fetched from (the import refuses any other); "
                    "fetches still pass the URL importer's SSRF checks (dataset_import.allow_private_hosts).")
    max_per_page: int = Field(description="The API's largest page size.")
    download_size: str = Field(description="Which of the photo's sizes an import downloads.")
    timeout_s: float = Field(10.0, gt=0)


def _unsplash() -> SourceConfig:
    return SourceConfig(api_key_env="UNSPLASH_ACCESS_KEY", base_url="https://api.unsplash.com",
                        download_hosts=["images.unsplash.com", "plus.unsplash.com"], max_per_page=30,
                        download_size="regular")


def _pexels() -> SourceConfig:
    return SourceConfig(api_key_env="PEXELS_API_KEY", base_url="https://api.pexels.com",
                        download_hosts=["images.pexels.com"], max_per_page=80, download_size="large2x")


class CollectConfig(BaseModel):
    """The ingress's ``collect:`` section: the sources, and how long search results stay importable."""

    unsplash: SourceConfig = Field(default_factory=_unsplash)
    pexels: SourceConfig = Field(default_factory=_pexels)
    app_name: str = Field("atelier", description="utm_source on Unsplash attribution links (its guidelines).")
    result_ttl_s: float = Field(24 * 3600.0, gt=0, description="A search result can be imported for this long.")
    max_import: int = Field(200, ge=1, description="Results one collect request may import.")

    @field_validator("unsplash", "pexels", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        """A source's section in a config file gives only what it changes (e.g. base_url)."""
        if isinstance(value, dict):
            return {**(_unsplash() if info.field_name == "unsplash" else _pexels()).model_dump(), **value}
        return value


# --- results -----------------------------------------------------------------------------------


class RateLimit(BaseModel):
    limit: int | None = None
    remaining: int | None = None
    reset_at: float | None = Field(None, description="Unix time the window resets, when the source says.")


class RateLimitState:
    """The last rate-limit headers one source sent (thread-safe): whether it may be called now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = RateLimit()

    @property
    def last(self) -> RateLimit:
        with self._lock:
            return self._last

    def seen(self, response: httpx.Response, now: float | None = None) -> RateLimit:
        """Remember an answer's rate-limit headers (a 429 spends the window whatever they say;
        an answer without them changes nothing); returns the headers as sent."""
        now = time.time() if now is None else now
        rate = rate_limit_of(response.headers, now)
        kept = rate.model_copy(update={"remaining": 0}) if response.status_code == 429 else rate
        if kept.remaining is None:
            return rate
        if kept.remaining == 0 and kept.reset_at is None:
            kept = kept.model_copy(update={"reset_at": now + EXHAUSTED_WAIT_S})
        with self._lock:
            self._last = kept
        return rate

    def exhausted(self, now: float | None = None) -> RateLimit | None:
        """The remembered headers while they say no request is left until a reset still ahead."""
        last = self.last
        now = time.time() if now is None else now
        return last if last.remaining == 0 and last.reset_at is not None and last.reset_at > now else None


class SourceResult(BaseModel):
    id: str = Field(description="'<source>:<the source's id>': what POST /v1/datasets/{id}/collect takes.")
    source: str
    source_id: str
    thumbnail_url: str
    full_url: str
    download_url: str = Field(description="The size an import downloads.")
    width: int | None = None
    height: int | None = None
    description: str = ""
    photographer: str = ""
    photographer_url: str = ""
    page_url: str = ""
    license: str
    license_url: str
    download_location: str | None = Field(None, description="Unsplash: the URL an import calls to count the download.")


class SearchPage(BaseModel):
    source: str
    page: int
    per_page: int
    total: int
    total_pages: int | None = None
    results: list[SourceResult]
    rate_limit: RateLimit


class SourceStatus(BaseModel):
    name: str
    available: bool
    reason: str | None = None
    license: str
    license_url: str
    license_summary: str
    max_per_page: int
    orientations: list[str]
    colors: list[str]


class SourceError(Exception):
    """A source refused or failed a call; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, param: str | None = None, status: int = 502):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


class SourceRateLimitedError(SourceError):
    def __init__(self, message: str, reset_at: float | None, param: str | None = "sources"):
        super().__init__(message, param, status=429)
        self.reset_at = reset_at


def _limited_message(name: str, rate: RateLimit) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rate.reset_at)) if rate.reset_at else "an unknown time"
    return (f"{name} rate limit reached ({rate.limit if rate.limit is not None else '?'} requests per window); "
            f"it resets at {when}")


# --- helpers -----------------------------------------------------------------------------------


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except ValueError:
        return None


def rate_limit_of(headers: httpx.Headers, now: float | None = None) -> RateLimit:
    """The ``X-Ratelimit-*`` headers (case-insensitive); a reset given in seconds from now (small
    numbers, or ``Retry-After``) becomes a Unix time."""
    now = time.time() if now is None else now
    reset = _int(headers.get("x-ratelimit-reset"))
    if reset is not None and reset < 10**9:
        reset = now + reset
    if reset is None and _int(headers.get("retry-after")) is not None:
        reset = now + _int(headers.get("retry-after"))
    return RateLimit(limit=_int(headers.get("x-ratelimit-limit")), remaining=_int(headers.get("x-ratelimit-remaining")),
                     reset_at=float(reset) if reset is not None else None)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


def host_allowed(url: str, hosts: list[str]) -> bool:
    """Whether ``url`` is http(s) on one of ``hosts`` (exact names, case-insensitive)."""
    scheme, host, _ = _origin(url)
    return scheme in ("http", "https") and host in {h.strip().lower().rstrip(".") for h in hosts}


def _with_utm(url: str, app_name: str) -> str:
    if not url:
        return url
    return f"{url}{'&' if '?' in url else '?'}{urlencode({'utm_source': app_name, 'utm_medium': 'referral'})}"


def _text(value: Any, limit: int = 2000) -> str:
    return value[:limit] if isinstance(value, str) else ""


def api_key(config: SourceConfig) -> str | None:
    value = os.environ.get(config.api_key_env, "").strip()
    return value or None


# --- the sources -------------------------------------------------------------------------------


class Source:
    """One source's API. Subclasses say how to ask and how to read the answer."""

    name: str
    license: str
    license_url: str
    license_summary: str
    orientations: dict[str, str]  # ours -> the source's
    colors: tuple[str, ...]

    def __init__(self, config: SourceConfig, app_name: str = "atelier", transport: httpx.BaseTransport | None = None):
        self.config = config
        self.app_name = app_name
        self.transport = transport
        self.rate = RateLimitState()

    # what the API wants
    def _auth(self, key: str) -> dict[str, str]:
        raise NotImplementedError

    search_path = ""  # the API's search endpoint

    def _search_request(self, query: str, page: int, per_page: int, orientation: str | None,
                        color: str | None) -> tuple[str, dict[str, Any]]:
        """Both APIs take the same search parameters; orientation names differ (`orientations`)."""
        params: dict[str, Any] = {"query": query, "page": page, "per_page": per_page}
        if orientation:
            params["orientation"] = self.orientations[orientation]
        if color:
            params["color"] = color
        return self.search_path, params

    def _normalise(self, data: dict[str, Any], page: int, per_page: int) -> tuple[list[SourceResult], int, int | None]:
        raise NotImplementedError

    def status(self) -> SourceStatus:
        reason = None
        if not self.config.enabled:
            reason = "disabled in the config (collect.%s.enabled)" % self.name
        elif api_key(self.config) is None:
            reason = f"no API key: set the environment variable {self.config.api_key_env}"
        return SourceStatus(name=self.name, available=reason is None, reason=reason, license=self.license,
                            license_url=self.license_url, license_summary=self.license_summary,
                            max_per_page=self.config.max_per_page, orientations=list(self.orientations),
                            colors=list(self.colors))

    def check_search(self, query: str, page: int, per_page: int, orientation: str | None, color: str | None) -> None:
        """SourceError (400) naming the field, before anything is sent."""
        if per_page > self.config.max_per_page:
            raise SourceError(f"per_page {per_page} is over {self.name}'s limit of {self.config.max_per_page}",
                              "per_page", 400)
        if orientation is not None and orientation not in self.orientations:
            raise SourceError(f"orientation must be one of {list(self.orientations)}", "orientation", 400)
        if color is not None and color not in self.colors:
            raise SourceError(f"{self.name} does not filter by color {color!r}; it knows {list(self.colors)}",
                              "color", 400)

    def _client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.config.base_url, timeout=self.config.timeout_s, trust_env=False,
                            follow_redirects=False, transport=self.transport,
                            headers={**self._auth(key), "Accept": "application/json",
                                     "User-Agent": f"{self.app_name} (atelier collect)"})

    def search(self, query: str, page: int = 1, per_page: int = 20, orientation: str | None = None,
               color: str | None = None) -> SearchPage:
        self.check_search(query, page, per_page, orientation, color)
        key = api_key(self.config)
        status = self.status()
        if not status.available:
            raise SourceError(f"source {self.name} is unavailable: {status.reason}", "sources", 400)
        spent = self.rate.exhausted()
        if spent is not None:  # not asked again before its window resets
            raise SourceRateLimitedError(_limited_message(self.name, spent), spent.reset_at)
        path, params = self._search_request(query, page, per_page, orientation, color)
        try:
            with self._client(key) as client:
                response = client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise SourceError(f"{self.name} did not answer: {type(exc).__name__}: {exc}", "sources", 502) from None
        rate = self.rate.seen(response)
        self._raise_for(response, rate)
        try:
            data = response.json()
            results, total, total_pages = self._normalise(data, page, per_page)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SourceError(f"{self.name} answered in an unexpected shape: {exc}", "sources", 502) from None
        return SearchPage(source=self.name, page=page, per_page=per_page, total=total, total_pages=total_pages,
                          results=results, rate_limit=rate)

    def _raise_for(self, response: httpx.Response, rate: RateLimit) -> None:
        code = response.status_code
        if code == 200:
            return
        if code == 429 or (code == 403 and rate.remaining == 0):
            raise SourceRateLimitedError(_limited_message(self.name, rate), rate.reset_at)
        if code in (401, 403):
            raise SourceError(f"{self.name} refused the configured API key (HTTP {code}); check "
                              f"{self.config.api_key_env}", "sources", 502)
        raise SourceError(f"{self.name} answered HTTP {code}", "sources", 502)


class UnsplashSource(Source):
    name = "unsplash"
    license = "Unsplash License"
    license_url = "https://unsplash.com/license"
    license_summary = ("Free to use, commercially too, without permission; attribution is appreciated, and API use "
                       "must credit the photographer and Unsplash. Not for selling unaltered copies or building a "
                       "competing service.")
    orientations = {"landscape": "landscape", "portrait": "portrait", "square": "squarish"}
    colors = ("black_and_white", "black", "white", "yellow", "orange", "red", "purple", "magenta", "green",
              "teal", "blue")

    search_path = "/search/photos"

    def _auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Client-ID {key}", "Accept-Version": "v1"}

    def _normalise(self, data, page, per_page):
        results = []
        for photo in data["results"]:
            urls, links, user = photo.get("urls") or {}, photo.get("links") or {}, photo.get("user") or {}
            results.append(SourceResult(
                id=f"unsplash:{photo['id']}", source=self.name, source_id=str(photo["id"]),
                thumbnail_url=urls.get("thumb") or urls.get("small") or "", full_url=urls.get("full") or urls.get("raw") or "",
                download_url=urls.get(self.config.download_size) or urls.get("regular") or urls.get("full") or "",
                width=photo.get("width"), height=photo.get("height"),
                description=_text(photo.get("description") or photo.get("alt_description")),
                photographer=_text(user.get("name") or user.get("username"), 200),
                photographer_url=_with_utm((user.get("links") or {}).get("html") or "", self.app_name),
                page_url=_with_utm(links.get("html") or "", self.app_name),
                license=self.license, license_url=self.license_url,
                download_location=links.get("download_location")))
        return results, int(data.get("total", len(results))), data.get("total_pages")


class PexelsSource(Source):
    name = "pexels"
    license = "Pexels License"
    license_url = "https://www.pexels.com/license/"
    license_summary = ("Free to use, modify and share without permission; crediting the photographer and Pexels is "
                       "asked for. Not for selling unaltered copies, or implying endorsement by people shown.")
    orientations = {"landscape": "landscape", "portrait": "portrait", "square": "square"}
    colors = ("red", "orange", "yellow", "green", "turquoise", "blue", "violet", "pink", "brown", "black", "gray",
              "white")

    search_path = "/v1/search"

    def _auth(self, key: str) -> dict[str, str]:
        return {"Authorization": key}

    def _normalise(self, data, page, per_page):
        results = []
        for photo in data["photos"]:
            src = photo.get("src") or {}
            results.append(SourceResult(
                id=f"pexels:{photo['id']}", source=self.name, source_id=str(photo["id"]),
                thumbnail_url=src.get("tiny") or src.get("small") or src.get("medium") or "",
                full_url=src.get("original") or "",
                download_url=src.get(self.config.download_size) or src.get("large") or src.get("original") or "",
                width=photo.get("width"), height=photo.get("height"), description=_text(photo.get("alt")),
                photographer=_text(photo.get("photographer"), 200), photographer_url=photo.get("photographer_url") or "",
                page_url=photo.get("url") or "", license=self.license, license_url=self.license_url))
        total = int(data.get("total_results", len(results)))
        return results, total, -(-total // per_page) if per_page else None


SOURCE_TYPES: dict[str, type[Source]] = {"unsplash": UnsplashSource, "pexels": PexelsSource}


def build_sources(config: CollectConfig, transport: httpx.BaseTransport | None = None) -> dict[str, Source]:
    return {name: SOURCE_TYPES[name](getattr(config, name), config.app_name, transport) for name in SOURCE_NAMES}


def ping_download(config: SourceConfig, download_location: str, app_name: str = "atelier",
                  transport: httpx.BaseTransport | None = None, rate: RateLimitState | None = None) -> str | None:
    """Call an Unsplash photo's ``download_location`` with the key; None if it answered 200, else
    why not. The key goes only to the configured API's own origin. With ``rate``, the source's
    remembered rate limit: while it is spent the call is not made (the reason says until when),
    and each answer's headers update it."""
    if _origin(download_location) != _origin(config.base_url):
        return f"download_location {download_location!r} is not on the configured API ({config.base_url})"
    key = api_key(config)
    if key is None:
        return f"no API key in this process's environment ({config.api_key_env})"
    spent = rate.exhausted() if rate is not None else None
    if spent is not None:
        return f"not called: {_limited_message('unsplash', spent)}"
    try:
        with httpx.Client(timeout=config.timeout_s, trust_env=False, follow_redirects=False, transport=transport,
                          headers={"Authorization": f"Client-ID {key}", "Accept-Version": "v1",
                                   "User-Agent": f"{app_name} (atelier collect)"}) as client:
            response = client.get(download_location)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if rate is not None:
        rate.seen(response)
    return None if response.status_code == 200 else f"HTTP {response.status_code}"


# --- what this server returned, per owner ------------------------------------------------------


class CollectRecords:
    """Search results this server returned, per owner: one JSON object per result (written in
    parallel), read back by id at import time. An entry older than ``ttl_s`` is forgotten."""

    def __init__(self, storage: Storage, ttl_s: float):
        self.storage = storage
        self.ttl_s = ttl_s

    @staticmethod
    def key(owner: str | None, result_id: str) -> str:
        digest = hashlib.sha256(result_id.encode()).hexdigest()[:32]  # any id, safe in a key
        return f"{COLLECT_PREFIX}{owner_tag(owner) or '_open'}/results/{digest}.json"

    def remember(self, owner: str | None, results: list[SourceResult]) -> None:
        now = time.time()

        def put(result: SourceResult) -> None:
            self.storage.put_bytes(self.key(owner, result.id),
                                   json.dumps({"seen_at": now, "result": result.model_dump(mode="json")}).encode(),
                                   content_type="application/json")

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(put, results))

    def recall(self, owner: str | None, result_id: str) -> SourceResult | None:
        """The result as returned to ``owner``, or None if it never was (or too long ago)."""
        if not isinstance(result_id, str) or not result_id or len(result_id) > 300:
            return None
        try:
            entry = self.storage.get_json(self.key(owner, result_id))
        except (ObjectNotFoundError, ValueError):
            return None
        if time.time() - float(entry.get("seen_at", 0)) > self.ttl_s:
            return None
        result = SourceResult.model_validate(entry["result"])
        return result if result.id == result_id else None
