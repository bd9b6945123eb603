"""Detectors on a synthetic problem: signal in 2 of 6 heads, head_dim 16.

The DataModule here follows the contract of lit_sahs.data.datamodules: head_set, geometry,
fingerprint, families after __init__; normalisation (train split only) after setup("fit");
batches {"x": [B, k, D] raw, "y": [B] float, "family": [B] long}.
"""
from __future__ import annotations

import json
import math
import os
import pickle

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lit_sahs.detectors import (
    FPRAtTPR,
    LogisticDetector,
    MLPDetector,
    SafetyDetector,
    SparseHeadDetector,
    TPRAtFPR,
    calibrate_threshold,
    compute_report,
)
from lit_sahs.artifact import load_detector, save_detector
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, HeadSet, TargetFingerprint

GEOMETRY = Geometry(num_layers=3, num_heads=4, head_dim=16)
FINGERPRINT = TargetFingerprint("synthetic", GEOMETRY, "ab" * 32)
HEADS = HeadSet([(0, 1), (0, 3), (1, 0), (1, 2), (2, 1), (2, 3)])
SIGNAL = (1, 4)  # positions in HEADS that carry the label
FAMILIES = ["plain", "dan", "pyrit/roleplay"]


class _Split(Dataset):
    def __init__(self, x, y, fam):
        self.x, self.y, self.fam = x, y, fam

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "family": self.fam[i]}


class SyntheticHeads(L.LightningDataModule):
    def __init__(self, n_train=400, n_val=200, n_test=200, shuffle_labels=False, seed=0, batch_size=64,
                 strength=1.0):
        super().__init__()
        self.head_set, self.geometry, self.fingerprint = HEADS, GEOMETRY, FINGERPRINT
        self.families = list(FAMILIES)
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(seed)
        k, d = len(HEADS), GEOMETRY.head_dim
        direction = torch.randn(len(SIGNAL), d, generator=g)
        direction = direction / direction.norm(dim=1, keepdim=True)
        # raw activations far from zero mean / unit scale: the detector must normalise itself
        offset = torch.randn(k, d, generator=g) * 3
        scale = torch.rand(k, d, generator=g) * 4 + 0.5

        def make(n):
            y = (torch.arange(n) % 2).float()[torch.randperm(n, generator=g)]
            z = torch.randn(n, k, d, generator=g)
            for j, h in enumerate(SIGNAL):
                z[:, h] += 1.5 * strength * (2 * y[:, None] - 1) * direction[j]
            x = z * scale + offset
            fam = torch.randint(0, len(FAMILIES), (n,), generator=g)
            if shuffle_labels:
                y = y[torch.randperm(n, generator=g)]
            return _Split(x.float(), y, fam)

        self.splits = {"train": make(n_train), "val": make(n_val), "test": make(n_test)}
        self.normalisation = None

    def setup(self, stage):
        x = self.splits["train"].x
        self.normalisation = (x.mean(0), x.std(0))

    def train_dataloader(self):
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.splits["test"], batch_size=self.batch_size)

    def predict_dataloader(self):
        return self.test_dataloader()


def trainer(max_epochs, **kw):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, deterministic=True, **kw)


def make(family):
    if family == "logistic":
        return LogisticDetector(), 3
    if family == "logistic-adam":
        return LogisticDetector(optimizer="adam", lr=0.02), 15
    if family == "mlp":
        return MLPDetector(hidden=32, lr=3e-3), 15
    if family == "sparse":
        return SparseHeadDetector(group_lasso=0.05), 5
    if family == "sparse-sgd":
        return SparseHeadDetector(group_lasso=0.05, solver="sgd", lr=0.2), 20
    raise AssertionError(family)


def fit(family, shuffle_labels=False, seed=0):
    L.seed_everything(seed, workers=True)
    det, epochs = make(family)
    dm = SyntheticHeads(shuffle_labels=shuffle_labels, seed=seed)
    t = trainer(epochs)
    t.fit(det, datamodule=dm)
    return det, dm, t


@pytest.fixture(scope="module")
def fitted():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = fit(family)
        return cache[family]

    return get


FAMILIES_TO_TEST = ["logistic", "logistic-adam", "mlp", "sparse", "sparse-sgd"]


