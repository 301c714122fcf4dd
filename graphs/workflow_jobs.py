"""Run a user workflow (graphs/workflows.py) as one job: each node on the deployment that owns it.

The job's payload is a `WorkflowRunPayload` (graphs/payloads.py): the workflow, `use_cache`,
`refine` (node id → chat context), `loras` ("name:version" → name, version, sha256) and `saved`
(the saved workflow and version it ran from, if any), prepared by api/workflows/service.py.
Seeds (refine's included) and LoRA versions are pinned there, so a run (and its replay) is
reproducible and its model nodes are cacheable. Cache keys also hold the model each deployment
runs, asked of it when the job starts.

Node runners block in the executor's threads, calling DeploymentHandles; images, masks and
videos pass between nodes as storage keys, so no pixels cross the runner. Node states (status,
progress, start/finish times, cache hits, errors) are written to `record.result["nodes"]` as
they change, which the job API and its SSE events show.
"""

from __future__ import annotations

from typing import Any, Callable

from deployments.errors import AtelierError, JobCancelledError
from deployments.llm.contract import RefinedPrompt, RefineRequest, build_refine_chat, refined_from_response
from deployments.llm.vision import Judgement, rank, revision_instruction
from deployments.media import parse_size
from deployments.sdxl.contract import SDXLRequest, routed
from deployments.svd.contract import SVDRequest
from deployments.upscaler.contract import UpscaleRequest
from graphs import vision as graph_vision
from graphs.payloads import JudgeSpec, WorkflowRefineContext, WorkflowRunPayload, section
from graphs.pipelines import drain_stream, generate_candidates, lora_lineage
from graphs.vision import store_moderated
from graphs.workflows import NODE_TYPES, NodeContext, Workflow, deployments_of, run_workflow
from storage.fs import ObjectNotFoundError, Storage
from storage.jobs import JobOutput
from storage.keys import owner_tag

CACHE_PREFIX = "workflows/cache/"
DESCRIBE_TIMEOUT_S = 60
CONTENT_TYPES = {"image": "image/png", "images": "image/png", "mask": "image/png", "video": "video/mp4"}


class WorkflowFailedError(AtelierError):
    status_code = 500
    error_type = "workflow_failed"


class StorageWorkflowCache:
    """Node outputs by cache key, in storage: shared by every runner replica, kept across restarts.
    A hit whose files were deleted since is a miss. Each owner has its own cache: a hit hands out
    output keys, which must be the owner's own (storage/keys.py `owner_tag`)."""

    def __init__(self, storage: Storage, owner: str | None = None):
        self.storage = storage
        tag = owner_tag(owner)
        self.prefix = f"{CACHE_PREFIX}{tag}/" if tag else CACHE_PREFIX

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            outputs = self.storage.get_json(f"{self.prefix}{key}.json")
        except ObjectNotFoundError:
            return None
        files = [v for value in outputs.values() for v in (value if isinstance(value, list) else [value])
                 if isinstance(v, str) and v.startswith("outputs/")]
        return outputs if all(self.storage.exists(f) for f in files) else None

    def put(self, key: str, outputs: dict[str, Any]) -> None:
        self.storage.put_json(f"{self.prefix}{key}.json", outputs)


def _drain(node: NodeContext, stream) -> Any:
    """One streamed deployment call: progress to the node, cancel between steps."""
    return drain_stream(stream, lambda step, total: node.progress(step / max(total, 1)), node.check_cancelled)


def _size(value: str | None) -> dict:
    if value is None:
        return {}
    width, height = parse_size(value)
    return {"width": width, "height": height}


def _judge(handles: dict[str, Any], spec: JudgeSpec | None, images: list[bytes], prompt: str,
           criteria: str | None) -> list[Judgement]:
    if spec is None:  # run_payload pins it for every run with a judging node
        raise WorkflowFailedError("this run has no judge context (its payload predates judging nodes)")
    return graph_vision.judge_images(handles["llm"], images, prompt, spec.model, spec.settings, criteria)


