"""Prompt suggestions: autocomplete from a curated list shipped with the project
(configs/prompts.yaml), and random prompts for inspiration."""

from __future__ import annotations

import random
from pathlib import Path

import yaml
from pydantic import BaseModel, Field

DEFAULT_PROMPTS_FILE = Path(__file__).resolve().parents[2] / "configs" / "prompts.yaml"


class Suggestion(BaseModel):
    prompt: str
    style: str | None = Field(None, description="A style preset that suits it (random suggestions only).")


class SuggestionList(BaseModel):
    object: str = "list"
    data: list[Suggestion]


class PromptsService:
    def __init__(self, path: str | Path = DEFAULT_PROMPTS_FILE, styles: list[str] | None = None):
        raw = yaml.safe_load(Path(path).read_text()) or {}
        self.prompts: list[str] = [p.strip() for p in raw.get("prompts") or [] if p and p.strip()]
        self.styles = styles if styles is not None else list((raw.get("inspiration") or {}).get("styles") or [])

    def complete(self, query: str, n: int) -> SuggestionList:
        """Prompts whose words start with what was typed (each typed word a prefix of some word of
        the prompt, in order of relevance: the whole query at a word start first, then every word)."""
        words = query.lower().split()
        if not words:
            return SuggestionList(data=[])
        phrase = " ".join(words)
        ranked: list[tuple[int, int, str]] = []
        for index, prompt in enumerate(self.prompts):
            text = prompt.lower()
            tokens = text.replace(",", " ").split()
            if text.startswith(phrase):
                rank = 0
            elif f" {phrase}" in f" {text}":
                rank = 1
            elif all(any(t.startswith(w) for t in tokens) for w in words):
                rank = 2
            else:
                continue
            ranked.append((rank, index, prompt))
        return SuggestionList(data=[Suggestion(prompt=p) for _, _, p in sorted(ranked)[:n]])

    def inspire(self, n: int, seed: int | None) -> SuggestionList:
        """`n` different prompts at random (the same ones for the same seed), each with a style."""
        rng = random.Random(seed)
        picks = rng.sample(self.prompts, min(n, len(self.prompts)))
        return SuggestionList(data=[Suggestion(prompt=p, style=rng.choice(self.styles) if self.styles else None)
                                    for p in picks])
