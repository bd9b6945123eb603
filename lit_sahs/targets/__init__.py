"""The models we look inside: loading (registry), where heads live (sites), prompts (prompting)."""
from lit_sahs.targets.registry import Target, load_target, TARGET_NAMES
from lit_sahs.targets import tiny  # noqa: F401 - registers the random-weight targets with load_target

__all__ = ["Target", "load_target", "TARGET_NAMES"]
