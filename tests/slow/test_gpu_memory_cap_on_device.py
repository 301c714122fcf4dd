"""The per-process GPU memory cap holds on a real GPU. Skipped cleanly without CUDA.

Runs in a child process: the cap is process-wide and must not limit the rest of the session.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import sys, torch
from deployments.runtime import configure_torch

fraction = float(sys.argv[1])
configure_torch(gpu_memory_fraction=fraction)
total = torch.cuda.get_device_properties(0).total_memory

def fits(share):
    try:
        block = torch.empty(int(share * total), dtype=torch.uint8, device="cuda")
    except torch.cuda.OutOfMemoryError:
        return False
    del block
    torch.cuda.empty_cache()
    return True

print(fits(fraction - 0.05), fits(fraction + 0.05))
"""


@pytest.mark.parametrize("fraction", [0.2, 0.4])
def test_allocations_past_the_fraction_fail(fraction):
    result = subprocess.run([sys.executable, "-c", CHILD, str(fraction)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    below, above = result.stdout.split()[-2:]
    assert (below, above) == ("True", "False"), result.stdout
