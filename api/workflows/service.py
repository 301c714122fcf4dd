"""User workflows: checked against the deployed models, run as one job, saved.

Workflow checks that need the running application (deployed node types, each model's limits,
styles, LoRAs, stored images) are added here to graphs/workflows.py's structural ones, so a run
is refused up front with every problem listed (400), and a job fails only for reasons that could
not be seen. A node's params are checked by its model's own contract (`check()` in
deployments/<model>/contract.py), the same check the API and the deployment run.
"""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from api.auth import caller
from api.jobs.service import JobsService
from api.models.service import ModelsService
from api.ratelimit import NO_RATE_LIMITS, RateLimiter, image_cost, video_cost
from api.text.service import TextService
from api.vision.service import VisionService
from api.workflows.protocol import SavedWorkflow, SavedWorkflowBody, WorkflowRunRequest
from deployments.diffusion import MAX_SEED, random_seed
from deployments.errors import AtelierError, ConflictError, InvalidRequestError, NotFoundError
from deployments.llm import vision as vision_contract
from deployments.media import parse_size
from deployments.sdxl import contract as sdxl_contract
from deployments.svd import contract as svd_contract
from deployments.upscaler import contract as upscaler_contract
from graphs.payloads import WorkflowRunPayload
from graphs.pipelines import candidate_requests
from graphs.workflows import (NODE_TYPES, Node, ValidationReport, Workflow, WorkflowIssue, deployments_of,
                              validate_workflow)
from storage.fs import InvalidKeyError, ObjectNotFoundError, Storage
from storage.jobs import JobRecord
from storage.keys import new_id
from storage.workflows import SavedWorkflowError, SavedWorkflowExistsError, SavedWorkflowStore

SDXL_NODE_TYPES = ("text_to_image", "image_to_image", "inpaint")
# The node types whose images output moderation looks at (graphs/vision.store_moderated).
IMAGE_MAKING_NODE_TYPES = (*SDXL_NODE_TYPES, "qa_loop")
# Nodes that ask the LLM to judge images (text_to_image only with best_of).
JUDGING_NODE_TYPES = ("judge", "qa_loop", "text_to_image")
# A node's prompt arrives on an edge when the workflow runs; its checks do not read it.
_UNSEEN_PROMPT = "a prompt from the workflow"

# What a node runs with when a param at fault is left out: its model's default. Each problem
# check() finds clears its field, and the check runs again, so every problem is listed.
_SDXL_CLEAR = {"size": {"width": None, "height": None}, "steps": {"steps": None}, "seed": {"seed": None},
               "style": {"style": None}, "n": {"n": 1}}
_SVD_CLEAR = {"fps": {"fps": None}, "num_frames": {"num_frames": None}, "steps": {"steps": None},
              "size": {"width": None, "height": None}}
_UPSCALE_CLEAR = {"steps": {"steps": None}, "noise_level": {"noise_level": None}}


class InvalidWorkflowError(InvalidRequestError):
    """A workflow with problems: `report` lists every one (the router answers 400 with them all)."""

    def __init__(self, report: ValidationReport):
        first = report.errors[0]
        param = ".".join(p for p in ("nodes" if first.node else None, first.node, first.field) if p) or "workflow"
        summary = "; ".join(f"{e.node or 'workflow'}{'.' + e.field if e.field else ''}: {e.message}"
                            for e in report.errors[:10])
        super().__init__(f"the workflow has {len(report.errors)} problem(s): {summary}", param)
        self.report = report

    def __reduce__(self):
        return (type(self), (self.report,))


def images_made(node: Node) -> int:
    """Images an SDXL or QA node makes at most: n, best_of's candidates, or one per QA round."""
    p = NODE_TYPES[node.type].params.model_validate(node.params)
    if node.type == "qa_loop":
        return p.max_rounds
    return getattr(p, "best_of", None) or getattr(p, "n", 1)


def _saved_workflow_error(exc: SavedWorkflowError) -> AtelierError:
    if isinstance(exc, SavedWorkflowExistsError):
        return ConflictError(exc.message, exc.param)
    return NotFoundError(exc.message, exc.param)


