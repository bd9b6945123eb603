"""`python -m lit_sahs fit` (LightningCLI) under ddp_spawn on 2 CPU processes (gloo): the detector in
the launching process ends up bound, with the weights the ranks trained, so the test and the export
that follow the fit in this process work."""
import json

import yaml

from test_fit_cli import workdir, write_config  # noqa: F401 - workdir is a fixture


def test_fit_under_ddp_spawn_binds_the_parents_detector(workdir, cli):  # noqa: F811
    cfg = write_config(workdir, {"class_path": "lit_sahs.detectors.LogisticDetector",
                                 "init_args": {"optimizer": "adam", "lr": 0.05}})
    doc = yaml.safe_load(cfg.read_text())
    doc["trainer"].update({"devices": 2, "strategy": "ddp_spawn", "logger": False, "max_epochs": 4})
    doc["trainer"].pop("callbacks")
    doc["baselines"] = []
    cfg.write_text(yaml.safe_dump(doc))
    code, out, err = cli(["fit", "--config", str(cfg)])
    assert code == 0, err[-3000:]
    report = json.loads((workdir / "out" / "report.json").read_text())
    assert report["heads"]["overall"]["auroc"] > 0.9
    from lit_sahs.artifact import load_detector

    exported = load_detector(workdir / "out" / "detector")
    assert exported.is_bound and float(exported.linear.weight.abs().max()) > 0.05
