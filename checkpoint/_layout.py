"""A checkpoint root as steps: where a step's files are, which steps exist and are committed,
and their manifests (the committer, the reader and the façade all look at the root this way).
"""
from __future__ import annotations

from typing import List, Tuple

from ._storage import Storage
from .errors import CheckpointCorruptError, CheckpointNotFoundError
from .format import MANIFEST, Manifest, step_dirname, step_of_dirname

__all__ = ["Layout"]


class Layout:
    """The steps under one checkpoint root."""

    def __init__(self, storage: Storage, url: str) -> None:
        self.storage = storage
        self.url = url

    def step_dir(self, step: int) -> str:
        return self.storage.join(step_dirname(step))

    def path(self, step: int, name: str) -> str:
        return self.storage.join(step_dirname(step), name)

    def all_steps(self) -> List[int]:
        """Every step directory, committed or not, oldest first."""
        steps = (step_of_dirname(n) for n in self.storage.listdir(self.storage.root))
        return sorted(s for s in steps if s is not None)

    def committed_steps(self) -> List[int]:
        """Steps whose manifest is published, oldest first."""
        return [s for s in self.all_steps() if self.storage.exists(self.path(s, MANIFEST))]

    def read_manifest(self, step: int) -> Manifest:
        path = self.path(step, MANIFEST)
        try:
            data = self.storage.read_bytes(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no checkpoint of step {step} at {self.url}") from None
        return Manifest.loads(data, path)

    def published_generations(self) -> List[Tuple[int, int]]:
        """``(step, generation)`` of every committed step whose manifest is readable."""
        out = []
        for step in self.committed_steps():
            try:
                out.append((step, self.read_manifest(step).generation))
            except (CheckpointCorruptError, FileNotFoundError, CheckpointNotFoundError):
                continue
        return out
