"""The prompts a command scores: read from a prompt file or ``--prompt`` values (``read_prompts``,
``gather_prompts``), checked and encoded for a target (``encode_prompts``: non-empty, within the
target's context by ``prompting.fit_context``, the one length policy, refused or cut with
``truncate``), and result rows written as JSON lines (``write_jsonl``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from lit_sahs.data.user_files import csv_rows, jsonl_rows
from lit_sahs.errors import LitSahsError
from lit_sahs.io import atomic_write_text
from lit_sahs.targets import prompting

if TYPE_CHECKING:
    from lit_sahs.targets import Target


def encode_prompts(target: Target, texts: Sequence[str], images: Optional[Sequence[Optional[str]]] = None,
                   ids: Optional[Sequence[str]] = None, reserve: int = 0, for_generate: bool = False,
                   truncate: Optional[str] = None) -> dict:
    """Check and encode a batch (a prompt is a text or a conversation, ``prompting.conversation``):
    every prompt non-empty (a conversation: its last user turn), every prompt plus `reserve` new tokens
    within the target's context (``prompting.fit_context``: refused, or cut with `truncate` left or
    right). With `for_generate`, position ids are left out: generate computes them from the
    attention mask itself (prefill and decode steps alike)."""
    texts = [t if isinstance(t, str) or prompting.is_conversation(t) else "" for t in texts]
    ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
    images = list(images) if images is not None else [None] * len(texts)
    if not texts:
        raise LitSahsError("no prompts given: pass at least one non-empty prompt")
    for n, (t, im, i) in enumerate(zip(texts, images, ids)):
        if prompting.is_conversation(t):
            texts[n] = t = prompting.conversation(t, i)
        if not prompting.prompt_text(t).strip() and im is None:
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
