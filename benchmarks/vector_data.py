"""Synthetic embeddings for the vector benchmarks: topics, and data and queries drawn from them.

Pure Python (the benchmarks need no numpy). Three kinds:

- `mixture` (the default): 100 topics of uneven size (Zipf weights); each topic spreads
  in a subspace of its own, of 8 to 32 dimensions with a decaying spectrum (the first
  direction the widest, as in a PCA of real embeddings) and a spread 0.5x to 2x the
  `noise` scale, plus an isotropic floor of a tenth of that norm. Real sentence
  embeddings look like this: low intrinsic dimension, uneven topics, some noise.
- `isotropic` (the stress case): equal topics, each an isotropic Gaussian in all 384
  dimensions whose norm (~1 at noise 0.05) equals the centre's: inside a topic the
  neighbours of a point are barely nearer than the rest of it, which is the worst case
  for a graph index.
- `offtopic` (the old benchmark's data, a pathology): isotropic data, and queries drawn
  around *other* random centres than the data's, so that a query is nearly equidistant
  from all 100,000 points (cosine ~0 ± noise); nothing real asks such questions.

A topic's subspace is spanned by coordinate axes, not by random directions: cosine
distance (and so HNSW and exact search) is invariant under a rotation applied to all
vectors and queries alike, and random subspaces of 384 dimensions are nearly orthogonal
as disjoint axes are; axes make a vector cost O(dims of the topic), not O(384 x 32).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["KINDS", "Topics"]

KINDS = ("mixture", "isotropic", "offtopic")


def _unit(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


@dataclass(frozen=True, slots=True)
class _Topic:
    centre: list[float]
    axes: list[int]  # empty: isotropic
    sds: list[float]  # per axis (or one value: the isotropic sd)
    floor: float  # isotropic sd added to every value


class Topics:
    """A fixed set of topics; `draw` samples points (data or queries) from them."""

    def __init__(
        self, kind: str, rng: random.Random, *, dim: int, topics: int, noise: float
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        self.kind = kind
        self.dim = dim
        self.rng = rng
        self.noise = noise
        self.topics = [self._topic(kind, noise) for _ in range(topics)]
        if kind == "mixture":
            weights = [1.0 / math.sqrt(i + 1) for i in range(topics)]
        else:
            weights = [1.0] * topics
        self.cum_weights = list(_accumulate(weights))
        # Queries of `offtopic` come from other centres than the data's.
        self.query_topics = (
            [self._topic("isotropic", noise) for _ in range(topics)]
            if kind == "offtopic"
            else self.topics
        )

    def _topic(self, kind: str, noise: float) -> _Topic:
        rng, dim = self.rng, self.dim
        centre = _unit([rng.gauss(0, 1) for _ in range(dim)])
        if kind != "mixture":
            return _Topic(centre, [], [noise], 0.0)
        dims = rng.randint(8, 32)
        axes = rng.sample(range(dim), dims)
        # Total spread norm noise * sqrt(dim) (the isotropic topic's), scaled 0.5x-2x
        # per topic, shared out over the topic's axes with variance ~ 1 / (j + 1).
        norm = noise * math.sqrt(dim) * math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        shares = [1.0 / (j + 1) for j in range(dims)]
        total = sum(shares)
        sds = [norm * math.sqrt(s / total) for s in shares]
        return _Topic(centre, axes, sds, 0.1 * norm / math.sqrt(dim))

    def _point(self, topic: _Topic) -> list[float]:
        gauss = self.rng.gauss
        if not topic.axes:
            sd = topic.sds[0]
            return _unit([c + gauss(0, sd) for c in topic.centre])
        floor = topic.floor
        out = [c + gauss(0, floor) for c in topic.centre]
        for axis, sd in zip(topic.axes, topic.sds, strict=True):
            out[axis] += gauss(0, sd)
        return _unit(out)

    def draw(self, count: int, *, queries: bool = False) -> list[list[float]]:
        """Return `count` unit vectors, each from a topic picked by weight."""
        pool = self.query_topics if queries else self.topics
        picks = self.rng.choices(range(len(pool)), cum_weights=self.cum_weights, k=count)
        return [self._point(pool[i]) for i in picks]


def _accumulate(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return out