@pytest.mark.parametrize("family", FAMILIES_TO_TEST)
def test_learns_separable_problem(fitted, family):
    det, dm, t = fitted(family)
    m = t.callback_metrics
    assert float(m["val/auroc"]) > 0.95, {k: float(v) for k, v in m.items()}
    for name in FAMILIES:  # metrics overall and per attack family
        assert float(m[f"val/{name}/auroc"]) > 0.9
        assert f"val/{name}/tpr_at_1fpr" in m
    for key in ("auprc", "accuracy", "f1", "tpr_at_1fpr", "tpr_at_5fpr", "fpr_at_95tpr", "threshold"):
        assert f"val/{key}" in m
    res = t.test(det, datamodule=dm, verbose=False)[0]
    assert res["test/auroc"] > 0.95 and "test/dan/auroc" in res


@pytest.mark.parametrize("family", FAMILIES_TO_TEST)
def test_shuffled_labels_stay_at_chance(family):
    _, _, t = fit(family, shuffle_labels=True, seed=1)
    assert abs(float(t.callback_metrics["val/auroc"]) - 0.5) < 0.15


@pytest.mark.parametrize("family", ["sparse", "sparse-sgd"])
def test_sparse_keeps_the_signal_heads(fitted, family):
    det, _, _ = fitted(family)
    assert list(det.selected_heads()) == [HEADS.heads[i] for i in SIGNAL]
    report = det.head_report()
    assert {(r["layer"], r["head"]) for r in report[:2]} == {HEADS.heads[i] for i in SIGNAL}
    assert report[0]["relative"] == 1.0 and all(r["relative"] < 0.05 and not r["selected"] for r in report[2:])
    if family == "sparse":  # the full-batch solver sets the noise heads to exactly zero
        assert list(det.selected_heads(threshold=0.0)) == [HEADS.heads[i] for i in SIGNAL]


def test_sparse_fista_reaches_the_group_lasso_optimum():
    """KKT conditions of mean BCE + group_lasso * sum ||W_h||: a dropped head's gradient norm is at
    most group_lasso; a kept head's gradient is -group_lasso * W_h / ||W_h||; the bias gradient is 0."""
    L.seed_everything(0, workers=True)
    gl = 0.08
    det, dm = SparseHeadDetector(group_lasso=gl, prox_steps=500), SyntheticHeads()
    trainer(4).fit(det, datamodule=dm)
    z = ((dm.splits["train"].x - det.mean) / det.std).detach()
    y = dm.splits["train"].y
    w = det.weight.detach().clone().requires_grad_(True)
    b = det.bias.detach().clone().requires_grad_(True)
    gw, gb = torch.autograd.grad(det._smooth(z, y, w, b), (w, b))
    norms = w.detach().norm(dim=1)
    kept = norms > 0
    assert 0 < int(kept.sum()) < len(HEADS)  # a real selection, not all or nothing
    assert float(gw[~kept].norm(dim=1).max()) <= gl * 1.01
    residual = gw[kept] + gl * w.detach()[kept] / norms[kept, None]
    assert float(residual.norm(dim=1).max()) < 1e-5 and abs(float(gb)) < 1e-5


def test_threshold_is_calibrated_on_val_benign(fitted):
    det, dm, _ = fitted("mlp")
    val = dm.splits["val"]
    with torch.no_grad():
        p = det.predict_proba(val.x)
    thr = float(det.threshold)
    assert thr != 0.5
    benign = p[val.y == 0]
    fpr = float((benign >= thr).double().mean())
    n_benign = benign.numel()
    assert det.hparams.target_fpr - 1.0 / n_benign - 1e-9 <= fpr <= det.hparams.target_fpr + 1e-9
    # predict_step flags with the same threshold
    out = trainer(1).predict(det, datamodule=dm)
    flags = torch.cat([o["flags"] for o in out])
    probs = torch.cat([o["probs"] for o in out])
    assert torch.equal(flags, probs >= thr)


def test_calibrate_threshold_ties_and_extremes():
    s = torch.tensor([0.9, 0.8, 0.8, 0.1, 0.05] + [0.0] * 15)  # 20 benign, 5% -> 1 allowed
    t = calibrate_threshold(s, 0.05)
    assert 0.8 < t < 0.9
    t = calibrate_threshold(torch.tensor([0.8, 0.8, 0.1]), 0.5)  # a tie cannot be split: flag none
    assert t > 0.8
    with pytest.raises(LitSahsError):
        calibrate_threshold(torch.tensor([]), 0.05)


