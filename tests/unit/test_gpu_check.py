"""benchmarks/gpu_check.py (`make gpu-check`) cannot rot: its `--tiny` run (the same script on CPU,
tiny architectures, a local Ray for the Serve parts) writes the JSON a GPU run writes, every section
ok, every figure positive, every image decoded. Without CUDA and without --tiny it skips cleanly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from local.tiny_models import ensure_tiny_models

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SECTIONS = ("sdxl", "lora_switch", "lora_training", "svd", "upscaler", "llm", "serve_replicas")


def env() -> dict:
    return {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str]:
    ensure_tiny_models(REPO / "models" / "tiny")  # the LoRA and configs/local.yaml need nothing else
    out = tmp_path_factory.mktemp("gpu-check") / "gpu-check.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-4000:])
    return json.loads(out.read_text()), result.stdout


def positive_numbers(value, path="") -> list[tuple[str, float]]:
    """Every number in a nested result, with where it is."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [(path, value)]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in positive_numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in positive_numbers(v, f"{path}[{i}]")]
    return []


# Figures that are legitimately zero: counts of failures, and overheads that may round to nothing.
MAY_BE_ZERO = ("oom", "errors", "overhead", "compile_s", "seed", "start", "switch_vs_generation", "memory_cap")


@pytest.mark.timeout(1800)
def test_tiny_run_writes_every_section_with_positive_figures_and_decoded_media(tiny_run):
    result, stdout = tiny_run
    assert result["mode"] == "tiny" and result["status"] == "ok"
    assert set(result["sections"]) == set(SECTIONS)
    for name in SECTIONS:
        section = result["sections"][name]
        assert section["status"] == "ok", (name, section.get("error"), section.get("traceback"))
        assert section["seconds"] > 0 and section["peak_memory_mb"] > 0
        assert result["timings"][name] == section["seconds"]
    for path, number in positive_numbers(result["sections"]):
        if not any(word in path for word in MAY_BE_ZERO):
            assert number > 0, path

    sdxl = result["sections"]["sdxl"]
    size = result["plan"]["sdxl_size"]
    assert sdxl["off"]["batch1_latency_s"] > 0 and sdxl["on"]["batch1_latency_s"] > 0
    assert sdxl["on"]["fast_paths"]["compile"] == "regional" and "compile" in sdxl["on"]["applied"]
    assert [row["step"] for row in sdxl["ablation"]][:2] == ["off", "attention=classic (no SDPA)"]
    for batch in sdxl["off"]["batches"].values():
        assert all(image == {"width": size, "height": size, "mode": "RGB"} for image in batch["decoded"])

    lora = result["sections"]["lora_switch"]
    assert lora["lora"] == "style_a:1" and lora["decoded"]["width"] == size
    assert result["sections"]["lora_training"]["best_samples_per_s"] > 0

    svd = result["sections"]["svd"]
    assert svd["decoded"] == {"frames": svd["frames"], "width": svd["width"], "height": svd["height"]}
    upscaler = result["sections"]["upscaler"]
    assert upscaler["decoded"]["width"] == upscaler["output"] == 4 * upscaler["input"]
    assert upscaler["tiles"] > 1  # the tiled path

    llm = result["sections"]["llm"]
    assert llm["model"] == "tiny Gemma 3"  # the production architecture's features: vision tower and all
    for c in (1, 16):
        for path in ("atelier", "engine"):
            run = llm[f"c{c}"][path]
            assert run["concurrency"] == c and run["tokens"] == run["requests"] * llm["max_tokens"]
            assert run["tokens_per_s"] > 0 and run["ttft_p50_ms"] > 0

    replicas = result["sections"]["serve_replicas"]
    assert replicas["distinct_replicas"] == 2 and replicas["oom"] == 0 and replicas["overlap_s"] > 0
    assert all(image["width"] == size for image in replicas["decoded"])

    # One table, printed and in the JSON, naming each section; and the fast paths it recommends.
    assert {row["section"] for row in result["table"]} == set(SECTIONS)
    assert "Atelier gpu-check (tiny)" in stdout and "timings:" in stdout
    assert set(result["recommended_fast_paths"]) == {"sdxl", "svd", "upscaler"}


def test_without_cuda_it_skips_cleanly(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run")
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert "skipped: no CUDA" in result.stdout
    assert not out.exists()  # a skipped run leaves the last GPU table alone


def test_unknown_section_is_refused():
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--sections", "sdxl,nope"], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "nope" in result.stderr
