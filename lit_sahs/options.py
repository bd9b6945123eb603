"""The command line of the commands that score prompts with a detector: ``DetectorOptions``, the
options guard and screen share (one declaration, so names, types and defaults stay equal),
``run_options`` (argv -> options -> command) and ``repeatable`` (``--prompt A --prompt B``)."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TypeVar

from lit_sahs.choices import Dtype, Truncate
from lit_sahs.devices import Device
from lit_sahs.family import ModelFamily
from lit_sahs.loading import load_detector_and_target
from lit_sahs.prompts import gather_prompts
from lit_sahs.targets import Target, prompting


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

    def load(self) -> tuple[ModelFamily, Target]:
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
