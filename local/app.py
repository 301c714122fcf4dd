"""The app `serve run configs/local.yaml` builds: api/app.py's, with the tiny random-weight models
built first where `tiny_models_dir` names a folder that lacks them (a fresh clone, the serve
tests). Production configs name `api.app:build_app`, which never builds models."""

from __future__ import annotations

import os
from pathlib import Path

from ray.serve import Application

from api import app as atelier_app
from local.tiny_models import ensure_tiny_models


def build_app(args: atelier_app.AtelierArgs | dict) -> Application:
    args = atelier_app.AtelierArgs.model_validate(args)
    if args.tiny_models_dir:
        ensure_tiny_models(str((Path(args.base_dir or os.getcwd()) / args.tiny_models_dir).resolve()))
    return atelier_app.build_app(args)
