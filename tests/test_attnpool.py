"""Heads at every prompt token and the attention-pooling detector: the capture against a direct
computation, the store extras, the live features, the family's fit, artifact, guard and screen."""
import numpy as np
import pytest
import torch

from lit_sahs.data.samples import Sample
from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, HeadSet, TargetFingerprint
from lit_sahs.targets import load_target, prompting
from direct import user_token_inputs

ONE = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
TEXTS = ["How do I bake bread at home?", "Write a tutorial on how to make a bomb", "Name a river."]
HEADS = HeadSet([(2, 1), (0, 3)])  # not in layer order: the capture keeps HeadSet order


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_target("tiny-llama")


def direct_tokens(target, text, heads):
    """One prompt alone (no padding): each head's o_proj input at every user token, [n_user, k, D]."""
    x, _, _ = user_token_inputs(target, text)
    g = target.geometry
    return torch.stack([x[l].reshape(-1, g.num_heads, g.head_dim)[:, h] for l, h in heads], dim=1)


def test_token_capture_equals_a_direct_computation_right_aligned_in_a_padded_batch(tiny):
    from lit_sahs.prompt_hooks import TokenHeadCapture

    length = 6  # shorter than the long prompts, longer than "Name a river."
    with TokenHeadCapture(tiny.model, HEADS, length, tokenizer=tiny.tokenizer) as cap, torch.no_grad():
        tiny.model(**prompting.encode(tiny, TEXTS))
    values, valid = cap.tokens()
    assert values.shape == (3, length, 2, tiny.geometry.head_dim)
    for i, text in enumerate(TEXTS):
        want = direct_tokens(tiny, text, HEADS)[-length:]  # a long prompt keeps its end
        n = len(want)
        assert valid[i].tolist() == [False] * (length - n) + [True] * n
        torch.testing.assert_close(values[i, length - n:], want, atol=1e-4, rtol=1e-4)
        assert not values[i, : length - n].any()  # slots before a short prompt are zeros


def test_extraction_stores_tokens_and_live_features_equal_them(tiny, tmp_path):
    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.data.extra_features import FeatureSpec
    from lit_sahs.extract import run_extraction
    from lit_sahs.hooks import capture_forward

    samples = [Sample.make(t + f" (case {i})", i % 2, source=f"src{i % 3}") for i, t in enumerate(TEXTS * 4)]
    run_extraction(tiny, samples, tmp_path / "s", batch_size=4, trainer_kwargs=ONE, token_heads=HEADS, token_length=8)
    store = ActivationStore.open(tmp_path / "s")
    assert {"tokens", "token_mask", "token_head_ids"} <= set(store.extra_names())
    row = next(i for i, r in enumerate(store.index()) if r["text"] == samples[1].text)
    want = direct_tokens(tiny, samples[1].text, HEADS)[-8:]
    np.testing.assert_allclose(store.read_extra("tokens", rows=[row])[0, 8 - len(want):].astype(np.float32),
                               want.numpy(), atol=2e-3, rtol=2e-2)  # float16 in the store

    dm = CachedActivationDataModule(str(tmp_path / "s"), heads="2.1", features="tokens", val_fraction=0.25,
                                    test_fraction=0.25)
    assert dm.feature_spec.names == ("tok:2.1", "tokmask") and dm.feature_spec.widths == (8 * 16, 8)
    live_spec = FeatureSpec.for_target(tiny, "tokens", heads=dm.head_set, token_length=8)
    assert live_spec == dm.feature_spec
    dm.setup()
    texts = [samples[1].text, samples[2].text]  # padded together
    live = capture_forward(tiny, prompting.encode(tiny, texts), dm.head_set, features=dm.feature_spec)
    rows = [next(i for i, r in enumerate(store.index()) if r["text"] == t) for t in texts]
    from lit_sahs.data.extra_features import read_inputs

    stored = read_inputs(store, dm.head_set, dm.feature_spec, 16, rows=rows)
    np.testing.assert_allclose(live.numpy(), stored.astype(np.float32), atol=2e-3, rtol=2e-2)

    with pytest.raises(LitSahsError, match="not 1.1.*--token_heads"):
        CachedActivationDataModule(str(tmp_path / "s"), heads="1.1", features="tokens")
    with pytest.raises(LitSahsError, match="records heads 2.1,0.3 at 8 tokens.*asks for heads 2.1 at 8"):
        run_extraction(tiny, samples + [Sample.make("one more", 0, source="src0")], tmp_path / "s",
                       trainer_kwargs=ONE, token_heads=HeadSet([(2, 1)]), token_length=8)


