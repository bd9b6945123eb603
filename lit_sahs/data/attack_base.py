"""What an attack is (``Attack``: a name, a family and its ``Variant`` templates) and the registry
that attacks defined outside attacks.py (the visual ones) register into."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from lit_sahs.data.samples import Sample


@dataclass(frozen=True)
class Variant:
    """One concrete template: `render` turns the request text into the attacked prompt."""

    key: str
    family: str
    render: Callable[[str], str]


@dataclass(frozen=True)
class Attack:
    """A named transform; with several variants each sample gets one, chosen deterministically."""

    name: str
    family: str
    variants: Callable[[], Sequence[Variant]]  # lazy: reading 650 templates is paid only when used

    def apply(self, sample: Sample, seed: int = 0, max_chars: int | None = None) -> Sample:
        """`max_chars` restricts the choice to variants whose attacked prompt fits (CPU budgets);
        when none fits, all stay eligible."""
        if self.name == "plain":
            return sample
        variants = self.variants()
        if max_chars is not None and len(variants) > 1:
            fitting = [v for v in variants if len(v.render(sample.text)) <= max_chars]
            variants = fitting or variants
        if len(variants) == 1:
            variant = variants[0]
        else:
            variant = random.Random(f"{self.name}|{sample.id}|{seed}").choice(variants)
        return Sample.make(
            variant.render(sample.text), sample.label, source=sample.source,
            attack=self.name, attack_family=variant.family, category=sample.category,
            image=sample.image, base_id=sample.base_id or sample.id,
            meta={**sample.meta, "variant": variant.key},
        )


_REGISTERED: dict[str, Attack] = {}


def register_attack(attack: Attack) -> Attack:
    """Make `attack` known to get_attack / apply_attacks / build_dataset by its name."""
    _REGISTERED[attack.name] = attack
    return attack


def registered_attacks() -> dict[str, Attack]:
    """The attacks registered so far, by name."""
    return _REGISTERED
