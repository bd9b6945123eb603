"""InitialCheckpoint: the weights a fit starts from compete for the best checkpoint."""
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping

from lit_sahs.initial_checkpoint import InitialCheckpoint


class Drift(L.LightningModule):
    """One weight starting at `start`; training pulls it to `pull`; val/score = -|w - 1| (best at w = 1)."""

    def __init__(self, start: float, pull: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(start)))
        self.pull = pull
        self.seen = []  # the weight at every validation

    def training_step(self, batch, batch_idx):
        return (self.w - self.pull) ** 2

    def validation_step(self, batch, batch_idx):
        self.seen.append(float(self.w))
        self.log("val/score", -abs(self.w.detach() - 1.0))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)


def _fit(tmp_path, model, epochs=3, patience=None, **trainer):
    ckpt = InitialCheckpoint(monitor="val/score", mode="max", filename="best", enable_version_counter=False,
                             dirpath=tmp_path / "ckpt")
    callbacks = [ckpt] + ([EarlyStopping(monitor="val/score", mode="max", patience=patience)] if patience else [])
    t = L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **trainer)
    t.fit(model)
    return t, ckpt


def test_the_initial_weights_are_kept_when_every_epoch_is_worse(tmp_path):
    t, ckpt = _fit(tmp_path, Drift(start=1.0, pull=3.0))
    assert len(t.lightning_module.seen) == 4  # before training, then after each of 3 epochs
    assert float(ckpt.best_model_score) == 0.0
    best = torch.load(ckpt.best_model_path, weights_only=True)
    assert best["global_step"] == 0 and float(best["state_dict"]["w"]) == 1.0


def test_a_better_epoch_still_wins(tmp_path):
    t, ckpt = _fit(tmp_path, Drift(start=3.0, pull=1.0))
    best = torch.load(ckpt.best_model_path, weights_only=True)
    assert best["global_step"] == 12 and float(ckpt.best_model_score) > -1.0  # the start scored -2
    assert float(best["state_dict"]["w"]) == pytest.approx(t.lightning_module.seen[-1])


def test_early_stopping_counts_the_start_as_the_score_to_beat(tmp_path):
    t, _ = _fit(tmp_path, Drift(start=1.0, pull=3.0), epochs=5, patience=1)
    assert t.current_epoch == 1 and len(t.lightning_module.seen) == 2  # one worse epoch, then stop


def test_resumed_and_debug_fits_validate_as_lightning_does(tmp_path):
    _, ckpt = _fit(tmp_path, Drift(start=3.0, pull=1.0), epochs=1)
    resumed = Drift(start=3.0, pull=1.0)
    t2 = L.Trainer(max_epochs=2, callbacks=[InitialCheckpoint(monitor="val/score", mode="max", dirpath=tmp_path / "r")],
                   logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    t2.fit(resumed, ckpt_path=ckpt.best_model_path)
    assert len(resumed.seen) == 1  # the resumed epoch only: the start of a resumed fit is not an initialisation
    debug = Drift(start=3.0, pull=1.0)
    _fit(tmp_path / "d", debug, fast_dev_run=True)
    assert len(debug.seen) == 1
