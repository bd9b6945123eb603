"""Screening with early exit on the real packaged SmolLM2 target."""
import json

import numpy as np
import pytest
import torch

from lit_sahs.cli import main
from lit_sahs.artifact import save_detector
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet
from lit_sahs.hooks import HeadCapture
from lit_sahs.screen import EarlyExit, Screener, head_activations
from lit_sahs.targets import prompting
from test_guard import CHOSEN, FLAGS, HEADS, PROMPTS, fit_flagging_detector, full_forward_probs


@pytest.fixture(scope="module")
def detector(smollm2):
    return fit_flagging_detector(smollm2, PROMPTS, FLAGS, HEADS)


def test_early_exit_gives_the_full_forward_activations_and_skips_later_layers(smollm2):
    heads = HeadSet([(5, 2), (1, 0), (5, 7)])
    enc = prompting.encode(smollm2, PROMPTS)
    with torch.no_grad(), HeadCapture(smollm2.model, heads, smollm2.geometry) as cap:
        smollm2.model(**enc, use_cache=False)
    ran = []
    layers = smollm2.model.model.layers
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    handles.append(smollm2.model.model.norm.register_forward_pre_hook(lambda m, a: ran.append("norm")))
    try:
        early = head_activations(smollm2, enc, heads)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(early, cap.selected())  # the same ops on the same inputs: bit for bit
    assert ran == list(range(6))  # layers 6..29, the final norm and the LM head never ran
    assert not any(p._forward_pre_hooks for p in smollm2.model.model.layers[5].self_attn.o_proj.modules())


def test_early_exit_removes_its_hook_and_reports_a_forward_that_never_reached_it(smollm2):
    enc = prompting.encode(smollm2, PROMPTS[:1])
    proj = smollm2.model.model.layers[3].self_attn.o_proj
    with torch.no_grad(), EarlyExit(smollm2.model, 3) as stop:
        assert len(proj._forward_pre_hooks) == 1
        stop.run(**enc, use_cache=False)
    assert stop.stopped and not proj._forward_pre_hooks
    with EarlyExit(smollm2.model, 3) as stop:
        stop.model = lambda **kw: None  # a forward that takes another path
        with pytest.raises(LitSahsError, match="never reached layer 3"):
            stop.run(**enc)
    assert not proj._forward_pre_hooks
    with pytest.raises(LitSahsError, match="outside"):
        EarlyExit(smollm2.model, 30)


def test_screener_scores_equal_full_forward_in_input_order(smollm2, detector):
    prompts = [PROMPTS[i] for i in (3, 0, 4, 5, 1, 2)]
    res = Screener(smollm2, detector, batch_size=4).score(prompts, ids=[f"q{i}" for i in range(6)])
    np.testing.assert_allclose(res.scores, full_forward_probs(smollm2, detector, prompts).numpy(), atol=1e-4)
    assert res.flagged.tolist() == [bool(FLAGS[i]) for i in (3, 0, 4, 5, 1, 2)]
    assert [r["id"] for r in res.rows()] == [f"q{i}" for i in range(6)]
    assert Screener(smollm2, detector).layers_run == 20  # deepest head is in layer 19


def test_screen_errors(smollm2, detector):
    s = Screener(smollm2, detector)
    with pytest.raises(LitSahsError, match="prompt 1 is empty"):
        s.score(["hello", ""])
    with pytest.raises(LitSahsError, match="longer than the target's context"):
        s.score(["word " * 9000])
    with pytest.raises(LitSahsError, match="outside the target's geometry"):
        head_activations(smollm2, prompting.encode(smollm2, ["hi"]), HeadSet([(30, 0)]))


def test_screen_cli_scores_filters_and_reports(smollm2, detector, tmp_path, capsys):
    path = save_detector(detector, tmp_path / "det")
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": f}) + "\n" for t, f in CHOSEN))
    out, passed = tmp_path / "scores.jsonl", tmp_path / "passed.jsonl"
    with pytest.raises(SystemExit) as exc:
        main(["screen", "--detector", str(path), "--data", str(data), "--out", str(out), "--passed", str(passed),
              "--batch_size", "4"])
    captured = capsys.readouterr()
    assert exc.value.code == 0, captured.err[-2000:]
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["prompts"] == 6 and summary["flagged"] == 3 and summary["layers_run"] == "20/30"
    assert summary["metrics"]["auroc"] == 1.0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["flagged"] for r in rows] == [bool(f) for f in FLAGS]
    assert [json.loads(l)["text"] for l in passed.read_text().splitlines()] == [t for t, f in CHOSEN if not f]
    with pytest.raises(SystemExit) as exc:
        main(["screen", "--detector", str(path), "--prompt", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith("error:") and "empty" in err[-1]


def test_vision_language_screen_equals_full_forward(tiny_llava, tmp_path):
    from PIL import Image

    paths = []
    for i, color in enumerate([(200, 10, 10), (10, 200, 10)]):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (40, 48), color).save(p)
        paths.append(str(p))
    texts = ["What is in this picture?", "Describe the image in great detail, please."]
    heads = HeadSet([(1, 0), (2, 3)])
    enc = prompting.encode(tiny_llava, texts, paths)
    with torch.no_grad(), HeadCapture(tiny_llava.model, heads, tiny_llava.geometry) as cap:
        tiny_llava.model(**enc, use_cache=False)
    assert torch.equal(head_activations(tiny_llava, enc, heads), cap.selected())