def test_tpr_at_fpr_hand_computed():
    preds = torch.tensor([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    target = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0, 0, 0])
    # 5 pos, 5 neg. thresholds: >=0.9 -> tpr 2/5 fpr 0; >=0.85 -> fpr 1/5; >=0.7 -> tpr 4/5 fpr 1/5;
    # >=0.6 -> fpr 2/5; >=0.5 -> tpr 1 fpr 2/5
    m = TPRAtFPR(max_fpr=0.0)
    m.update(preds[:5], target[:5])
    m.update(preds[5:], target[5:])
    assert float(m.compute()) == pytest.approx(0.4)
    assert float(TPRAtFPR(0.2)(preds, target)) == pytest.approx(0.8)
    assert float(TPRAtFPR(0.4)(preds, target)) == pytest.approx(1.0)
    assert float(FPRAtTPR(0.95)(preds, target)) == pytest.approx(0.4)
    assert float(FPRAtTPR(0.8)(preds, target)) == pytest.approx(0.2)
    # ties are not split: with every score equal, only (0,0) and (1,1) are reachable
    assert float(TPRAtFPR(0.5)(torch.full((4,), 0.5), torch.tensor([1, 0, 1, 0]))) == 0.0
    with pytest.raises(ValueError, match="Unexpected keyword"):
        TPRAtFPR(0.01, bogus=1)


def test_compute_report_groups_and_single_class():
    scores = torch.tensor([0.9, 0.8, 0.2, 0.1, 0.7, 0.6])
    labels = torch.tensor([1, 1, 0, 0, 1, 1])
    groups = ["plain", "plain", "plain", "plain", "dan", "dan"]  # dan holds malicious prompts only
    rep = compute_report(scores, labels, groups, threshold=0.5)
    assert set(rep) == {"overall", "plain", "dan"}
    assert rep["overall"]["auroc"] == pytest.approx(1.0) and rep["overall"]["n"] == 6
    dan = rep["dan"]
    assert dan["n"] == 2 and dan["n_benign"] == 0
    assert math.isnan(dan["auroc"]) and math.isnan(dan["fpr"]) and math.isnan(dan["tpr_at_1fpr"])
    assert dan["tpr"] == 1.0 and dan["accuracy"] == 1.0
    assert compute_report([0.1, 0.4], [0, 0])["overall"]["fpr"] == 0.0
    with pytest.raises(LitSahsError):
        compute_report([0.1, 0.2], [0, 1], groups=["a"])
    with pytest.raises(LitSahsError):
        compute_report([0.1, 0.2], [0, 2])


