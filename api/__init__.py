"""HTTP routers by area (videos, text, datasets, ...), included by `api/ingress.py`.

Each area module holds an `APIRouter` whose handlers take the ingress replica through
`Depends(current_ingress)`, and use its services: `storage`, `jobs`, `handles`,
`submit_job`, `job_view`, `url_for`, `read_upload`, `get_job_record`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from api.ingress import IngressDeployment


def current_ingress(request: Request) -> "IngressDeployment":
    return request.app.state.ingress
