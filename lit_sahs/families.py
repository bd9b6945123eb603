"""Every model family lit_sahs knows: the built-in ones and plug-ins.

Importing this module registers the built-in families (the safety-head detectors in
``lit_sahs.detectors``, SafeVLM in ``lit_sahs.safevlm``) and every plug-in package that declares a
``lit_sahs.families`` entry point (``[project.entry-points."lit_sahs.families"] my_probe =
"my_pkg.probe"``: the module is imported, its ``@register_family`` does the rest). Commands that
look a family up by name use ``family_class`` from here, so they see all of them.
"""
from __future__ import annotations

import logging
from importlib.metadata import entry_points

import lit_sahs.detectors  # noqa: F401 - registers logistic, mlp, sparse, attnpool
import lit_sahs.safevlm  # noqa: F401 - registers safevlm
from lit_sahs.errors import LitSahsError
from lit_sahs.family import ENTRY_POINT_GROUP, FAMILIES, ModelFamily, family_class as _registered

log = logging.getLogger(__name__)
_plugins_loaded = False


def load_plugins() -> None:
    """Import the modules named under the ``lit_sahs.families`` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not take the built-ins down
            log.warning("model family plug-in %s (%s) failed to load: %s", ep.name, ep.value, e)


def family_class(name: str) -> type[ModelFamily]:
    """The family registered as `name`, built-ins and plug-ins included."""
    if name not in FAMILIES:
        load_plugins()
    return _registered(name)


def family_names() -> list[str]:
    load_plugins()
    return sorted(FAMILIES)


def trainable_families() -> dict[str, type[ModelFamily]]:
    """Families that train on stored head activations (what ``tune`` and the zero-shot folds search)."""
    load_plugins()
    return {n: c for n, c in sorted(FAMILIES.items()) if c.reads_store}


__all__ = ["FAMILIES", "ModelFamily", "family_class", "family_names", "trainable_families", "LitSahsError"]