def node_runners(handles: dict[str, Any], job_id: str, spec: WorkflowRunPayload,
                 storage: Storage | None = None) -> dict[str, Callable[[NodeContext], dict]]:
    """The runners of the model node types, bound to this job's handles (and its storage, where
    judged images are read and best-of candidates and QA rounds stored)."""

    def output_id(node: NodeContext) -> str:
        return f"{job_id}.{node.node_id}"

    def diffusion(mode: str) -> Callable[[NodeContext], dict]:
        def run(node: NodeContext) -> dict:
            p = node.params
            request = SDXLRequest(
                mode=mode, prompt=node.inputs["prompt"], negative_prompt=node.inputs.get("negative_prompt"), n=p.n,
                steps=p.steps, guidance_scale=p.guidance_scale, seed=p.seed,
                style=getattr(p, "style", None), lora=getattr(p, "lora", None),
                lora_scale=getattr(p, "lora_scale", 1.0), strength=getattr(p, "strength", 0.8),
                image_key=node.inputs.get("image"), mask_key=node.inputs.get("mask"), job_id=job_id,
                store=spec.moderation is None, output_id=output_id(node), **_size(p.size))
            if getattr(p, "best_of", None) is not None:
                return best_of(node, request)
            stream = routed(handles["sdxl"], request).options(stream=True).generate_stream.remote(request)
            response = _drain(node, stream)
            if spec.moderation is not None:  # the PNGs came back: looked at, then stored
                store(node, response.images)
            return {"images": [image.key for image in response.images]}

        return run

    def store(node: NodeContext, images: list, first_index: int = 0) -> None:
        """Generated PNGs stored under the node's output id; with the run's `moderation`, each is
        looked at first and a refused one fails the node, unstored."""
        store_moderated(storage, handles.get("llm"), images, output_id(node), spec.moderation, node.check_cancelled,
                        first_index)

    def best_of(node: NodeContext, request: SDXLRequest) -> dict:
        """text_to_image with best_of: the images API's best-of-n (graphs/pipelines.py), as a node:
        the candidates judged against the prompt, the top n out, every candidate in the node's info."""
        p = node.params
        request.store = False  # the PNGs are judged, then stored
        response = generate_candidates(None, handles["sdxl"], request, p.best_of,
                                       on_step=lambda step, total: node.progress(0.9 * step / max(total, 1)),
                                       check_cancelled=node.check_cancelled)
        judged = _judge(handles, spec.judge, [image.png for image in response.images], request.prompt, p.criteria)
        node.check_cancelled()
        store(node, response.images)
        order = rank(judged)
        ranks = {index: position for position, index in enumerate(order)}
        node.report({"candidates": [
            {"index": i, "image": image.key, "seed": image.seed, "rank": ranks[i], "chosen": ranks[i] < p.n,
             **judged[i].model_dump()} for i, image in enumerate(response.images)]})
        return {"images": [response.images[i].key for i in order[:p.n]]}

    def judge(node: NodeContext) -> dict:
        """Every input image judged against the prompt; out: the images best first (the top n when
        n is set) and every image's judgement, best first."""
        keys = node.inputs["images"]
        images = [storage.get_bytes(key) for key in keys]
        node.progress(0.1)
        judged = _judge(handles, spec.judge, images, node.inputs["prompt"], node.params.criteria)
        order = rank(judged)
        scores = [{"image": keys[i], "index": i, "rank": position, **judged[i].model_dump()}
                  for position, i in enumerate(order)]
        node.report({"judged": scores})
        return {"images": [keys[i] for i in order[:node.params.n or len(order)]], "scores": scores}

    def ask_refine(context: WorkflowRefineContext, request: RefineRequest,
                   instruction: str | None = None) -> RefinedPrompt:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        chat = build_refine_chat(request, context.model, context.settings, context.style, context.trigger_word,
                                 instruction)
        stream = handles["llm"].options(stream=True).chat.remote(ChatCompletionRequest.model_validate(chat), None)
        try:
            first = next(iter(stream))
        finally:
            stream.cancel()
        first = first[0] if isinstance(first, list) else first
        return refined_from_response(first, request, context.trigger_word)

    def qa_loop(node: NodeContext) -> dict:
        """generate → judge → refine the prompt with the judge's reasons → generate again, until the
        score reaches the threshold or the rounds run out. Each round (prompt, seed, image, score,
        reasons, defects) is reported as it ends; out: the best round's image and prompt, and every round."""
        p = node.params
        asked = node.inputs["prompt"]  # what every round is judged against
        negative_in = node.inputs.get("negative_prompt")
        prompt, negative, refine_note = asked, negative_in, None
        rounds: list[dict] = []
        stopped = "max_rounds"
        for r in range(p.max_rounds):
            def at(phase: float, r: int = r) -> None:
                node.progress((r + phase) / p.max_rounds)

            seed = p.seed + r if p.seed is not None else None  # pinned at submit: a replay runs the same rounds
            request = SDXLRequest(mode="text_to_image", prompt=prompt, negative_prompt=negative, n=1, steps=p.steps,
                                  guidance_scale=p.guidance_scale, seed=seed, style=p.style, lora=p.lora,
                                  lora_scale=p.lora_scale, job_id=job_id, store=False, **_size(p.size))
            stream = routed(handles["sdxl"], request).options(stream=True).generate_stream.remote(request)
            image = drain_stream(stream, lambda step, total: at(0.7 * step / max(total, 1)),
                                 node.check_cancelled).images[0]
            at(0.75)
            judgement = _judge(handles, spec.judge, [image.png], asked, p.criteria)[0]
            store(node, [image], first_index=r)
            rounds.append({"round": r + 1, "prompt": prompt, "negative_prompt": negative, "seed": image.seed,
                           "image": image.key, **judgement.model_dump(), **(refine_note or {})})
            node.report({"rounds": rounds, "threshold": p.threshold, "max_rounds": p.max_rounds})
            node.check_cancelled()
            if judgement.score >= p.threshold:
                stopped = "threshold"
                break
            if r + 1 == p.max_rounds:
                break
            at(0.85)
            refined = ask_refine(spec.refine[node.node_id],
                                 RefineRequest(prompt=prompt, style=p.style, lora=p.lora, seed=seed),
                                 revision_instruction(judgement, p.threshold))
            prompt = refined.prompt
            negative = ", ".join(x for x in (refined.negative_prompt, negative_in) if x) or None
            refine_note = {"refined": refined.refined, **({"refine_warning": refined.warning} if refined.warning else {})}
            node.check_cancelled()
        best = max(rounds, key=lambda item: (item["score"], -item["round"]))  # ties: the earlier round
        node.report({"stopped": stopped, "best_round": best["round"]})
        return {"image": best["image"], "prompt": best["prompt"], "rounds": rounds}

    def upscale(node: NodeContext) -> dict:
        p = node.params
        request = UpscaleRequest(image_key=node.inputs["image"], prompt=node.inputs.get("prompt") or "",
                                 steps=p.steps, noise_level=p.noise_level, seed=p.seed, job_id=job_id, store=True,
                                 output_id=output_id(node))
        response = _drain(node, handles["upscaler"].options(stream=True).upscale_stream.remote(request))
        return {"image": response.key}

    def image_to_video(node: NodeContext) -> dict:
        p = node.params
        request = SVDRequest(image_key=node.inputs["image"], num_frames=p.num_frames, fps=p.fps,
                             motion_bucket_id=p.motion_bucket_id, noise_aug_strength=p.noise_aug_strength,
                             steps=p.steps, seed=p.seed, job_id=job_id, store=True, output_id=output_id(node),
                             **_size(p.size))
        response = _drain(node, handles["svd"].options(stream=True).generate_stream.remote(request))
        return {"video": response.video_key}

    def refine(node: NodeContext) -> dict:
        request = RefineRequest(prompt=node.inputs["prompt"], style=node.params.style, lora=node.params.lora,
                                seed=node.params.seed)  # pinned by the ingress: a replay samples the same text
        refined = ask_refine(spec.refine[node.node_id], request)
        return {"prompt": refined.prompt, "negative_prompt": refined.negative_prompt}

    return {"text_to_image": diffusion("text_to_image"), "image_to_image": diffusion("image_to_image"),
            "inpaint": diffusion("inpaint"), "upscale": upscale, "image_to_video": image_to_video, "refine": refine,
            "judge": judge, "qa_loop": qa_loop}


