"""Helpers for deployment tests that stop a streamed call midway, as a hang-up or a job cancel does."""

from __future__ import annotations

import threading
from typing import Any


class PipelineSpy:
    """Wraps a diffusers pipeline: counts the denoising steps its calls run and keeps what a call raised."""

    def __init__(self, pipe: Any):
        self._pipe = pipe
        self.calls = 0
        self.steps = 0
        self.raised: BaseException | None = None
        self.finished = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        for name in ("callback_on_step_end", "callback"):  # the new and the legacy step hooks
            if kwargs.get(name) is not None:
                kwargs[name] = self._counted(kwargs[name])
        try:
            return self._pipe(*args, **kwargs)
        except BaseException as exc:
            self.raised = exc
            raise
        finally:
            self.finished.set()

    def _counted(self, hook):
        def counted(*args, **kwargs):
            self.steps += 1
            return hook(*args, **kwargs)

        return counted


async def leave_after_first_step(stream, progress_type: type) -> None:
    """Read a stream until its first progress event, then close it: the caller is gone."""
    async for event in stream:
        if isinstance(event, progress_type):
            break
    await stream.aclose()
