"""A loopback stand-in for the Unsplash and Pexels APIs (and their image hosts), for tests.

It answers the documented JSON shapes: Unsplash ``GET /search/photos`` (``{"total",
"total_pages", "results": [photo]}``, ``Authorization: Client-ID <key>``) and
``GET /photos/<id>/download`` (the download_location), Pexels ``GET /v1/search``
(``{"total_results", "page", "per_page", "photos": [photo], "next_page"}``,
``Authorization: <key>``), with ``X-Ratelimit-Limit``/``-Remaining`` (and Pexels'
``X-Ratelimit-Reset``) headers; 401 for a bad key; 429 with a reset for the query
``ratelimited``. Images are small PNGs under ``/img/<name>.png`` (``/img/slow*`` take a second,
``/img/gone*`` are 404s); ``/redirect?to=<url>`` answers 302 to ``url``.

Photos: Unsplash ``u1``..``u5`` and Pexels ``1``..``5``; Unsplash ``u3`` and Pexels ``2`` serve the
bytes of ``u1`` (duplicates by content), and Unsplash ``evil`` names an image on ``localhost``,
a host the sources' download allow-list does not hold. Other Unsplash queries (``QUERIES``) find
slow photos, one whose image is gone, ``hop`` (redirected to ``localhost``) and ``rehop``
(redirected to 127.0.0.1, a download host). With ``ping_budget`` set, each download_location
call spends one and says how many are left (``X-Ratelimit-Remaining``); none left is a 429.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from urllib.parse import parse_qs, urlencode, urlsplit

from tests.keyed_app import png

UNSPLASH_KEY = "good-unsplash-key"
PEXELS_KEY = "good-pexels-key"
RESET_IN_S = 1800
SAME_AS = {"u3": "u1", "p2": "u1"}  # image name -> the name whose bytes it serves
BEACH = ["u1", "u2", "u3", "u4", "u5", "evil"]
QUERIES = {"slow": ["u1", "slow1", "slow2", "slow3"], "troubled": ["u1", "gone", "hop", "rehop", "u2"]}


class StandIn:
    def __init__(self):
        self.pings: list[str] = []  # Unsplash photo ids whose download_location was called
        self.searches: list[tuple[str, dict]] = []  # (path, query params) of each search
        self.image_gets: list[str] = []
        self.reset_at = int(time.time()) + RESET_IN_S
        self.ping_budget: int | None = None
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 (http.server's name)
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                auth = self.headers.get("Authorization", "")
                if parts.path == "/search/photos":
                    standin.searches.append((parts.path, query))
                    if auth != f"Client-ID {UNSPLASH_KEY}":
                        return self._json(401, {"errors": ["OAuth error: The access token is invalid"]})
                    if query.get("query") == "ratelimited":
                        return self._json(429, {"errors": ["Rate Limit Exceeded"]},
                                          {"X-Ratelimit-Limit": "50", "X-Ratelimit-Remaining": "0",
                                           "X-Ratelimit-Reset": str(standin.reset_at)})
                    per_page = int(query.get("per_page", 10))
                    found = QUERIES.get(query.get("query"), BEACH)
                    names = found[:per_page]
                    return self._json(200, {"total": len(found), "total_pages": -(-len(found) // per_page),
                                            "results": [standin.unsplash_photo(n) for n in names]},
                                      {"X-Ratelimit-Limit": "50", "X-Ratelimit-Remaining": "49"})
                if parts.path.startswith("/photos/") and parts.path.endswith("/download"):
                    if auth != f"Client-ID {UNSPLASH_KEY}":
                        return self._json(401, {"errors": ["OAuth error: The access token is invalid"]})
                    photo = parts.path.split("/")[2]
                    if standin.ping_budget is None:
                        headers = {}
                    elif standin.ping_budget <= 0:
                        return self._json(429, {"errors": ["Rate Limit Exceeded"]},
                                          {"X-Ratelimit-Limit": "50", "X-Ratelimit-Remaining": "0"})
                    else:
                        standin.ping_budget -= 1
                        headers = {"X-Ratelimit-Limit": "50", "X-Ratelimit-Remaining": str(standin.ping_budget)}
                    standin.pings.append(photo)
                    return self._json(200, {"url": f"{standin.url}/img/{photo}.png"}, headers)
                if parts.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", query["to"])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if parts.path == "/v1/search":
                    standin.searches.append((parts.path, query))
                    if auth != PEXELS_KEY:
                        return self._json(401, {"error": "Unauthorized"})
                    headers = {"X-Ratelimit-Limit": "20000", "X-Ratelimit-Remaining": "19999",
                               "X-Ratelimit-Reset": str(standin.reset_at)}
                    if query.get("query") == "ratelimited":
                        return self._json(429, {"error": "Too Many Requests"},
                                          {**headers, "X-Ratelimit-Remaining": "0"})
                    per_page = int(query.get("per_page", 15))
                    ids = [1, 2, 3, 4, 5][:per_page]
                    return self._json(200, {"total_results": 5, "page": int(query.get("page", 1)),
                                            "per_page": per_page, "photos": [standin.pexels_photo(i) for i in ids]},
                                      headers)
                if parts.path.startswith("/img/") and parts.path.endswith(".png"):
                    name = parts.path[len("/img/"):-len(".png")]
                    standin.image_gets.append(name)
                    if name.startswith("gone"):
                        return self._json(404, {"errors": ["not found"]})
                    if name.startswith("slow"):
                        time.sleep(1.0)
                    seed = sum(ord(c) * 31 ** i for i, c in enumerate(SAME_AS.get(name, name))) % 2**31
                    data = png(24, 16, seed=seed)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                return self._json(404, {"errors": ["not found"]})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def unsplash_photo(self, name: str) -> dict:
        localhost = f"http://localhost:{self.httpd.server_address[1]}"
        image = f"{localhost if name == 'evil' else self.url}/img/{name}.png"
        if name in ("hop", "rehop"):
            target = f"{localhost if name == 'hop' else self.url}/img/{name}.png"
            image = f"{self.url}/redirect?{urlencode({'to': target})}"
        return {
            "id": name, "width": 24, "height": 16, "color": "#aabbcc", "description": f"photo {name} on a beach",
            "alt_description": "a beach",
            "urls": {"raw": image, "full": image, "regular": image, "small": image, "thumb": image},
            "links": {"self": f"{self.url}/photos/{name}", "html": f"https://unsplash.com/photos/{name}",
                      "download": f"https://unsplash.com/photos/{name}/download",
                      "download_location": f"{self.url}/photos/{name}/download"},
            "user": {"id": "user1", "username": "ann", "name": "Ann Example",
                     "links": {"html": "https://unsplash.com/@ann"}},
        }

    def pexels_photo(self, number: int) -> dict:
        image = f"{self.url}/img/p{number}.png"
        return {
            "id": number, "width": 24, "height": 16, "url": f"https://www.pexels.com/photo/beach-{number}/",
            "photographer": "Bo Example", "photographer_url": "https://www.pexels.com/@bo", "photographer_id": 7,
            "avg_color": "#334455", "alt": f"pexels beach {number}",
            "src": {"original": image, "large2x": image, "large": image, "medium": image, "small": image,
                    "portrait": image, "landscape": image, "tiny": image},
        }

    def __enter__(self) -> "StandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def ingress(self) -> dict:
        """The ingress config that points both sources (and the URL importer) at this server."""
        hosts = ["127.0.0.1"]
        return {
            "collect": {"unsplash": {"base_url": self.url, "download_hosts": hosts, "api_key_env": "TEST_UNSPLASH_KEY",
                                     "max_per_page": 30, "download_size": "regular"},
                        "pexels": {"base_url": self.url, "download_hosts": hosts, "api_key_env": "TEST_PEXELS_KEY",
                                   "max_per_page": 80, "download_size": "large2x"}},
            "dataset_import": {"allow_private_hosts": ["127.0.0.1", "localhost"]},
        }
