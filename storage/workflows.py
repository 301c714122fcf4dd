"""Saved workflows: named, versioned workflow documents.

Layout under the storage root::

    workflows/saved/<id>/v<N>.json     version N: {"object", "id", "name", "description", "version",
                                       "created_at", "workflow"} (a :class:`SavedWorkflow`)

Versions are 1, 2, ... per id. Saving a version creates its file only if nothing is there
(:meth:`storage.fs.Storage.put_if_absent`), so of two concurrent saves of one version one wins
and the other is told (:class:`SavedWorkflowExistsError`). Deleting removes every version.

The document is stored as given once it has been validated (by the API, against graphs/workflows.py);
this module does not read it.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel

from storage.fs import ObjectNotFoundError, Storage

__all__ = [
    "SAVED_PREFIX",
    "SavedWorkflow",
    "SavedWorkflowError",
    "SavedWorkflowNotFoundError",
    "SavedWorkflowExistsError",
    "SavedWorkflowStore",
]

SAVED_PREFIX = "workflows/saved/"


class SavedWorkflow(BaseModel):
    object: str = "workflow"
    id: str
    name: str
    description: str
    version: int
    created_at: int
    workflow: dict[str, Any]
    owner: str | None = None  # the tenant that saved version 1; every version keeps it


class SavedWorkflowError(Exception):
    """Base class; ``param`` names the offending argument."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class SavedWorkflowNotFoundError(SavedWorkflowError, LookupError):
    """No such workflow, or no such version of it."""


class SavedWorkflowExistsError(SavedWorkflowError):
    """The version was saved meanwhile (by a concurrent save)."""


class SavedWorkflowStore:
    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def key(workflow_id: str, version: int) -> str:
        return f"{SAVED_PREFIX}{workflow_id}/v{version}.json"

    def versions(self, workflow_id: str) -> list[int]:
        prefix = f"{SAVED_PREFIX}{workflow_id}/"
        versions = []
        for key in self.storage.list(prefix):
            name = key.rsplit("/", 1)[-1]
            if name.startswith("v") and name.endswith(".json") and name[1:-5].isdigit():
                versions.append(int(name[1:-5]))
        return sorted(versions)

    def get(self, workflow_id: str, version: int | None = None) -> SavedWorkflow:
        """A version (default: the latest); :class:`SavedWorkflowNotFoundError` naming the field."""
        if not workflow_id.replace("_", "").isalnum():
            raise SavedWorkflowNotFoundError(f"no workflow with id {workflow_id!r}", "workflow_id")
        versions = self.versions(workflow_id)
        if not versions:
            raise SavedWorkflowNotFoundError(f"no workflow with id {workflow_id!r}", "workflow_id")
        version = version or versions[-1]
        try:
            return SavedWorkflow.model_validate(self.storage.get_json(self.key(workflow_id, version)))
        except ObjectNotFoundError:
            raise SavedWorkflowNotFoundError(f"workflow {workflow_id} has no version {version}; it has {versions}",
                                             "version") from None

    def create(self, saved: SavedWorkflow) -> SavedWorkflow:
        """Write a new version, only if it is not there yet (:class:`SavedWorkflowExistsError`)."""
        data = saved.model_dump_json().encode()
        if not self.storage.put_if_absent(self.key(saved.id, saved.version), data, "application/json"):
            raise SavedWorkflowExistsError(f"workflow {saved.id} version {saved.version} was saved meanwhile; "
                                           "retry", "workflow_id")
        if saved.version > 1 and not self.storage.exists(self.key(saved.id, 1)):
            # deleted while this version was being saved (delete removes version 1 first): the new
            # version must not bring the workflow back on its own
            self.storage.delete(self.key(saved.id, saved.version))
            raise SavedWorkflowNotFoundError(f"workflow {saved.id} was deleted while this version was saved",
                                             "workflow_id")
        return saved

    def list_latest(self, limit: int, visible: Callable[[SavedWorkflow], bool] | None = None) -> list[SavedWorkflow]:
        """The latest version of up to `limit` workflows (only those `visible` accepts), newest id first."""
        ids = sorted({key[len(SAVED_PREFIX):].split("/", 1)[0] for key in self.storage.list(SAVED_PREFIX)},
                     reverse=True)
        out = []
        for workflow_id in ids:
            if len(out) >= limit:
                break
            try:
                saved = self.get(workflow_id)
            except SavedWorkflowNotFoundError:
                continue
            if visible is None or visible(saved):
                out.append(saved)
        return out

    def delete(self, workflow_id: str) -> None:
        """Every version; :class:`SavedWorkflowNotFoundError` if there is none."""
        self.get(workflow_id)
        for version in self.versions(workflow_id):
            self.storage.delete(self.key(workflow_id, version))
