"""Configuration only: Ray Serve configs (local.yaml), style presets (styles.yaml) and fine-tuning
configs (training/*.yaml). No code lives or is imported here; this file makes the YAML package data."""
