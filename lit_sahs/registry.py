"""The MLflow model registry for detectors: `python -m lit_sahs register` and models:/ URIs.

    python -m lit_sahs register --detector runs:/<run_id>/detector --name smollm2-guard --alias champion
    python -m lit_sahs register --study quickstart-smollm2 --name smollm2-guard   # the study's refit
    load_detector("models:/smollm2-guard@champion")     # or models:/smollm2-guard/3, runs:/<id>/detector

A registered version is an MLflow pyfunc model (``lit_sahs.mlflow_model``: built from code, no
pickle) whose ``detector`` artifact is the detector (detector.safetensors + detector.json, written
by save_detector), so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` take it. Registering
a run's detector (``runs:/<id>/detector``, what ``fit`` and ``tune`` print) links the version to that
training run and its metrics; a local directory gets a run of its own in the `registry` experiment.
lit_sahs's own loading downloads the version and reads only the detector directory inside, with
safetensors and json: a registry entry without one (a pickle, an MLflow pytorch flavour, a .ckpt)
is refused before any byte of it is interpreted, so a detector someone else registered cannot run
code on the machine that loads it.

A registered model belongs to one target: its first version records the target fingerprint
(tag ``lit_sahs.target_fingerprint``) and a detector for another target is refused. Each
version carries tags for the target, the HeadSet, the detector family and the source run's
metrics. Registration either completes (version created, READY, tagged, alias set) or leaves
nothing behind: a model or run it created is deleted again on any failure.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from lit_sahs.errors import LitSahsError
from lit_sahs.artifact import load_detector
from lit_sahs.mlflow_model import DETECTOR_PATH, MODEL_PATH, log_detector_and_model, log_pyfunc_model, run_has_model
from lit_sahs.model_uri import RUN_URI, TAG_FINGERPRINT, download as _download, error_text as _msg
from lit_sahs.tracking import absolute_uri, artifact_location, mlflow_client, mlflow_error, redact

log = logging.getLogger(__name__)

TAG_TARGET = "lit_sahs.target"
TAG_GEOMETRY = "lit_sahs.geometry"
TAG_HEADS = "lit_sahs.head_set"
TAG_FAMILY = "lit_sahs.detector"
TAG_THRESHOLD = "lit_sahs.threshold"
TAG_METRICS = "lit_sahs.metrics"
ALIAS = re.compile(r"^[A-Za-z0-9_\-]{1,255}$")
# metrics copied from the source run into version tags (all of them go into lit_sahs.metrics)
KEY_METRICS = ("mean_held_out_auroc", "mean_tpr_at_1fpr", "min_held_out_auroc", "refit_test/auroc",
               "refit_test/tpr_at_1fpr", "threshold")


# ---------------------------------------------------------------- registering

def _detector_tags(det) -> dict[str, str]:
    fp = det.fingerprint
    return {TAG_FINGERPRINT: fp.weights_hash, TAG_TARGET: fp.name,
            TAG_GEOMETRY: "x".join(str(v) for v in fp.geometry.shape),
            TAG_HEADS: ",".join(f"{l}.{h}" for l, h in det.artifact_metadata().get("head_set", [])),
            TAG_FAMILY: det.family,
            TAG_THRESHOLD: f"{float(det.threshold):.6g}"}


def _run_metrics(c, run_id: str) -> dict[str, float]:
    try:
        return dict(c.get_run(run_id).data.metrics)
    except Exception:  # noqa: BLE001
        return {}


def _check_alias(alias: Optional[str]) -> None:
    if alias is None:
        return
    if not ALIAS.match(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise LitSahsError(f"alias {alias!r} is not allowed: use letters, digits, '_' or '-' (not 'latest' or 'v<number>')")


def parse_tags(tags: Optional[list[str] | dict]) -> dict[str, str]:
    if not tags:
        return {}
    if isinstance(tags, dict):
        return {str(k): str(v) for k, v in tags.items()}
    if isinstance(tags, str):
        tags = [t for t in tags.split(",") if t.strip()]
    out = {}
    for t in tags:
        k, sep, v = str(t).partition("=")
        if not sep or not k.strip():
            raise LitSahsError(f"tag {t!r} must be key=value")
        out[k.strip()] = v.strip()
    return out


def register_detector(detector: str, name: str, alias: Optional[str] = None, tags: Optional[dict] = None,
                      description: Optional[str] = None, tracking_uri: Optional[str] = None,
                      experiment: str = "registry", metrics: Optional[dict] = None) -> dict:
    """Register `detector` (a save_detector directory, .ckpt, runs:/ or models:/ URI) as a new version of
    `name`; set `alias` on it. Returns {name, version, uri, alias_uri, source, run_id, tags}.
    On any failure nothing it created stays in the registry or tracking store."""
    if not name or not re.fullmatch(r"[^/@:]{1,255}", name):
        raise LitSahsError(f"registered model name {name!r} is not allowed: no '/', '@' or ':'")
    _check_alias(alias)
    user_tags = parse_tags(tags)
    turi = absolute_uri(tracking_uri)
    c = mlflow_client(tracking_uri)

    # 1. the detector must load (safetensors + JSON) before the registry is touched
    det = load_detector(detector)
    src_run: Optional[str] = None
    src_path: Optional[str] = None
    if isinstance(detector, str) and RUN_URI.match(detector):
        m = RUN_URI.match(detector)
        src_run, src_path = m["run_id"], (m["path"] or "").strip("/")
        sub = Path(tempfile.mkdtemp(prefix="lit_sahs-check-"))
        try:  # the version points at the run's pyfunc model holding this artifact (logged here if missing)
            local, directory, _ = _download(detector, sub, tracking_uri)
            if (local / "MLmodel").is_file():
                model_path = src_path
            else:
                if directory != local:
                    src_path = f"{src_path}/{directory.name}".strip("/")
                model_path = MODEL_PATH if src_path == DETECTOR_PATH else f"{src_path}-model"
                if not run_has_model(c, src_run, model_path):
                    log_pyfunc_model(c, src_run, det, directory, model_path)
        finally:
            shutil.rmtree(sub, ignore_errors=True)
    tags_v = _detector_tags(det)
    run_metrics = dict(metrics or {})
    if src_run:
        run_metrics = {**_run_metrics(c, src_run), **run_metrics}

    # 2. the registered model: new, or one that holds detectors for the same target
    created_model = created_run = None
    created_version = None
    try:
        try:
            existing = c.get_registered_model(name)
        except mlflow_error() as e:
            if "not found" not in str(e).lower() and getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise LitSahsError(redact(f"the model registry at {turi} failed: {_msg(e)}", turi)) from None
            existing = None
        except Exception as e:  # noqa: BLE001 - unreachable registry
            raise LitSahsError(redact(f"cannot reach the model registry at {turi}: {_msg(e)}", turi)) from None
        if existing is not None:
            fp = (existing.tags or {}).get(TAG_FINGERPRINT)
            if fp is None and c.search_model_versions(f"name='{name}'"):
                raise LitSahsError(f"registered model {name!r} exists but holds no lit_sahs detectors: choose another name")
            if fp is not None and fp != det.fingerprint.weights_hash:
                raise LitSahsError(
                    f"registered model {name!r} holds detectors for target {(existing.tags or {}).get(TAG_TARGET)!r} "
                    f"(weights {fp[:24]}) but this detector was made for {det.fingerprint.name!r} "
                    f"(weights {det.fingerprint.weights_hash[:24]}): register it under another name")
        else:
            c.create_registered_model(name, tags={TAG_FINGERPRINT: det.fingerprint.weights_hash,
                                                  TAG_TARGET: det.fingerprint.name,
                                                  TAG_GEOMETRY: tags_v[TAG_GEOMETRY]},
                                      description=description)
            created_model = name
        if existing is not None and TAG_FINGERPRINT not in (existing.tags or {}):
            c.set_registered_model_tag(name, TAG_FINGERPRINT, det.fingerprint.weights_hash)
            c.set_registered_model_tag(name, TAG_TARGET, det.fingerprint.name)

        # 3. where the version's files live: the source run's artifact, or a run made here
        if src_run:
            source, run_id = f"runs:/{src_run}/{model_path}", src_run
        else:
            exp = c.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else c.create_experiment(
                experiment, artifact_location=artifact_location(experiment, turi))
            run_id = c.create_run(exp_id, run_name=f"register-{name}",
                                  tags={"lit_sahs.kind": "register", "lit_sahs.source": str(detector)}).info.run_id
            created_run = run_id
            source = log_detector_and_model(c, run_id, det)
            c.set_terminated(run_id)

        # 4. the version, its tags and alias
        metric_tags = {f"metric.{k}": f"{v:.6g}" for k, v in run_metrics.items() if k in KEY_METRICS}
        vtags = {**tags_v, **metric_tags, **user_tags}
        if run_metrics:
            vtags[TAG_METRICS] = json.dumps({k: round(float(v), 6) for k, v in sorted(run_metrics.items())})[:4900]
        mv = c.create_model_version(name, source=source, run_id=run_id, tags=vtags, description=description)
        created_version = mv.version
        deadline = time.monotonic() + 120
        while mv.status != "READY":
            if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
                raise LitSahsError(f"model version {name}/{mv.version} did not become READY ({mv.status}: "
                                   f"{mv.status_message})")
            time.sleep(0.5)
            mv = c.get_model_version(name, mv.version)
        if alias:
            c.set_registered_model_alias(name, alias, mv.version)
    except BaseException as e:
        _rollback(c, name, created_model, created_version, created_run)
        if isinstance(e, (LitSahsError, KeyboardInterrupt)):
            raise
        raise LitSahsError(redact(f"registering {detector} as {name!r} failed ({type(e).__name__}: {_msg(e)}); "
                                  "nothing was registered", turi)) from None
    return {"name": name, "version": int(mv.version), "uri": f"models:/{name}/{mv.version}",
            "alias": alias, "alias_uri": f"models:/{name}@{alias}" if alias else None, "source": source,
            "run_id": run_id, "tags": vtags, "tracking_uri": redact(turi)}


def _rollback(c, name: str, created_model: Optional[str], created_version: Optional[str],
              created_run: Optional[str]) -> None:
    for what, fn in (("version", lambda: created_version and c.delete_model_version(name, created_version)),
                     ("model", lambda: created_model and c.delete_registered_model(created_model)),
                     ("run", lambda: created_run and c.delete_run(created_run))):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - best effort; report what could not be removed
            log.warning("could not remove the %s created before the failure: %s", what, _msg(e))
