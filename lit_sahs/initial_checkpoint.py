"""A checkpoint choice in which the modules a fit starts from are a candidate too.

Lightning validates after each training epoch only, and its ``ModelCheckpoint`` never saves at step 0
(nothing has trained yet), so a fit that starts from good weights (SafeVLM's joined safety heads start
as the fitted safety-head detector) can only keep an epoch that made them worse. ``InitialCheckpoint``
runs one validation pass before the first training step, in the fit itself: the monitored value is
logged, ``EarlyStopping`` counts it as the score to beat, the module's validation hooks run as after
an epoch (SafeVLM calibrates its thresholds there), and the checkpoint written from it competes with
the epochs' for ``best_model_path``, the one the engine tests and exports.

    callbacks:
      - class_path: lit_sahs.initial_checkpoint.InitialCheckpoint
        init_args: {monitor: val/margin, mode: max, filename: best, enable_version_counter: false}

Skipped when the fit resumes from a checkpoint (its start is not the initialisation), under
``fast_dev_run``, and when there is no validation data.
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint


class InitialCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that also validates, and may keep, the weights before training."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.fast_dev_run or trainer.global_step > 0:
            return
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        val_loop.setup_data()
        if val_loop.skip:
            return
        # what the training epoch loop does around its own validation runs
        first_iter = trainer._logger_connector._first_loop_iter
        trainer.validating = True
        try:
            val_loop.run()
        finally:
            trainer.training = True
            trainer._logger_connector._first_loop_iter = first_iter
        # Lightning's own hooks skip step 0 ("nothing trained"): the candidate is saved here, once
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        for cb in trainer.callbacks:
            if isinstance(cb, EarlyStopping):  # it checks at epoch end or at validation end: exactly one acts
                cb.on_validation_end(trainer, pl_module)
                cb.on_train_epoch_end(trainer, pl_module)
