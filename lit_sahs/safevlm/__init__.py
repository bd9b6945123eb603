"""SafeVLM, the second method: safety modules added to a target and trained in two stages.

taxonomy.py   risk levels / risk types and how each source's categories map to them
modules.py    SafetyProjector, VisionAbstractor, SafetyTokens, SafetyHead (plain nn.Modules)
forward.py    safety-token slots in the input sequence; hooks that feed the head from one forward
answers.py    the LM loss's answers: a refusal, or the target's own cached answer
data.py       SafetyDataModule (the product's sources and splits)
module.py     SafeVLM LightningModule (stage 1: safety modules; stage 2: LoRA via peft)
joined.py     joined heads: the logistic safety-head detector they start from, loaded and checked
selection.py  val/margin, val/answer_margin, val/gated_answer_margin: the checkpoint-choice metrics
validation.py ValidationRows: what a validation run collects row by row, and the metrics logged from it
lora_gate.py  LoRAGate (stage II's adapter per prompt, by the head's risk), adapters_off
artifact.py   safetensors + JSON artifacts, loaded by load_detector / the registry
guard.py      SafeVLMGuard: refuse, add a safety hint, or pass, decided at the prefill
refusals.py   refusal rates in generation by evaluation group and OpenBookQA utility, one way for every condition
"""
from lit_sahs.safevlm.data import SafetyDataModule
from lit_sahs.safevlm.module import SafeVLM

__all__ = ["SafeVLM", "SafetyDataModule"]
