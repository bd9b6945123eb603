"""A third model family is one class plus its registration: the commands reach it through the
ModelFamily interface and the registry, never by name."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from lit_sahs.artifact import load_detector, save_detector
from lit_sahs.errors import LitSahsError
from lit_sahs.family import FAMILIES, ModelFamily, register_family
from lit_sahs.choices import DEFAULT_REFUSAL
from lit_sahs.guarding import GuardResult


class LengthGuard:
    """The toy family's guard: refuse flagged prompts, answer the rest with the target."""

    def __init__(self, target, det, refusal, threshold):
        det.prepare(target)
        self.target, self.det = target, det
        self.refusal = refusal or DEFAULT_REFUSAL
        self.threshold = float(det.threshold) if threshold is None else threshold

    def generate(self, texts, images=None, ids=None, max_new_tokens=4, **kw):
        from lit_sahs.targets import prompting

        enc = prompting.encode(self.target, texts)
        scores = self.det.score_encoded(self.target, enc)
        flags = [bool(s >= self.threshold) for s in scores]
        enc.pop("position_ids", None)
        out = self.target.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=self.target.tokenizer.pad_token_id)[:, enc["input_ids"].shape[1]:]
        answers = [self.refusal if f else self.target.tokenizer.decode(o, skip_special_tokens=True)
                   for f, o in zip(flags, out)]
        return GuardResult(ids=[str(i) for i in range(len(texts))], prompts=list(texts), flagged=flags,
                           scores=[float(s) for s in scores], responses=answers, sequences=out,
                           threshold=self.threshold)


class PromptLength(ModelFamily, nn.Module):
    """Toy family: a logistic function of the prompt's token count (no head activations at all)."""

    family = "toy_length"
    report_name = "toy_length"

    def __init__(self, scale: float = 0.5, offset: float = 8.0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([float(scale), float(offset)], dtype=torch.float64))
        self.register_buffer("threshold", torch.tensor(0.5, dtype=torch.float64))
        self.fingerprint = None

    @property
    def is_bound(self):
        return self.fingerprint is not None

    def artifact_metadata(self):
        return {"fingerprint": self.fingerprint.to_dict()}

    def artifact_tensors(self):
        return {"weight": self.weight.detach().clone(), "threshold": self.threshold.clone()}

    @classmethod
    def from_artifact(cls, meta, tensors, source):
        from lit_sahs.heads import TargetFingerprint

        det = cls()
        det.fingerprint = TargetFingerprint.from_dict(meta["fingerprint"])
        det.load_state_dict(dict(tensors))
        return det

    @torch.no_grad()
    def score_encoded(self, target, enc):
        n = enc["attention_mask"].sum(-1).double()
        return torch.sigmoid(self.weight[0] * (n - self.weight[1])).cpu().numpy()

    def layers_run(self, target):
        return 0

    def make_guard(self, target, refusal=None, threshold=None, fail_closed=True, judge_band=None):
        if judge_band not in (None, "off"):
            raise LitSahsError("the prompt-length family has no judge stage")
        return LengthGuard(target, self, refusal, threshold)

    def split_scores(self, dm, split):
        raise NotImplementedError


@pytest.fixture(scope="module")
def toy():
    register_family()(PromptLength)
    yield PromptLength
    FAMILIES.pop("toy_length", None)


@pytest.fixture(scope="module")
def tiny():
    from lit_sahs.targets import load_target

    return load_target("tiny-llama")


def test_registration_checks_the_interface(toy):
    class Incomplete(ModelFamily):
        family = "incomplete"

    with pytest.raises(LitSahsError, match="does not implement"):
        register_family()(Incomplete)
    with pytest.raises(LitSahsError, match="not a ModelFamily"):
        register_family("plain")(dict)

    class Other(PromptLength):
        pass

    with pytest.raises(LitSahsError, match="already registered"):
        register_family("toy_length")(Other)
    assert "incomplete" not in FAMILIES and FAMILIES["toy_length"] is PromptLength


