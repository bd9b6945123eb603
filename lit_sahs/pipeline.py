"""What `fit` does before and after training when a config asks for it: extract the store if rows
are missing, locate heads if the ranking is missing, and after fitting report and export."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lit_sahs.data.protocol import SampleSpec, names
from lit_sahs.errors import LitSahsError
from lit_sahs.choices import Dtype

log = logging.getLogger(__name__)


@dataclass
class Prepare(SampleSpec):
    """Extraction settings for `fit`: when `target` is set, samples missing from `data.store` are
    extracted first (a complete store is reused as it is). `pool` ('mean,max') and `token_heads`
    ('layer.head,...', at the prompt's last `token_length` tokens) record what pooled and
    attention-pooling detectors read, as ``extract --pool / --token_heads`` do."""

    target: Optional[str] = None
    batch_size: int = 8
    dtype: Dtype = "float32"
    pool: str = ""
    token_heads: Optional[str] = None
    token_length: int = 64


def ensure_store(p, store: str, trainer_kwargs: Optional[dict] = None) -> dict:
    from lit_sahs.extract import run_extraction

    if not isinstance(p, Prepare):  # LightningCLI hands the parsed section over as a namespace
        p = Prepare(**(p.as_dict() if hasattr(p, "as_dict") else dict(vars(p))))
    from lit_sahs.heads import HeadSet

    result = run_extraction(p.target, p.build(), store, batch_size=p.batch_size, dtype=p.dtype,
                            trainer_kwargs=trainer_kwargs or {"accelerator": "auto", "devices": 1},
                            pool=names(p.pool), token_heads=HeadSet.parse(p.token_heads) if p.token_heads else None,
                            token_length=p.token_length)
    log.warning("store %s: %s", store, json.dumps(result))
    return result


def ensure_ranking(store: str, ranking: str, held_out_families=(), held_out_sources=(), val_fraction=0.2,
                   test_fraction=0.2, seed=0, top_k: int = 8) -> Path:
    """Locate heads on the store's train split (scored on val) unless the ranking exists."""
    from lit_sahs.locate import locate, save_ranking_outputs
    from lit_sahs.ranking import HeadRanking

    path = Path(ranking)
    if path.exists():
        return path
    if path.suffix != ".json":
        raise LitSahsError(f"ranking path {ranking} must end in .json")
    result = locate(store, held_out_families=names(held_out_families), held_out_sources=names(held_out_sources),
                    val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    json_path, png_path = save_ranking_outputs(result, path.parent, top_k=top_k)
    if json_path != path:
        HeadRanking.load(json_path).save(path)
    return path
