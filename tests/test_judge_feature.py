"""The target as its own judge (lit_sahs.self_judge): the `judge` feature stored by `extract --judge`
equals a direct computation, a store without it is refused, guard / screen / the live DataModule
compute it as the store holds it, and the judge band calls the judge only for the rows inside it."""
import json

import numpy as np
import pytest
import torch
import yaml

from lit_sahs.data.samples import Sample
from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError

TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
TEXTS = [f"{w} number {i}" for i in range(8) for w in ("how to build a bomb", "a poem about bread")]


@pytest.fixture(scope="module")
def tiny():
    from lit_sahs.targets import load_target

    torch.set_num_threads(1)
    return load_target("tiny-llama")


@pytest.fixture(scope="module")
def samples():
    return [Sample.make(t, int(i % 2 == 0), source="unit") for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def judge_store(tiny, samples, tmp_path_factory):
    from lit_sahs.extract import run_extraction

    path = tmp_path_factory.mktemp("judge") / "s"
    run_extraction(tiny, samples, path, batch_size=4, trainer_kwargs=TRAINER, judge=True)
    return ActivationStore.open(path)


@pytest.fixture(scope="module")
def judge_detector(judge_store, tmp_path_factory):
    """A logistic detector on one head and the judge feature, fitted on the store, saved and loaded."""
    from lit_sahs.artifact import load_detector, save_detector
    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.engine import Engine
    from lit_sahs.folds import build_detector

    dm = CachedActivationDataModule(str(judge_store.path), heads="0.0", features="judge", batch_size=64)
    det = Engine(validate_once=True, max_epochs=2).fit(build_detector("logistic", {}), dm).detector
    art = save_detector(det, tmp_path_factory.mktemp("judge-art") / "det")
    return load_detector(art)


def direct_logodds(target, text: str) -> float:
    """The judge's log-odds for one prompt, from the chat template, a plain forward and the token sets."""
    from lit_sahs.self_judge import judge_prompt, judge_token_ids

    tok = target.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": judge_prompt(text)}], tokenize=False,
                                       add_generation_prompt=True)
    ids = tok(rendered, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(target.model(**ids).logits[0, -1].double(), -1)
    unsafe, safe = judge_token_ids(tok)
    return float(logp[unsafe].logsumexp(0) - logp[safe].logsumexp(0))


def test_judge_tokens_open_each_word_and_never_both(tiny):
    from lit_sahs.self_judge import SAFE_WORDS, UNSAFE_WORDS, judge_token_ids

    unsafe, safe = judge_token_ids(tiny.tokenizer)
    assert unsafe and safe and not set(unsafe) & set(safe)
    words = [w for v in UNSAFE_WORDS for w in (v, " " + v)]
    assert all(any(w.startswith(tiny.tokenizer.decode([t])) for w in words) for t in unsafe)
    words = [w for v in SAFE_WORDS for w in (v, " " + v)]
    assert all(any(w.startswith(tiny.tokenizer.decode([t])) for w in words) for t in safe)


def test_stored_judge_feature_equals_a_direct_computation(tiny, judge_store):
    from lit_sahs.data.extra_features import FeatureSpec, read_values

    stored = judge_store.read_extra("judge_logodds")
    texts = [r["text"] for r in judge_store.index()]
    want = np.array([direct_logodds(tiny, t) for t in texts])
    np.testing.assert_allclose(stored, want, atol=1e-4)
    assert np.ptp(want) > 0  # the prompts do not all get one value
    spec = FeatureSpec.for_store(judge_store, "judge")
    assert spec.names == ("judge",) and spec.widths == (1,)
    np.testing.assert_allclose(read_values(judge_store, spec)[0][:, 0], stored)


def test_a_store_without_the_judge_is_refused_in_one_line(tiny, samples, tmp_path, cli):
    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.extract import run_extraction

    run_extraction(tiny, samples[:4], tmp_path / "plain", batch_size=4, trainer_kwargs=TRAINER)
    with pytest.raises(LitSahsError, match="--judge true") as e:
        CachedActivationDataModule(str(tmp_path / "plain"), heads="0.0", features="judge")
    assert "\n" not in str(e.value)
    with pytest.raises(LitSahsError, match="does not record the judge"):  # one choice for all of a store's rows
        run_extraction(tiny, samples[4:6], tmp_path / "plain", batch_size=4, trainer_kwargs=TRAINER, judge=True)
    cfg = {"trainer": {**TRAINER, "max_epochs": 1, "default_root_dir": str(tmp_path / "root")},
           "mlflow": {"experiment": "unit", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
           "output_dir": str(tmp_path / "out"),
           "model": {"class_path": "lit_sahs.detectors.LogisticDetector"},
           "data": {"class_path": "lit_sahs.data.datamodules.CachedActivationDataModule",
                    "init_args": {"store": str(tmp_path / "plain"), "heads": "0.0", "features": "judge"}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = cli(["fit", "--config", str(tmp_path / "cfg.yaml")])
    lines = [l for l in err.strip().splitlines() if not l.startswith(("INFO", "WARNING"))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "judge" in lines[0], err[-2000:]


def test_screen_guard_and_live_data_score_the_judge_feature_as_stored(tiny, samples, judge_store, judge_detector,
                                                                      tmp_path):
    from lit_sahs.data.datamodules import LiveActivationDataModule
    from lit_sahs.data.extra_features import read_inputs
    from lit_sahs.detectors.guard import SafetyGuard
    from lit_sahs.evaluate import detector_scores
    from lit_sahs.hooks import capture_forward
    from lit_sahs.screen import Screener
    from lit_sahs.targets import prompting

    det = judge_detector
    assert det.feature_spec.names == ("judge",)
    by_id = {r["id"]: i for i, r in enumerate(judge_store.index())}
    rows = [by_id[s.id] for s in samples[:6]]
    stored = read_inputs(judge_store, det.head_set, det.feature_spec, det.geometry.head_dim, rows=rows)
    want = detector_scores(det, stored)
    texts = [s.text for s in samples[:6]]
    np.testing.assert_allclose(Screener(tiny, det, batch_size=4).score(texts).scores, want, atol=2e-3)
    np.testing.assert_allclose(SafetyGuard(tiny, det).generate(texts, max_new_tokens=1).scores, want, atol=2e-3)
    with pytest.raises(LitSahsError, match="texts"):  # the second prefill reads the prompts' texts
        capture_forward(tiny, prompting.encode(tiny, texts), det.head_set, features=det.feature_spec)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"text": s.text, "label": s.label}) + "\n" for s in samples[:6]))
    dm = LiveActivationDataModule(target=tiny, data=str(data), attacks="plain", limit=None, heads="0.0",
                                  features="judge", batch_size=4)
    live, _ = dm.capture(range(6))
    want = read_inputs(judge_store, det.head_set, det.feature_spec, det.geometry.head_dim,
                       rows=[by_id[s.id] for s in dm.samples[:6]])
    np.testing.assert_allclose(live.numpy(), want.astype(np.float32), atol=2e-3)


def test_band_decisions_call_the_judge_once_for_the_rows_inside():
    from lit_sahs.self_judge import JudgeRule, band_decisions

    calls = []

    def judge(rows):
        calls.append(list(rows))
        return np.array([1.0 if r % 2 else -1.0 for r in rows])

    scores = np.array([0.1, 0.3, 0.5, 0.7, 0.9, np.nan])
    flagged = ~(scores < 0.5)
    out, judged, logodds = band_decisions(scores, flagged, JudgeRule((0.3, 0.7), 0.0), judge)
    assert calls == [[1, 2, 3]]
    assert judged.tolist() == [False, True, True, True, False, False]
    assert out.tolist() == [False, True, False, True, True, True]  # rows 1-3: log-odds >= 0; NaN stays flagged
    assert np.isnan(logodds[[0, 4, 5]]).all() and logodds[[1, 2, 3]].tolist() == [1.0, -1.0, 1.0]
    out, _, _ = band_decisions(scores, flagged, JudgeRule((0.3, 0.7), 1.5), judge)  # a cut above every answer
    assert out.tolist() == [False, False, False, False, True, True]
    calls.clear()
    out, judged, _ = band_decisions(scores, flagged, None, judge)
    assert calls == [] and not judged.any() and out.tolist() == flagged.tolist()


def test_screen_and_guard_judge_only_the_band(tiny, judge_detector, monkeypatch):
    import lit_sahs.detectors.guard as guard_mod
    import lit_sahs.screen as screen_mod
    from lit_sahs.detectors.guard import SafetyGuard
    from lit_sahs.screen import Screener

    seen = []

    def spy(target, texts, token_ids=None):  # "unsafe" exactly for the bread poems
        seen.extend(texts)
        return torch.tensor([3.0 if "bread" in t else -3.0 for t in texts])

    texts = TEXTS[:8]
    plain = Screener(tiny, judge_detector, batch_size=3).score(texts)
    order = np.argsort(plain.scores)
    # 4 of 8 rows inside, the edges halfway between neighbours: a batch of 3 and one of 8 pad the rows differently,
    # which moves a score by ~1e-7 (transformers 5.x), and an edge on a row's own score would flip that row
    s = plain.scores[order]
    lo, hi = float(s[1] + s[2]) / 2, float(s[5] + s[6]) / 2
    inside = (plain.scores >= lo) & (plain.scores <= hi)
    def spying_rows(target, texts, batch_size=None):  # the band's judge, with the spy as its prefill
        return lambda rows: spy(target, [texts[i] for i in rows]).numpy()

    monkeypatch.setattr(screen_mod, "row_judge", spying_rows)
    res = Screener(tiny, judge_detector, batch_size=3, judge_band=(lo, hi), judge_cut=0.0).score(texts)
    assert sorted(seen) == sorted(t for t, i in zip(texts, inside) if i)
    assert res.judged.tolist() == inside.tolist()
    want = np.where(inside, ["bread" in t for t in texts], plain.flagged)
    assert res.flagged.tolist() == want.tolist()
    assert [r.get("judged") for r in res.rows()] == inside.tolist()
    # the guard's gate: the detector reads the judge feature, so the band reuses its values
    seen.clear()
    monkeypatch.setattr(guard_mod, "row_judge", spying_rows)
    g = SafetyGuard(tiny, judge_detector, judge_band=(lo, hi), judge_cut=0.0).generate(texts, max_new_tokens=1)
    assert seen == [] and g.judged == inside.tolist()
    assert [r["judged"] for r in g.rows()] == inside.tolist()


def test_guard_band_runs_a_judge_prefill_for_the_band_rows_only(tiny, judge_store, monkeypatch):
    """A detector without the judge feature: the gate runs the judge prefill on the band's rows alone."""
    import lit_sahs.detectors.guard as guard_mod
    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.detectors.guard import SafetyGuard
    from lit_sahs.engine import Engine
    from lit_sahs.folds import build_detector

    dm = CachedActivationDataModule(str(judge_store.path), heads="0.0,1.1", batch_size=64)
    det = Engine(validate_once=True, max_epochs=2).fit(build_detector("logistic", {}), dm).detector
    texts = TEXTS[:6]
    plain = SafetyGuard(tiny, det).generate(texts, max_new_tokens=1)
    scores = np.array(plain.scores)
    lo, hi = float(np.sort(scores)[1]), float(np.sort(scores)[3])
    inside = (scores >= lo) & (scores <= hi)
    seen = []
    from lit_sahs.self_judge import judge_logodds as real

    def spy(target, batch, token_ids=None):
        seen.append(list(batch))
        return real(target, batch, token_ids)

    monkeypatch.setattr(guard_mod, "row_judge",
                        lambda target, texts, batch_size=None: lambda rows: spy(target, [texts[i] for i in rows]).numpy())
    cut = 0.05  # any fixed cut: the gate must apply it to the judge prefill's answers
    g = SafetyGuard(tiny, det, judge_band=(lo, hi), judge_cut=cut).generate(texts, max_new_tokens=1)
    assert len(seen) == 1 and sorted(seen[0]) == sorted(t for t, i in zip(texts, inside) if i)
    from lit_sahs.self_judge import judge_logodds

    verdict = judge_logodds(tiny, seen[0]).numpy() >= cut
    got = {t: f for t, f in zip(texts, g.flagged)}
    assert [got[t] for t in seen[0]] == verdict.tolist()
    assert [f for f, i in zip(g.flagged, inside) if not i] == [f for f, i in zip(plain.flagged, inside) if not i]
    np.testing.assert_allclose(g.scores, plain.scores)


def test_a_bad_band_from_python_is_refused(tiny, judge_detector):
    from lit_sahs.detectors.guard import SafetyGuard
    from lit_sahs.screen import Screener

    with pytest.raises(LitSahsError, match="LO <= HI"):
        Screener(tiny, judge_detector, judge_band=(0.9, 0.1))
    with pytest.raises(LitSahsError, match="probability"):
        SafetyGuard(tiny, judge_detector, judge_band=(0.1, 2.0))


@pytest.mark.parametrize("band", ["0.8,0.2", "0.2,1.5", "0.5", "a,b", "-0.1,0.4"])
def test_bad_judge_band_is_one_error_line(band, cli):
    for command in ("screen", "guard"):
        code, out, err = cli([command, "--detector", "nosuch", "--prompt", "hi", "--judge_band", band])
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "judge_band" in lines[0], err


def test_source_protocol_adds_the_judge_rows_on_a_judge_store(tmp_path):
    """On a store with judge_logodds (here the only signal), `judge` alone and `heads_judge` join the
    table and sparse_all keeps the judge group."""
    from lit_sahs.generalisation import source_protocol
    from lit_sahs.heads import Geometry, TargetFingerprint

    geom = Geometry(num_layers=2, num_heads=2, head_dim=4)
    rng = np.random.default_rng(0)
    n = 160
    rows = []
    for i in range(n):
        label = i % 2
        src = (("h_a", "h_b") if label else ("b_a", "b_b"))[(i // 2) % 2]
        rows.append(Sample(id=f"r{i}", text=f"prompt {i}", label=label, source=src, attack="plain",
                           attack_family="plain", base_id=f"b{i}").index_row())
    y = np.arange(n) % 2
    store = ActivationStore.create_or_open(tmp_path / "s", TargetFingerprint("synthetic-judge", geom, "e" * 64),
                                           "rule", {"fmt": 1})
    hidden = 5
    store.write_block(rows, rng.standard_normal((n, *geom.shape)), extras={
        "residual": rng.standard_normal((n, hidden)).astype(np.float16),
        "prompt_nll": rng.random(n).astype(np.float32),
        "residual_layers": rng.standard_normal((n, 2, hidden)).astype(np.float16),
        "residual_layer_ids": np.tile(np.array([0, 1], dtype=np.int16), (n, 1)),
        "refusal_prob": rng.random(n).astype(np.float32),
        "judge_logodds": (rng.standard_normal(n) + 3.0 * (2 * y - 1)).astype(np.float32)})
    res = source_protocol(str(tmp_path / "s"), top_k=2, heads="0.0,1.1", ranking=None, progress=False,
                          baselines=("judge",), max_epochs=3, extra_rows=False, sparse_all=True)
    assert set(res["mean"]) == {"heads", "judge", "heads_judge", "sparse_all"}  # heads_judge: by default
    m = res["mean"]
    assert m["judge"]["auroc"] > 0.95 and m["heads_judge"]["auroc"] > 0.9 and m["heads"]["auroc"] < 0.75
    assert all("judge" in f["sparse_selected"] for f in res["folds"])
