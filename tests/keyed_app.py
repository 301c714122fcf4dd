"""The API app as the ingress builds it (typed args, the models' Limits, every service), over a tmp
storage, a fake queue and model handles that must never be reached, with the given API keys: for
tests of what the HTTP layer decides before any model runs (ownership, rate limits)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from api.app import AtelierArgs, model_limits
from api.auth import ApiKey, hash_key
from api.ingress import create_app
from api.services import build_services
from local.tiny_models import ensure_tiny_models

REPO = Path(__file__).resolve().parents[1]
LOCAL = "http://127.0.0.1:8000"


class Unreachable:
    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr: str):
        raise AssertionError(f"the API reached the {self.name} deployment ({attr})")


class FakeQueue:
    def __init__(self):
        self.sent: list[str] = []

    def enqueue_task_sync(self, name, kwargs, task_id, **options):
        self.sent.append(kwargs["job_id"])


def png(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def safetensors_bytes(names: list[str]) -> bytes:
    """A valid safetensors file of 2-element float32 tensors (a LoRA's shape, for the registry)."""
    header, offset = {}, 0
    for name in names:
        header[name] = {"dtype": "F32", "shape": [2], "data_offsets": [offset, offset + 8]}
        offset += 8
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + bytes(offset)


def keyed_app(storage_root: Path, keys: dict[str, tuple[str, list[str]]], ingress: dict[str, Any] | None = None
              ) -> SimpleNamespace:
    """`keys`: name -> (the key, its scopes); each key is its own tenant. Returns the client, the
    services and the fake queue."""
    tiny = ensure_tiny_models(REPO / "models" / "tiny")
    args = AtelierArgs.model_validate({
        "storage_root": str(storage_root),
        "queue": {"broker_url": "memory://", "backend_url": "cache+memory://"},
        "ingress": ingress or {},
        "sdxl": {"model": str(tiny["sdxl"]), "default_size": 64, "min_size": 32, "max_size": 256,
                 "default_steps": 2, "max_steps": 50},
        "svd": {"model": str(tiny["svd"]), "default_width": 64, "default_height": 64, "min_size": 32,
                "max_size": 256, "default_steps": 2, "max_steps": 50},
        "upscaler": {"model": str(tiny["upscaler"]), "min_input_size": 16, "max_input_size": 256,
                     "tile_size": 32, "tile_overlap": 8, "default_steps": 2, "max_steps": 50},
    })
    limits = model_limits(args)
    queue = FakeQueue()
    services = build_services(args.ingress, {name: Unreachable(name) for name in limits}, limits, queue=queue)
    api_keys = [ApiKey(name=name, sha256=hash_key(key), scopes=scopes) for name, (key, scopes) in keys.items()]
    client = TestClient(create_app(services, api_keys), base_url=LOCAL, raise_server_exceptions=False)
    return SimpleNamespace(client=client, services=services, queue=queue, args=args)
