"""The local development harness; not part of the served app.

- `local.tiny_models`: builds tiny random-weight SDXL, SVD, x4-upscaler and Gemma models (and a
  random LoRA) in code, for the embedded default, the tests and the benchmarks
  (`python -m local.tiny_models --out models/tiny`, or `make models`).
- `local.runner`: runs configs/local.yaml under `serve run` in an isolated scratch folder on a free
  port (the serve tests and the benchmarks), and starts throwaway local Ray nodes.

It sits above every other package (pyproject.toml's import-linter contracts): it may use any of
them, and only the app builder's `tiny_models_dir` reaches into it.
"""
