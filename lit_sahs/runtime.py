"""What every command that runs a detector in front of a target shares: guard, screen, ablate and
evaluate's ``score_file``.

* loading: ``resolve_detector`` (an instance, an artifact dir / .ckpt, or a models:/ / runs:/ URI)
  and ``load_detector_and_target``, the one sequence "detector, then the target it names (or an
  override), then the fingerprint and geometry checks";
* prompts: ``encode_prompts`` (non-empty, within the target's context: ``prompting.fit_context``,
  the one length policy, refuses or cuts with ``truncate``), ``read_prompts`` / ``gather_prompts``
  (a prompt file or ``--prompt`` values) and ``write_jsonl``;
* the capture forward: ``capture_forward`` runs the target on an encoded batch under a
  ``HeadCapture`` and returns the detector's heads at the first-token position, optionally stopping
  after the deepest needed layer (``EarlyExit``);
* the command line: ``DetectorOptions``, the options guard and screen share (one declaration, so
  names, types and defaults stay equal), ``run_options`` and ``repeatable`` (``--prompt A --prompt B``);
* ``summary_metrics``: the report columns screen and score_file print (counts, threshold-free metrics,
  the rates at the threshold and the flagged share).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import torch
from torch import nn

from lit_sahs.capture import HeadCapture
from lit_sahs.detectors import SafetyDetector, load_detector
from lit_sahs.detectors.metrics import COUNT_COLUMNS, SCORE_COLUMNS, THRESHOLD_COLUMNS
from lit_sahs.devices import Device, resolve_device
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet
from lit_sahs.io import atomic_write_text
from lit_sahs.choices import Dtype, Truncate
from lit_sahs.targets import Target, load_target, prompting, sites
from lit_sahs.targets.registry import parse_device_map

# ---------------------------------------------------------------- detector and target


def resolve_detector(spec: str | os.PathLike | SafetyDetector, tracking_uri: Optional[str] = None,
                     map_location: str | torch.device = "cpu") -> SafetyDetector:
    """A detector from an instance, an artifact directory / detector.json / .ckpt, or a registry URI
    (``models:/name/1``, ``models:/name@champion``, ``runs:/<id>/detector``; fetched by
    ``lit_sahs.registry``, which loads only safetensors + JSON artifacts)."""
    if isinstance(spec, nn.Module):  # a SafetyDetector, or SafeVLM's safety modules
        return spec.to(map_location).eval()
    return load_detector(str(spec), map_location=map_location, tracking_uri=tracking_uri)


def load_detector_and_target(detector: str | os.PathLike | SafetyDetector, target: Target | str | None = None,
                             device: Optional[str | torch.device] = "auto", dtype: Optional[str] = None,
                             tracking_uri: Optional[str] = None, device_map=None,
                             offload_folder: Optional[str] = None) -> tuple[SafetyDetector, Target]:
    """(detector in eval mode on the target's device, target). The target is `target` when it is a
    loaded ``Target``, else loaded by that name or, by default, the name the detector records;
    `device_map` / `offload_folder` place a target larger than one device (``load_target``).
    A detector made for another target (fingerprint) or reading heads outside its geometry is a
    LitSahsError: its scores would be meaningless."""
    det = resolve_detector(detector, tracking_uri=tracking_uri)
    if not det.is_bound:
        raise LitSahsError("the detector is not fitted: fit it or load a saved one")
    if not isinstance(target, Target):
        device = device if isinstance(device, torch.device) else resolve_device(device)
        target = load_target(target or det.fingerprint.name, dtype=dtype, device=device,
                             device_map=parse_device_map(device_map), offload_folder=offload_folder)
    det.check_target(target.fingerprint)
    det.head_set.validate(target.geometry)
    return det.to(target.device).eval(), target


# ---------------------------------------------------------------- prompts

context_length = prompting.context_length  # the target's context in tokens (None: no limit known)


def encode_prompts(target: Target, texts: Sequence[str], images: Optional[Sequence[Optional[str]]] = None,
                   ids: Optional[Sequence[str]] = None, reserve: int = 0, for_generate: bool = False,
                   truncate: Optional[str] = None) -> dict:
    """Check and encode a batch: every prompt non-empty, every prompt plus `reserve` new tokens
    within the target's context (``prompting.fit_context``: refused, or cut with `truncate` left or
    right). With `for_generate`, position ids are left out: generate computes them from the
    attention mask itself (prefill and decode steps alike)."""
    texts = [t if isinstance(t, str) else "" for t in texts]
    ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
    images = list(images) if images is not None else [None] * len(texts)
    if not texts:
        raise LitSahsError("no prompts given: pass at least one non-empty prompt")
    for t, im, i in zip(texts, images, ids):
        if not t.strip() and im is None:
            raise LitSahsError(f"prompt {i} is empty: give it some text")
    enc = prompting.encode(target, texts, images, ids)
    fitted = prompting.fit_context(target, texts, images, ids, truncate=truncate, reserve=reserve,
                                   lengths=enc["attention_mask"].sum(-1).tolist())
    if fitted != texts:
        enc = prompting.encode(target, fitted, images, ids)
    if for_generate:
        enc.pop("position_ids", None)
    return enc


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Prompts from a .jsonl/.ndjson (``text``; optional ``id``, ``image`` relative to the file,
    ``label``), a .csv with the same columns, or a .txt (one prompt a line)."""
    from lit_sahs.data.sources import csv_rows, jsonl_rows

    p = Path(path)
    if not p.is_file():
        raise LitSahsError(f"prompt file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        try:
            lines = p.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise LitSahsError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
        numbered = [(n, {"text": line}) for n, line in enumerate(lines, 1) if line.strip()]
    elif suffix in (".jsonl", ".ndjson"):
        numbered = list(jsonl_rows(p, ("text",)))
    elif suffix == ".csv":
        numbered = [(n, {k: v for k, v in d.items() if v not in (None, "")}) for n, d in csv_rows(p, ("text",))]
    else:
        raise LitSahsError(f"prompt file {p} has unsupported type {suffix!r}: use .jsonl, .csv or .txt")
    rows: list[dict] = []
    for n, d in numbered:
        if "text" not in d:
            raise LitSahsError(f"{p}, line {n}: no 'text' field")
        sid = d.get("id")
        if sid not in (None, "") and (isinstance(sid, bool) or not isinstance(sid, (str, int))):
            raise LitSahsError(f"{p}, line {n}: 'id' must be a string or an integer, got {sid!r}")
        rows.append({**d, "id": str(sid) if sid not in (None, "") else str(n)})
    for r in rows:
        if not isinstance(r["text"], str):
            raise LitSahsError(f"{p}: prompt {r['id']} has a non-text 'text' field")
        if r.get("image") and not isinstance(r["image"], str):
            raise LitSahsError(f"{p}: prompt {r['id']} has a non-text 'image' field (give a path)")
        if r.get("image"):
            img = Path(r["image"])
            r["image"] = str(img if img.is_absolute() else p.parent / img)
        else:
            r["image"] = None
    if not rows:
        raise LitSahsError(f"{p} holds no prompts")
    return rows


def gather_prompts(prompt: Optional[Sequence[str]], data: Optional[str], image: Optional[Sequence[str]] = None) -> list[dict]:
    """Rows {id, text, image[, label...]} from `--prompt` values (with one `--image` each, or none)
    or from a prompt file; exactly one of the two."""
    if bool(prompt) == bool(data):
        raise LitSahsError("give prompts with --prompt TEXT (repeatable) or --data FILE, not both")
    if data:
        return read_prompts(data)
    images = list(image or [])
    if images and len(images) != len(prompt):
        raise LitSahsError(f"--image given {len(images)} times for {len(prompt)} prompts: give one per prompt or none")
    return [{"id": str(i), "text": t, "image": images[i] if images else None} for i, t in enumerate(prompt)]


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """One JSON object a line, written atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---------------------------------------------------------------- the capture forward

class StopForward(Exception):
    """Raised by EarlyExit's hook to abandon a forward once the needed layers have run."""


class EarlyExit:
    """Context manager: a forward on `model` stops at the attention output projection of `layer`
    (its input, i.e. that layer's head outputs, has been computed; nothing after it runs). Enter
    it *after* the HeadCapture whose hooks must see that input. Call the model through ``run``,
    which swallows the StopForward."""

    def __init__(self, model: nn.Module, layer: int):
        projs = sites.output_projections(model)
        if not 0 <= layer < len(projs):
            raise LitSahsError(f"early exit at layer {layer} is outside the target's {len(projs)} layers")
        self.model, self.layer, self._proj = model, layer, projs[layer]
        self._handle = None
        self.stopped = False

    def _hook(self, module, args):
        self.stopped = True
        raise StopForward()

    def __enter__(self) -> "EarlyExit":
        self.stopped = False
        self._handle = self._proj.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return exc[0] is StopForward  # a StopForward escaping a `with` block is the expected exit

    def run(self, **inputs) -> None:
        try:
            self.model(**inputs)
        except StopForward:
            pass
        if not self.stopped:
            raise LitSahsError(f"the forward never reached layer {self.layer}: early exit did not fire")


@torch.no_grad()
def capture_forward(target: Target, enc: dict, heads: HeadSet, early_exit: bool = False,
                    features=None) -> torch.Tensor:
    """[batch, k, head_dim]: `heads` at the first-token position for an encoded batch, from one
    forward without a KV cache whose LM head runs on the last position only; with `early_exit` the
    forward stops after the deepest layer of `heads` (the same values, bit for bit). With extra
    `features` (a detector's ``feature_spec``) they follow the heads, [batch, k + slots, head_dim],
    from the same forward (run to the end: the refusal feature needs the logits)."""
    heads = heads.validate(target.geometry)
    model = target.model
    enc = {k: v.to(target.device) if torch.is_tensor(v) else v for k, v in enc.items()}
    if features:
        from lit_sahs.capture import FeatureCapture

        with FeatureCapture(model, heads, target.geometry, features, target.tokenizer) as cap:
            model(**enc, use_cache=False, logits_to_keep=1)
        return cap.selected()
    with HeadCapture(model, heads, target.geometry) as cap:
        if early_exit:
            with EarlyExit(model, max(heads.layers)) as stop:
                stop.run(**enc, use_cache=False)
        else:
            model(**enc, use_cache=False, logits_to_keep=1)
    return cap.selected()


# ---------------------------------------------------------------- reports

# the columns screen and score_file report: the row counts, the threshold-free metrics, the rates at
# the threshold and the share of rows flagged (derived from the counts and rates, see summary_metrics)
SUMMARY_COLUMNS = COUNT_COLUMNS + SCORE_COLUMNS + THRESHOLD_COLUMNS + ("flagged_share",)


def summary_metrics(metrics: dict) -> dict:
    """One group of compute_report cut to SUMMARY_COLUMNS, NaN (undefined: AUROC of a one-class
    group, TPR without malicious rows, FPR without benign ones) as None for JSON. ``flagged_share``:
    the share of all the group's rows flagged at the threshold, malicious and benign together."""
    m = dict(metrics)
    if "flagged_share" not in m and all(k in m for k in ("n", "n_malicious", "n_benign", "tpr", "fpr")):
        flagged = sum(round(float(m[rate]) * m[count]) for rate, count in (("tpr", "n_malicious"), ("fpr", "n_benign"))
                      if m[count])
        m["flagged_share"] = flagged / m["n"] if m["n"] else float("nan")
    return {k: (None if isinstance(m[k], float) and math.isnan(m[k]) else m[k]) for k in SUMMARY_COLUMNS if k in m}


# ---------------------------------------------------------------- command line

@dataclass
class DetectorOptions:
    """The options of every command that scores prompts with a detector (guard, screen).

    Args:
        detector: detector artifact dir, .ckpt or MLflow URI (models:/name/1)
        target: target (default: the one named in the detector)
        prompt: a prompt (repeat --prompt for a batch)
        image: an image path per --prompt (vision-language targets)
        data: a prompt file: .jsonl/.csv (text[, id, image, label]) or .txt (one prompt a line)
        threshold: override the detector's threshold
        dtype: the target's dtype: float32, bfloat16 or float16
        device: where the target runs: auto (a GPU when there is one), cpu, cuda, cuda:N or mps
        device_map: a target larger than one device: auto, balanced, sequential or a JSON
            {module: device, "cpu" or "disk"} (accelerate), as for extract
        offload_folder: where layers the device map puts on "disk" are kept
        tracking_uri: MLflow tracking URI for models:/ detectors
        truncate: a prompt longer than the target's context is refused (default), or its text cut to
            fit: left (keep the end) or right (keep the start)
    """

    detector: str
    target: Optional[str] = None
    prompt: Optional[list[str]] = None
    image: Optional[list[str]] = None
    data: Optional[str] = None
    threshold: Optional[float] = None
    dtype: Dtype = "float32"
    device: Device = "auto"
    device_map: Optional[str] = None
    offload_folder: Optional[str] = None
    tracking_uri: Optional[str] = None
    truncate: Truncate = None

    def __post_init__(self) -> None:
        prompting.truncate_side(self.truncate)  # a bad value fails before anything loads
        self._rows: Optional[list[dict]] = None

    def rows(self) -> list[dict]:
        """The prompts (read once); ``load`` checks them against the target's context."""
        if self._rows is None:
            self._rows = gather_prompts(self.prompt, self.data, self.image)
        return self._rows

    def load(self) -> tuple[SafetyDetector, Target]:
        """(detector, target); then every prompt of ``rows()`` is checked against the target's context
        (plus ``max_new_tokens`` where the command generates) before any forward: the run is refused
        naming the long prompts, or, with ``truncate``, their texts are cut in those same rows."""
        det, target = load_detector_and_target(self.detector, self.target, device=self.device, dtype=self.dtype,
                                               tracking_uri=self.tracking_uri, device_map=self.device_map,
                                               offload_folder=self.offload_folder)
        rows = self.rows()
        texts = prompting.fit_context(target, [r["text"] for r in rows], [r["image"] for r in rows],
                                      [r["id"] for r in rows], truncate=self.truncate,
                                      reserve=int(getattr(self, "max_new_tokens", 0) or 0))
        for r, t in zip(rows, texts):
            r["text"] = t
        return det, target


REPEATABLE = ("prompt", "image")
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def _is_value(token: str) -> bool:
    """Whether argparse reads `token` after an option as its value: anything not starting with '-',
    a lone '-', a negative number, or text with a space before any '=' (``"- item"``)."""
    return (not token.startswith("-") or token == "-" or bool(_NEGATIVE_NUMBER.match(token))
            or " " in token.partition("=")[0])


def _one_item_list(text: str) -> str:
    """`text` as a one-item YAML flow list of a double-quoted scalar, every character that is not
    plainly printable escaped, so that jsonargparse reads back exactly `text`."""
    body = "".join(c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in text)
    return f'["{body}"]'


def repeatable(argv: Sequence[str], options: Sequence[str] = REPEATABLE) -> list[str]:
    """argv with each ``--prompt X`` (or ``--prompt=X``) rewritten as ``--prompt+ ["X"]``.

    A generated parser gives a list option jsonargparse's append syntax (``--prompt+ X``), while a
    repeated plain ``--prompt`` would keep only the last value; these commands have always taken
    ``--prompt A --prompt B``. The value goes in as a quoted one-item list so that its text stays
    literal: parsed as YAML, a prompt such as ``null``, ``# Title`` or ``- item`` would change."""
    argv, out, i = list(argv), [], 0
    flags = {f"--{o}" for o in options}
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out += argv[i:]
            break
        name, eq, value = arg.partition("=")
        if name in flags and eq:
            out.append(f"{name}+={_one_item_list(value)}")
        elif arg in flags and i + 1 < len(argv) and _is_value(argv[i + 1]):
            out += [f"{arg}+", _one_item_list(argv[i + 1])]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


Options = TypeVar("Options")


def run_options(command: Callable[[Options], int], options: type[Options], argv: Optional[Sequence[str]],
                prog: str) -> int:
    """Parse argv (default sys.argv[1:]) into the dataclass `options` and run `command` on it."""
    from lit_sahs.commands import parse_command

    argv = sys.argv[1:] if argv is None else argv
    return int(command(options(**parse_command(options, repeatable(argv), prog))) or 0)

