"""The activation store's ``manifest.json``: what its activations were extracted with.

Cached activations are only comparable with the target, position rule and prompt format that
made them, so every store records these once, when it is created, and every writer that
reopens it must match them (a resumed or second-rank extraction must not mix two targets or
two prompt formats into one store). The manifest also carries ``format_version`` and ``dtype``,
so a store written by an incompatible lit_sahs is refused instead of misread, and
``manifest_sha256``, the digest of everything else in it, so an edited or damaged manifest is
reported as such (stores made before it existed are read without it).
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lit_sahs
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, TargetFingerprint
from lit_sahs.io import atomic_write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPE = "float16"
EXTRACT_HINT = "run `python -m lit_sahs extract ...` first"
CHECKSUM_KEY = "manifest_sha256"


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def jsonable(x: Any) -> Any:
    """Normalise through JSON so tuples/lists and key order compare equal after a round trip."""
    return json.loads(json.dumps(x, sort_keys=True))


def write_manifest(path: Path, fingerprint: TargetFingerprint, position_rule: str, prompt_format: dict | str) -> bool:
    """Write the manifest of a new store at `path` unless one is already there (another DDP rank
    may have won the race); returns whether this call wrote it."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "lit_sahs_version": lit_sahs.__version__,
        "fingerprint": fingerprint.to_dict(),
        "geometry": fingerprint.geometry.to_dict(),
        "dtype": DTYPE,
        "layout": {"array": "[n, layer, head, head_dim]", "chunks": "(n, 1, 1, head_dim)",
                   "images": "images/<sha256>.<ext>, one file per distinct image"},
        "position_rule": position_rule,
        "prompt_format": jsonable(prompt_format),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest[CHECKSUM_KEY] = manifest_digest(manifest)
    return atomic_write_json(path / MANIFEST, manifest, exclusive=True, indent=2, sort_keys=True)


def read_manifest(path: Path) -> dict:
    """The manifest of the store at `path`, checked to be one this lit_sahs can read."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise LitSahsError(f"no activation store at {path} (no {MANIFEST}): {EXTRACT_HINT}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LitSahsError(f"corrupt {mpath}: {e}; delete the store and re-run extract") from e
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise LitSahsError(f"corrupt {mpath}: not a lit_sahs manifest; delete the store and re-run extract")
    if CHECKSUM_KEY in manifest and manifest[CHECKSUM_KEY] != manifest_digest(manifest):
        raise LitSahsError(f"{mpath} does not match its checksum ({CHECKSUM_KEY}): it was edited or damaged; "
                           "restore it from a copy of the store (the blocks were not touched: do not run "
                           "`store verify --repair` against a wrong manifest)")
    if manifest["format_version"] != FORMAT_VERSION:
        raise LitSahsError(
            f"activation store {path} has format_version {manifest['format_version']!r}, this lit_sahs "
            f"({lit_sahs.__version__}) reads {FORMAT_VERSION}: re-run extract or use a matching lit_sahs"
        )
    if manifest.get("dtype") != DTYPE:
        raise LitSahsError(f"corrupt {mpath}: dtype {manifest.get('dtype')!r}, expected {DTYPE!r}")
    return manifest


def parse_manifest(manifest: dict, path: Path) -> tuple[TargetFingerprint, Geometry]:
    """The target fingerprint and geometry a manifest records (they must agree)."""
    try:
        fingerprint = TargetFingerprint.from_dict(manifest["fingerprint"])
        geometry = Geometry.from_dict(manifest["geometry"])
    except (KeyError, TypeError, ValueError) as e:
        raise LitSahsError(
            f"corrupt manifest in activation store {path}: {e!r}; delete it and re-run extract"
        ) from e
    if geometry != fingerprint.geometry:
        raise LitSahsError(
            f"corrupt manifest in activation store {path}: geometry disagrees with the fingerprint; "
            "delete it and re-run extract"
        )
    return fingerprint, geometry


def check_same_extraction(manifest: dict, have: TargetFingerprint, path: Path, fingerprint: TargetFingerprint,
                          position_rule: str, prompt_format: dict | str) -> None:
    """Refuse to add to a store that was made for another target, position rule or prompt format."""
    try:
        have.check(fingerprint, f"activation store {path}")
    except LitSahsError as e:
        raise LitSahsError(
            f"{e}; the store was made for another target: give a new --store path for {fingerprint.name!r}"
        ) from None
    for key, want in (("position_rule", position_rule), ("prompt_format", jsonable(prompt_format))):
        got = manifest.get(key)
        if got != want:
            raise LitSahsError(
                f"activation store {path} was extracted with {key} {got!r} but this run uses {want!r}: "
                "use the same setting or give a new --store path"
            )