def model_ids(handles: dict[str, Any], workflow: Workflow, spec: WorkflowRunPayload) -> dict[str, str]:
    """The model behind each deployment this workflow uses (its folder or hub id), for cache keys
    and lineage. Asked of the deployments when the job runs: the ingress caches what they said at
    its start, which a redeploy of one model leaves stale."""
    needed = sorted({name for node in workflow.nodes for name in deployments_of(node)})
    # Ask every deployment at once; the answers are awaited together below.
    pending = {name: handles[name].describe.remote() for name in needed if name != "llm" and name in handles}
    ids: dict[str, str] = {}
    if "llm" in needed:
        # vLLM's server has no describe(); the ingress pins the LLM from its own config, which
        # changes (and restarts the ingress) whenever the LLM is redeployed.
        context = next(iter(spec.refine.values()), None) or spec.judge
        if context is not None and (model := context.source or context.model):
            ids["llm"] = str(model)
    for name, response in pending.items():
        info = response.result(timeout_s=DESCRIBE_TIMEOUT_S)
        if model := info.get("source") or info.get("model"):
            ids[name] = str(model)
    return dict(sorted(ids.items()))


def _lineage(workflow: Workflow, node_id: str, spec: WorkflowRunPayload, job_id: str,
             models: dict[str, str]) -> dict:
    """What produced an output: the nodes upstream of it (type and params, seeds included; the
    model each ran on; the LoRA with its weights' sha256), the saved workflow and version it ran
    from, and the job. Kept in the job record's output metadata; the job id is never written
    into the files, so a replay can write identical bytes."""
    sources: dict[str, list[str]] = {}
    for edge in workflow.edges:
        sources.setdefault(edge.target, []).append(edge.source)
    by_id = {node.id: node for node in workflow.nodes}
    seen, stack = [], [node_id]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.append(current)
            stack.extend(sources.get(current, []))
    loras = {ref: section(pin) for ref, pin in spec.loras.items()}
    nodes = []
    for n in reversed(seen):
        node = by_id[n]
        entry: dict[str, Any] = {"id": n, "type": node.type, "params": node.params}
        deployment = NODE_TYPES[node.type].deployment
        if deployment is not None:
            entry["model_id"] = models.get(deployment)
        if node.params.get("lora"):
            entry["lora"] = loras.get(node.params["lora"]) or lora_lineage(node.params["lora"], None)
        nodes.append(entry)
    return {"job_id": job_id, "workflow": section(spec.saved), "replay_of": spec.replay_of,
            "seeds": {n["id"]: n["params"]["seed"] for n in nodes if n["params"].get("seed") is not None},
            "nodes": nodes}