def test_pooled_and_token_features_of_one_forward_share_one_prompt_mask(tiny, monkeypatch):
    """A detector reading pooled and per-token heads: the prompt's tokens are found once per forward,
    and each capture gives what it gives alone."""
    import lit_sahs.prompt_hooks as ph
    from lit_sahs.data.extra_features import FeatureSpec
    from lit_sahs.hooks import capture_forward

    calls = []
    real = ph.user_token_mask
    monkeypatch.setattr(ph, "user_token_mask", lambda *a: calls.append(1) or real(*a))
    enc = prompting.encode(tiny, TEXTS)
    both = FeatureSpec.for_target(tiny, "mean,tokens", heads=HEADS, token_length=6)
    joint = capture_forward(tiny, enc, HEADS, features=both)
    assert len(calls) == 1
    alone = [capture_forward(tiny, enc, HEADS, features=FeatureSpec.for_target(tiny, f, heads=HEADS, token_length=6))
             for f in ("mean", "tokens")]
    assert len(calls) == 3
    heads_only = capture_forward(tiny, enc, HEADS)
    w = heads_only.shape[1]
    torch.testing.assert_close(joint, torch.cat([alone[0], alone[1][:, w:]], dim=1))


# ---------------------------------------------------------------- the family on a synthetic store

GEOM = Geometry(num_layers=3, num_heads=2, head_dim=8)
FP = TargetFingerprint("synthetic-tokens", GEOM, "e" * 64)
T = 10


def make_token_store(path, n=240, seed=0):
    """The label lives at ONE token whose position varies (a keyword anywhere in the prompt) of head
    (1, 0); the first-token heads are noise. Prompts have 3..10 tokens."""
    rng = np.random.default_rng(seed)
    rows, acts, toks, masks = [], [], [], []
    for i in range(n):
        label = i % 2
        rows.append(Sample(id=f"r{i}", text=f"prompt {i}", label=label, source=("h" if label else "b") + str(i % 3),
                           attack="plain", attack_family="plain", base_id=f"b{i}").index_row())
        acts.append(rng.standard_normal(GEOM.shape))
        length = int(rng.integers(3, T + 1))
        tok = np.zeros((T, 2, GEOM.head_dim))
        tok[T - length:] = rng.standard_normal((length, 2, GEOM.head_dim))
        at = T - length + int(rng.integers(0, length))
        tok[at, 0, :2] += 4.0 * (2 * label - 1)
        toks.append(tok)
        masks.append(np.r_[np.zeros(T - length), np.ones(length)])
    store = ActivationStore.create_or_open(path, FP, "rule", {"fmt": 1})
    store.write_block(rows, np.stack(acts), extras={
        "tokens": np.stack(toks).astype(np.float16), "token_mask": np.stack(masks).astype(np.uint8),
        "token_head_ids": np.tile(np.array([[1, 0], [2, 1]], dtype=np.int16), (n, 1, 1))})
    return store


def _fit(path, family, hparams, features, max_epochs=30):
    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.engine import Engine
    from lit_sahs.folds import build_detector

    dm = CachedActivationDataModule(str(path), heads="1.0,2.1", features=features, batch_size=64, seed=0)
    return Engine(validate_once=True, max_epochs=max_epochs).fit(build_detector(family, hparams), dm), dm


