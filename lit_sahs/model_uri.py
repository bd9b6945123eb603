"""models:/ and runs:/ URIs of detector artifacts: resolve a registry version and download its
directory, reading nothing. Loading is ``lit_sahs.artifact.load_detector``; registering is
``lit_sahs.registry``. Only a directory holding detector.json + detector.safetensors is accepted
(directly, or as the ``detector`` artifact inside a lit_sahs pyfunc model: the model's code is never
run here): a pickle, a .ckpt or an MLflow flavour without that directory is refused before any byte
of it is interpreted.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from lit_sahs.artifact_format import META_FILE, WEIGHTS_FILE
from lit_sahs.errors import LitSahsError
from lit_sahs.tracking import absolute_uri, download_artifacts, mlflow_client, mlflow_error, redact

TAG_FINGERPRINT = "lit_sahs.target_fingerprint"
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+?)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")
RUN_URI = re.compile(r"^runs:/(?P<run_id>[0-9a-zA-Z]+)(?:/(?P<path>.*))?$")


def is_uri(path: Any) -> bool:
    return isinstance(path, str) and (path.startswith("models:/") or path.startswith("runs:/"))


def parse_model_uri(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias> -> (name, version, alias)."""
    m = MODEL_URI.match(uri.strip())
    if not m:
        raise LitSahsError(f"{uri!r} is not a registry URI: use models:/<name>/<version> or models:/<name>@<alias>")
    return m["name"], m["version"], m["alias"]


def error_text(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


# ---------------------------------------------------------------- resolving and loading

def registered_model(c, name: str, where: str):
    """The RegisteredModel `name`, or a LitSahsError naming the models that exist."""
    try:
        return c.get_registered_model(name)
    except mlflow_error() as e:
        if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST" and "not found" not in str(e).lower():
            raise LitSahsError(redact(f"the model registry at {where} failed: {error_text(e)}", where)) from None
    try:
        names = sorted(m.name for m in c.search_registered_models(max_results=50))
    except Exception:  # noqa: BLE001
        names = []
    raise LitSahsError(f"registered model {name!r} does not exist in {redact(where)}"
                       + (f" (registered: {', '.join(names)})" if names else " (the registry is empty)")
                       + ": register one with `python -m lit_sahs register --name ...` or set MLFLOW_TRACKING_URI")


def resolve_version(uri: str, tracking_uri: Optional[str] = None):
    """The ModelVersion a models:/ URI names (version number, 'latest' or @alias)."""
    name, version, alias = parse_model_uri(uri)
    c = mlflow_client(tracking_uri)
    where = os.environ.get("MLFLOW_REGISTRY_URI") or absolute_uri(tracking_uri)
    try:
        registered_model(c, name, where)
    except LitSahsError:
        raise
    except Exception as e:  # noqa: BLE001 - an unreachable registry
        raise LitSahsError(redact(f"cannot reach the model registry at {where}: {error_text(e)}", where)) from None
    versions = sorted((v.version for v in c.search_model_versions(f"name='{name}'")), key=int)
    try:
        if alias is not None:
            return c.get_model_version_by_alias(name, alias)
        if version == "latest":
            if not versions:
                raise LitSahsError(f"registered model {name!r} has no versions")
            return c.get_model_version(name, versions[-1])
        if not version.isdigit():
            raise LitSahsError(f"{uri!r}: the version must be a number, 'latest', or use models:/{name}@<alias>")
        return c.get_model_version(name, version)
    except mlflow_error():
        aliases = sorted(c.get_registered_model(name).aliases or {})
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise LitSahsError(f"registered model {name!r} has no {what} (versions: {versions or 'none'}; "
                           f"aliases: {aliases or 'none'})") from None


def download(uri: str, dst: str | os.PathLike, tracking_uri: Optional[str] = None):
    """(downloaded path, detector directory inside it, ModelVersion or None). Nothing is loaded here."""
    turi = absolute_uri(tracking_uri)
    mv = None
    if uri.startswith("models:/"):
        mv = resolve_version(uri, tracking_uri)
        source = mlflow_client(tracking_uri).get_model_version_download_uri(mv.name, mv.version)
    elif RUN_URI.match(uri):
        source = uri
        if not (RUN_URI.match(uri)["path"] or "").strip("/"):  # the run's root: MLflow wants a path, use its location
            try:
                source = mlflow_client(tracking_uri).get_run(RUN_URI.match(uri)["run_id"]).info.artifact_uri
            except Exception as e:  # noqa: BLE001
                raise LitSahsError(redact(f"cannot find run {uri} in {turi}: {error_text(e)}", turi)) from None
    else:
        raise LitSahsError(f"{uri!r} is not a registry or run URI: use models:/<name>/<version>, "
                           "models:/<name>@<alias> or runs:/<run_id>/<path>")
    try:
        local = download_artifacts(source, dst, tracking_uri)
    except mlflow_error() as e:
        raise LitSahsError(f"cannot download {uri} ({source}): {error_text(e)}") from None
    except OSError as e:
        raise LitSahsError(f"cannot download {uri} ({source}): {e}") from None
    # the artifact itself, a run's root holding it, or a lit_sahs pyfunc model (lit_sahs.mlflow_model)
    # holding it as its "detector" artifact: only the safetensors + JSON inside is ever read
    candidates = [local, local / "detector"] + ([local / "artifacts" / "detector"] if (local / "MLmodel").is_file() else [])
    for d in (candidates if local.is_dir() else []):
        if d.is_dir() and (d / META_FILE).is_file() and (d / WEIGHTS_FILE).is_file():
            return local, d, mv
    found = (sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())[:10] if local.is_dir()
             else [local.name])
    raise LitSahsError(f"{uri} holds no lit_sahs detector artifact ({META_FILE} + {WEIGHTS_FILE}); found {found}. "
                       "Only safetensors + JSON detectors are loaded: pickles, .ckpt files and MLflow model "
                       "flavours are refused because loading them could run code")


def download_detector(uri: str, dst: str | os.PathLike, tracking_uri: Optional[str] = None) -> Path:
    """Download the detector directory a models:/ or runs:/ URI points at into `dst`; returns the
    directory holding detector.json and detector.safetensors. Nothing is loaded here."""
    return download(uri, dst, tracking_uri)[1]
