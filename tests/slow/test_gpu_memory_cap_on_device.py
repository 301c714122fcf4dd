"""The per-process GPU memory cap holds on a real GPU. Skipped cleanly without CUDA.

Runs in child processes: the cap is process-wide and must not limit the rest of the session. Two
children capped at 0.5 of the GPU each, working at once, stand for two replicas at 0.5 GPU.
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
from deployments.diffusion import configure_torch

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


# --- two replicas at 0.5 GPU each, at once ------------------------------------------------------

SHARE = 0.5
WORKING_SET = 0.40   # of the GPU each process holds at its peak: within its cap, with room for matmuls
PAST_CAP = 0.03      # how far past its cap the refused allocation would take a process

# One replica's life at 0.5 GPU: cap the allocator as the deployments do, grow a working set of
# fp16 matrices by real matmuls, hold it while the other process holds its own (the parent's
# barrier), then ask past the cap while the GPU still has the memory free, so a refusal is the
# cap's and not the GPU's. Prints one JSON line per phase.
SHARED_CHILD = """
import json, sys, torch
from deployments.diffusion import configure_torch

share, working_set, past_cap = (float(a) for a in sys.argv[1:4])
configure_torch(gpu_memory_fraction=share)
total = torch.cuda.get_device_properties(0).total_memory
side = 8192  # 128 MiB per fp16 matrix
torch.manual_seed(0)
a = torch.randn(side, side, device="cuda", dtype=torch.float16) / side ** 0.5
held, oom = [a], None
try:
    while torch.cuda.memory_reserved() + side * side * 2 < working_set * total:
        held.append(held[-1] @ a)  # each new matrix is computed, not just allocated
except torch.cuda.OutOfMemoryError as exc:
    oom = str(exc)[:300]
torch.cuda.synchronize()
print(json.dumps({"phase": "ready", "reserved": torch.cuda.memory_reserved(), "matrices": len(held),
                  "oom": oom}), flush=True)
sys.stdin.readline()  # both processes hold their working sets from here on

try:  # work at the peak, beside the other process
    checksum = sum(float((m @ a).float().abs().mean()) for m in held[-16:])
    torch.cuda.synchronize()
except torch.cuda.OutOfMemoryError as exc:
    oom, checksum = str(exc)[:300], None
free, device_total = torch.cuda.mem_get_info()
reserved = torch.cuda.memory_reserved()
over = int((share + past_cap) * total) - reserved  # would take this process past its cap
try:
    block = torch.empty(over, dtype=torch.uint8, device="cuda")
    refused = False
    del block
except torch.cuda.OutOfMemoryError:
    refused = True
torch.cuda.synchronize()
print(json.dumps({"phase": "peak", "reserved": reserved, "device_used": device_total - free, "free": free,
                  "over_request": over, "refused_past_cap": refused, "checksum": checksum, "oom": oom,
                  "total": total}), flush=True)
sys.stdin.readline()  # hold until the other has probed too
"""


def _json_line(process: subprocess.Popen, log: Path) -> dict:
    import json

    line = process.stdout.readline()
    assert line, f"child exited: {log.read_text()[-2000:]}"
    return json.loads(line)


@pytest.mark.timeout(600)
def test_two_processes_at_half_the_gpu_each_run_at_once_and_are_refused_past_their_caps(tmp_path):
    if torch.cuda.get_device_properties(0).total_memory < 16 * 1024**3:
        pytest.skip("needs a GPU of at least 16 GiB for two working sets of 0.4 of it")
    logs = [tmp_path / f"child{i}.log" for i in range(2)]  # files, not pipes: a full pipe would stall a child
    children = [subprocess.Popen([sys.executable, "-c", SHARED_CHILD, str(SHARE), str(WORKING_SET), str(PAST_CAP)],
                                 cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
                                 text=True) for log in logs]
    try:
        ready = [_json_line(child, log) for child, log in zip(children, logs)]
        for child in children:  # release both only once both hold their working sets
            child.stdin.write("go\n")
            child.stdin.flush()
        peak = [_json_line(child, log) for child, log in zip(children, logs)]
        for child in children:
            child.stdin.write("done\n")
            child.stdin.flush()
        for child, log in zip(children, logs):
            assert child.wait(timeout=120) == 0, log.read_text()[-2000:]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()

    total = peak[0]["total"]
    for before, at_peak in zip(ready, peak):
        # neither ran out of memory, and each really held its working set
        assert before["oom"] is None and at_peak["oom"] is None, (before, at_peak)
        assert at_peak["checksum"] is not None and at_peak["checksum"] > 0
        assert at_peak["reserved"] >= (WORKING_SET - 0.02) * total, at_peak
        assert at_peak["reserved"] <= SHARE * total
        # refused past its cap, though the GPU had that memory free: the cap refused it, not the GPU
        assert at_peak["over_request"] < at_peak["free"], at_peak
        assert at_peak["refused_past_cap"], at_peak
    # at once: when each probed, the device held both working sets (neither frees its own before "done")
    assert min(p["device_used"] for p in peak) >= sum(r["reserved"] for r in ready), (ready, peak)
