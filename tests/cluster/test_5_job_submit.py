"""Fine-tuning through `ray job submit`, as the README shows it, with the cluster's token. (A run
over HTTP across both nodes, surviving the loss of one, is in test_2_node_loss.py.)"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.cluster.helpers import report

pytestmark = pytest.mark.serve


def test_ray_job_submit_with_the_token(atelier, dataset_id):
    cluster = atelier.cluster
    name = f"gull-cli-{uuid.uuid4().hex[:6]}"
    config = {"name": name, "base_model": "models/tiny/sdxl", "dataset_id": dataset_id,
              "storage_root": atelier.config()["applications"][0]["args"]["storage_root"],
              "resolution": 64, "num_workers": 2, "placement_strategy": "SPREAD", "cpus_per_worker": 0.5,
              "data_cpus": 0.2, "max_steps": 2, "checkpoint_every_steps": 2, "learning_rate": 0.001}
    runtime_env = json.dumps({"working_dir": atelier.bundle_uri})
    command = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--runtime-env-json", runtime_env,
               "--", "python", "-m", "training.cli", "--config-json", json.dumps(config)]

    # Without the token, Ray refuses (this is what the README's command met on a 2.60 cluster).
    refused = cluster.cli(*command, check=False, timeout_s=120,
                          env={"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""})
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower(), refused.stderr[-2000:]

    # With RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN here; ops may use
    # RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), it runs to the end and registers the adapter.
    started = time.monotonic()
    done = cluster.cli(*command, timeout_s=600)
    output = done.stdout
    report(f"[training] ray job submit: {time.monotonic() - started:.1f}s; {output.strip().splitlines()[-1][:300]}")
    assert f'"lora": "{name}:1"' in output, output[-3000:]
    assert "succeeded" in output.lower(), output[-3000:]
