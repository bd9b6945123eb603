"""`python -m lit_sahs extract`: its options (the parser, YAML configs and --help come from this
signature) and the run; the extraction itself is `lit_sahs.extract.run_extraction`."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Literal, Optional, Union

from lit_sahs.choices import Dtype, Truncate
from lit_sahs.commands import run_command
from lit_sahs.data.protocol import DEFAULT_ATTACKS, DEFAULT_BENIGN, DEFAULT_HARMFUL, SampleSpec, names
from lit_sahs.errors import LitSahsError


@dataclass
class TrainerSettings:
    """The Trainer options extraction takes; DDP across devices and nodes is Lightning's.

    Args:
        accelerator: auto (a GPU when there is one), cpu, gpu, cuda, mps or tpu
        devices: number of devices or 'auto'
        num_nodes: machines taking part
        strategy: e.g. ddp for several devices
    """

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    devices: Union[int, str] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"


def extract_command(target: str = "smollm2-135m-instruct", dtype: Dtype = "float32",
            harmful: str = ",".join(DEFAULT_HARMFUL), benign: str = ",".join(DEFAULT_BENIGN),
            data: Optional[str] = None, attacks: str = ",".join(DEFAULT_ATTACKS), spread_attacks: bool = False,
            limit: Optional[int] = 400, benign_ratio: float = 1.0, max_chars: Optional[int] = None, seed: int = 0,
            batch_size: int = 8, block_rows: int = 256,
            num_workers: Optional[int] = None, store: Optional[str] = None,
            device_map: Optional[str] = None, offload_folder: Optional[str] = None,
            truncate: Truncate = None, residual_layers: Optional[str] = None, pool: str = "",
            token_heads: Optional[str] = None, token_ranking: Optional[str] = None, token_top_k: int = 16,
            token_length: int = 64, judge: bool = False, trainer: TrainerSettings = TrainerSettings()) -> int:
    """Capture every head's output at the first-token position into a store.

    Args:
        target: target name, .gguf path, HF dir or hub id
        dtype: float32, bfloat16 or float16
        harmful: comma-separated harmful sources or file:path.jsonl
        benign: comma-separated benign sources or file:path.jsonl
        data: a user JSONL/CSV (text,label,...) used instead of --harmful/--benign
        attacks: comma-separated attack names
        spread_attacks: give each base prompt one of the attacks, in turn within each source, instead
            of every attack: as many rows, len(attacks) times as many distinct prompts
        limit: total samples after attacks
        benign_ratio: benign base prompts per harmful one (packaged sources)
        max_chars: pick jailbreak templates whose attacked prompt fits in this many characters
        seed: sampling seed
        batch_size: prompts per forward
        block_rows: rows per committed store block
        num_workers: DataLoader processes that tokenise and preprocess images beside the forward
            (default: 4 on a GPU, 0 on the CPU, where they would compete with it)
        store: store directory (default stores/<target>)
        device_map: a target larger than one device: auto (balanced over the GPUs, then CPU, then
            disk), balanced, sequential, or a JSON object {module name: device, "cpu" or "disk"}
        offload_folder: where layers the device map puts on "disk" are kept
        truncate: a prompt longer than the target's context is refused (default), or its text cut to
            fit: left (keep the end) or right (keep the start)
        residual_layers: comma-separated decoder layers whose first-token residual is stored as an
            extra feature (default: 4 evenly spaced, the last included)
        pool: also store every head pooled over the prompt's own tokens: mean, max or mean,max
            (text-only targets; each costs layers x heads x head_dim x 2 bytes per prompt)
        token_heads: also store these heads ('layer.head,...') at each of the prompt's last
            --token_length own tokens, for the attention-pooling detector (text-only targets;
            heads x tokens x head_dim x 2 bytes per prompt)
        token_ranking: or the top --token_top_k heads of this ranking (from `locate`)
        token_top_k: how many of the ranking's heads --token_ranking records
        token_length: prompt tokens recorded per head (the last ones: a longer prompt keeps its end)
        judge: also store the target's own verdict on each prompt (the `judge` feature: log-odds of
            answering "unsafe" vs "safe" when asked to classify it), from a second short prefill:
            about one more forward per prompt, 4 bytes
        trainer: Lightning Trainer settings
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from lit_sahs.checks import at_least
    from lit_sahs.extract import run_extraction
    from lit_sahs.heads import HeadSet
    from lit_sahs.outputs import check_outputs
    from lit_sahs.targets.registry import parse_device_map

    store = store or os.path.join("stores", os.path.basename(str(target)).removesuffix(".gguf"))
    at_least({"--batch_size": batch_size, "--block_rows": block_rows, "--limit": limit,
              "--token_top_k": token_top_k, "--token_length": token_length}, 1)  # before any source loads
    tokens, ranked_for = None, None
    if token_heads and token_ranking:
        raise LitSahsError("give --token_heads or --token_ranking, not both")
    if token_heads:
        tokens = HeadSet.parse(token_heads)
    elif token_ranking:
        from lit_sahs.ranking import HeadRanking

        ranking = HeadRanking.load(token_ranking)
        tokens, ranked_for = ranking.top_k(token_top_k), ranking.fingerprint
    check_outputs(dirs={"--store": store})
    samples = SampleSpec(harmful=harmful, benign=benign, attacks=attacks, data=data, limit=limit,
                         max_chars=max_chars, seed=seed, spread_attacks=spread_attacks,
                         benign_ratio=benign_ratio).build()
    result = run_extraction(target, samples, store, batch_size=batch_size, block_rows=block_rows, dtype=dtype,
                            trainer_kwargs=dataclasses.asdict(trainer), num_workers=num_workers,
                            device_map=parse_device_map(device_map), offload_folder=offload_folder,
                            truncate=truncate, residual_layers=_parse_layers(residual_layers),
                            pool=names(pool), token_heads=tokens, token_length=token_length,
                            token_heads_for=ranked_for, judge=judge)
    if rank_zero_only.rank == 0:  # under DDP every rank runs this command; one summary
        print(json.dumps({"store": store, **result}))
    return 0


def _parse_layers(spec: Optional[str]) -> Optional[tuple[int, ...]]:
    if spec is None or not str(spec).strip():
        return None
    try:
        return tuple(int(x) for x in str(spec).split(",") if x.strip())
    except ValueError:
        raise LitSahsError(f"--residual_layers {spec!r}: give comma-separated layer numbers, e.g. 7,14,21,29") from None


def main(argv: list[str]) -> int:
    return run_command(extract_command, argv, "python -m lit_sahs extract")
