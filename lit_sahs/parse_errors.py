"""A command-line parser's complaint (jsonargparse words it over several lines, after the usage) as
the one `error:` line every bad input gets."""
from __future__ import annotations

import re

_KEY = re.compile(r'^Parser key "([^"]+)":')
_GIVEN = re.compile(r"Given value: (.*)$|Got value: (.*)$", re.MULTILINE)
_EXPECTED = re.compile(r"Expected a <class '([\w.]+)'>")


def one_line(e: BaseException) -> str:
    """`--option 'value' is not a valid <types>` for a value of the wrong type, else the first line."""
    text = str(e).strip()
    key = _KEY.match(text)
    if not key:
        return (text.splitlines() or [type(e).__name__])[0]
    given = _GIVEN.search(text)
    value = next((g for g in given.groups() if g is not None), "").strip() if given else ""
    types = [t for t in dict.fromkeys(_EXPECTED.findall(text)) if t != "NoneType"]
    want = " or ".join(types) if types else "value of the documented type"
    return f"--{key.group(1)} {value!r} is not a valid {want}; see --help"