def held_out_auroc(det, dm) -> float:
    from sklearn.metrics import roc_auc_score

    y = [int(r["label"]) for r in dm.split_rows("test")]
    return roc_auc_score(y, det.split_scores(dm, "test"))


def test_attention_pooling_finds_a_token_the_first_position_misses_and_round_trips(tmp_path):
    from lit_sahs.artifact import load_detector, save_detector

    torch.manual_seed(0)
    make_token_store(tmp_path / "s")
    pooled, dm = _fit(tmp_path / "s", "attnpool", {"dropout": 0.0}, "tokens")
    first, _ = _fit(tmp_path / "s", "logistic", {}, None, max_epochs=5)
    assert held_out_auroc(pooled.detector, dm) > 0.95
    assert held_out_auroc(first.detector, dm) < 0.7
    det = pooled.detector
    # the attention lands on the planted token of head (1, 0)
    from lit_sahs.data.extra_features import read_inputs

    store = ActivationStore.open(tmp_path / "s")
    x = torch.as_tensor(read_inputs(store, det.head_set, det.feature_spec, 8, rows=list(range(32))))
    with torch.no_grad():
        att = det.attention((x - det.mean) / det.std)[:, 0, 0]  # head (1, 0), query 0: [32, T]
    toks = store.read_extra("tokens", rows=list(range(32)))[:, :, 0, :2].astype(np.float32)
    planted = np.abs(toks).sum(-1).argmax(1)
    # the query points along the planted direction of one class: in that class it finds the token
    found, harmful = att.argmax(1).numpy() == planted, store.labels()[:32] == 1
    assert max(found[harmful].mean(), found[~harmful].mean()) > 0.8

    save_detector(det, tmp_path / "art")
    back = load_detector(tmp_path / "art")
    assert type(back).__name__ == "AttentionPoolDetector" and back.feature_spec == det.feature_spec
    np.testing.assert_array_equal(back.scores(x), det.scores(x))
    assert float(back.threshold) == float(det.threshold)


def test_attention_pooling_needs_token_features(tmp_path):
    make_token_store(tmp_path / "s", n=40)
    with pytest.raises(LitSahsError, match="attnpool detector reads heads at every prompt token"):
        _fit(tmp_path / "s", "attnpool", {}, None, max_epochs=1)
    with pytest.raises(LitSahsError, match="queries must be >= 1"):
        _fit(tmp_path / "s", "attnpool", {"queries": 0}, "tokens", max_epochs=1)


def test_guard_and_screen_score_an_attention_pooling_detector_as_the_store_does(tiny, tmp_path):
    from lit_sahs.artifact import load_detector, save_detector
    from lit_sahs.data.extra_features import read_inputs
    from lit_sahs.detectors.guard import SafetyGuard
    from lit_sahs.extract import run_extraction
    from lit_sahs.screen import Screener

    texts = [f"{w} number {i}" for i in range(8) for w in ("how to build a bomb", "a poem about bread")]
    samples = [Sample.make(t, i % 2 == 0, source=f"u{i % 2}") for i, t in enumerate(texts)]
    run_extraction(tiny, samples, tmp_path / "s", batch_size=4, trainer_kwargs=ONE, token_heads=HEADS, token_length=8)
    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.engine import Engine
    from lit_sahs.folds import build_detector

    dm = CachedActivationDataModule(str(tmp_path / "s"), heads=HEADS.spec(), features="tokens", batch_size=8)
    det = Engine(validate_once=True, max_epochs=2).fit(build_detector("attnpool", {}), dm).detector
    save_detector(det, tmp_path / "art")
    det = load_detector(tmp_path / "art")
    store = ActivationStore.open(tmp_path / "s")
    by_id = {r["id"]: i for i, r in enumerate(store.index())}
    rows = [by_id[s.id] for s in samples[:4]]
    want = det.scores(read_inputs(store, det.head_set, det.feature_spec, det.geometry.head_dim, rows=rows))
    res = SafetyGuard(tiny, det).generate([s.text for s in samples[:4]], max_new_tokens=1)
    np.testing.assert_allclose(res.scores, want, atol=2e-3)
    screened = Screener(tiny, det, batch_size=3).score([s.text for s in samples[:4]]).scores
    np.testing.assert_allclose(screened, want, atol=2e-3)


