"""The catalogue: model cards, readiness of the deployments, and LoRA adapters by name."""

from __future__ import annotations

import asyncio
from typing import Any

from ray.serve.handle import DeploymentHandle

from api.auth import PermissionDeniedError, caller
from api.models.protocol import ModelCard, ModelList
from deployments.errors import AtelierError, ConflictError, InvalidRequestError
from deployments.llm.contract import GemmaLimits
from deployments.sdxl.contract import SDXLLimits
from deployments.sdxl.lora import bad_lora_reference, unknown_lora
from deployments.styles import StylePreset
from storage.registry import LoraRecord, LoraRegistry, LoraRegistryError, check_safetensors


class ModelNotDeployedError(AtelierError):
    status_code = 404
    error_type = "model_not_found"


DEFAULT_MAX_LORA_IMPORT_BYTES = 512 * 1024**2  # ingress.max_lora_import_bytes


class ModelsService:
    def __init__(self, handles: dict[str, DeploymentHandle], limits: dict[str, Any], loras: LoraRegistry,
                 readiness_timeout_s: float, max_import_bytes: int = DEFAULT_MAX_LORA_IMPORT_BYTES):
        self.handles = handles  # deployed models by name; a model not deployed has none
        self.limits = limits  # each deployed model's contract Limits, fixed when the app was built
        self.loras = loras
        self.readiness_timeout_s = readiness_timeout_s
        self.max_import_bytes = max_import_bytes  # the largest LoRA file POST /v1/models takes

    @property
    def sdxl(self) -> SDXLLimits:
        return self.limits["sdxl"]

    def limits_of(self, name: str) -> Any:
        """A deployed model's Limits; 404 when this application does not deploy it."""
        if name not in self.handles or name not in self.limits:
            raise ModelNotDeployedError(f"no {name!r} model is deployed in this application", "model")
        return self.limits[name]

    def handle(self, name: str) -> DeploymentHandle:
        self.limits_of(name)
        return self.handles[name]

    async def not_ready(self) -> list[str]:
        """The deployments that do not answer their health check yet, with why."""
        async def probe(name: str, handle: DeploymentHandle) -> str | None:
            try:
                await asyncio.wait_for(handle.check_health.remote(), timeout=self.readiness_timeout_s)
                return None
            except Exception as exc:  # starting, unhealthy or unreachable: all mean not ready
                return f"{name}: {type(exc).__name__}"

        return [p for p in await asyncio.gather(*(probe(n, h) for n, h in self.handles.items())) if p]

    async def list(self) -> ModelList:
        sdxl = self.sdxl.describe()
        cards = [ModelCard(
            id=sdxl["model"], kind="image", capabilities=["images.generations", "images.edits"],
            metadata={k: sdxl[k] for k in ("source", "default_size", "min_size", "max_size", "default_steps",
                                           "max_steps", "allowed_n", "styles")},
        )]
        for name, kind, capabilities in (("svd", "video", ["videos"]), ("upscaler", "upscaler", ["images.upscale"])):
            limits = self.limits.get(name)
            if limits is not None and name in self.handles:
                cards.append(ModelCard(id=limits.model, kind=kind, capabilities=capabilities,
                                       metadata=limits.model_dump(mode="json", exclude={"model"})))
        llm: GemmaLimits | None = self.limits.get("llm")
        if llm is not None and "llm" in self.handles:
            cards.append(ModelCard(id=llm.model, kind="text",
                                   capabilities=["chat.completions", "completions", "prompts.refine"],
                                   metadata={"source": llm.source, "max_model_len": llm.max_model_len}))
        who = caller()
        for record in await asyncio.to_thread(self.loras.list, None, True):
            if who.sees(record.owner, record.public):
                cards.append(self.lora_card(record))
        return ModelList(data=cards)

    def lora_card(self, record: LoraRecord) -> ModelCard:
        return ModelCard(
            id=record.id, created=int(record.created_at), kind="lora", capabilities=["images.generations"],
            metadata={"name": record.name, "version": record.version, "base": self.sdxl.model,
                      "size_bytes": record.size_bytes, "sha256": record.sha256, "public": record.public,
                      **record.manifest.model_dump(mode="json")})

    async def get(self, model_id: str) -> ModelCard:
        """A deployed model's card, or a LoRA's (`name` for its latest version, or `name:version`)
        with its manifest; 404 for anything else, another owner's private LoRA included."""
        for card in (await self.list()).data:
            if card.id == model_id and card.kind != "lora":
                return card
        try:
            return self.lora_card(await self.lora_record(model_id))
        except InvalidRequestError:
            raise ModelNotDeployedError(f"no model {model_id!r}; GET /v1/models lists them", "model") from None

    async def delete_lora(self, model_id: str) -> dict:
        """Delete one LoRA version (`name:version`). Replicas that hold it finish what they are
        running; new requests no longer find it. Other versions stay. Only its owner (or admin)."""
        from storage.registry import parse_lora_ref

        if any(card.id == model_id and card.kind != "lora" for card in (await self.list()).data):
            raise InvalidRequestError(f"{model_id!r} is a deployed base model; only LoRA versions are deleted here",
                                      "model")
        try:
            name, version = parse_lora_ref(model_id, "model")
        except LoraRegistryError as exc:
            raise InvalidRequestError(exc.message, "model") from None
        if version is None:
            raise InvalidRequestError(f"name the version to delete: {model_id}:<version>", "model")
        record = await self.get(model_id)  # 404 unless the caller sees it
        held = await asyncio.to_thread(self.loras.get, name, version)
        if not caller().owns(held.owner):
            raise PermissionDeniedError(f"LoRA {record.id} is public but not yours: only its owner deletes it",
                                        "model")
        await asyncio.to_thread(self.loras.delete, name, version)
        return {"id": record.id, "object": "model", "deleted": True}

    async def import_lora(self, data: bytes, name: str, filename: str | None, trigger_word: str | None = None,
                          description: str = "", public: bool = False) -> ModelCard:
        """Register an external LoRA file as the next version of `name` (the first, unless the caller
        owns the name already). The SDXL deployment converts it (diffusers or kohya format, through
        diffusers' loader) and checks it against the base model's layers; the manifest records where
        it came from."""
        import hashlib

        from storage.registry import LoraExistsError, _valid_name

        try:
            _valid_name(name)
        except LoraRegistryError as exc:
            raise InvalidRequestError(exc.message, "name") from None
        try:  # the header, here: a file that is not a LoRA never travels to the GPU replica
            check_safetensors(data)
        except LoraRegistryError as exc:
            raise InvalidRequestError(exc.message.replace("adapter", "file", 1), "file") from None
        if trigger_word is not None and not trigger_word.strip():
            trigger_word = None
        owner = caller().owner
        try:
            await asyncio.to_thread(self.loras.check_owner, name, owner)
        except LoraRegistryError as exc:
            raise ConflictError(exc.message, "name") from None
        imported = await self.handle("sdxl").import_lora.remote(data)
        manifest = {
            "base_model": self.sdxl.source, "method": "lora", "trigger_word": trigger_word, "rank": imported.rank,
            "alpha": imported.alpha, "target_modules": imported.target_modules,
            "train_text_encoder": imported.train_text_encoder, "description": description,
            "source": {"kind": "import", "format": imported.source_format, "filename": filename,
                       "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data),
                       "layers": imported.layers},
        }
        new_version = await asyncio.to_thread(self.loras.exists, name)
        try:
            record = await asyncio.to_thread(self.loras.register, name, manifest, imported.weights,
                                             new_version, owner, public)
        except LoraExistsError as exc:
            raise ConflictError(exc.message, "name") from None
        except LoraRegistryError as exc:
            raise InvalidRequestError(exc.message, exc.param or "file") from None
        return self.lora_card(record)

    def style_preset(self, name: str | None) -> StylePreset | None:
        if name is None:
            return None
        styles = self.sdxl.styles
        if name not in styles:
            raise InvalidRequestError(f"unknown style {name!r}; known: {sorted(styles)}", "style")
        return styles[name]

    async def lora_record(self, ref: str | None) -> LoraRecord | None:
        """The registered LoRA a request names (read from storage each time, so a new one is usable at
        once, and a deleted one is not). None registered under that reference (or deleted, or another
        owner's private one): 404 `model_not_found` naming `lora`; a malformed reference: 400."""
        if ref is None:
            return None
        try:
            record = await asyncio.to_thread(self.loras.resolve, ref)
        except LoraRegistryError as exc:
            raise bad_lora_reference(ref, exc) from None
        if not caller().sees(record.owner, record.public):  # another owner's private LoRA: unknown here
            raise unknown_lora(ref, f"no LoRA named {record.name!r} is registered")
        return record

    async def lora_trigger_word(self, ref: str | None) -> str | None:
        record = await self.lora_record(ref)
        return record.trigger_word if record else None
