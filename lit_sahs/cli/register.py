"""`python -m lit_sahs register`: its options, parsed before MLflow and the detector code load
(``lit_sahs.registry`` does the registering)."""
from __future__ import annotations

import json
import logging
from typing import Optional, Union

from lit_sahs.commands import run_command
from lit_sahs.errors import LitSahsError


def register_command(name: str, detector: Optional[str] = None, study: Optional[str] = None,
                     storage: Optional[str] = None, alias: Optional[str] = None,
                     tag: Union[str, list[str], None] = None, description: Optional[str] = None,
                     tracking_uri: Optional[str] = None, experiment: str = "registry") -> int:
    """Put a detector in the MLflow model registry (name, version, alias, tags).

    Args:
        name: registered model name
        detector: detector directory, .ckpt, runs:/<run_id>/detector or models:/ URI
        study: register the refit detector of this tune study instead
        storage: the study's storage URL (default: tune's default SQLite file)
        alias: alias to point at the new version, e.g. champion
        tag: extra version tags: key=value[,key=value...] (or a YAML list)
        description: the version's description
        tracking_uri: MLflow tracking/registry URI (default sqlite in mlruns/)
        experiment: experiment for the run that holds a local detector's files
    """
    from lit_sahs.registry import TAG_HEADS, TAG_TARGET, parse_tags, register_detector
    from lit_sahs.tracking import study_refit

    if bool(detector) == bool(study):
        raise LitSahsError("give exactly one of --detector (a detector or URI) and --study (a tune study's refit)")
    extra = {}
    if study:
        info = study_refit(study, storage)
        detector = info["detector"]
        extra = {"optuna.study": study, "optuna.trial": str(info.get("trial"))}
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = register_detector(detector, name, alias=alias, tags={**extra, **parse_tags(tag)},
                            description=description, tracking_uri=tracking_uri, experiment=experiment)
    print(f"registered {out['uri']}" + (f" (alias {out['alias_uri']})" if out["alias"] else "")
          + f" from {out['source']}; target {out['tags'][TAG_TARGET]}, heads {out['tags'][TAG_HEADS]}")
    print(json.dumps(out))
    return 0



def main(argv: list[str]) -> int:
    return run_command(register_command, argv, prog="python -m lit_sahs register")