def test_rank_metrics_rank_raw_scores_as_given():
    """Raw projections (~1e4, as a harm direction gives) and ties: AUROC and AP equal sklearn's.
    A float32 sigmoid would turn these scores into tied 1.0s and report 0.5."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + 1.5 * y, 1) * 1e4 + 2e4  # all > 1, with tied values
    rep = compute_report(s, y, threshold=2.5e4)["overall"]
    assert rep["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12) and rep["auroc"] > 0.8
    assert rep["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert rep["tpr"] == pytest.approx(float(((s >= 2.5e4) & (y == 1)).sum() / y.sum()))


@pytest.mark.parametrize("family", ["logistic", "sparse"])
def test_artifact_round_trip(fitted, tmp_path, family):
    det, dm, _ = fitted(family)
    x = dm.splits["test"].x[:32]
    det.eval()
    with torch.no_grad():
        expected = det(x)
    out = save_detector(det, tmp_path / "det")
    assert sorted(os.listdir(out)) == ["detector.json", "detector.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["det"]  # no temporary left behind
    meta = json.loads((out / "detector.json").read_text())
    assert meta["detector"] == det.family and meta["head_set"] == HEADS.to_list()
    assert meta["threshold"] == pytest.approx(float(det.threshold))
    loaded = load_detector(out)
    assert type(loaded) is type(det) and loaded.head_set == det.head_set and loaded.families == FAMILIES
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert float(loaded.threshold) == float(det.threshold)
    with pytest.raises(LitSahsError, match="already exists"):
        save_detector(det, out)
    save_detector(det, out, overwrite=True)
    assert torch.equal(load_detector(out / "detector.json")(x).detach(), expected)


def test_artifact_errors(fitted, tmp_path):
    det, _, _ = fitted("logistic")
    with pytest.raises(LitSahsError, match="does not exist"):
        load_detector(tmp_path / "nope")
    out = save_detector(det, tmp_path / "det")
    meta = json.loads((out / "detector.json").read_text())
    meta["detector"] = "transformer"
    (out / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(LitSahsError, match="unknown detector family"):
        load_detector(out)
    (out / "detector.json").write_text("{not json")
    with pytest.raises(LitSahsError, match="not valid JSON"):
        load_detector(out)
    out2 = save_detector(det, tmp_path / "det2")
    (out2 / "detector.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(LitSahsError, match="corrupt"):
        load_detector(out2)
    os.remove(out2 / "detector.safetensors")
    with pytest.raises(LitSahsError, match="missing"):
        load_detector(out2)
    with pytest.raises(LitSahsError, match="not bound"):
        save_detector(MLPDetector(), tmp_path / "unbound")


def test_checkpoint_round_trip(tmp_path):
    L.seed_everything(0)
    det = MLPDetector(hidden=16, lr=3e-3)
    dm = SyntheticHeads()
    t = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=tmp_path,
                  callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="det", monitor="val/auroc",
                                                                 mode="max")])
    t.fit(det, datamodule=dm)
    path = tmp_path / "det.ckpt"
    x = dm.splits["test"].x[:16]
    det.eval()
    with torch.no_grad():
        expected = det(x)
    loaded = MLPDetector.load_from_checkpoint(path)  # torch's weights_only default
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert float(loaded.threshold) == float(det.threshold)
    assert loaded.fingerprint == FINGERPRINT and loaded.head_set == HEADS
    via_artifact = load_detector(path)
    with torch.no_grad():
        assert torch.equal(via_artifact(x), expected)
    # a loaded detector validates without a fresh normalisation and keeps its threshold
    thr = float(loaded.threshold)
    trainer(1).validate(loaded, datamodule=SyntheticHeads(seed=3), verbose=False)
    assert float(loaded.threshold) == thr


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lit_sahs_pwned",))


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    marker = "/tmp/lit_sahs_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    with open(path, "wb") as f:
        torch.save({"state_dict": {}, "lit_sahs": {"detector": "mlp"}, "payload": _Evil()}, f)
    with pytest.raises(LitSahsError, match="plain-tensor"):
        load_detector(path)
    with pytest.raises(pickle.UnpicklingError):
        MLPDetector.load_from_checkpoint(path)
    assert not os.path.exists(marker)


def test_check_target_and_wrong_shapes(fitted):
    det, dm, _ = fitted("logistic")
    det.check_target(FINGERPRINT)  # same weights: fine
    other = TargetFingerprint("other", GEOMETRY, "cd" * 32)
    with pytest.raises(LitSahsError, match="was made for target 'synthetic'"):
        det.check_target(other)
    with pytest.raises(LitSahsError, match=r"expects activations \[batch, 6, 16\]"):
        det(torch.zeros(4, 5, 16))
    with pytest.raises(LitSahsError, match="expects activations"):
        det(torch.zeros(6, 16))
    with pytest.raises(LitSahsError, match="not bound"):
        LogisticDetector()(torch.zeros(1, 6, 16))
    # evaluation data captured from another target is refused
    dm2 = SyntheticHeads(n_train=8, n_val=8, n_test=8)
    dm2.fingerprint = other
    with pytest.raises(LitSahsError, match="was made for target"):
        trainer(1).test(det, datamodule=dm2, verbose=False)


def test_bad_hparams_and_bind():
    with pytest.raises(LitSahsError):
        LogisticDetector(optimizer="sgd")
    with pytest.raises(LitSahsError):
        MLPDetector(target_fpr=1.5)
    det = MLPDetector()
    with pytest.raises(LitSahsError, match="shape"):
        det.bind(HEADS, GEOMETRY, FINGERPRINT, torch.zeros(5, 16), torch.ones(5, 16))
    with pytest.raises(LitSahsError, match="outside"):
        det.bind(HeadSet([(7, 0)]), GEOMETRY, FINGERPRINT, torch.zeros(1, 16), torch.ones(1, 16))
    from lit_sahs.families import trainable_families

    assert set(trainable_families()) == {"logistic", "mlp", "sparse", "attnpool"}
    assert all(issubclass(c, SafetyDetector) for c in trainable_families().values())


@pytest.mark.parametrize("kwargs, match", [
    ({"group_lasso": -1.0}, "group_lasso and l2"),
    ({"solver": "adam"}, "unknown solver"),
    ({"prox_steps": 0}, "prox_steps"),
    ({"selection_threshold": 1.0}, "relative to the largest"),
])
def test_sparse_bad_settings_are_one_error(kwargs, match):
    with pytest.raises(LitSahsError, match=match):
        SparseHeadDetector(**kwargs)
