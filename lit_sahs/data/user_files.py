"""User files: labelled prompts from a JSONL or CSV file (``file:<path>`` as a source, ``--data``),
and the row readers that prompt files share (``jsonl_rows``, ``csv_rows``: UTF-8 with or without a
BOM, one clear error per bad line)."""
from __future__ import annotations

import csv
import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from lit_sahs.data.samples import Sample, dedupe, dedupe_key
from lit_sahs.errors import LitSahsError

log = logging.getLogger("lit_sahs.data.sources")  # a user file is a source (file:<path>): its warnings say so

FILE_PREFIX = "file:"


def load_user_file(path) -> list[Sample]:
    """Labelled prompts from a JSONL or CSV file (UTF-8, with or without a BOM): `text` and `label`
    (0/1) required; optional `id` (the sample id, unique; default: one derived from the content),
    `attack`, `attack_family`, `source`, `category`, `image` (a path relative to the file, which must
    exist). Repeats of a text are dropped and a text given with both labels is dropped entirely,
    as ``samples.dedupe`` does across sources (a warning says how many rows went)."""
    path = Path(path)
    if not path.is_file():
        raise LitSahsError(f"user data file {path} does not exist; pass an existing .jsonl or .csv file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = jsonl_rows(path)
    elif suffix == ".csv":
        rows = csv_rows(path)
    else:
        raise LitSahsError(f"user data file {path} has unsupported type {suffix!r}; use .jsonl or .csv")
    samples, first = [], {}  # first: line of each id the file gives
    for lineno, row in rows:
        sample = _user_sample(path, lineno, row)
        if _user_id(f"{path}, line {lineno}", row.get("id")):
            if sample.id in first:
                raise LitSahsError(f"{path}, line {lineno}: id {sample.id!r} is already used on line "
                                   f"{first[sample.id]}; every value in the `id` column must be unique")
            first[sample.id] = lineno
        samples.append(sample)
    if not samples:
        raise LitSahsError(f"user data file {path} holds no rows; add lines with `text` and `label`")
    return _drop_repeats_and_conflicts(path, samples)


def _drop_repeats_and_conflicts(path: Path, samples: list[Sample]) -> list[Sample]:
    """``samples.dedupe`` on the file's rows, saying how many rows it dropped and why."""
    labels: dict[tuple[str, str], set[int]] = {}
    for s in samples:
        labels.setdefault(dedupe_key(s), set()).add(s.label)
    conflicting = sum(len(labels[dedupe_key(s)]) > 1 for s in samples)
    kept = dedupe(samples)
    repeats = len(samples) - len(kept) - conflicting
    if conflicting:
        log.warning("%s: dropped %d rows whose text appears with both labels (%d texts); "
                    "any label kept would be wrong for one of them", path, conflicting,
                    sum(len(v) > 1 for v in labels.values()))
    if repeats:
        log.warning("%s: dropped %d rows that repeat an earlier row's text", path, repeats)
    if not kept:
        raise LitSahsError(f"user data file {path}: no rows left after dropping texts given with both labels")
    return kept


def _columns(columns: Sequence[str]) -> str:
    return " and ".join(f"`{c}`" for c in columns)


@contextmanager
def _text_errors(path: Path) -> Iterator[None]:
    """A file that is not UTF-8 text, or a CSV the csv module cannot parse, as one LitSahsError."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise LitSahsError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start} of a read): "
                           "save it as UTF-8 (with or without a BOM)") from None
    except csv.Error as e:
        raise LitSahsError(f"{path} is not a readable CSV file ({e}): save it as comma-separated UTF-8") from None


def jsonl_rows(path: Path, columns: Sequence[str] = ("text", "label")) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; `columns` only words the errors
    (each reader checks its own fields)."""
    with open(path, encoding="utf-8-sig") as f, _text_errors(path):  # -sig: a BOM (editors on Windows) is not part of line 1
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LitSahsError(f"{path}, line {lineno}: invalid JSON ({e.msg}); write one JSON object per line") from None
            except RecursionError:
                raise LitSahsError(f"{path}, line {lineno}: JSON nested too deeply to read") from None
            if not isinstance(row, dict):
                raise LitSahsError(f"{path}, line {lineno}: expected a JSON object with {_columns(columns)}")
            yield lineno, row


def csv_rows(path: Path, columns: Sequence[str] = ("text", "label")) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each row of a CSV file whose header names every one of `columns`. A row
    with more or fewer fields than the header, or a quote never closed, is refused by line, since
    reading on would shift or swallow the values."""
    with open(path, encoding="utf-8-sig", newline="") as f, _text_errors(path):  # -sig: spreadsheets save CSV with a BOM
        reader = csv.DictReader(f, strict=True)
        if not reader.fieldnames or any(c not in reader.fieldnames for c in columns):
            raise LitSahsError(f"{path}, line 1: the CSV header must name {_columns(columns)} "
                               f"column{'s' if len(columns) > 1 else ''}, got {reader.fieldnames}")
        width, last = len(reader.fieldnames), reader.line_num
        try:
            for row in reader:
                extra = row.get(None)
                got = width + len(extra) if extra is not None else sum(v is not None for v in row.values())
                if got != width:
                    fix = ('quote a value that holds a comma ("a, b")' if got > width
                           else "give every column a cell (an empty one is fine)")
                    raise LitSahsError(f"{path}, line {reader.line_num}: {got} field{'s' * (got != 1)} but the header "
                                       f"names {width} columns; {fix}")
                yield reader.line_num, row
                last = reader.line_num
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise LitSahsError(f"{path}, line {last + 1}: a quoted field starts here and is never closed "
                                   "(a \" without its closing \"); close the quote, or write a quote inside "
                                   "a quoted field as \"\"") from None
            raise


_LABEL_TEXT = re.compile(r"^[01](\.0*)?$")


def parse_label(value) -> Optional[int]:
    """0 or 1 from a label cell: the numbers 0, 1, 0.0, 1.0 or their text; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and _LABEL_TEXT.match(value.strip()):
        return int(float(value.strip()))
    return None


def _text_field(where: str, row: dict, key: str) -> str:
    """A text column's value, stripped ('' when absent or empty); a number, list or object is refused
    rather than silently replaced by the default."""
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LitSahsError(f"{where}: `{key}` must be text, got {value!r}")
    return value.strip()


def _user_sample(path: Path, lineno: int, row: dict) -> Sample:
    where = f"{path}, line {lineno}"
    text = _text_field(where, row, "text")
    if not text:
        raise LitSahsError(f"{where}: missing or empty `text`; every row needs the prompt text")
    label = parse_label(row.get("label"))
    if label is None:
        raise LitSahsError(f"{where}: `label` must be 0 (benign) or 1 (malicious), got {row.get('label')!r}")
    image = _text_field(where, row, "image")
    if image:
        resolved = (path.parent / image).resolve()
        if not resolved.is_file():
            raise LitSahsError(f"{where}: image {image!r} not found at {resolved}; paths are relative to the data file")
        image = str(resolved)
    attack = _text_field(where, row, "attack") or "plain"
    sample = Sample.make(
        text, label,
        source=_text_field(where, row, "source") or f"{FILE_PREFIX}{path.name}",
        attack=attack,
        attack_family=_text_field(where, row, "attack_family") or attack,
        category=_text_field(where, row, "category"),
        image=image or None,
    )
    uid = _user_id(where, row.get("id"))
    return sample.with_(id=uid, base_id=uid) if uid else sample


def _user_id(where: str, value) -> str:
    """The row's own id ('' when the file gives none)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise LitSahsError(f"{where}: `id` must be a string or an integer, got {value!r}")
    return str(value).strip()