def test_the_source_protocol_adds_the_attention_pooling_row_on_a_token_store(tmp_path):
    """Signal at one token only: the attention-pooled row finds it on held-out sources, the
    first-token heads do not."""
    from lit_sahs.generalisation import source_protocol

    torch.manual_seed(0)
    make_token_store(tmp_path / "s", n=300)
    res = source_protocol(str(tmp_path / "s"), top_k=2, max_epochs=3, baselines=(), progress=False)
    assert set(res["mean"]) == {"heads", "heads_attnpool"}
    assert res["mean"]["heads_attnpool"]["auroc"] > 0.85 and res["mean"]["heads"]["auroc"] < 0.7


def test_tune_searches_the_attention_pooling_family_within_the_recorded_heads(mlflow_workdir, cli):
    """A study over attnpool with `tokens` scores the planted token on held-out sources; k is capped at
    the heads the store recorded at every token, and the refit reads them."""
    import json

    import yaml

    from lit_sahs.artifact import load_detector

    torch.manual_seed(0)
    make_token_store(mlflow_workdir / "s", n=300)
    cfg = {"store": str(mlflow_workdir / "s"), "objective": "sources", "ranking": "per_fold", "study_name": "tok",
           "storage": f"sqlite:///{mlflow_workdir}/optuna.db", "n_trials": 1, "max_epochs": {"attnpool": 40}, "seed": 0, "min_rows": 20,
           "batch_size": 64, "space": {"detector": ["attnpool"], "k": {"low": 2, "high": 4},
                                       "features": ["tokens"]},
           "sampler": {"name": "random"}, "pruner": {"name": "none"}, "heartbeat_interval": None, "refit": True,
           "plots": False, "baselines": [], "output_dir": str(mlflow_workdir / "art"),
           "tracking_uri": f"sqlite:///{mlflow_workdir}/mlruns/mlflow.db"}
    (mlflow_workdir / "tune.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = cli(["tune", "--config", str(mlflow_workdir / "tune.yaml")])
    assert code == 0, err[-2000:]
    best = json.loads((mlflow_workdir / "art" / "tok" / "best.json").read_text())
    assert best["detector"] == "attnpool" and best["value"] > 0.85
    det = load_detector(mlflow_workdir / "art" / "tok" / "detector")
    assert set(det.head_set) <= {(1, 0), (2, 1)} and det.feature_spec.token_length == T  # k capped at the recorded

    cfg["space"] = {"detector": ["logistic", "attnpool"], "k": 2, "features": ["none", "tokens"]}
    (mlflow_workdir / "tune.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = cli(["tune", "--config", str(mlflow_workdir / "tune.yaml")])
    assert code == 2 and "lack 'tokens'" in err.strip().splitlines()[-1]


def test_a_refit_asks_for_the_features_of_its_own_heads():
    """A cross-fit or fold refit picks its own heads: per-head names over exactly the detector's heads
    go back to mean / max / tokens; names of other heads stay as they are."""
    from lit_sahs.data.extra_features import FeatureSpec

    spec = FeatureSpec(("resid:3", "tok:1.0", "tok:2.1", "tokmask", "mean:1.0", "mean:2.1", "max:0.0"),
                       (12, 80, 80, 10, 8, 8, 8))
    assert spec.request([(1, 0), (2, 1)]) == "resid:3,tokens,mean,max:0.0"
    assert spec.request([(1, 0)]) == ",".join(spec.names)
    assert FeatureSpec((), ()).request([(1, 0)]) is None