def workflow_run(ctx, handles: dict[str, Any]) -> None:
    """Job kind `workflows.run`."""
    spec: WorkflowRunPayload = ctx.payload
    workflow = spec.workflow
    ctx.start_stage("workflow")

    def on_update(states: dict) -> None:
        nodes = {node_id: state.model_dump(mode="json") for node_id, state in states.items()}
        progress = sum(s["progress"] if s["status"] not in ("completed", "cached") else 100.0
                       for s in nodes.values()) / max(len(nodes), 1)
        ctx.record.result = {**(ctx.record.result or {}), "nodes": nodes}
        ctx.save(force=False, progress=round(progress, 2), stage_progress=round(progress, 2))

    def is_cancelled() -> bool:
        try:
            ctx.check_cancelled()
        except JobCancelledError:
            return True
        return False

    models = model_ids(handles, workflow, spec)
    result = run_workflow(workflow, {**node_runners(handles, ctx.id, spec, ctx.store.storage)}, on_update=on_update,
                          is_cancelled=is_cancelled, cache=StorageWorkflowCache(ctx.store.storage, ctx.record.owner),
                          use_cache=spec.use_cache, model_ids=models)
    nodes = {node_id: state.model_dump(mode="json") for node_id, state in result.nodes.items()}
    ctx.record.result = {"nodes": nodes, "outputs": result.outputs, "workflow": section(spec.saved), "models": models,
                         "cached": sorted(n for n, s in nodes.items() if s["status"] == "cached")}
    ctx.record.outputs = []
    port_types = _output_port_types(workflow)
    for node in workflow.nodes:
        if node.type != "output" or result.nodes[node.id].status not in ("completed", "cached"):
            continue
        value, kind = result.nodes[node.id].outputs.get("value"), port_types.get(node.id)
        for key in (value if isinstance(value, list) else [value]):
            if kind in CONTENT_TYPES and isinstance(key, str):
                ctx.add_output(JobOutput(key=key, content_type=CONTENT_TYPES[kind], extra={
                    "node": node.id, "name": node.params.get("name") or node.id,
                    "lineage": _lineage(workflow, node.id, spec, ctx.id, models)}))
    ctx.save(force=True)
    if result.status == "cancelled":
        raise JobCancelledError("cancelled by request")
    failed = {n: s["error"] for n, s in nodes.items() if s["status"] == "failed"}
    if failed:
        roots = {n: e for n, e in failed.items() if not (e or "").startswith("upstream node ")}
        summary = "; ".join(f"{n}: {e}" for n, e in (roots or failed).items())
        raise WorkflowFailedError(f"{len(failed)} of {len(nodes)} nodes failed ({summary})")


def _output_port_types(workflow: Workflow) -> dict[str, str]:
    """The type an output node receives: the type of the port feeding it."""
    types = {node.id: node.type for node in workflow.nodes}
    out = {}
    for edge in workflow.edges:
        if types.get(edge.target) == "output":
            out[edge.target] = NODE_TYPES[types[edge.source]].outputs.get(edge.source_port)
    return out
