"""Fetch images from URLs for dataset import, without letting a URL reach inside the network.

Every URL, and every redirect hop, goes through the same checks before a byte is sent:

1. the scheme is ``http`` or ``https`` and the URL names a host (no ``user:pass@``);
2. the host is resolved once, and *every* address it resolves to must be public (not private,
   loopback, link-local, multicast, reserved or unspecified) unless the host name or the
   address is on the config's allow-list (CIDRs, addresses or host names);
3. the connection goes to the address that was checked (the request is sent to the IP with
   ``Host`` and TLS SNI set to the name), so a second DNS answer cannot swap in another one
   (DNS rebinding);
4. redirects are not followed by the client: each ``Location`` is checked as in 1-3 (and
   against ``allowed_hosts`` when the config sets it: a collect job's source download hosts);
5. the body is streamed and dropped at ``max_bytes`` (a declared ``Content-Length`` over the
   limit is refused before reading); a declared non-image ``Content-Type`` is refused, and the
   bytes must identify as an image (PIL) of at most ``max_pixels`` (read from its header);
6. ``timeout_s`` bounds the whole fetch, every hop and every byte included: each hop's httpx
   timeouts are what is left of it, the deadline is checked between reads (each read returns
   what the network has, not a fixed chunk), and a watchdog shuts the connection's socket at the
   deadline or on ``stop``, so a server that trickles bytes or goes silent cannot hold a thread.

Non-public means: not global, or private, loopback, link-local, multicast, reserved or
unspecified; also every 6to4 (2002::/16), Teredo (2001::/32), NAT64 (64:ff9b::/96 and
64:ff9b:1::/48) and site-local (fec0::/10) address, since the first three reach IPv4 addresses
of any kind. An IPv4-mapped address (::ffff:0:0/96) is judged by its IPv4 address.

Environment proxies are ignored (``trust_env=False``): a proxy would resolve names itself.
Keep-alive is off so a pooled TLS connection made for one host name is never reused for
another name on the same address.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Literal
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DatasetImportConfig",
    "UrlFetchResult",
    "UrlRefusedError",
    "check_url",
    "resolve_allowed",
    "fetch_url",
    "fetch_urls",
]

_REDIRECTS = {301, 302, 303, 307, 308}
# Declared types that may still hold an image; anything else declared is refused unread.
_GENERIC_TYPES = {"application/octet-stream", "binary/octet-stream", "application/binary"}
# Width x height an image added to a dataset may have by default (storage.datasets uses it too):
# the ingress's max_upload_pixels. Checked from the image's header, before it is decoded; a
# full decode of 8192x8192 takes 256 MB.
DEFAULT_MAX_PIXELS = 4096 * 4096
# How often the watchdog looks at the deadline and the stop event, and fetch_urls at `poll`.
_WATCH_INTERVAL_S = 0.05
_POLL_INTERVAL_S = 0.25


class DatasetImportConfig(BaseModel):
    """Limits for importing into datasets; the ingress holds one and copies it into each job."""

    allow_private_hosts: list[str] = Field(
        default_factory=list,
        description="CIDRs, addresses or host names that may be fetched although not public "
                    "(e.g. '127.0.0.1' in tests, '10.0.0.0/8' or 'minio.internal' for an internal store).")
    allowed_prefixes: list[str] = Field(
        default_factory=list,
        description="The import roots a prefix import may read: locations outside the storage root "
                    "(s3://bucket/x/ or /abs/dir/), or 'imports/...' inside it. Nothing else in the storage "
                    "root (uploads/, outputs/, datasets/...) is ever importable, even if listed here. Empty: "
                    "no prefix imports.")
    max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Per image.")
    timeout_s: float = Field(30.0, gt=0, description="Per URL: the whole fetch, all redirect hops and bytes included.")
    concurrency: int = Field(8, ge=1, le=64)
    max_urls: int = Field(1000, ge=1, description="Per import: URLs, job ids or output keys.")
    max_files: int = Field(10_000, ge=1, description="Per prefix import.")
    max_redirects: int = Field(5, ge=0)
    allowed_hosts: list[str] | None = Field(
        None,
        description="When set, the only host names a fetch may reach, the URL and every redirect hop alike, on top "
                    "of the checks above (a collect job sets its sources' download hosts). None: any host.")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, gt=0,
        description="Width x height an image added to a dataset may have (uploads, zip members and imports "
                    "alike), read from the image's header before it is decoded.")
    max_zip_expanded_bytes: int | None = Field(
        None, gt=0,
        description="What the zip archives of one upload may expand to; None: 4 x the ingress's "
                    "max_upload_bytes. Over it, the upload is refused with 413.")


class UrlRefusedError(ValueError):
    """The URL (or a redirect hop) is not allowed by policy."""


@dataclass
class UrlFetchResult:
    url: str
    status: Literal["ok", "refused", "failed"]  # refused: by policy; failed: network or HTTP error
    reason: str | None = None
    data: bytes | None = None
    content_type: str | None = None
    final_url: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --- policy ----------------------------------------------------------------------------------


class _AllowList:
    def __init__(self, entries: Iterable[str]):
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: set[str] = set()
        for entry in entries:
            entry = entry.strip()
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(_normal_host(entry))

    def permits(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return _normal_host(host) in self.hosts or any(address in net for net in self.networks)


def _normal_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


# IPv6 ranges that are not a public host to fetch from, whatever the Python version says:
# 6to4 and Teredo relay to IPv4 addresses of any kind, and NAT64 (64:ff9b::/96, and the
# local-use 64:ff9b:1::/48) translates to the IPv4 address in its last 32 bits, private ones
# included; site-local (fec0::/10) is deprecated private space. Python 3.11 counts 6to4 and
# site-local as global.
_NON_PUBLIC_V6 = tuple(ipaddress.ip_network(n) for n in (
    "2002::/16", "2001::/32", "64:ff9b::/96", "64:ff9b:1::/48", "fec0::/10"))


def _unmapped(address):
    # ::ffff:127.0.0.1 is 127.0.0.1; Python 3.11 does not look through the mapping itself
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_public(address) -> bool:
    a = _unmapped(address)
    if a.version == 6 and any(a in net for net in _NON_PUBLIC_V6):
        return False
    return a.is_global and not (a.is_multicast or a.is_reserved or a.is_private or a.is_loopback
                                or a.is_link_local or a.is_unspecified)


def check_url(url: object) -> tuple[str, str, int]:
    """Syntax checks: ``(scheme, host, port)`` of an http(s) URL, else :class:`UrlRefusedError`."""
    if not isinstance(url, str) or not url.strip():
        raise UrlRefusedError("URL must be a non-empty string")
    if len(url) > 4096:
        raise UrlRefusedError("URL is longer than 4096 characters")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UrlRefusedError(f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlRefusedError(f"scheme {parts.scheme or '(none)'!r} is not allowed; use http or https")
    if parts.username is not None or parts.password is not None:
        raise UrlRefusedError("URLs with credentials (user@host) are not allowed")
    host = parts.hostname
    if not host:
        raise UrlRefusedError("URL has no host")
    return scheme, host, port or (443 if scheme == "https" else 80)


def resolve_allowed(host: str, port: int, allow: _AllowList | Iterable[str] = ()) -> list[str]:
    """Resolve ``host``; every address must be public or allow-listed. Returns the addresses."""
    allow = allow if isinstance(allow, _AllowList) else _AllowList(allow)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlRefusedError(f"cannot resolve host {host!r}: {exc}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if not _is_public(address) and not allow.permits(host, _unmapped(address)):
            raise UrlRefusedError(f"host {host!r} resolves to non-public address {address}; "
                                  "add it to allow_private_hosts to permit it")
    if not addresses:
        raise UrlRefusedError(f"host {host!r} has no addresses")
    return addresses


# --- fetching --------------------------------------------------------------------------------


def _new_client(config: DatasetImportConfig) -> httpx.Client:
    return httpx.Client(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(config.timeout_s),
        limits=httpx.Limits(max_keepalive_connections=0),
        # identity: images are compressed already, and a gzip body could inflate a whole read at once
        headers={"User-Agent": "atelier-dataset-import/1", "Accept": "image/*", "Accept-Encoding": "identity"},
    )


def _pinned_request(client: httpx.Client, url: str, allow: _AllowList, timeout_s: float,
                    trace: Callable[[str, dict], None]) -> httpx.Request:
    scheme, host, port = check_url(url)
    address = resolve_allowed(host, port, allow)[0]
    default_port = 443 if scheme == "https" else 80
    host_header = host if ":" not in host else f"[{host}]"
    if port != default_port:
        host_header += f":{port}"
    pinned = httpx.URL(url).copy_with(host=address)
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    extensions["trace"] = trace
    return client.build_request("GET", pinned, headers={"Host": host_header}, extensions=extensions,
                                timeout=httpx.Timeout(timeout_s))


def _check_image(data: bytes, max_pixels: int) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # the header only: nothing is decoded here
    except Image.DecompressionBombError:
        raise UrlRefusedError(f"image is over the limit of {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UrlRefusedError("response is not an image") from None
    if width * height > max_pixels:
        raise UrlRefusedError(f"image is {width}x{height}, over the limit of {max_pixels} pixels")


class _Watchdog:
    """Ends one fetch at its deadline, or when ``stop`` is set, even inside a blocked read.

    httpx's timeouts bound each read, not the transfer: a server that sends a byte now and then
    never trips them. The fetch passes :meth:`trace` as the request's ``trace`` extension, so the
    watchdog learns each connection's socket as it is made (TCP, then TLS); at the deadline it
    shuts that socket down, which wakes a read blocked on it. ``fired`` then says why.
    """

    def __init__(self, deadline: float, stop: threading.Event | None):
        self.deadline = deadline
        self.stop = stop
        self.fired: Literal["deadline", "stop"] | None = None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="url-import-watchdog", daemon=True)
        self._thread.start()

    def trace(self, event: str, info: dict) -> None:
        if not event.endswith((".connect_tcp.complete", ".start_tls.complete")):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._socket = sock
            if self.fired is not None:  # connected just as time ran out
                self._shutdown()

    def forget(self) -> None:
        """The current connection is about to close: never touch its socket again."""
        with self._lock:
            self._socket = None

    def close(self) -> None:
        self._done.set()
        self.forget()

    def _watch(self) -> None:
        while not self._done.is_set():
            now = time.monotonic()
            if now >= self.deadline or (self.stop is not None and self.stop.is_set()):
                with self._lock:
                    if self._done.is_set():
                        return
                    self.fired = "deadline" if now >= self.deadline else "stop"
                    self._shutdown()
                return
            self._done.wait(min(_WATCH_INTERVAL_S, self.deadline - now))

    def _shutdown(self) -> None:  # with the lock held
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


def _ended(url: str, watchdog: _Watchdog, config: DatasetImportConfig) -> UrlFetchResult:
    if watchdog.fired == "stop":
        return UrlFetchResult(url, "failed", "stopped")
    return UrlFetchResult(url, "failed", f"timed out after {config.timeout_s} s")


def fetch_url(url: str, config: DatasetImportConfig, client: httpx.Client | None = None,
              stop: threading.Event | None = None) -> UrlFetchResult:
    """Fetch one image URL under the policy above. Never raises for a bad URL or response.

    Returns within about ``config.timeout_s`` (plus DNS resolution) whatever the server does,
    and soon after ``stop`` is set.
    """
    allow = _AllowList(config.allow_private_hosts)
    hosts = None if config.allowed_hosts is None else {_normal_host(h) for h in config.allowed_hosts}
    own_client = client is None
    client = client or _new_client(config)
    deadline = time.monotonic() + config.timeout_s
    watchdog = _Watchdog(deadline, stop)
    current = url
    try:
        for hop in range(config.max_redirects + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or watchdog.fired:
                return _ended(url, watchdog, config)
            if hosts is not None and _normal_host(check_url(current)[1]) not in hosts:
                raise UrlRefusedError(f"{'redirect to ' if hop else ''}{current!r} is not on the allowed hosts "
                                      f"({', '.join(sorted(hosts))})")
            request = _pinned_request(client, current, allow, remaining, watchdog.trace)
            response = client.send(request, stream=True)
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        return UrlFetchResult(url, "failed", f"HTTP {response.status_code} without Location")
                    current = urljoin(current, location)
                    continue
                if response.status_code != 200:
                    return UrlFetchResult(url, "failed", f"HTTP {response.status_code}", final_url=current)
                content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if content_type and not content_type.startswith("image/") and content_type not in _GENERIC_TYPES:
                    raise UrlRefusedError(f"content type {content_type!r} is not an image")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > config.max_bytes:
                    raise UrlRefusedError(f"response is {declared} bytes, over the limit of {config.max_bytes}")
                body = bytearray()
                for chunk in response.iter_bytes():  # what each read returned: the checks run between reads
                    if watchdog.fired or time.monotonic() > deadline:
                        return _ended(url, watchdog, config)
                    body += chunk
                    if len(body) > config.max_bytes:
                        raise UrlRefusedError(f"response is over the limit of {config.max_bytes} bytes")
                if watchdog.fired:  # a shut-down socket can end a body that has no length as if complete
                    return _ended(url, watchdog, config)
                data = bytes(body)
                _check_image(data, config.max_pixels)
                return UrlFetchResult(url, "ok", data=data, content_type=content_type or None, final_url=current)
            finally:
                watchdog.forget()
                response.close()
        raise UrlRefusedError(f"more than {config.max_redirects} redirects")
    except UrlRefusedError as exc:
        return UrlFetchResult(url, "refused", str(exc), final_url=current if current != url else None)
    except Exception as exc:  # network, TLS, protocol: reported per URL, never fatal to the batch
        if watchdog.fired or isinstance(exc, httpx.TimeoutException):
            return _ended(url, watchdog, config)
        return UrlFetchResult(url, "failed", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    finally:
        watchdog.close()
        if own_client:
            client.close()


def fetch_urls(urls: list[str], config: DatasetImportConfig,
               on_result: Callable[[int, UrlFetchResult], None] | None = None,
               poll: Callable[[], None] | None = None) -> list[UrlFetchResult]:
    """Fetch ``urls`` with at most ``config.concurrency`` in flight; results in input order.

    ``on_result(index, result)`` runs in the calling thread as each finishes (progress, storing,
    cancel checks), and ``poll()`` every quarter second while fetches run (a cancel check that
    does not wait for a slow fetch to end). If either raises, pending fetches are dropped,
    running ones stopped mid-read, and the exception propagates.
    """
    if len(urls) > config.max_urls:
        raise UrlRefusedError(f"{len(urls)} URLs is over the limit of {config.max_urls}")
    results: list[UrlFetchResult | None] = [None] * len(urls)
    stop = threading.Event()
    client = _new_client(config)
    pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="url-import")
    try:
        futures = {pool.submit(fetch_url, u, config, client, stop): i for i, u in enumerate(urls)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=_POLL_INTERVAL_S if poll else None, return_when=FIRST_COMPLETED)
            if poll is not None:
                poll()
            for future in done:
                index = futures[future]
                results[index] = future.result()
                if on_result is not None:
                    on_result(index, results[index])
    finally:
        stop.set()  # running fetches: their watchdogs shut their sockets
        pool.shutdown(wait=False, cancel_futures=True)
        client.close()  # fetches still running after an error fail fast on the closed client
    return results  # type: ignore[return-value]