def every_problem(check: Callable[[BaseModel], None], request: BaseModel,
                  clear: dict[str, dict[str, Any]]) -> tuple[list[InvalidRequestError], BaseModel]:
    """Every problem `check` finds in `request`, not only the first: after each, the field at fault
    is cleared (`clear[param]`) and the check runs again. Also returns the request as cleared."""
    problems: list[InvalidRequestError] = []
    while True:
        try:
            check(request)
            return problems, request
        except InvalidRequestError as exc:
            if any(p.param == exc.param for p in problems):
                return problems, request  # the field's default fails too: it is reported once
            problems.append(exc)
            if exc.param not in clear:
                return problems, request
            request = request.model_copy(update=clear[exc.param])


class _Checks:
    """Collects every problem of a workflow against the running models, with its node and field."""

    def __init__(self) -> None:
        self.issues: list[WorkflowIssue] = []

    def add(self, node: str, field: str, message: str) -> None:
        self.issues.append(WorkflowIssue(node=node, field=field, message=message))

    def add_all(self, node: str, problems: list[InvalidRequestError], fields: dict[str, str] | None = None) -> None:
        """A contract's problems; a param is the node's `params.<param>` unless `fields` names it."""
        for exc in problems:
            self.add(node, (fields or {}).get(exc.param) or f"params.{exc.param}", exc.message)


