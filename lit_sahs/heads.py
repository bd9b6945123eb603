"""HeadSet, Geometry and TargetFingerprint: the values every stage passes along."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Sequence

from lit_sahs.errors import LitSahsError


@dataclass(frozen=True)
class Geometry:
    """Shape of a target's attention heads: every decoder layer has `num_heads` query heads of `head_dim`."""

    num_layers: int
    num_heads: int
    head_dim: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_layers, self.num_heads, self.head_dim)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(int(d["num_layers"]), int(d["num_heads"]), int(d["head_dim"]))


@dataclass(frozen=True)
class HeadSet:
    """An ordered list of (layer, head) pairs. Order matters: detectors concatenate in this order."""

    heads: tuple[tuple[int, int], ...]

    def __init__(self, heads: Iterable[Sequence[int]]):
        pairs = tuple((int(l), int(h)) for l, h in heads)
        if len(set(pairs)) != len(pairs):
            raise LitSahsError(f"HeadSet has duplicate heads: {list(pairs)}")
        object.__setattr__(self, "heads", pairs)

    @classmethod
    def all(cls, geometry: Geometry) -> "HeadSet":
        return cls((l, h) for l in range(geometry.num_layers) for h in range(geometry.num_heads))

    @classmethod
    def parse(cls, text: str) -> "HeadSet":
        """Parse '3.1,5.0' (layer.head pairs) or a JSON list [[3,1],[5,0]]."""
        text = text.strip()
        if text.startswith("["):
            return cls(json.loads(text))
        try:
            return cls(tuple(int(x) for x in item.split(".")) for item in text.split(",") if item)
        except ValueError as e:
            raise LitSahsError(f"cannot parse HeadSet {text!r}: use 'layer.head,layer.head' e.g. '3.1,5.0'") from e

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.heads)

    def __len__(self) -> int:
        return len(self.heads)

    @property
    def layers(self) -> tuple[int, ...]:
        """Distinct layers, ascending: the only layers a capture needs to hook."""
        return tuple(sorted({l for l, _ in self.heads}))

    def validate(self, geometry: Geometry) -> "HeadSet":
        bad = [(l, h) for l, h in self.heads if not (0 <= l < geometry.num_layers and 0 <= h < geometry.num_heads)]
        if bad:
            raise LitSahsError(
                f"HeadSet heads {bad} lie outside the target's geometry "
                f"({geometry.num_layers} layers x {geometry.num_heads} heads)"
            )
        return self

    def to_list(self) -> list[list[int]]:
        return [list(p) for p in self.heads]

    def spec(self) -> str:
        """The heads as the `heads` option writes them: '3.1,5.0'."""
        return ",".join(f"{l}.{h}" for l, h in self.heads)


@dataclass(frozen=True)
class TargetFingerprint:
    """Identifies a target: artifacts made for one refuse to run on another."""

    name: str
    geometry: Geometry
    weights_hash: str

    def to_dict(self) -> dict:
        return {"name": self.name, "geometry": self.geometry.to_dict(), "weights_hash": self.weights_hash}

    @classmethod
    def from_dict(cls, d: dict) -> "TargetFingerprint":
        return cls(d["name"], Geometry.from_dict(d["geometry"]), d["weights_hash"])

    def matches(self, other: "TargetFingerprint") -> bool:
        """Same weights and geometry; the name is only a label."""
        return self.weights_hash == other.weights_hash and self.geometry == other.geometry

    def check(self, other: "TargetFingerprint", what: str) -> None:
        if not self.matches(other):
            raise LitSahsError(
                f"{what} was made for target {self.name!r} (weights {self.weights_hash[:12]}, "
                f"{self.geometry.shape}) but the target is {other.name!r} (weights {other.weights_hash[:12]}, "
                f"{other.geometry.shape}): use the matching target or rebuild it"
            )
