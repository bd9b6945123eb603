"""The source-level protocol: folds that hold out one harmful and one benign source."""
import json

import numpy as np
import pytest

from lit_sahs.errors import LitSahsError
from lit_sahs.data.holdout import Holdout
from lit_sahs.folds import Folds, source_holdouts
from lit_sahs.generalisation import source_protocol
from synthetic import make_store


def by_label(label, i):
    return f"harm{(i // 2) % 3}" if label else f"ben{(i // 2) % 4}"


def rows(sources_labels):
    return [{"id": f"{s}-{i}", "label": y, "source": s} for s, y, n in sources_labels for i in range(n)]


def test_round_robin_holds_every_source_out_once_and_all_pairs_every_pair():
    index = rows([("h1", 1, 30), ("h2", 1, 30), ("b1", 0, 30), ("b2", 0, 30), ("b3", 0, 30)])
    folds, skipped = source_holdouts(index, "round_robin")
    assert [f.sources for f in folds] == [("h1", "b1"), ("h2", "b2"), ("h1", "b3")] and not skipped
    folds, _ = source_holdouts(index, "all_pairs")
    assert len(folds) == 6 and len({f.sources for f in folds}) == 6


def test_small_folds_are_skipped_with_the_reason_and_one_source_a_side_is_refused():
    index = rows([("h1", 1, 30), ("h2", 1, 4), ("b1", 0, 30), ("b2", 0, 5)])
    folds, skipped = source_holdouts(index, "round_robin", min_rows=20)
    assert [f.sources for f in folds] == [("h1", "b1")] and skipped == {"h2__b2": "only 9 rows"}
    with pytest.raises(LitSahsError, match="two harmful and two benign"):
        source_holdouts(rows([("h1", 1, 30), ("b1", 0, 30), ("b2", 0, 30)]))
    with pytest.raises(LitSahsError, match="unknown pairing"):
        source_holdouts(index, "every")
    with pytest.raises(LitSahsError, match="no rows"):
        source_holdouts(index, sources=["nosuch"])


def test_a_fold_never_trains_ranks_or_calibrates_on_its_held_out_sources(tmp_path):
    make_store(tmp_path / "s", source_of=by_label)
    folds = Folds(tmp_path / "s")
    hold = Holdout(sources=("harm0", "ben1"))
    split = folds.split(hold)
    src = np.array([r["source"] for r in folds.index])
    assert set(src[split["test"]]) == {"harm0", "ben1"}
    assert not {"harm0", "ben1"} & (set(src[split["train"]]) | set(src[split["val"]]))
    ranking = folds.ranking_for(hold)
    assert ranking is folds.ranking_for(Holdout(sources=("harm0", "ben1")))  # cached per fold
    assert ranking is not folds.ranking_for(Holdout(sources=("harm1", "ben2")))


def test_source_protocol_reports_every_fold_with_baselines(tmp_path):
    make_store(tmp_path / "s", source_of=by_label)
    result = source_protocol(str(tmp_path / "s"), top_k=2, max_epochs=3, baselines=["tfidf"], progress=False)
    assert [f["holdout"] for f in result["folds"]] == [["harm0", "ben0"], ["harm1", "ben1"], ["harm2", "ben2"],
                                                       ["harm0", "ben3"]]
    for f in result["folds"]:
        assert set(f["methods"]) == {"heads", "tfidf"}
        assert f["methods"]["heads"]["auroc"] > 0.95  # the planted heads carry the label in every source
        assert 0 <= f["methods"]["heads"]["fpr"] <= 1
    assert result["mean"]["heads"]["auroc"] == pytest.approx(
        np.mean([f["methods"]["heads"]["auroc"] for f in result["folds"]]))
    json.dumps(result)  # the report is written as JSON


def test_evaluate_command_writes_the_source_table(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    make_store(tmp_path / "s", source_of=by_label)
    code, out, err = cli(["evaluate", "--store", str(tmp_path / "s"), "--protocol", "sources", "--top_k", "2",
                          "--max_epochs", "3", "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert code == 0, err[-2000:]
    assert "Mean over 4 source folds" in out and "| heads |" in out and "| harm0 + ben0 |" in out
    for name in ("sources.md", "sources.json", "sources_auroc.png"):
        assert (tmp_path / "s" / "sources" / name).exists()
    code, _, err = cli(["evaluate", "--store", str(tmp_path / "s"), "--protocol", "nonsense"])
    assert code == 2 and "error:" in err and "nonsense" in err  # a Literal choice: refused by the parser


def test_tune_runs_on_source_folds_and_logs_them(tmp_path, monkeypatch):
    """The default objective: one trial over the source folds, fold names valid as MLflow keys."""
    from lit_sahs.tune import TuneConfig, run_tune

    monkeypatch.chdir(tmp_path)
    make_store(tmp_path / "s", source_of=by_label)
    cfg = TuneConfig(store=str(tmp_path / "s"), study_name="src", storage=f"sqlite:///{tmp_path}/o.db",
                     tracking_uri=f"sqlite:///{tmp_path}/m.db", n_trials=1, refit=False, plots=False,
                     heartbeat_interval=None, min_rows=20, max_epochs=2, space={"detector": ["logistic"], "k": 2})
    result = run_tune(cfg)
    assert result["objective"] == "sources"
    assert result["families"] == ["harm0__ben0", "harm1__ben1", "harm2__ben2", "harm0__ben3"]
    assert result["trials"] == {"COMPLETE": 1} and result["best"]["value"] > 0.9
