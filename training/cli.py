"""Run or check a LoRA / DreamBooth fine-tuning run from the command line (a Ray job's entrypoint).

    python -m training.cli --config cfg.yaml                 # train (connects to / starts Ray)
    python -m training.cli --config cfg.yaml --check         # check the config and print the plan
    python -m training.cli --config-json '{"name": ...}'     # what POST /v1/fine_tuning/jobs submits

The storage root's credentials (``storage_options``) come from the environment variable
ATELIER_STORAGE_OPTIONS (a JSON object; what the Ray job's runtime_env carries) when the config sets
none, so that they never appear on a command line.

Prints the registered adapter and metrics as JSON; a bad config prints an OpenAI-style error
naming the field on stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from training.config import STORAGE_OPTIONS_ENV, TrainConfigError, load_config
from training.loop import train
from training.plan import check_inputs

__all__ = ["main", "storage_options_from_env"]


def storage_options_from_env() -> dict | None:
    """``STORAGE_OPTIONS_ENV`` as a dict (None: not set); TrainConfigError, never echoing its value, if it is
    not a JSON object."""
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise TrainConfigError(f"{STORAGE_OPTIONS_ENV} must hold a JSON object (the storage_options)",
                               "storage_options")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.cli", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML or JSON file with a TrainConfig (a path or an fsspec URL)")
    source.add_argument("--config-json", help="the TrainConfig as a JSON string")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field (VALUE is parsed as YAML)")
    parser.add_argument("--check", action="store_true", help="check the config and print the plan; do not train")
    args = parser.parse_args(argv)

    overrides = {}
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field] = yaml.safe_load(value)
    try:
        env_options = storage_options_from_env()
        config = load_config(json.loads(args.config_json) if args.config_json else args.config, **overrides)
        if env_options is not None and not config.storage_options:
            config = config.model_copy(update={"storage_options": env_options})
        if args.check:
            print(check_inputs(config).model_dump_json(indent=2))
            return 0
        result = train(config)
    except TrainConfigError as exc:
        print(json.dumps({"error": {"type": "invalid_request_error", "message": exc.message, "param": exc.param}}),
              file=sys.stderr)
        return 2
    print(json.dumps({"run_name": result.run_name, "lora": result.lora.id, "metrics": result.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
