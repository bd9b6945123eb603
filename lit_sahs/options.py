"""The options of the commands that score prompts with a detector (guard, screen, serve), one
declaration each so names, types and defaults stay equal, and how their argv is read:
``parse_options`` (argv -> options) and ``repeatable`` (``--prompt A --prompt B``).

Nothing here imports torch: ``--help`` and a bad option answer at once, and the command's own
module (which loads the target) is imported by ``lit_sahs.cli.scoring`` only after parsing."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, TypeVar

from lit_sahs.checks import answer_below_arg, answer_direction_arg, at_least, optional_probability, judge_band_arg
from lit_sahs.commands import parse_command
from lit_sahs.choices import DEFAULT_REFUSAL, Dtype, Truncate, truncate_side
from lit_sahs.devices import Device
from lit_sahs.errors import LitSahsError


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
        judge_band: LO,HI: prompts whose detector score lies in [LO, HI] are decided by the target's
            own verdict (a second short prefill asking it whether the prompt is safe or unsafe;
            flagged where its log-odds reach the cut `calibrate --judge_band` fitted), the others by
            the detector alone; default: the detector's calibrated band, if any; off: none
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
    judge_band: Optional[str] = None

    def __post_init__(self) -> None:
        truncate_side(self.truncate)  # a bad value fails before anything loads
        judge_band_arg(self.judge_band)
        self._rows: Optional[list[dict]] = None

    def band(self):
        """``judge_band`` as (lo, hi), "off", or None (the detector's calibrated band, if any)."""
        return judge_band_arg(self.judge_band)

    def rows(self) -> list[dict]:
        """The prompts (read once); ``load`` checks them against the target's context."""
        if self._rows is None:
            from lit_sahs.prompts import gather_prompts

            self._rows = gather_prompts(self.prompt, self.data, self.image)
        return self._rows

    def load(self) -> tuple:  # (ModelFamily, Target); not annotated so that parsing never resolves them
        """(detector, target); then every prompt of ``rows()`` is checked against the target's context
        (plus ``max_new_tokens`` where the command generates) before any forward: the run is refused
        naming the long prompts, or, with ``truncate``, their texts are cut in those same rows."""
        from lit_sahs.loading import load_detector_and_target
        from lit_sahs.targets import prompting

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



@dataclass
class GuardOptions(DetectorOptions):
    """Generate with a detector guarding each prompt: flagged prompts get a refusal, scored from the
    prefill of the same generate call.

    Args:
        max_new_tokens: tokens to generate for each prompt that is not flagged
        batch_size: prompts per guarded generate call
        refusal: the answer given to a flagged prompt
        fail_closed: refuse prompts whose scoring failed (else error)
        out: write one JSON line per prompt here (default: stdout)
        answer_below: a prompt scored below this may not open its answer with a refusal ("I'm sorry",
            "I cannot", ...): the answer side of the guard, against over-refusal of prompts the
            detector is sure are benign (default: the cut `calibrate --answer_tpr` shipped in the
            detector, else none; off: none)
        answer_direction: a refusal direction file (``python -m lit_sahs direction``) ablated while the
            prompts scored below answer_below decode: reaches refusals that open with something else
            (default: the one `calibrate --answer_direction` shipped in the detector, if any; off: none)
    """

    max_new_tokens: int = 128
    batch_size: int = 8
    refusal: str = DEFAULT_REFUSAL
    fail_closed: bool = True
    out: Optional[str] = None
    answer_below: Optional[str] = None
    answer_direction: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        answer_below_arg(self.answer_below)
        answer_direction_arg(self.answer_direction, self.answer_below)


@dataclass
class ScreenOptions(DetectorOptions):
    """Score prompts with a detector without generating (the target runs only up to the detector's
    deepest layer).

    Args:
        batch_size: prompts per forward (batched by length)
        out: write one JSON line per prompt (id, score, flagged) here
        passed: write the rows that were NOT flagged here (bulk filtering)
    """

    batch_size: int = 16
    out: Optional[str] = None
    passed: Optional[str] = None


@dataclass
class ServeOptions:
    """Serve a detector behind OpenAI-compatible moderation and guarded chat endpoints.

    Args:
        detector: detector artifact dir, .ckpt or MLflow URI (models:/name@alias, runs:/<id>/detector)
        target: target (default: the one named in the detector)
        threshold: a probability in [0, 1] replacing the detector's calibrated threshold
        host: address to listen on (127.0.0.1: this machine only)
        port: port to listen on
        model_name: the model name clients send (default: the target's name)
        max_batch_size: most prompts scored or generated in one batch
        batch_timeout: seconds a batch waits at most for the requests expected to fill it
        max_new_tokens: default and largest max_tokens of a chat request
        max_inputs: most texts in one moderation request
        max_body_bytes: largest request body accepted
        refusal: the answer a flagged conversation gets
        log_prompts: write prompt texts into the log (off: only counts, scores and timings)
        dtype: the target's dtype: float32, bfloat16 or float16
        device: where the target runs: auto (a GPU when there is one), cpu, cuda, cuda:N or mps
        tracking_uri: MLflow tracking URI for models:/ and runs:/ detectors
        answer_below: a chat prompt scored below this may not open its answer with a refusal
            (against over-refusal of prompts the detector is sure are benign; default: the detector's
            calibrated cut, if any; off: none)
        answer_direction: a refusal direction file (``python -m lit_sahs direction``) ablated while the
            chat prompts scored below answer_below decode (default: the detector's own, if any; off: none)
    """

    detector: str
    target: Optional[str] = None
    threshold: Optional[float] = None
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: Optional[str] = None
    max_batch_size: int = 16
    batch_timeout: float = 0.05
    max_new_tokens: int = 128
    max_inputs: int = 256
    max_body_bytes: int = 1 << 20
    refusal: str = DEFAULT_REFUSAL
    log_prompts: bool = False
    dtype: Dtype = "float32"
    device: Device = "auto"
    tracking_uri: Optional[str] = None
    answer_below: Optional[str] = None
    answer_direction: Optional[str] = None

    def __post_init__(self) -> None:  # bad values fail before anything loads
        optional_probability(self.threshold, "threshold")
        answer_below_arg(self.answer_below)
        answer_direction_arg(self.answer_direction, self.answer_below)
        at_least({n: getattr(self, n) for n in ("max_batch_size", "max_new_tokens", "max_inputs", "max_body_bytes")}, 1)
        if not 0 <= self.batch_timeout <= 10:
            raise LitSahsError(f"batch_timeout must be between 0 and 10 seconds, got {self.batch_timeout}")
        if not 0 <= self.port <= 65535:
            raise LitSahsError(f"port must be between 0 and 65535, got {self.port}")

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


def parse_options(options: type[Options], argv: Optional[Sequence[str]], prog: str) -> Options:
    """argv (default sys.argv[1:]) parsed into the dataclass `options`."""
    argv = sys.argv[1:] if argv is None else argv
    return options(**parse_command(options, repeatable(argv), prog))