class WorkflowsService:
    def __init__(self, store: SavedWorkflowStore, storage: Storage, jobs: JobsService, models: ModelsService,
                 text: TextService, max_nodes: int):
        self.store = store  # saved workflows
        self.storage = storage  # stored images a workflow names
        self.jobs = jobs
        self.models = models  # deployed models, their contract Limits, styles and LoRAs
        self.text = text  # the LLM a refine node talks to, and its refine settings
        self.max_nodes = max_nodes
        self.readable: Callable[[str], bool] = lambda key: True  # may the caller read a stored output
        self.max_images = 64  # images and video frames one run may ask for (config max_workflow_images)
        self.max_best_of = 8  # text_to_image's best_of (config max_best_of, as the images API)
        self.max_qa_rounds = 5  # a qa_loop's max_rounds (config max_qa_rounds)
        self.rate: RateLimiter = NO_RATE_LIMITS
        self.vision: VisionService | None = None  # prompt moderation (build_services sets it)

    # --- checks against the running application -----------------------------------------------------

    def _stored_image_size(self, key: str) -> tuple[int, int] | str:
        """(width, height) of a stored image, read from its header; or why it cannot be used."""
        try:
            if not self.readable(key):  # another owner's output: as if missing
                raise ObjectNotFoundError(key)
            data = self.storage.get_bytes(key)
        except (ObjectNotFoundError, InvalidKeyError):
            return f"no stored output at {key!r}"
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.size
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError):
            return f"{key!r} is not an image"

    def _check_sdxl_node(self, checks: _Checks, node: Node, image: tuple[int, int] | None,
                         mask: tuple[int, int] | None) -> tuple[int, int] | None:
        """SDXL's contract check; the images' size if known."""
        limits: sdxl_contract.SDXLLimits = self.models.sdxl
        params = node.params
        width = height = None
        fields = {}
        if params.get("size"):
            width, height = parse_size(params["size"])
        elif node.type != "text_to_image" and image is not None:
            # the input image's size, rounded down to a multiple of 8, as the deployment runs it
            width, height = image[0] // 8 * 8, image[1] // 8 * 8
            fields["size"] = "inputs.image"
        request = sdxl_contract.SDXLRequest(
            mode=node.type if node.type in SDXL_NODE_TYPES else "text_to_image",  # a qa_loop makes images too
            prompt=_UNSEEN_PROMPT, n=params.get("n", 1), width=width, height=height,
            steps=params.get("steps"), guidance_scale=params.get("guidance_scale"), seed=params.get("seed"),
            strength=params.get("strength", 0.8), style=params.get("style"))
        problems, _ = every_problem(lambda r: sdxl_contract.check(r, limits), request, _SDXL_CLEAR)
        checks.add_all(node.id, problems, fields)
        if node.type == "inpaint" and image is not None and mask is not None and image != mask:
            checks.add(node.id, "inputs.mask", f"mask is {mask[0]}x{mask[1]} but image is {image[0]}x{image[1]}; "
                                               "they must match")
        self._check_judged_node(checks, node, None if problems else request)
        if any(p.param == "size" for p in problems):
            return None
        return sdxl_contract.size_of(request, limits)

    def _check_judged_node(self, checks: _Checks, node: Node, request: sdxl_contract.SDXLRequest | None) -> None:
        """The judge's params, by the LLM contract's checks (the images API's own): best_of against
        n and the cap, and each SDXL call its candidates take; a QA loop's rounds against the cap, and
        its seeds; the criteria's length. `request`: the node's SDXL request, when it has one."""
        if node.type not in JUDGING_NODE_TYPES:
            return
        p = NODE_TYPES[node.type].params.model_validate(node.params)  # valid: the structural checks passed
        settings = self.vision.judge_settings if self.vision is not None else vision_contract.JudgeSettings()
        to_run: list[Callable[[], None]] = [lambda: vision_contract.check_criteria(p.criteria, settings)]
        if node.type == "text_to_image" and p.best_of is not None:
            to_run.append(lambda: vision_contract.check_best_of(p.best_of, p.n, self.max_best_of))
            if request is not None and p.n <= p.best_of <= self.max_best_of:  # else that check says why
                limits = self.models.sdxl
                to_run += [lambda r=r: sdxl_contract.check(r, limits) for r in candidate_requests(request, p.best_of)]
        if node.type == "qa_loop":
            to_run.append(lambda: vision_contract.check_max_rounds(p.max_rounds, self.max_qa_rounds))
            max_seed = self.models.sdxl.max_seed
            if p.seed is not None and p.seed + p.max_rounds - 1 > max_seed:  # round r uses seed + r
                checks.add(node.id, "params.seed", f"seed + max_rounds - 1 must be at most {max_seed}")
        for run_check in to_run:
            try:
                run_check()
            except InvalidRequestError as exc:
                checks.add(node.id, f"params.{exc.param}", exc.message)

    def _check_upscale_node(self, checks: _Checks, node: Node,
                            image: tuple[int, int] | None) -> tuple[int, int] | None:
        """The upscaler's contract check; the output size if known."""
        limits: upscaler_contract.UpscalerLimits = self.models.limits_of("upscaler")
        params = node.params
        request = upscaler_contract.UpscaleRequest(steps=params.get("steps"), noise_level=params.get("noise_level"),
                                                   seed=params.get("seed"))
        problems, request = every_problem(lambda r: upscaler_contract.check(r, limits), request, _UPSCALE_CLEAR)
        checks.add_all(node.id, problems)
        if image is None:
            return None
        media = upscaler_contract.UpscaleMedia(width=image[0], height=image[1], param="inputs.image")
        problems, _ = every_problem(lambda r: upscaler_contract.check(r, limits, media), request, {})
        checks.add_all(node.id, problems, {media.param: media.param})
        if problems:
            return None
        return image[0] * limits.scale, image[1] * limits.scale

    def _check_video_node(self, checks: _Checks, node: Node) -> None:
        """SVD's contract check (frames, rate, size, steps)."""
        limits: svd_contract.SVDLimits = self.models.limits_of("svd")
        params = node.params
        size = parse_size(params["size"]) if params.get("size") else (None, None)
        request = svd_contract.SVDRequest(
            num_frames=params.get("num_frames"), fps=params.get("fps"), steps=params.get("steps"),
            seed=params.get("seed"), motion_bucket_id=params.get("motion_bucket_id", 127),
            noise_aug_strength=params.get("noise_aug_strength", 0.02), width=size[0], height=size[1])
        problems, _ = every_problem(lambda r: svd_contract.check(r, limits), request, _SVD_CLEAR)
        checks.add_all(node.id, problems)

    async def check(self, doc: Any) -> tuple[ValidationReport, Workflow | None]:
        """Structural checks, then each node's params against the model that runs it (its contract's
        check: SDXL's sizes, steps, seeds and styles; SVD's frames, rate, size and steps; the
        upscaler's steps, noise level and input size), that LoRAs are registered, and that stored
        images and masks exist. Every problem is reported.

        Image sizes are followed through the graph where they are known before running (a size
        param, a model's default, a stored image, x4 after an upscale), so an upscale of an image
        too large for the upscaler is refused here rather than failing in the job."""
        report = validate_workflow(doc, available_deployments=set(self.models.handles), max_nodes=self.max_nodes)
        if not report.valid:
            return report, None
        workflow = Workflow.model_validate(doc)
        by_id = {node.id: node for node in workflow.nodes}
        feeds = {(edge.target, edge.target_port): edge.source for edge in workflow.edges}
        sizes: dict[str, tuple[int, int] | None] = {}  # node id -> size of its image(s) or mask, if known
        checks = _Checks()
        for node_id in report.order:
            node, params = by_id[node_id], by_id[node_id].params

            def input_size(port: str) -> tuple[int, int] | None:
                return sizes.get(feeds.get((node_id, port), ""))

            if node.type in ("image", "mask"):
                found = await asyncio.to_thread(self._stored_image_size, params["key"])
                if isinstance(found, str):
                    checks.add(node_id, "params.key", found)
                else:
                    sizes[node_id] = found
            elif node.type in (*SDXL_NODE_TYPES, "qa_loop"):
                sizes[node_id] = self._check_sdxl_node(checks, node, input_size("image"), input_size("mask"))
            elif node.type in ("select", "judge"):
                sizes[node_id] = input_size("images")
                self._check_judged_node(checks, node, None)
            elif node.type == "upscale":
                sizes[node_id] = self._check_upscale_node(checks, node, input_size("image"))
            elif node.type == "image_to_video":
                self._check_video_node(checks, node)
            elif params.get("style"):  # a refine node's style: SDXL's presets (an SDXL node's is its check's)
                try:
                    self.models.style_preset(params["style"])
                except InvalidRequestError as exc:
                    checks.add(node_id, "params.style", exc.message)
            if params.get("lora"):
                try:
                    await self.models.lora_record(params["lora"])
                except InvalidRequestError as exc:
                    checks.add(node_id, "params.lora", exc.message)
        images = self.workload(workflow)[0] if not checks.issues else 0  # each node within its own limits first
        if images > self.max_images:
            checks.issues.append(WorkflowIssue(message=f"the workflow asks for {images} images and video frames in "
                                                       f"all; at most {self.max_images} per run here"))
        if checks.issues:
            return ValidationReport(valid=False, errors=checks.issues, order=report.order), None
        return report, workflow

    def workload(self, workflow: Workflow) -> tuple[int, int]:
        """(images and video frames, cost units) the run asks of the models (api/ratelimit.py)."""
        images = units = 0
        sdxl = self.models.limits.get("sdxl")
        for node in workflow.nodes:
            params = node.params
            if node.type in (*SDXL_NODE_TYPES, "qa_loop") and sdxl is not None:
                n = images_made(node)
                width, height = parse_size(params["size"]) if params.get("size") else (sdxl.default_size,) * 2
                images += n
                units += image_cost(n, params.get("steps"), width, height, sdxl.default_steps)
            elif node.type == "upscale" and "upscaler" in self.models.limits:
                images += 1
                units += max(1, params.get("steps") or self.models.limits["upscaler"].default_steps)
            elif node.type == "image_to_video" and "svd" in self.models.limits:
                svd = self.models.limits["svd"]
                frames = params.get("num_frames") or svd.default_num_frames
                images += frames
                units += video_cost(frames, params.get("steps"), svd.default_steps)
        return images, units

    async def checked(self, doc: Any) -> Workflow:
        """The workflow once it passes every check; InvalidWorkflowError listing every problem."""
        report, workflow = await self.check(doc)
        if workflow is None:
            raise InvalidWorkflowError(report)
        return workflow

    # --- runs -----------------------------------------------------------------------------------------

    async def run_payload(self, workflow: Workflow, use_cache: bool, saved: dict | None) -> dict:
        """Seeds pinned (a run and its replay are reproducible; refine's too, as the LLM samples),
        LoRAs pinned to a version with their weights' sha256 (lineage), what each refine and QA loop
        node needs to talk to the LLM, and the judge's model and bounds when a node judges."""
        nodes = []
        refine: dict[str, dict] = {}
        loras: dict[str, dict] = {}
        judge: dict | None = None
        for node in workflow.nodes:
            params = dict(node.params)
            if "seed" in NODE_TYPES[node.type].params.model_fields and params.get("seed") is None:
                params["seed"] = min(random_seed(), MAX_SEED - images_made(node) + 1)  # image i uses seed + i
            if params.get("lora"):
                record = await self.models.lora_record(params["lora"])
                params["lora"] = record.id
                loras[record.id] = {"name": record.name, "version": record.version, "sha256": record.sha256}
            if "llm" in deployments_of(node) and node.type != "refine":
                judge = self.judge_context()
            if node.type in ("refine", "qa_loop"):  # a QA loop refines its prompt with the judge's reasons
                llm = self.text.limits
                if llm is None:
                    self.text.handle(None)  # 404: no language model is deployed
                style = self.models.style_preset(params.get("style"))
                refine[node.id] = {
                    "model": llm.model, "source": llm.source, "settings": self.text.settings.model_dump(),
                    "style": style.model_dump() if style else None,
                    "trigger_word": await self.models.lora_trigger_word(params.get("lora")),
                }
            nodes.append({**node.model_dump(), "params": params})
        sections = {"judge": judge} if judge else {}  # a run that judges nothing is stored as before
        return {"workflow": {**workflow.model_dump(), "nodes": nodes}, "use_cache": use_cache, "refine": refine,
                **sections, "loras": loras, "saved": saved}

    def judge_context(self) -> dict:
        """What a run's judging nodes need to talk to the LLM (graphs/payloads.JudgeSpec); 404 with none."""
        llm = self.text.limits
        if llm is None:
            self.text.handle(None)  # 404: no language model is deployed
        settings = self.vision.judge_settings if self.vision is not None else vision_contract.JudgeSettings()
        return {"model": llm.model, "source": llm.source, "settings": settings.model_dump(mode="json")}

    async def run(self, body: WorkflowRunRequest) -> JobRecord:
        """Run an inline or saved workflow as one job; InvalidWorkflowError listing every problem."""
        if (body.workflow is None) == (body.workflow_id is None):
            raise InvalidRequestError("give either workflow (inline) or workflow_id (saved)", "workflow")
        saved = None
        doc = body.workflow
        if body.workflow_id is not None:
            record = await self.get(body.workflow_id, body.version)
            doc, saved = record.workflow, {"id": record.id, "version": record.version, "name": record.name}
        workflow = await self.checked(doc)
        self.rate.charge(self.workload(workflow)[1], "workflow")
        if self.vision is not None:  # every prompt the run starts from, checked before anything runs
            await asyncio.gather(*(self.vision.check_prompt(node.params.get("text"), f"nodes.{node.id}.params.text")
                                   for node in workflow.nodes if node.type == "prompt"))
        payload = await self.run_payload(workflow, body.use_cache, saved)
        moderation = self.vision.moderation_spec() if self.vision is not None else None
        if moderation and any(node.type in IMAGE_MAKING_NODE_TYPES for node in workflow.nodes):
            payload["moderation"] = moderation  # each generated image looked at before it is stored
        return await self.jobs.submit_async(WorkflowRunPayload.create(**payload), ["workflow"])

    # --- saved workflows ------------------------------------------------------------------------------

    async def _call(self, fn: Callable, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except SavedWorkflowError as exc:
            raise _saved_workflow_error(exc) from None

    async def get(self, workflow_id: str, version: int | None = None) -> SavedWorkflow:
        """The caller's saved workflow (any for admin); another owner's is as unknown as a missing one."""
        saved = await self._call(self.store.get, workflow_id, version)
        if not caller().sees(saved.owner):
            raise NotFoundError(f"no workflow with id {workflow_id!r}", "workflow_id")
        return saved

    async def save(self, workflow_id: str, version: int, body: SavedWorkflowBody,
                   owner: str | None = None) -> SavedWorkflow:
        """Check the workflow (InvalidWorkflowError), then write the version; 409 if it was saved meanwhile.
        A new version keeps the workflow's owner (`owner`: the first version's)."""
        if version > 1:
            owner = (await self.get(workflow_id)).owner  # 404 unless the caller's
        workflow = await self.checked(body.workflow)
        saved = SavedWorkflow(id=workflow_id, name=body.name, description=body.description, version=version,
                              created_at=int(time.time()), workflow=workflow.model_dump(), owner=owner)
        return await self._call(self.store.create, saved)

    async def create(self, body: SavedWorkflowBody) -> SavedWorkflow:
        return await self.save(new_id("wf"), 1, body, owner=caller().owner)

    async def list(self, limit: int) -> list[SavedWorkflow]:
        who = caller()
        return await self._call(self.store.list_latest, limit, None if who.admin else (lambda w: who.sees(w.owner)))

    async def delete(self, workflow_id: str) -> None:
        await self.get(workflow_id)  # 404 unless the caller's
        await self._call(self.store.delete, workflow_id)


def build_workflows_service(storage: Storage, jobs: JobsService, models: ModelsService, text: TextService,
                            max_nodes: int, max_images: int = 64) -> WorkflowsService:
    service = WorkflowsService(SavedWorkflowStore(storage), storage, jobs, models, text, max_nodes)
    service.max_images = max_images
    service.readable = jobs.files.readable  # another owner's output is as unknown as a missing one
    return service
