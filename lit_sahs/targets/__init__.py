"""The models we look inside: loading (registry), where heads live (sites), prompts (prompting)."""
from lit_sahs.targets.registry import Target, load_target, TARGET_NAMES

__all__ = ["Target", "load_target", "TARGET_NAMES"]
