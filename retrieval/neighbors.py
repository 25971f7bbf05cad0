"""The ``ATELIER_NEIGHBORS`` type: what a style-database query returns to the nodes that use neighbours."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class Neighbors:
    """k retrieved images: L2-normalised CLIP image embeddings [k, dim] float32, cosine scores, metadata.

    ``norms`` (optional) holds each embedding's original length, so consumers that
    need raw CLIP image embeddings (the SD 2.1 unCLIP noise augmentor) can restore them exactly.
    ``reason`` says why the result is empty or shorter than asked (filters, small database).
    """

    embeddings: torch.Tensor
    scores: List[float]
    metadata: List[dict]
    embedder_name: str
    embedder_hash: str
    norms: Optional[List[float]] = None
    reason: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.embeddings.ndim != 2:
            raise ValueError(f"Neighbors.embeddings must be [k, dim], got shape {tuple(self.embeddings.shape)}")
        k = self.embeddings.shape[0]
        if len(self.scores) != k or len(self.metadata) != k:
            raise ValueError(f"Neighbors: {k} embeddings but {len(self.scores)} scores, {len(self.metadata)} rows")
        if self.norms is not None and len(self.norms) != k:
            raise ValueError(f"Neighbors: {k} embeddings but {len(self.norms)} norms")

    def __len__(self):
        return self.embeddings.shape[0]

    @property
    def dim(self):
        return int(self.embeddings.shape[1])

    def raw_embeddings(self):
        """Embeddings at their original CLIP magnitude (normalised ones when the norms are unknown)."""
        if self.norms is None:
            return self.embeddings
        return self.embeddings * torch.tensor(self.norms, dtype=self.embeddings.dtype).unsqueeze(1)
