"""User workflow graphs: the JSON format, validation, and a concurrent executor.

A workflow is a DAG of typed nodes joined by edges between named ports. This module is pure Python
(pydantic, stdlib threads, storage's key rules, the LLM contract's judge checks): the model calls
are injected as `NodeRunner`s, so the graph logic is testable without Ray and the ingress can wire
runners to whichever deployments it has.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Annotated, Any, Callable, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from deployments.errors import InvalidRequestError
from deployments.llm.vision import check_threshold
from storage.fs import InvalidKeyError, validate_key
from storage.keys import OUTPUTS_PREFIX

log = logging.getLogger(__name__)

# Kept local (same value as deployments.sdxl.contract.MAX_SEED) so this module stays dependency-free.
MAX_SEED = 2**32 - 1
MAX_NODES = 500  # the hard cap; apps configure a lower one (recursion in cycle search is bounded by it)

# "scores": judgements, best first ([{image, score, reasons, defects, matches_prompt}, ...]; a QA
# loop's rounds), shown by an output node; no model node takes them.
PortType = Literal["text", "image", "images", "video", "mask", "scores"]
ANY: Literal["any"] = "any"  # an input port that accepts every port type (the `output` node)

# ---------------------------------------------------------------------------------------------
# Node parameters
# ---------------------------------------------------------------------------------------------

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)] | None
Steps = Annotated[int, Field(ge=1)] | None  # the most a model takes is its contract's check()
Guidance = Annotated[float, Field(ge=0, le=30)] | None
Size = Annotated[str, Field(pattern=r"^[1-9][0-9]{1,4}x[1-9][0-9]{1,4}$", description="WIDTHxHEIGHT")] | None
ImageCount = Literal[1, 2, 4, 8]


class NodeParams(BaseModel):
    # A typo in a param name must be an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")

    def uses(self) -> dict[str, str]:
        """Deployments these params ask for besides the node type's own: param -> deployment."""
        return {}


# A judgement's score is 1 to 10; the checks are the LLM contract's (deployments/llm/vision.py),
# the ones the images API runs. The caps (max_best_of, max_qa_rounds) are config: the workflows
# service checks them against the running app.
Criteria = Annotated[str, Field(max_length=4000, description="What else the judge should look for.")] | None


def _threshold(value: float) -> float:
    try:
        check_threshold(value)
    except InvalidRequestError as exc:
        raise ValueError(exc.message) from None
    return value


class PromptParams(NodeParams):
    text: str = Field(min_length=1, max_length=4000)


class KeyParams(NodeParams):
    key: str = Field(min_length=1, max_length=1024, description="Storage key of a stored output, e.g. outputs/…")

    @field_validator("key")
    @classmethod
    def _output_key(cls, key: str) -> str:
        # The same rule as the HTTP `image_key` fields (api/uploads.reference_key): a
        # valid key under outputs/, so a workflow cannot read job records, uploads or LoRA weights.
        try:
            validate_key(key)
        except InvalidKeyError as exc:
            raise ValueError(f"key is not a valid storage key: {exc}") from None
        if not key.startswith(OUTPUTS_PREFIX):
            raise ValueError(f"key must name a stored output ({OUTPUTS_PREFIX}…)")
        return key


class RefineParams(NodeParams):
    style: str | None = None
    lora: str | None = Field(None, max_length=300)
    # Refinement samples (temperature > 0): a pinned seed makes a run, its cache entry and its replay agree.
    seed: Seed = None


class _DiffusionParams(NodeParams):
    n: ImageCount = 1
    size: Size = None
    steps: Steps = None
    guidance_scale: Guidance = None
    seed: Seed = None


class TextToImageParams(_DiffusionParams):
    style: str | None = None
    lora: str | None = Field(None, max_length=300)
    lora_scale: float = Field(1.0, ge=0, le=4)
    best_of: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Generate this many candidates, judge them with the LLM, keep the top n (ranked).")
    criteria: Criteria = None

    def uses(self) -> dict[str, str]:
        return {"best_of": "llm"} if self.best_of is not None else {}


class ImageToImageParams(_DiffusionParams):
    strength: float = Field(0.8, gt=0, le=1)
    # As on text_to_image: checked against the registry and pinned to a version by the workflows service.
    lora: str | None = Field(None, max_length=300)
    lora_scale: float = Field(1.0, ge=0, le=4)


