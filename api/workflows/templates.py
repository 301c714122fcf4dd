"""Starting points for the workflow editor, served by `GET /v1/workflows/templates`.

Each template is an ordinary workflow document (checked by the unit tests against
graphs/workflows.py's validation) plus the deployments it needs, so an editor can say which ones
this application can run. None carries a `ui` block: the editor lays them out itself.
"""

from __future__ import annotations

from typing import Any

from graphs.workflows import Node, deployments_of


def _node(id_: str, type_: str, **params: Any) -> dict[str, Any]:
    return {"id": id_, "type": type_, "params": params}


def _edge(source: str, source_port: str, target: str, target_port: str) -> dict[str, str]:
    return {"source": source, "source_port": source_port, "target": target, "target_port": target_port}


def _branch(name: str, seed: int) -> tuple[list[dict], list[dict]]:
    """prompt → text_to_image → select → upscale → output, one branch of the diamond."""
    nodes = [_node(f"image_{name}", "text_to_image", seed=seed), _node(f"pick_{name}", "select", index=0),
             _node(f"upscale_{name}", "upscale", seed=seed), _node(f"out_{name}", "output", name=name)]
    edges = [_edge("prompt", "text", f"image_{name}", "prompt"), _edge(f"image_{name}", "images", f"pick_{name}", "images"),
             _edge(f"pick_{name}", "image", f"upscale_{name}", "image"),
             _edge(f"upscale_{name}", "image", f"out_{name}", "value")]
    return nodes, edges


def _diamond() -> dict[str, Any]:
    a_nodes, a_edges = _branch("a", 1)
    b_nodes, b_edges = _branch("b", 2)
    return {"name": "diamond", "description": "One prompt, two seeds run side by side, each upscaled.",
            "nodes": [_node("prompt", "prompt", text="a red kite over the sea"), *a_nodes, *b_nodes],
            "edges": a_edges + b_edges}


TEMPLATES: dict[str, dict[str, Any]] = {
    "text_to_image": {
        "name": "Text → image → output",
        "workflow": {
            "name": "text to image", "description": "A prompt, an image, one output.",
            "nodes": [_node("prompt", "prompt", text="a lighthouse at dusk"), _node("image", "text_to_image", n=1),
                      _node("out", "output", name="images")],
            "edges": [_edge("prompt", "text", "image", "prompt"), _edge("image", "images", "out", "value")],
        },
    },
    # The seed platform's chain. The engine's upscale node takes an image, so the still is
    # upscaled before it is animated (there is no video upscale node yet).
    "text_image_video": {
        "name": "Text → image → video → upscale → output",
        "workflow": {
            "name": "text to video", "description": "A prompt, an image, upscaled x4 and animated into a video.",
            "nodes": [_node("prompt", "prompt", text="waves breaking on a rocky shore"),
                      _node("image", "text_to_image", n=1), _node("pick", "select", index=0),
                      _node("upscale", "upscale"), _node("video", "image_to_video"),
                      _node("out", "output", name="video"), _node("still", "output", name="still")],
            "edges": [_edge("prompt", "text", "image", "prompt"), _edge("image", "images", "pick", "images"),
                      _edge("pick", "image", "upscale", "image"), _edge("upscale", "image", "video", "image"),
                      _edge("video", "video", "out", "value"), _edge("upscale", "image", "still", "value")],
        },
    },
    "diamond": {"name": "Diamond: one prompt, two branches", "workflow": _diamond()},
    # The seed studio's quality-assessment agent: the QA loop judges each still and rewrites the
    # prompt with the judge's reasons until it scores 7 (at most 3 rounds); the best still is animated.
    "product_shot_qa": {
        "name": "Product shot with QA → video",
        "workflow": {
            "name": "product shot with QA",
            "description": "A product shot refined by a judge until it scores 7 of 10 (3 rounds at most), "
                           "then animated into a short video.",
            "nodes": [_node("prompt", "prompt", text="a studio product shot of a ceramic coffee mug on a marble "
                                                     "counter, soft window light"),
                      _node("qa", "qa_loop", threshold=7, max_rounds=3,
                            criteria="clean studio background, the product sharp and centred, no text"),
                      _node("video", "image_to_video"),
                      _node("still", "output", name="still"), _node("rounds", "output", name="rounds"),
                      _node("out", "output", name="video")],
            "edges": [_edge("prompt", "text", "qa", "prompt"), _edge("qa", "image", "video", "image"),
                      _edge("qa", "image", "still", "value"), _edge("qa", "rounds", "rounds", "value"),
                      _edge("video", "video", "out", "value")],
        },
    },
}


def list_templates(deployed: set[str]) -> list[dict[str, Any]]:
    """Every template, with the deployments it needs and whether this application has them all."""
    out = []
    for template_id, template in TEMPLATES.items():
        needs = sorted({name for n in template["workflow"]["nodes"] for name in deployments_of(Node.model_validate(n))})
        out.append({"id": template_id, "object": "workflow.template", "name": template["name"],
                    "description": template["workflow"]["description"], "requires": needs,
                    "available": set(needs) <= deployed, "workflow": template["workflow"]})
    return out
