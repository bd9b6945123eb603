"""locate: batched per-head probes (parity with scikit-learn, planted signal), HeadRanking outputs,
the heatmap, and locate() on a small ActivationStore (val split only, layer chunking)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from lit_sahs.data.samples import Sample
from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, HeadSet, TargetFingerprint
from lit_sahs.locate import batched_auroc, fit_head_probes, locate, rank_heads, save_ranking_outputs
from lit_sahs.plots import head_heatmap
from lit_sahs.ranking import HeadRanking

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def planted(n=300, L=3, H=4, D=16, signal=None, seed=0):
    """Gaussian activations [n, L, H, D] whose `signal` heads shift along a random direction by label."""
    signal = {(1, 2): 2.0, (2, 0): 1.2} if signal is None else signal
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    rng.shuffle(y)
    x = rng.standard_normal((n, L, H, D)).astype(np.float32) * rng.uniform(0.5, 3.0, D).astype(np.float32)
    x += rng.normal(0, 2, (1, L, H, D)).astype(np.float32)  # per-dim offsets: standardisation matters
    for (l, h), strength in signal.items():
        u = rng.standard_normal(D)
        x[:, l, h] += (strength * np.outer(2 * y - 1, u / np.linalg.norm(u))).astype(np.float32)
    return x, y


def test_batched_probes_match_sklearn_per_head():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    x, y = planted(n=360, signal={(0, 1): 1.5, (1, 2): 0.8, (2, 3): 0.4})
    xt, yt, xe, ye = x[:240], y[:240], x[240:], y[240:]
    l2 = 1e-2
    out = fit_head_probes(torch.from_numpy(xt), yt, torch.from_numpy(xe), ye, l2=l2)
    assert out["auroc"].shape == (3, 4) and out["accuracy"].shape == (3, 4)
    for l, h in [(0, 1), (1, 2), (2, 3), (0, 0), (2, 2)]:  # signal of three strengths, and noise heads
        scaler = StandardScaler().fit(xt[:, l, h])
        clf = LogisticRegression(C=1 / (l2 * len(yt)), max_iter=5000, tol=1e-8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit(scaler.transform(xt[:, l, h]), yt)
        scores = clf.decision_function(scaler.transform(xe[:, l, h]))
        assert abs(float(out["auroc"][l, h]) - roc_auc_score(ye, scores)) < 0.01, (l, h)
        assert abs(float(out["accuracy"][l, h]) - np.mean((scores > 0) == ye)) < 0.03, (l, h)
        # same optimum, not just the same ranking of scores
        np.testing.assert_allclose(out["weight"][l, h].numpy(), clf.coef_[0], atol=2e-3, rtol=2e-2)


def test_planted_signal_heads_rank_first():
    x, y = planted(n=400, L=4, H=5, D=16, signal={(3, 1): 2.0, (1, 4): 1.5, (0, 0): 1.0})
    out = fit_head_probes(x[:300], y[:300], x[300:], y[300:])
    scores = rank_heads(out["auroc"], out["accuracy"])
    assert [(s["layer"], s["head"]) for s in scores[:3]] == [(3, 1), (1, 4), (0, 0)]
    assert scores[0]["auroc"] > 0.9 and max(s["auroc"] for s in scores[3:]) < 0.8
    assert [s["auroc"] for s in scores] == sorted((s["auroc"] for s in scores), reverse=True)


def test_ties_in_auroc_are_broken_by_accuracy_then_position():
    au = np.array([[0.9, 0.9], [0.95, 0.9]])
    acc = np.array([[0.7, 0.8], [0.6, 0.7]])
    order = [(s["layer"], s["head"]) for s in rank_heads(au, acc)]
    assert order == [(1, 0), (0, 1), (0, 0), (1, 1)]


def test_batched_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50)
    s = rng.integers(0, 5, (7, 50)).astype(np.float32)  # many ties
    got = batched_auroc(torch.from_numpy(s), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, [roc_auc_score(y, row) for row in s], atol=1e-12)


def test_bad_probe_input_raises_one_clear_error():
    x, y = planted(n=40)
    with pytest.raises(LitSahsError, match="only benign"):
        fit_head_probes(x, np.zeros(40), x, y)
    with pytest.raises(LitSahsError, match=r"\[samples, layers, heads, head_dim\]"):
        fit_head_probes(x[:, 0], y, x[:, 0], y)
    with pytest.raises(LitSahsError, match="labels for"):
        fit_head_probes(x, y[:10], x, y)
    bad = x.copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(LitSahsError, match="NaN"):
        fit_head_probes(bad, y, x, y)


def _ranking() -> HeadRanking:
    fp = TargetFingerprint("t", Geometry(2, 3, 4), "hash")
    au = np.array([[0.5, 0.9, 0.6], [0.99, 0.7, 0.55]])
    return HeadRanking(fp, rank_heads(au, np.full_like(au, 0.5)), {"scored_on": "val", "probe": {"l2": 0.01}})


def test_ranking_json_roundtrips_and_top_k_gives_a_headset(tmp_path):
    r = _ranking()
    json_path, png_path = save_ranking_outputs(r, tmp_path / "out", top_k=2)
    assert json_path.name == "ranking.json" and png_path.name == "heads.png"
    back = HeadRanking.load(json_path)
    assert back.to_dict() == r.to_dict() == json.loads(json_path.read_text())
    top = back.top_k(2)
    assert isinstance(top, HeadSet) and list(top) == [(1, 0), (0, 1)]
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]


def test_heatmap_is_a_valid_png_of_plausible_size(tmp_path):
    from PIL import Image

    grid = np.random.default_rng(0).uniform(0.4, 1.0, (30, 9))
    grid[4, 2] = np.nan  # an unscored head is drawn blank, not an error
    path = head_heatmap(grid, tmp_path / "sub" / "h.png", "title", top_k=5)
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert h > w > 100  # 30 layers tall, 9 heads wide
    assert [p.name for p in path.parent.iterdir()] == ["h.png"]  # no temp file left behind
    with pytest.raises(LitSahsError, match=r"\[layers, heads\]"):
        head_heatmap(np.zeros(5), tmp_path / "bad.png")


GEOM = Geometry(num_layers=3, num_heads=4, head_dim=8)


def _store(path, n_base=60, signal=((2, 1), 1.6)):
    """A store of n_base base prompts x 2 attack families, signal in one head."""
    fp = TargetFingerprint("t", GEOM, "hash")
    store = ActivationStore.create_or_open(path, fp, "last", {"fmt": 1})
    rows = []
    for i in range(n_base):
        base = Sample.make(f"prompt {i}", i % 2, "harmsrc" if i % 2 else "benignsrc")
        rows.append(base.index_row())
        rows.append(Sample.make(base.text, base.label, base.source, attack="dan", attack_family="dan",
                                base_id=base.id).index_row())
    (l, h), strength = signal
    x, _ = planted(n=len(rows), L=3, H=4, D=8, signal={}, seed=3)
    y = np.array([r["label"] for r in rows])
    x[:, l, h, 0] += strength * (2 * y - 1)
    store.write_block(rows[:50], x[:50])
    store.write_block(rows[50:], x[50:])
    return store


def test_locate_on_a_store_scores_on_val_and_records_the_split(tmp_path):
    store = _store(tmp_path / "s")
    r = locate(tmp_path / "s", held_out_families=["dan"], val_fraction=0.25, seed=1)
    assert r.fingerprint == store.fingerprint
    assert len(r.scores) == 12 and r.top_k(1) == HeadSet([(2, 1)])
    split = r.meta["split"]
    assert split["held_out_families"] == ["dan"] and split["val_fraction"] == 0.25 and split["seed"] == 1
    assert split["sizes"]["test"] == 60  # every dan row is held out, and never read
    assert split["sizes"]["train"] + split["sizes"]["val"] == 60 and split["sizes"]["val"] > 0
    assert r.meta["scored_on"] == "val" and r.meta["probe"]["l2"] > 0
    assert r.meta["store"].endswith("s")
    json_path, png_path = save_ranking_outputs(r, tmp_path / "out")
    assert HeadRanking.load(json_path).meta == json.loads(json.dumps(r.meta))


def test_locate_never_reads_test_rows(tmp_path, monkeypatch):
    store = _store(tmp_path / "s")
    from lit_sahs.data.protocol import split_rows

    test_rows = set(split_rows(store.index(), held_out_families=["dan"])["test"].tolist())
    seen = []
    real_read = ActivationStore.read

    def spy(self, heads=None, rows=None):
        seen.extend(np.asarray(rows).tolist())
        return real_read(self, heads, rows)

    monkeypatch.setattr(ActivationStore, "read", spy)
    locate(store, held_out_families=["dan"])
    assert seen and not test_rows & set(seen)


def test_head_chunking_gives_the_same_ranking(tmp_path):
    store = _store(tmp_path / "s")
    whole = locate(store)
    chunked = locate(store, memory_budget=1)  # one head at a time
    g = store.geometry
    assert len(chunked.meta["probe"]["head_chunks"]) == g.num_layers * g.num_heads
    assert len(whole.meta["probe"]["head_chunks"]) == 1
    for a, b in zip(whole.scores, chunked.scores):
        assert (a["layer"], a["head"]) == (b["layer"], b["head"])
        assert a["auroc"] == pytest.approx(b["auroc"], abs=1e-6)


def test_locate_single_class_training_data_is_a_clear_error(tmp_path):
    fp = TargetFingerprint("t", GEOM, "hash")
    store = ActivationStore.create_or_open(tmp_path / "s", fp, "last", {"fmt": 1})
    rows = [Sample.make(f"p {i}", 1, "src").index_row() for i in range(20)]
    store.write_block(rows, np.zeros((20,) + GEOM.shape, np.float16))
    with pytest.raises(LitSahsError, match="only malicious"):
        locate(store)


def test_held_out_names_given_comma_separated_on_the_command_line(tmp_path, cli):
    """`--held_out.families dan,pliny` holds out both families (not one family named 'dan,pliny')."""
    from synthetic import make_store

    make_store(tmp_path / "s")
    code, _, err = cli(["locate", "--store", str(tmp_path / "s"), "--held_out.families", "dan,pliny",
                        "--out", str(tmp_path / "out")])
    assert code == 0, err[-2000:]
    split = HeadRanking.load(tmp_path / "out" / "ranking.json").meta["split"]
    assert split["held_out_families"] == ["dan", "pliny"]