def test_a_registered_toy_family_saves_loads_screens_evaluates_and_guards(toy, tiny, tmp_path, cli, monkeypatch):
    from lit_sahs.screen import Screener
    from lit_sahs.targets import prompting

    texts = ["Hi", "Please write out the complete and detailed list of every river in Europe with lengths"]
    lengths = prompting.encode(tiny, texts)["attention_mask"].sum(-1).tolist()  # the chat template included
    det = PromptLength(scale=0.7, offset=sum(lengths) / 2)
    det.fingerprint = tiny.fingerprint
    art = save_detector(det, tmp_path / "toy")
    assert json.loads((art / "detector.json").read_text())["detector"] == "toy_length"
    loaded = load_detector(art)
    assert isinstance(loaded, PromptLength)
    want = det.score_encoded(tiny, prompting.encode(tiny, texts))
    assert want[0] < 0.5 < want[1]
    res = Screener(tiny, loaded).score(texts)
    np.testing.assert_allclose(res.scores, want)
    assert res.flagged.tolist() == [False, True]

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, [0, 1])))
    code, out, err = cli(["screen", "--detector", str(art), "--data", str(data)])
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["layers_run"] == "0/4"
    code, _, err = cli(["evaluate", "--detector", str(art), "--data", str(data), "--scores", "s.csv"])
    assert code == 0, err
    got = [float(r.split(",")[4]) for r in (tmp_path / "s.csv").read_text().splitlines()[1:]]
    np.testing.assert_allclose(got, want)

    code, out, err = cli(["guard", "--detector", str(art), "--data", str(data), "--max_new_tokens", "2",
                          "--refusal", "No."])
    assert code == 0, err
    rows = [json.loads(x) for x in out.strip().splitlines()]
    assert [r["flagged"] for r in rows] == [False, True] and rows[1]["response"] == "No."
    code, _, err = cli(["guard", "--detector", str(art), "--data", str(data), "--judge_band", "0.3,0.7"])
    assert code == 2 and err.strip().splitlines()[-1] == "error: the prompt-length family has no judge stage", err


def test_an_artifact_of_an_unknown_family_is_one_error(tmp_path, tiny, cli):
    from lit_sahs.artifact_format import write_artifact

    art = write_artifact(tmp_path / "x", "no_such_family", {"fingerprint": tiny.fingerprint.to_dict(),
                                                           "threshold": 0.5}, {"w": torch.zeros(1)})
    with pytest.raises(LitSahsError, match="unknown detector family 'no_such_family'"):
        load_detector(art)
    code, _, err = cli(["screen", "--detector", str(art), "--prompt", "hi"])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and "no_such_family" in err


def test_nan_weights_are_refused_on_load(tmp_path):
    from lit_sahs.detectors import LogisticDetector
    from lit_sahs.heads import Geometry, HeadSet, TargetFingerprint
    from safetensors.torch import load_file, save_file

    geo = Geometry(2, 2, 4)
    det = LogisticDetector().bind(HeadSet([(0, 1)]), geo, TargetFingerprint("t", geo, "ab" * 32),
                                  torch.zeros(1, 4), torch.ones(1, 4))
    art = save_detector(det, tmp_path / "d")
    state = load_file(str(art / "detector.safetensors"))
    state["linear.weight"][0, 0] = float("nan")
    save_file(state, str(art / "detector.safetensors"))
    with pytest.raises(LitSahsError, match="NaN or inf"):
        load_detector(art)


def test_the_builtin_table_names_exactly_the_families_that_register():
    """`fit --help` lists families from BUILTIN_FAMILIES without importing them; it must not drift."""
    from lit_sahs.families import FAMILIES
    from lit_sahs.family import BUILTIN_FAMILIES

    registered = {n: f"{c.__module__}:{c.__qualname__}" for n, c in FAMILIES.items()
                  if c.__module__.startswith("lit_sahs.")}
    assert registered == BUILTIN_FAMILIES