class UpscaleParams(NodeParams):
    steps: Steps = None
    noise_level: Annotated[int, Field(ge=0)] | None = None
    seed: Seed = None


class ImageToVideoParams(NodeParams):
    num_frames: int | None = None  # 1 to the model's limit: its contract's check()
    fps: int | None = None
    motion_bucket_id: int = Field(127, ge=0, le=255)
    noise_aug_strength: float = Field(0.02, ge=0, le=1)
    size: Size = None
    steps: Steps = None
    seed: Seed = None


class JudgeParams(NodeParams):
    criteria: Criteria = None
    n: Annotated[int, Field(ge=1)] | None = Field(None, description="Keep the top n images; empty keeps all, ranked.")


class QALoopParams(NodeParams):
    """generate → judge → refine the prompt with the judge's reasons → generate again, until the
    score reaches `threshold` or after `max_rounds`. Round r (from 0) uses seed + r."""

    threshold: Annotated[float, AfterValidator(_threshold)] = Field(7.0, description="Stop at this score (1 to 10).")
    max_rounds: int = Field(3, ge=1, description="Rounds at most (the app caps it: max_qa_rounds).")
    criteria: Criteria = None
    size: Size = None
    steps: Steps = None
    guidance_scale: Guidance = None
    seed: Seed = None
    style: str | None = None
    lora: str | None = Field(None, max_length=300)
    lora_scale: float = Field(1.0, ge=0, le=4)


class SelectParams(NodeParams):
    index: int = Field(0, ge=0)


class OutputParams(NodeParams):
    name: str | None = Field(None, min_length=1, max_length=64, description="Key in the result; default the node id.")


# ---------------------------------------------------------------------------------------------
# Node type registry
# ---------------------------------------------------------------------------------------------


class PortSpec(BaseModel):
    type: PortType | Literal["any"]
    required: bool = True


