"""LoRA adapters inside SDXL's one base pipeline, loaded per request by registered name.

A request names an adapter (`lora="corgi"` or `"corgi:2"`); Ray Serve model multiplexing routes it
to a replica that holds it (`routed()` in the contract) and the replica's `@serve.multiplexed`
loader keeps an LRU of model ids, calling `LoadedLora.__del__` on eviction. Adapters live inside
the base pipeline (`load_lora_weights(adapter_name=...)`); a pipeline call activates its
request's adapter (`set_adapters`) or none (`disable_lora`), and a released adapter is deleted
(`delete_adapters`) once no model id and no running request use it. The base pipeline is never
reloaded. A version deleted from the registry (DELETE /v1/models/{id}) while a replica holds it:
the requests running with it finish with it; the next request naming it finds it gone (a 404), and
the adapter is deleted once those running requests end.

`SDXLAdapters` holds that state for one pipeline; the deployment keeps one, and its multiplexed
loader calls `SDXLAdapters.load`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator

from ray import serve

from deployments import metrics
from deployments.errors import InvalidRequestError
from deployments.sdxl.contract import DEFAULT_MAX_LORAS_PER_REPLICA, SDXLRequest
from storage.registry import LoraNotFoundError, LoraRecord, LoraRegistry, LoraRegistryError

logger = logging.getLogger("ray.serve")

LORA_RECHECK_S = 2.0


class UnknownLoraError(InvalidRequestError):
    """A request names a LoRA, or a version, that is not registered (never was, was deleted, or is
    another owner's private one): a 404 with OpenAI's `model_not_found` code, naming `lora`. Still an
    InvalidRequestError, so a workflow check lists it among the document's problems."""

    status_code = 404
    error_type = "model_not_found"
    code = "model_not_found"

    def to_body(self) -> dict:
        body = super().to_body()
        body["error"]["code"] = self.code
        return body


def unknown_lora(ref: str, why: str) -> UnknownLoraError:
    return UnknownLoraError(f"unknown LoRA {ref!r}: {why}; GET /v1/models lists registered adapters", "lora")


def bad_lora_reference(ref: object, exc: LoraRegistryError) -> InvalidRequestError:
    """A reference the registry cannot even look up (a bad name or version): a 400; one it looked
    up and did not find: a 404."""
    if isinstance(exc, LoraNotFoundError):
        return unknown_lora(ref, exc.message)
    return InvalidRequestError(f"bad LoRA reference {ref!r}: {exc.message}", "lora")


class LoadedLora:
    """An adapter loaded in the pipeline: what the multiplexed loader returns, one per model id.

    Ray's multiplexer calls `__del__` when it evicts the model id (LRU); that releases the
    adapter, which is deleted from the pipeline once no model id and no running request use it.
    """

    def __init__(self, model_id: str, adapter_name: str, record: LoraRecord, release: Callable[[str], None]):
        self.model_id = model_id
        self.adapter_name = adapter_name
        self.record = record
        self._release = release

    def __del__(self):
        release, self._release = self._release, None  # Ray calls it, then the GC may again
        if release is not None:
            try:
                release(self.adapter_name)
            except ImportError:  # the interpreter is shutting down; the pipeline goes with it
                pass

    def __repr__(self) -> str:
        return f"LoadedLora({self.model_id!r} -> {self.record.id}, adapter {self.adapter_name!r})"


@dataclass
class _AdapterState:
    record: LoraRecord
    refs: int = 0  # LoadedLora handles (model ids) holding it
    in_use: int = 0  # requests between loading it and finishing their pipeline call
    deleted: bool = False  # its version left the registry: refused to new requests, deleted once unused
    checked_at: float = 0.0  # when a request last found its version still registered (monotonic)


class _LocalLoraLRU:
    """Stands in for `@serve.multiplexed` outside a Serve replica (unit tests, scripts): the same
    LRU of model ids, the same `__del__` on eviction."""

    def __init__(self, load: Callable, capacity: int):
        self.load, self.capacity = load, capacity
        self.models: OrderedDict[str, LoadedLora] = OrderedDict()
        self._lock: asyncio.Lock | None = None

    async def __call__(self, model_id: str) -> LoadedLora:
        if model_id in self.models:
            self.models.move_to_end(model_id)
            return self.models[model_id]
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if model_id not in self.models:
                if len(self.models) >= self.capacity:
                    _, evicted = self.models.popitem(last=False)
                    await asyncio.to_thread(evicted.__del__)
                self.models[model_id] = await self.load(model_id)
            return self.models[model_id]


def adapter_name_for(record: LoraRecord) -> str:
    """The peft adapter name of a registered version (peft names cannot hold '.')."""
    digest = hashlib.sha1(record.name.encode()).hexdigest()[:6]
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', record.name)}_v{record.version}_{digest}"


def _in_serve_replica() -> bool:
    try:
        serve.get_replica_context()
    except Exception:
        return False
    return True


def instance_loader(load: Callable[[str], Awaitable[LoadedLora]], capacity: int
                    ) -> Callable[[str], Awaitable[LoadedLora]] | None:
    """The replica's model-id loader where the class-level `@serve.multiplexed` one (at
    DEFAULT_MAX_LORAS_PER_REPLICA) does not serve: outside a Serve replica a local LRU, inside one
    a multiplexed loader of the configured capacity. None: the class-level loader serves."""
    if not _in_serve_replica():
        return _LocalLoraLRU(load, capacity)
    if capacity == DEFAULT_MAX_LORAS_PER_REPLICA:
        return None

    async def get_lora(lora_id: str) -> LoadedLora:  # the class-level loader, with the configured size
        return await load(lora_id)

    return serve.multiplexed(max_num_models_per_replica=capacity)(get_lora)


class SDXLAdapters:
    """The adapters in one base pipeline: loading (on the replica's torch thread), the request's
    adapter active in each pipeline call, and deletion once released and unused.

    Lock order: `pipe_lock` (held by every pipeline call and adapter load/delete) before
    `_lock` (the bookkeeping; held briefly).
    """

    def __init__(self, pipe: Any, registry: LoraRegistry, *, model: str, model_name: str,
                 run: Callable[..., Awaitable[Any]], pipe_lock: threading.Lock | None = None):
        """`model`: the base pipeline's folder or hub id; `run(fn, *args)`: runs `fn` on the
        replica's torch thread; `pipe_lock`: the lock every call of `pipe` holds (default: a new one)."""
        self.pipe = pipe
        self.registry = registry
        self.model, self.model_name = model, model_name
        self._run = run
        self.pipe_lock = pipe_lock or threading.Lock()
        self._lock = threading.RLock()  # re-entrant: a GC-run LoadedLora.__del__ may take it
        self._adapters: dict[str, _AdapterState] = {}
        self._pending_delete: set[str] = set()
        self.loads = 0  # adapter loads the multiplexer asked for (misses)
        # A held adapter's version is checked against the registry at most this often: one storage
        # read (an S3 HEAD in production) per adapter per period, not per request. The ingress checks
        # every request itself; this catches a delete that raced past it.
        self.recheck_s = LORA_RECHECK_S

    # --- per request ----------------------------------------------------------------------------

    async def acquire(self, request: SDXLRequest, get_lora: Callable[[str], Awaitable[LoadedLora]]
                      ) -> LoadedLora | None:
        """The request's adapter through the multiplexed loader `get_lora`, marked in use until
        `release`: `request.lora`, else the multiplexed model id the request was routed with
        (`handle.options(multiplexed_model_id=...)`). An adapter held from before is checked against
        the registry: once its version is deleted, requests naming it are refused (404) and it goes
        from the pipeline when the requests running with it end."""
        model_id = serve.get_multiplexed_model_id()
        if request.lora and model_id and request.lora != model_id:
            raise InvalidRequestError(
                f"lora {request.lora!r} differs from the multiplexed model id {model_id!r} it was routed with", "lora")
        ref = request.lora or model_id
        if not ref:
            return None
        try:
            loads = self.loads
            lora = await get_lora(ref)
            hit = self.loads == loads  # the multiplexer loaded nothing
            metrics.lora_cache(hit=hit)
        except LoraRegistryError as exc:
            raise bad_lora_reference(ref, exc) from None
        if not self._use(lora.adapter_name, +1):  # no await since the load: it cannot be evicted between
            raise unknown_lora(ref, f"LoRA {lora.record.id} was deleted")
        if hit and self._recheck_due(lora.adapter_name):
            try:
                registered = await self._registered(lora.record)
            except BaseException:  # the caller left
                self.release(lora)
                raise
            if not registered:
                self._mark_deleted(lora.adapter_name)
                self.release(lora)
                raise unknown_lora(ref, f"LoRA {lora.record.id} was deleted")
        return lora

    def release(self, lora: LoadedLora | None) -> None:
        """The request that acquired `lora` is done with it (its pipeline call ended, or it left);
        a deleted adapter nothing else uses goes now."""
        if lora is not None:
            self._use(lora.adapter_name, -1)
            if self._pending_delete:
                self._try_delete_pending()

    @contextmanager
    def activated(self, lora: LoadedLora | None, scale: float) -> Iterator[None]:
        """Holds `pipe_lock` for one pipeline call, with only `lora` (or no adapter) active;
        released adapters nothing uses are deleted first. Adapters change only between calls."""
        with self.pipe_lock:
            self._delete_pending_locked()
            if lora is not None:
                self.pipe.enable_lora()
                self.pipe.set_adapters([lora.adapter_name], [scale])
            elif self._adapters:
                self.pipe.disable_lora()
            yield

    def loaded(self) -> list[str]:
        """name:version of the adapters in the pipeline (an evicted one may stay until its requests end)."""
        with self._lock:
            return sorted(state.record.id for state in self._adapters.values())

    # --- loading and deleting -------------------------------------------------------------------

    async def load(self, lora_id: str) -> LoadedLora:
        """The multiplexed loader's body: the adapter for a model id, on the torch thread."""
        self.loads += 1
        return await self._run(self._load_adapter, lora_id)

    def _load_adapter(self, lora_id: str) -> LoadedLora:
        """Runs in a worker thread. An adapter still in the pipeline (another model id for the same
        version, or evicted but not yet deleted) is reused, not loaded again."""
        record = self.registry.resolve(lora_id)
        name = adapter_name_for(record)
        # a handle is made only once it holds a reference: its __del__ gives one back
        if self._revive(name):
            return LoadedLora(lora_id, name, record, self._release_adapter)
        weights = self.registry.get_weights(record.name, record.version)  # storage read, outside the pipeline lock
        with self.pipe_lock:
            if self._revive(name):
                return LoadedLora(lora_id, name, record, self._release_adapter)
            self._delete_pending_locked()
            from safetensors.torch import load as load_safetensors

            if record.base_model != self.model:
                logger.info("LoRA %s was trained on %r; this deployment serves %r", record.id, record.base_model,
                            self.model)
            try:
                self.pipe.load_lora_weights(load_safetensors(weights), adapter_name=name)
            except (ValueError, KeyError, RuntimeError) as exc:
                try:  # drop whatever part of it was injected before the failure
                    self.pipe.delete_adapters(name)
                except Exception:
                    pass
                raise InvalidRequestError(f"LoRA {record.id} does not fit model {self.model_name!r}: {exc}",
                                          "lora") from exc
            with self._lock:
                self._adapters[name] = _AdapterState(record, refs=1, checked_at=time.monotonic())  # just read
        logger.info("loaded LoRA %s as adapter %s", record.id, name)
        return LoadedLora(lora_id, name, record, self._release_adapter)

    def _revive(self, name: str) -> bool:
        with self._lock:
            state = self._adapters.get(name)
            if state is None:
                return False
            state.refs += 1
            if not state.deleted:
                self._pending_delete.discard(name)
            return True

    def _use(self, name: str, delta: int) -> bool:
        """Counts a request in (+1) or out (-1); False, counting nothing, for one coming to a deleted adapter."""
        with self._lock:
            state = self._adapters.get(name)
            if state is None or (delta > 0 and state.deleted):
                return False
            state.in_use += delta
            return True

    def _recheck_due(self, name: str) -> bool:
        with self._lock:
            state = self._adapters.get(name)
            now = time.monotonic()
            if state is None or now - state.checked_at < self.recheck_s:
                return False
            state.checked_at = now
            return True

    async def _registered(self, record: LoraRecord) -> bool:
        """Whether a held adapter's version is still registered. Storage that does not answer keeps
        it usable: the API checked the request against the registry already."""
        try:
            return await asyncio.to_thread(self.registry.is_registered, record.name, record.version)
        except Exception as exc:
            logger.warning("could not check that LoRA %s is still registered: %r", record.id, exc)
            return True

    def _mark_deleted(self, name: str) -> None:
        with self._lock:
            state = self._adapters.get(name)
            if state is not None:
                state.deleted = True
                self._pending_delete.add(name)

    def _release_adapter(self, name: str) -> None:
        """A model id holding `name` was evicted: delete the adapter now if nothing else uses it and
        no pipeline call runs; otherwise the next pipeline call (or load) deletes it."""
        with self._lock:
            state = self._adapters.get(name)
            if state is None:
                return
            state.refs -= 1
            if state.refs <= 0:
                self._pending_delete.add(name)
        self._try_delete_pending()

    def _try_delete_pending(self) -> None:
        if self.pipe_lock.acquire(blocking=False):  # never wait here: the GC may run this on any thread
            try:
                self._delete_pending_locked()
            finally:
                self.pipe_lock.release()

    def _delete_pending_locked(self) -> None:
        """Caller holds `pipe_lock`. Deletes released (or deleted) adapters that no request is using."""
        with self._lock:
            states = {n: self._adapters[n] for n in self._pending_delete}
            names = [n for n, state in states.items() if (state.refs <= 0 or state.deleted) and state.in_use <= 0]
            if not names:
                return
            self.pipe.delete_adapters(names)
            for n in names:
                self._pending_delete.discard(n)
                logger.info("deleted LoRA adapter %s (%s)", n, self._adapters.pop(n).record.id)

    # --- importing an external adapter ----------------------------------------------------------

    async def convert_import(self, data: bytes) -> ImportedLora:
        """An external LoRA file (diffusers/peft or kohya format) checked against this pipeline's
        layers and rewritten as diffusers saves trained adapters; on the torch thread."""
        return await self._run(self._convert_import, data)

    def _convert_import(self, data: bytes) -> ImportedLora:
        """diffusers' own loader does the conversion (`load_lora_weights` reads kohya and older
        formats): the file is loaded into the base pipeline as a temporary adapter, which fails on a
        layer whose shape differs; what was injected is read back per component with peft and saved
        with `save_lora_weights`, then the temporary adapter is deleted. A file some of whose layers
        match nothing in the model is refused (diffusers would only warn and drop them)."""
        import tempfile
        import uuid

        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        # 1. Read the file and count its LoRA layers (one "down"/"A" matrix each).
        try:
            raw = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise InvalidRequestError(f"file is not a safetensors file: {exc}", "file") from None
        downs = [k for k in raw if re.search(r"(lora_down|lora\.down|lora_A|down_proj|lora_linear_layer\.down)"
                                             r"(\.[^.]+)?\.weight$", k)]
        if not downs:
            raise InvalidRequestError("file holds no LoRA layers (no lora_down / lora_A weights)", "file")
        kind = "kohya" if any(k.startswith(("lora_unet_", "lora_te")) for k in raw) else "diffusers"

        # 2. Load it as a temporary adapter, read back what landed, delete it.
        name = f"import_{uuid.uuid4().hex[:12]}"
        components = {"unet": self.pipe.unet, "text_encoder": getattr(self.pipe, "text_encoder", None),
                      "text_encoder_2": getattr(self.pipe, "text_encoder_2", None)}
        layers: dict[str, dict] = {}
        configs: dict[str, dict] = {}
        with self.pipe_lock:
            self._delete_pending_locked()
            try:
                self.pipe.load_lora_weights(dict(raw), adapter_name=name)
                for component, model in components.items():
                    if model is not None and name in (getattr(model, "peft_config", None) or {}):
                        layers[component] = get_peft_model_state_dict(model, adapter_name=name)
                        configs[component] = model.peft_config[name].to_dict()
            except (ValueError, KeyError, RuntimeError, AttributeError) as exc:
                detail = " ".join(str(exc).split("\n")[:2])[:400]  # torch lists every mismatched layer
                raise InvalidRequestError(f"file does not fit model {self.model_name!r}: {detail}", "file") from None
            finally:
                try:
                    self.pipe.delete_adapters(name)
                except Exception:  # nothing (or only part) was injected
                    pass
        loaded = sum(1 for state in layers.values() for k in state if ".lora_A." in k)
        if loaded < len(downs):
            raise InvalidRequestError(
                f"file has {len(downs)} LoRA layers but only {loaded} match a layer of model {self.model_name!r}; "
                f"it was made for another base model", "file")

        # 3. Save in the format the registry holds (as training saves it).
        from diffusers import StableDiffusionXLPipeline

        with tempfile.TemporaryDirectory() as folder:
            StableDiffusionXLPipeline.save_lora_weights(
                folder, **{f"{c}_lora_layers": convert_state_dict_to_diffusers(s) for c, s in layers.items()},
                **{f"{c}_lora_adapter_metadata": m for c, m in configs.items()})
            with open(f"{folder}/pytorch_lora_weights.safetensors", "rb") as f:
                converted = f.read()
        unet = configs.get("unet") or next(iter(configs.values()))
        return ImportedLora(weights=converted, source_format=kind, rank=int(unet.get("r") or 1),
                            alpha=unet.get("lora_alpha"), layers=loaded,
                            target_modules=sorted(unet.get("target_modules") or []),
                            train_text_encoder=any(c != "unet" for c in layers))


@dataclass
class ImportedLora:
    """An external adapter after `SDXLAdapters.convert_import`: diffusers-format weights and what they hold."""

    weights: bytes
    source_format: str  # "diffusers" or "kohya"
    rank: int
    alpha: float | None
    layers: int
    target_modules: list[str]
    train_text_encoder: bool
