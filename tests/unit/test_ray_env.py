"""configs/ray.env: the Ray variables every node we start gets (local.runner.ray_env)."""

from __future__ import annotations

from dotenv import dotenv_values

from local.runner import RAY_ENV_FILE, ray_env


def test_the_file_sets_serves_haproxy_ingress_and_grpc_data_plane():
    values = dotenv_values(RAY_ENV_FILE)
    assert values["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert values["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # handles are called from the job runner's threads and Ray Data's actors, outside any loop
    assert values["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == "1"
    assert ray_env()["RAY_SERVE_ENABLE_HA_PROXY"] in ("0", "1")


def test_the_environment_wins_over_the_file_and_overrides_win_over_both(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    env = ray_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    env = ray_env({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    # only the file's names: the rest of the environment is not copied in
    monkeypatch.setenv("SOMETHING_ELSE", "x")
    assert "SOMETHING_ELSE" not in ray_env()


def test_a_replica_accepts_every_request_the_ingress_forwards():
    """Over gRPC a replica refuses a message past RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH (4 MiB by
    default): an edit carries an image and a mask of up to max_upload_bytes each."""
    import yaml

    from api.config import IngressConfig

    default = IngressConfig.model_fields["max_upload_bytes"].default
    limit = int(dotenv_values(RAY_ENV_FILE)["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"])
    for config in ("configs/local.yaml", "configs/cluster.yaml", "serve_config.yaml"):
        path = RAY_ENV_FILE.parents[1] / config
        if not path.exists():
            continue
        ingress = yaml.safe_load(path.read_text())["applications"][0]["args"]["ingress"]
        assert limit >= 4 * ingress.get("max_upload_bytes", default), config