class NodeSpec(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    description: str
    inputs: dict[str, PortSpec] = {}
    outputs: dict[str, PortType] = {}
    params: type[BaseModel]
    deployment: str | None = None  # "sdxl", "llm", "upscaler", "svd"; None for built-ins
    uses: tuple[str, ...] = ()  # other deployments every node of this type calls (a QA loop's LLM)


def _in(type_: str, required: bool = True) -> PortSpec:
    return PortSpec(type=type_, required=required)


_EDIT_INPUTS = {"image": _in("image"), "prompt": _in("text"), "negative_prompt": _in("text", False)}

NODE_TYPES: dict[str, NodeSpec] = {
    "prompt": NodeSpec(description="A fixed piece of text.", outputs={"text": "text"}, params=PromptParams),
    "image": NodeSpec(description="An existing stored image.", outputs={"image": "image"}, params=KeyParams),
    "mask": NodeSpec(description="An existing stored mask (white = repaint).", outputs={"mask": "mask"},
                     params=KeyParams),
    "refine": NodeSpec(description="Rewrite a prompt with the LLM; also proposes a negative prompt.",
                       inputs={"prompt": _in("text")}, outputs={"prompt": "text", "negative_prompt": "text"},
                       params=RefineParams, deployment="llm"),
    "text_to_image": NodeSpec(description="Generate images from a prompt.",
                              inputs={"prompt": _in("text"), "negative_prompt": _in("text", False)},
                              outputs={"images": "images"}, params=TextToImageParams, deployment="sdxl"),
    "image_to_image": NodeSpec(description="Redraw an image guided by a prompt.", inputs=_EDIT_INPUTS,
                               outputs={"images": "images"}, params=ImageToImageParams, deployment="sdxl"),
    "inpaint": NodeSpec(description="Repaint the masked part of an image.",
                        inputs={**_EDIT_INPUTS, "mask": _in("mask")}, outputs={"images": "images"},
                        params=ImageToImageParams, deployment="sdxl"),
    "upscale": NodeSpec(description="x4 upscale an image.",
                        inputs={"image": _in("image"), "prompt": _in("text", False)}, outputs={"image": "image"},
                        params=UpscaleParams, deployment="upscaler"),
    "image_to_video": NodeSpec(description="Animate an image into a short video.", inputs={"image": _in("image")},
                               outputs={"video": "video"}, params=ImageToVideoParams, deployment="svd"),
    "judge": NodeSpec(description="Score images against their prompt with the LLM; ranked best first, with "
                                  "scores, reasons and defects.",
                      inputs={"images": _in("images"), "prompt": _in("text")},
                      outputs={"images": "images", "scores": "scores"}, params=JudgeParams, deployment="llm"),
    "qa_loop": NodeSpec(description="Generate, judge, and rewrite the prompt with the judge's reasons until the "
                                    "score reaches the threshold or the rounds run out; every round is recorded.",
                        inputs={"prompt": _in("text"), "negative_prompt": _in("text", False)},
                        outputs={"image": "image", "prompt": "text", "rounds": "scores"},
                        params=QALoopParams, deployment="sdxl", uses=("llm",)),
    "select": NodeSpec(description="Pick one image out of a list.", inputs={"images": _in("images")},
                       outputs={"image": "image"}, params=SelectParams),
    "output": NodeSpec(description="A result of the workflow.", inputs={"value": _in(ANY)}, params=OutputParams),
}

# Cheap, deterministic built-ins: caching them would cost more than it saves.
UNCACHED_TYPES = frozenset({"prompt", "image", "mask", "select", "output"})

# ---------------------------------------------------------------------------------------------
# Workflow format
# ---------------------------------------------------------------------------------------------


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    # A plain str so an unknown type is a validation issue naming the node, not a parse failure.
    type: str = Field(json_schema_extra={"examples": list(NODE_TYPES)})
    params: dict[str, Any] = {}
    cache: bool = True


class Edge(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str
    source_port: str
    target: str
    target_port: str


class Workflow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str = ""
    nodes: list[Node]
    edges: list[Edge] = []
    # The editor's layout (node positions, groups, comments, viewport): kept with the workflow and
    # never read by the engine, so it is in no check and no cache key.
    ui: dict[str, Any] | None = Field(None, description=(
        "Editor layout, ignored by the engine: {positions: {node_id: {x, y}}, groups: [{id, title, x, y, width, "
        "height, nodes}], comments: [{id, text, x, y}], viewport: {x, y, zoom}}. Without it an editor lays the "
        "graph out itself."))


def workflow_schema() -> dict[str, Any]:
    """The workflow JSON Schema plus the node type catalogue (ports and params schemas), for clients
    such as the web UI's editor, which builds its palette and param forms from it."""
    return {
        "workflow": Workflow.model_json_schema(),
        # An input of type "any" takes every port type; any other input takes only its own type.
        "port_types": [*PortType.__args__, ANY],
        "node_types": {
            name: {
                "description": spec.description,
                "deployment": spec.deployment,
                "uses": list(spec.uses),
                "inputs": {p: s.model_dump() for p, s in spec.inputs.items()},
                "outputs": dict(spec.outputs),
                "params": spec.params.model_json_schema(),
            }
            for name, spec in NODE_TYPES.items()
        },
    }


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


class WorkflowIssue(BaseModel):
    node: str | None = None
    field: str | None = None
    message: str


class ValidationReport(BaseModel):
    valid: bool
    errors: list[WorkflowIssue] = []
    order: list[str] = []


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _parse_issues(doc: Any, exc: ValidationError) -> list[WorkflowIssue]:
    issues = []
    raw_nodes = doc.get("nodes") if isinstance(doc, dict) else None
    for err in exc.errors():
        loc = err["loc"]
        node = None
        # Name the node when the error is inside one that has a usable id, so a UI can highlight it.
        if len(loc) >= 2 and loc[0] == "nodes" and isinstance(loc[1], int) and isinstance(raw_nodes, list):
            raw = raw_nodes[loc[1]] if loc[1] < len(raw_nodes) else None
            if isinstance(raw, dict) and isinstance(raw.get("id"), str):
                node = raw["id"]
        issues.append(WorkflowIssue(node=node, field=_loc(loc) or None, message=err["msg"]))
    return issues


def _find_cycles(ids: list[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan), as ordered node ids."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[set[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by MAX_NODES
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in succ[v]:
                sccs.append(comp)

    for v in ids:
        if v not in index:
            visit(v)
    position = {v: i for i, v in enumerate(ids)}
    cycles = []
    for comp in sorted(sccs, key=lambda c: min(position[v] for v in c)):
        start = min(comp, key=position.__getitem__)
        # Shortest path start -> ... -> start inside the component (BFS), so the message is minimal.
        parent: dict[str, str] = {}
        frontier, found = [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in succ[v]:
                    if w == start:
                        found = v
                        break
                    if w in comp and w not in parent:
                        parent[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append(path[::-1])
    return cycles


def _topological_order(ids: list[str], succ: dict[str, list[str]]) -> list[str]:
    """Kahn's algorithm; among ready nodes, the one appearing first in the document runs first."""
    position = {v: i for i, v in enumerate(ids)}
    indegree = {v: 0 for v in ids}
    for v in ids:
        for w in succ[v]:
            indegree[w] += 1
    ready = [position[v] for v in ids if indegree[v] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        v = ids[heapq.heappop(ready)]
        order.append(v)
        for w in succ[v]:
            indegree[w] -= 1
            if indegree[w] == 0:
                heapq.heappush(ready, position[w])
    return order


def validate_workflow(
    doc: dict[str, Any] | Workflow,
    available_deployments: set[str] | None = None,
    max_nodes: int = MAX_NODES,
) -> ValidationReport:
    """Every structural problem in a user's workflow, each with the node and field it is about.
    Never raises. The models' limits are their contracts' `check()`s, which the workflows service
    (api/workflows/service.py) runs on each node once the structure is sound."""
    max_nodes = min(max_nodes, MAX_NODES)
    if isinstance(doc, dict) and isinstance(doc.get("nodes"), list) and len(doc["nodes"]) > max_nodes:
        return _too_many_nodes(len(doc["nodes"]), max_nodes)
    if isinstance(doc, Workflow):
        workflow = doc
    else:
        try:
            workflow = Workflow.model_validate(doc)
        except ValidationError as exc:
            return ValidationReport(valid=False, errors=_parse_issues(doc, exc))
    if len(workflow.nodes) > max_nodes:
        return _too_many_nodes(len(workflow.nodes), max_nodes)

    errors: list[WorkflowIssue] = []

    def error(node: str | None, field: str | None, message: str) -> None:
        errors.append(WorkflowIssue(node=node, field=field, message=message))

    nodes: dict[str, Node] = {}
    output_names: dict[str, str] = {}
    for node in workflow.nodes:
        if node.id in nodes:
            error(node.id, "id", f"duplicate node id {node.id!r}")
            continue
        nodes[node.id] = node
        spec = NODE_TYPES.get(node.type)
        if spec is None:
            error(node.id, "type", f"unknown node type {node.type!r}; known types: {', '.join(NODE_TYPES)}")
            continue
        for deployment in (d for d in (spec.deployment, *spec.uses) if d):
            if available_deployments is not None and deployment not in available_deployments:
                error(node.id, "type", f"node type {node.type} needs the {deployment} deployment, "
                                       "which this application does not deploy")
        try:
            params = spec.params.model_validate(node.params)
        except ValidationError as exc:
            for err in exc.errors():
                error(node.id, _loc(("params", *err["loc"])), err["msg"])
            continue
        for param, deployment in params.uses().items():  # type: ignore[attr-defined]
            if available_deployments is not None and deployment not in available_deployments:
                error(node.id, f"params.{param}", f"{param} needs the {deployment} deployment, which this "
                                                  "application does not deploy")
        if node.type == "output":
            name = params.name or node.id  # type: ignore[attr-defined]
            if name in output_names:
                error(node.id, "params.name", f"output name {name!r} is also used by node {output_names[name]}")
            output_names.setdefault(name, node.id)

    ids = list(nodes)
    succ: dict[str, list[str]] = {v: [] for v in ids}
    connected: dict[tuple[str, str], int] = {}  # (target, port) -> first edge index
    for i, edge in enumerate(workflow.edges):
        src, dst = nodes.get(edge.source), nodes.get(edge.target)
        if src is None:
            error(edge.source, f"edges.{i}.source", f"edge {i} comes from unknown node {edge.source!r}")
        if dst is None:
            error(edge.target, f"edges.{i}.target", f"edge {i} goes to unknown node {edge.target!r}")
        if src is None or dst is None:
            continue
        if dst.id not in succ[src.id]:
            succ[src.id].append(dst.id)
        src_spec, dst_spec = NODE_TYPES.get(src.type), NODE_TYPES.get(dst.type)
        out_type = in_spec = None
        if src_spec is not None:
            out_type = src_spec.outputs.get(edge.source_port)
            if out_type is None:
                error(src.id, f"outputs.{edge.source_port}", f"node type {src.type} has no output "
                      f"{edge.source_port!r}; outputs: {', '.join(src_spec.outputs) or 'none'}")
        if dst_spec is not None:
            in_spec = dst_spec.inputs.get(edge.target_port)
            if in_spec is None:
                error(dst.id, f"inputs.{edge.target_port}", f"node type {dst.type} has no input "
                      f"{edge.target_port!r}; inputs: {', '.join(dst_spec.inputs) or 'none'}")
            elif (dst.id, edge.target_port) in connected:
                error(dst.id, f"inputs.{edge.target_port}", f"input {edge.target_port!r} already has an edge "
                      f"(edge {connected[(dst.id, edge.target_port)]}); an input takes one edge")
            else:
                connected[(dst.id, edge.target_port)] = i
        if out_type and in_spec and in_spec.type not in (ANY, out_type):
            hint = "; use a select node" if (out_type, in_spec.type) == ("images", "image") else ""
            error(dst.id, f"inputs.{edge.target_port}", f"edge {src.id}.{edge.source_port} → "
                  f"{dst.id}.{edge.target_port}: {out_type} does not fit an {in_spec.type} input{hint}")

    for node in nodes.values():
        spec = NODE_TYPES.get(node.type)
        for port, port_spec in (spec.inputs.items() if spec else ()):
            if port_spec.required and (node.id, port) not in connected:
                error(node.id, f"inputs.{port}", f"required input {port!r} ({port_spec.type}) has no edge")

    cycles = _find_cycles(ids, succ)
    for cycle in cycles:
        error(cycle[0], None, "cycle: " + " → ".join([*cycle, cycle[0]]))

    outputs = [v for v in ids if nodes[v].type == "output"]
    if not outputs:
        error(None, None, "the workflow has no output node")
    else:
        pred: dict[str, list[str]] = {v: [] for v in ids}
        for v in ids:
            for w in succ[v]:
                pred[w].append(v)
        leads = set(outputs)
        todo = list(outputs)
        while todo:
            for v in pred[todo.pop()]:
                if v not in leads:
                    leads.add(v)
                    todo.append(v)
        for v in ids:
            if v not in leads:
                error(v, None, f"node {v} does not lead to any output")

    order = [] if cycles else _topological_order(ids, succ)
    return ValidationReport(valid=not errors, errors=errors, order=order)


def _too_many_nodes(count: int, limit: int) -> ValidationReport:
    issue = WorkflowIssue(node=None, field="nodes", message=f"{count} nodes; a workflow has at most {limit}")
    return ValidationReport(valid=False, errors=[issue])


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------


class WorkflowCancelled(Exception):
    """Raised by `NodeContext.check_cancelled` once the run is cancelled."""


NodeStatus = Literal["pending", "running", "completed", "failed", "cancelled", "cached"]


class NodeState(BaseModel):
    status: NodeStatus = "pending"
    progress: float = 0.0  # percent, 0..100
    error: str | None = None
    outputs: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cache_key: str | None = None
    progress_updates: int = 0  # progress reports the runner made (steps streamed from its deployment)
    info: dict[str, Any] | None = None  # what the runner reported as it ran (a QA loop's rounds, candidates)


class WorkflowResult(BaseModel):
    status: Literal["completed", "failed", "cancelled"]
    nodes: dict[str, NodeState]
    outputs: dict[str, Any]


class NodeContext:
    """What a runner gets: the node, its validated params, its input values, and progress/cancel hooks."""

    def __init__(self, node: Node, params: BaseModel, inputs: dict[str, Any],
                 progress: Callable[[float], None], check_cancelled: Callable[[], None],
                 report: Callable[[dict[str, Any]], None] = lambda info: None) -> None:
        self.node = node
        self.params = params
        self.inputs = inputs
        self.progress = progress  # fraction 0..1
        self.check_cancelled = check_cancelled  # raises WorkflowCancelled
        # Shows what the node did so far on its state (`info`, merged), in the job record as it runs.
        self.report = report

    @property
    def node_id(self) -> str:
        return self.node.id


NodeRunner = Callable[[NodeContext], dict[str, Any]]


class WorkflowCache(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, outputs: dict[str, Any]) -> None: ...


class InMemoryWorkflowCache:
    def __init__(self) -> None:
        self._items: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: str, outputs: dict[str, Any]) -> None:
        with self._lock:
            self._items[key] = outputs


def _params(node: Node) -> BaseModel:
    return NODE_TYPES[node.type].params.model_validate(node.params)


def deployments_of(node: Node) -> list[str]:
    """The deployments a (valid) node calls: its type's, the ones every node of the type uses, and
    those its params ask for (text_to_image's best_of judges with the LLM)."""
    spec = NODE_TYPES[node.type]
    names = [spec.deployment, *spec.uses, *_params(node).uses().values()]  # type: ignore[attr-defined]
    return list(dict.fromkeys(name for name in names if name))


def is_cacheable(node: Node) -> bool:
    """Model nodes with a fixed (or no) seed; a None seed means a fresh random result each run."""
    if node.type in UNCACHED_TYPES or not node.cache:
        return False
    params = _params(node)
    return not ("seed" in type(params).model_fields and getattr(params, "seed") is None)


def cache_key(node: Node, inputs: dict[str, Any], model_id: str | None = None) -> str:
    """sha256 of the node type, its params with defaults filled in, its input values, and the
    identity of the model that runs it (so swapping a deployment's weights does not serve stale outputs)."""
    payload = {"type": node.type, "params": _params(node).model_dump(mode="json"), "inputs": inputs,
               "model": model_id}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _run_prompt(ctx: NodeContext) -> dict[str, Any]:
    return {"text": ctx.params.text}  # type: ignore[attr-defined]


def _run_select(ctx: NodeContext) -> dict[str, Any]:
    images, index = ctx.inputs["images"], ctx.params.index  # type: ignore[attr-defined]
    if index >= len(images):
        raise IndexError(f"index {index} is out of range: the input has {len(images)} image(s)")
    return {"image": images[index]}


BUILTIN_RUNNERS: dict[str, NodeRunner] = {
    "prompt": _run_prompt,
    "image": lambda ctx: {"image": ctx.params.key},  # type: ignore[attr-defined]
    "mask": lambda ctx: {"mask": ctx.params.key},  # type: ignore[attr-defined]
    "select": _run_select,
    "output": lambda ctx: {"value": ctx.inputs["value"]},
}

_POLL_S = 0.1  # how often the scheduler polls is_cancelled (spec: at most every 0.2 s)


def run_workflow(
    workflow: Workflow,
    runners: dict[str, NodeRunner],
    *,
    on_update: Callable[[dict[str, NodeState]], None] | None = None,
    is_cancelled: Callable[[], bool] = lambda: False,
    cache: WorkflowCache | None = None,
    use_cache: bool = True,
    max_parallel: int = 8,
    model_ids: dict[str, str] | None = None,
) -> WorkflowResult:
    """Run a valid workflow, each node as soon as its inputs are ready, up to `max_parallel` at once.

    Blocks until every node is settled. `runners` (by node type) override `BUILTIN_RUNNERS`.
    With use_cache=False the cache is not read, but fresh results are still written to it.
    `model_ids` (by deployment: "sdxl", "upscaler", ...) name the models behind the runners; they
    are part of each node's cache key.
    """
    report = validate_workflow(workflow)
    if not report.valid:
        raise ValueError("invalid workflow: " + "; ".join(
            f"{e.node or '-'}{'.' + e.field if e.field else ''}: {e.message}" for e in report.errors))
    all_runners = {**BUILTIN_RUNNERS, **runners}
    nodes = {n.id: n for n in workflow.nodes}
    missing = sorted({n.type for n in nodes.values()} - set(all_runners))
    if missing:
        raise ValueError(f"no runner for node type(s): {', '.join(missing)}")

    feeds: dict[str, dict[str, tuple[str, str]]] = {v: {} for v in nodes}  # target -> port -> (source, port)
    dependants: dict[str, list[str]] = {v: [] for v in nodes}
    for edge in workflow.edges:
        feeds[edge.target][edge.target_port] = (edge.source, edge.source_port)
        if edge.target not in dependants[edge.source]:
            dependants[edge.source].append(edge.target)
    waiting_on = {v: len({src for src, _ in feeds[v].values()}) for v in nodes}

    states = {v: NodeState() for v in nodes}
    lock = threading.RLock()
    cancel_event = threading.Event()

    def update(node_id: str, **changes: Any) -> None:
        with lock:  # one lock serialises state changes and on_update calls
            states[node_id] = states[node_id].model_copy(update=changes)
            if on_update is not None:
                snapshot = {k: s.model_copy(deep=True) for k, s in states.items()}
                try:
                    on_update(snapshot)
                except Exception:  # a broken progress sink must not fail the generation
                    log.exception("workflow on_update callback failed")

    def check_cancelled() -> None:
        if cancel_event.is_set() or is_cancelled():
            cancel_event.set()
            raise WorkflowCancelled("workflow cancelled")

    def execute(node_id: str) -> None:
        node = nodes[node_id]
        with lock:  # producers are settled, but read their outputs under the lock anyway
            inputs = {port: states[src].outputs[src_port]  # type: ignore[index]
                      for port, (src, src_port) in feeds[node_id].items()}
        model_id = "+".join(m for m in ((model_ids or {}).get(d) for d in deployments_of(node)) if m) or None
        key = cache_key(node, inputs, model_id) if cache is not None and is_cacheable(node) else None
        if key is not None and use_cache:
            hit = cache.get(key)  # type: ignore[union-attr]
            if hit is not None:
                now = time.time()
                update(node_id, status="cached", progress=100.0, outputs=hit, cache_key=key,
                       started_at=now, finished_at=now)
                return
        check_cancelled()
        update(node_id, status="running", started_at=time.time(), cache_key=key)

        def progress(fraction: float) -> None:
            with lock:  # the counter is read and written under the one (re-entrant) state lock
                update(node_id, progress=round(min(max(fraction, 0.0), 1.0) * 100, 2),
                       progress_updates=states[node_id].progress_updates + 1)

        def report(info: dict[str, Any]) -> None:
            with lock:
                update(node_id, info={**(states[node_id].info or {}), **info})

        ctx = NodeContext(node, _params(node), inputs, progress, check_cancelled, report)
        outputs = all_runners[node.type](ctx)
        absent = [p for p in NODE_TYPES[node.type].outputs if p not in (outputs or {})]
        if absent:
            raise RuntimeError(f"the {node.type} runner returned no {', '.join(absent)} output")
        if key is not None:
            cache.put(key, outputs)  # type: ignore[union-attr]
        update(node_id, status="completed", progress=100.0, outputs=outputs, finished_at=time.time())

    def settle_downstream(root: str, status: NodeStatus, error: str | None) -> None:
        todo = list(dependants[root])
        while todo:
            v = todo.pop()
            if states[v].status == "pending":
                update(v, status=status, error=error, finished_at=time.time())
                todo.extend(dependants[v])

    ready = [v for v in report.order if waiting_on[v] == 0]
    running: dict[Future[None], str] = {}
    with ThreadPoolExecutor(max_workers=max(1, max_parallel), thread_name_prefix="workflow") as pool:
        while True:
            if not cancel_event.is_set() and is_cancelled():
                cancel_event.set()
            while ready and not cancel_event.is_set() and len(running) < max_parallel:
                node_id = ready.pop(0)
                running[pool.submit(execute, node_id)] = node_id
            if not running:
                break
            done, _ = wait(running, timeout=_POLL_S, return_when=FIRST_COMPLETED)
            for future in done:
                node_id = running.pop(future)
                exc = future.exception()
                # A deployment that saw the cancel marker first stops with its own error (the replica
                # checks it between steps too): once the run is cancelled, that is a cancel, not a failure.
                if isinstance(exc, WorkflowCancelled) or (exc is not None and (cancel_event.is_set() or is_cancelled())):
                    cancel_event.set()
                    update(node_id, status="cancelled", error=str(exc), finished_at=time.time())
                    settle_downstream(node_id, "cancelled", None)
                elif exc is not None:
                    cause = f"{type(exc).__name__}: {exc}"
                    update(node_id, status="failed", error=cause, finished_at=time.time())
                    settle_downstream(node_id, "failed", f"upstream node {node_id} failed: {cause}")
                else:
                    for v in dependants[node_id]:
                        waiting_on[v] -= 1
                        if waiting_on[v] == 0:
                            ready.append(v)
                    ready.sort(key=report.order.index)  # keep document order among ready nodes

    for v, state in states.items():
        if state.status in ("pending", "running"):  # only reachable after a cancel
            update(v, status="cancelled", finished_at=time.time())

    statuses = {s.status for s in states.values()}
    status: Literal["completed", "failed", "cancelled"] = (
        "cancelled" if cancel_event.is_set() or "cancelled" in statuses
        else "failed" if "failed" in statuses else "completed")
    results = {}
    for v, node in nodes.items():
        if node.type == "output" and states[v].status in ("completed", "cached"):
            results[_params(node).name or v] = states[v].outputs["value"]  # type: ignore[attr-defined,index]
    return WorkflowResult(status=status, nodes=dict(states), outputs=results)
