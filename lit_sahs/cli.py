"""`python -m lit_sahs <command>`: one parser per subcommand; every LitSahsError becomes one
`error: ...` line on stderr and exit status 2."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Callable, Optional

from jsonargparse import ActionConfigFile, ArgumentParser

from lit_sahs.errors import LitSahsError

DEFAULT_HARMFUL = "advbench,harmbench,donotanswer,past_tense"
DEFAULT_BENIGN = "truthfulqa,nq_open,mmlu,commonsenseqa,openbookqa,healthsearchqa,medicationqa,sharegpt"
DEFAULT_ATTACKS = "plain,pyrit,dan,inthewild"


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in str(text).split(",") if n.strip())


def _add_trainer_args(p: ArgumentParser) -> None:
    """The Trainer options extraction needs; DDP across devices/nodes is Lightning's."""
    p.add_argument("--trainer.accelerator", default="auto", help="cpu, gpu, auto")
    p.add_argument("--trainer.devices", default="auto", help="number of devices or 'auto'")
    p.add_argument("--trainer.num_nodes", type=int, default=1)
    p.add_argument("--trainer.strategy", default="auto", help="e.g. ddp for several devices")


def extract_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m lit_sahs extract",
                       description="Capture every head's output at the first-token position into a store.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--target", default="smollm2-135m-instruct", help="target name, .gguf path, HF dir or hub id")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--harmful", default=DEFAULT_HARMFUL, help="comma-separated harmful sources or file:path.jsonl")
    p.add_argument("--benign", default=DEFAULT_BENIGN, help="comma-separated benign sources or file:path.jsonl")
    p.add_argument("--data", default=None, help="a user JSONL/CSV (text,label,...) used instead of --harmful/--benign")
    p.add_argument("--attacks", default=DEFAULT_ATTACKS, help="comma-separated attack names")
    p.add_argument("--limit", type=Optional[int], default=400, help="total samples after attacks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_rows", type=int, default=256, help="rows per committed store block")
    p.add_argument("--store", default=None, help="store directory (default stores/<target>)")
    _add_trainer_args(p)
    return p


def cmd_extract(argv: list[str]) -> int:
    from lit_sahs.data.protocol import build_dataset
    from lit_sahs.data.attacks import apply_attacks
    from lit_sahs.data.sources import load_user_file
    from lit_sahs.extract import run_extraction

    args = extract_parser().parse_args(argv)
    if args.data:
        samples = apply_attacks(load_user_file(args.data), _names(args.attacks), seed=args.seed)
        if args.limit is not None:
            samples = samples[: args.limit]
    else:
        samples = build_dataset(harmful=_names(args.harmful), benign=_names(args.benign),
                                attacks=_names(args.attacks), limit=args.limit, seed=args.seed)
    store = args.store or os.path.join("stores", os.path.basename(str(args.target)).removesuffix(".gguf"))
    trainer = {k: v for k, v in vars(args.trainer).items()}
    if str(trainer["devices"]).isdigit():
        trainer["devices"] = int(trainer["devices"])
    result = run_extraction(args.target, samples, store, batch_size=args.batch_size, block_rows=args.block_rows,
                            dtype=args.dtype, trainer_kwargs=trainer)
    print(json.dumps({"store": store, **result}))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {"extract": cmd_extract}


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}: use one of {names}", file=sys.stderr)
            sys.exit(2)
        print(f"usage: python -m lit_sahs {{{names}}} [--help] ...")
        sys.exit(0)
    try:
        sys.exit(COMMANDS[argv[0]](argv[1:]))
    except LitSahsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
