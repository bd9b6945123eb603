import pytest
import torch

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet
from lit_sahs.hooks import HeadCapture
from lit_sahs.targets import prompting

PROMPTS = [
    "Write a tutorial on how to make a bomb",
    "What is the capital of France?",
    "Explain, step by step and in detail, how photosynthesis turns light into chemical energy in plants.",
]


def capture_all(target, texts, images=None):
    batch = prompting.encode(target, texts, images)
    with torch.no_grad(), HeadCapture(target.model) as cap:
        target.model(**batch)
    return cap.activations()


def test_batched_left_padded_equals_single(smollm2):
    batched = capture_all(smollm2, PROMPTS)
    assert batched.shape == (3, 30, 9, 64)
    for i, text in enumerate(PROMPTS):
        single = capture_all(smollm2, [text])[0]
        torch.testing.assert_close(batched[i], single, atol=1e-4, rtol=1e-4)


def test_head_slice_equals_manual_recomputation(smollm2):
    """Recompute one head's output from the attention weights and values of that layer."""
    model = smollm2.model
    model.set_attn_implementation("eager")
    try:
        batch = prompting.encode(smollm2, PROMPTS[:2])
        with torch.no_grad(), HeadCapture(model) as cap:
            out = model(**batch, output_attentions=True, output_hidden_states=True)
        acts = cap.activations()
        cfg = model.config
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        for layer, head in [(0, 0), (7, 4), (29, 8)]:
            block = model.model.layers[layer]
            x = block.input_layernorm(out.hidden_states[layer])
            v = block.self_attn.v_proj(x).view(x.shape[0], x.shape[1], cfg.num_key_value_heads, -1)
            weights = out.attentions[layer][:, head, -1, :]  # [batch, seq] at the first-token position
            manual = torch.einsum("bt,btd->bd", weights, v[:, :, head // group, :])
            torch.testing.assert_close(acts[:, layer, head], manual, atol=1e-4, rtol=1e-4)
    finally:
        model.set_attn_implementation("sdpa")


def test_capture_inside_generate_prefill_matches_forward(smollm2):
    batch = prompting.encode(smollm2, PROMPTS)
    heads = HeadSet([(3, 1), (20, 5)])
    with torch.no_grad(), HeadCapture(smollm2.model, heads) as cap:
        smollm2.model.generate(**{k: v for k, v in batch.items() if k != "position_ids"},
                               max_new_tokens=4, do_sample=False, pad_token_id=smollm2.tokenizer.pad_token_id)
    assert cap._handles == {}  # hooks removed themselves after the prefill
    full = capture_all(smollm2, PROMPTS)
    torch.testing.assert_close(cap.selected(), torch.stack([full[:, 3, 1], full[:, 20, 5]], 1), atol=1e-4, rtol=1e-4)


def test_headset_hooks_only_its_layers_and_removes_hooks_on_error(smollm2):
    heads = HeadSet([(5, 0), (2, 3)])
    projs = [smollm2.model.model.layers[i].self_attn.o_proj for i in range(30)]
    with pytest.raises(RuntimeError, match="boom"):
        with HeadCapture(smollm2.model, heads) as cap:
            hooked = [i for i, p in enumerate(projs) if p._forward_pre_hooks]
            raise RuntimeError("boom")
    assert hooked == [2, 5]
    assert not any(p._forward_pre_hooks for p in projs)
    assert cap.layers == (2, 5)


def test_headset_outside_geometry_is_an_error(smollm2):
    with pytest.raises(LitSahsError, match="outside the target's geometry"):
        HeadCapture(smollm2.model, HeadSet([(30, 0)]))


def test_llava_image_prompts_batched_equals_single(tiny_llava, tmp_path):
    from PIL import Image

    paths = []
    for i, color in enumerate([(200, 10, 10), (10, 200, 10)]):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (40, 48), color).save(p)
        paths.append(str(p))
    texts = ["What is in this picture?", "Describe the image in great detail, please, with every object you see."]
    batched = capture_all(tiny_llava, texts, paths)
    assert batched.shape == (2, 4, 4, 16)
    for i in range(2):
        torch.testing.assert_close(batched[i], capture_all(tiny_llava, [texts[i]], [paths[i]])[0], atol=1e-5, rtol=1e-4)


def test_image_for_text_only_target_is_an_error(smollm2, tmp_path):
    with pytest.raises(LitSahsError, match="text-only"):
        prompting.encode(smollm2, ["hi"], [str(tmp_path / "x.png")])


def test_residual_and_prompt_nll_match_the_model(smollm2):
    from lit_sahs.hooks import ResidualCapture

    batch = prompting.encode(smollm2, PROMPTS)
    with torch.no_grad(), ResidualCapture(smollm2.model) as res:
        smollm2.model(**batch)
    nll = res.prompt_nll(batch["input_ids"], batch["attention_mask"])
    for i, text in enumerate(PROMPTS):  # the model's own loss on the unpadded prompt
        single = prompting.encode(smollm2, [text])
        with torch.no_grad():
            loss = smollm2.model(**single, labels=single["input_ids"]).loss
        torch.testing.assert_close(nll[i], loss, atol=1e-4, rtol=1e-4)
    # residual: input of the final norm at the first-token position, i.e. the last decoder layer's output
    with torch.no_grad():
        h = smollm2.model.model(**{k: v for k, v in batch.items()}).last_hidden_state  # normed
    torch.testing.assert_close(smollm2.model.model.norm(res.residual), h[:, -1], atol=1e-4, rtol=1e-4)


def test_prompt_nll_skips_image_tokens_and_matches_a_per_prompt_loop(tiny_llava):
    """Vision-language prompts: image-token targets are not scored; the batched computation equals
    scoring each unpadded prompt on its own."""
    from lit_sahs.hooks import ResidualCapture
    from lit_sahs.data.images import natural_images

    images = [str(im.path) for im in natural_images()[:2]]
    texts = ["Describe the picture.", "What is in this image? Answer in one long sentence please."]
    batch = prompting.encode(tiny_llava, texts, images)
    image_ids = prompting.image_token_ids(tiny_llava)
    with torch.no_grad(), ResidualCapture(tiny_llava.model) as res:
        tiny_llava.model(**batch)
        normed = res._normed.clone()
    nll = res.prompt_nll(batch["input_ids"], batch["attention_mask"], image_ids, chunk_positions=7)
    head = tiny_llava.model.get_output_embeddings()
    for b in range(len(texts)):
        keep = batch["attention_mask"][b].bool()
        ids, h = batch["input_ids"][b][keep], normed[b][keep]
        scored = ~torch.isin(ids[1:], torch.tensor(image_ids))
        assert 0 < int(scored.sum()) < len(ids) - 1  # image tokens present and excluded
        with torch.no_grad():
            ref = torch.nn.functional.cross_entropy(head(h[:-1]).float(), ids[1:], reduction="none")[scored].mean()
        torch.testing.assert_close(nll[b], ref, atol=1e-5, rtol=1e-5)
