"""ActivationStore: round trips, head-subset reads, resume after a kill, de-dup, and input checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from zarr.storage import WrapperStore

from lit_sahs.data.samples import Sample
from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, HeadSet, TargetFingerprint

GEOM = Geometry(num_layers=3, num_heads=4, head_dim=8)
FP = TargetFingerprint("tiny-target", GEOM, "a" * 64)
RULE = "last_prompt_token"
FMT = {"chat_template": True, "system": None}
REPO = Path(__file__).resolve().parents[1]


def make_rows(n: int, start: int = 0) -> list[dict]:
    return [
        Sample.make(f"prompt number {i}", i % 2, "unit", attack="plain", category="c").index_row()
        for i in range(start, start + n)
    ]


def make_acts(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n,) + GEOM.shape).astype(np.float16)


def new_store(path) -> ActivationStore:
    return ActivationStore.create_or_open(path, FP, RULE, FMT)


def by_id(store: ActivationStore) -> dict[str, np.ndarray]:
    return dict(zip(store.ids(), store.read()))


def test_roundtrip_full_and_headset(tmp_path):
    rows, acts = make_rows(10), make_acts(10)
    store = new_store(tmp_path / "s")
    b1 = store.write_block(rows[:6], acts[:6])
    b2 = store.write_block(rows[6:], torch.from_numpy(acts[6:]).to(torch.bfloat16).float().half(), rank=1)
    assert b1 and b2 and b1 != b2
    assert len(store) == 10
    assert [r["id"] for r in store.index()] == [r["id"] for r in rows]
    assert store.labels().tolist() == [i % 2 for i in range(10)]

    reopened = ActivationStore.open(tmp_path / "s")
    np.testing.assert_array_equal(reopened.read()[:6], acts[:6])
    assert reopened.read().shape == (10,) + GEOM.shape and reopened.read().dtype == np.float16

    heads = HeadSet([(2, 3), (0, 1), (2, 0)])  # not sorted: HeadSet order must be kept
    got = reopened.read(heads)
    assert got.shape == (10, 3, GEOM.head_dim)
    full = reopened.read()
    for k, (l, h) in enumerate(heads):
        np.testing.assert_array_equal(got[:, k], full[:, l, h])

    picked = reopened.read(heads, rows=[9, 0, 9, 3])
    np.testing.assert_array_equal(picked, got[[9, 0, 9, 3]])

    streamed = list(reopened.iter_blocks(heads))
    assert [len(r) for r, _ in streamed] == [6, 4]
    np.testing.assert_array_equal(np.concatenate([a for _, a in streamed]), got)

    ids = [rows[7]["id"], rows[2]["id"]]
    np.testing.assert_array_equal(reopened.read(heads, rows=reopened.positions(ids)), got[[7, 2]])
    with pytest.raises(LitSahsError, match="1 rows .* not in store"):
        reopened.positions([rows[0]["id"], "no-such-id"])


def test_manifest_contents(tmp_path):
    store = new_store(tmp_path / "s")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["fingerprint"] == FP.to_dict() and m["geometry"] == GEOM.to_dict()
    assert m["dtype"] == "float16" and m["position_rule"] == RULE and m["prompt_format"] == FMT
    assert {"format_version", "lit_sahs_version", "created"} <= set(m)
    assert store.fingerprint == FP and store.geometry == GEOM


class RecordingStore(WrapperStore):
    """Wraps a block's zarr store and records every key read."""

    seen: list[str] = []

    async def get(self, key, prototype, byte_range=None):
        RecordingStore.seen.append(key)
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        RecordingStore.seen.extend(k for k, _ in key_ranges)
        return await super().get_partial_values(prototype, key_ranges)


def test_headset_read_fetches_only_requested_head_chunks(tmp_path, monkeypatch):
    store = new_store(tmp_path / "s")
    acts = make_acts(8)
    store.write_block(make_rows(4), acts[:4])
    store.write_block(make_rows(4, 4), acts[4:])

    wrap = ActivationStore._block_store
    monkeypatch.setattr(ActivationStore, "_block_store", lambda self, p, read_only: RecordingStore(wrap(self, p, read_only)))
    RecordingStore.seen = []
    reader = ActivationStore.open(tmp_path / "s")
    heads = HeadSet([(1, 2), (0, 3)])
    reader.read(heads)
    chunks = {k for k in RecordingStore.seen if k.startswith("c/")}
    # one chunk per requested head per block, nothing else
    assert chunks == {"c/0/1/2/0", "c/0/0/3/0"}
    assert sum(k.startswith("c/") for k in RecordingStore.seen) == 2 * len(heads)


def test_headset_read_survives_deleting_other_heads_chunks(tmp_path):
    store = new_store(tmp_path / "s")
    acts = make_acts(8)
    store.write_block(make_rows(8), acts)
    heads = HeadSet([(2, 1), (0, 0)])
    kept = {(l, h) for l, h in heads}
    block = tmp_path / "s" / "blocks" / store.block_names()[0]
    deleted = 0
    for f in block.glob("c/0/*/*/0"):
        l, h = int(f.parts[-3]), int(f.parts[-2])
        if (l, h) not in kept:
            f.unlink()
            deleted += 1
    assert deleted == GEOM.num_layers * GEOM.num_heads - len(heads)

    reader = ActivationStore.open(tmp_path / "s")
    got = reader.read(heads)
    np.testing.assert_array_equal(got[:, 0], acts[:, 2, 1])
    np.testing.assert_array_equal(got[:, 1], acts[:, 0, 0])
    # a lost chunk is a named error, never plausible zeros (or NaN rows read as data)
    with pytest.raises(LitSahsError, match="is damaged.*c/0/1/1/0 is missing"):
        reader.read(HeadSet([(1, 1)]))


def test_rewriting_same_rows_writes_nothing(tmp_path):
    store = new_store(tmp_path / "s")
    rows, acts = make_rows(6), make_acts(6)
    assert store.write_block(rows, acts) is not None
    n_blocks = len(store.block_names())
    assert store.write_block(rows, acts) is None
    assert len(store) == 6 and len(store.block_names()) == n_blocks
    # partially new: only the new rows are written
    more, more_acts = make_rows(8), make_acts(8, seed=1)
    name = store.write_block(more, more_acts)
    assert name is not None and len(store) == 8
    np.testing.assert_array_equal(store.read(rows=[6, 7]), more_acts[6:])
    np.testing.assert_array_equal(store.read(rows=[0]), acts[:1])  # old data kept, not overwritten
    # a fresh handle (a resumed run) agrees
    assert ActivationStore.open(tmp_path / "s").written_ids() == {r["id"] for r in more}


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, pickle
    import numpy as np
    import zarr
    from lit_sahs.data.store import ActivationStore
    path, data = sys.argv[1], sys.argv[2]
    rows, acts, fp, rule, fmt = pickle.load(open(data, "rb"))
    store = ActivationStore.create_or_open(path, fp, rule, fmt)
    store.write_block(rows[:4], acts[:4])
    real_setitem = zarr.Array.__setitem__
    def die_midway(self, key, value):
        real_setitem(self, slice(0, 2), value[:2])  # part of the block's chunks reach the disk...
        os._exit(9)  # ...then the process dies like a SIGKILL: no cleanup runs
    zarr.Array.__setitem__ = die_midway
    store.write_block(rows[4:8], acts[4:8])
    sys.exit(0)  # never reached
    """
)


def test_kill_mid_block_then_resume_matches_uninterrupted_run(tmp_path):
    import pickle

    rows, acts = make_rows(10), make_acts(10, seed=3)
    data = tmp_path / "data.pkl"
    data.write_bytes(pickle.dumps((rows, acts, FP, RULE, FMT)))
    killed = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(killed), str(data)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 9, proc.stderr
    leftovers = [p for p in (killed / "blocks").iterdir() if p.name.startswith(".tmp-")]
    assert any(p.is_dir() and any(p.rglob("c/*/*/*/*")) for p in leftovers)  # a half block was on disk

    store = ActivationStore.open(killed)
    assert len(store) == 4 and store.ids() == [r["id"] for r in rows[:4]]
    assert not any(p.name.startswith(".tmp-") for p in (killed / "blocks").iterdir())  # cleaned on open

    # resume: the same loop as the first run, writing every batch again
    resumed = ActivationStore.create_or_open(killed, FP, RULE, FMT)
    assert resumed.write_block(rows[:4], acts[:4]) is None
    assert resumed.write_block(rows[4:8], acts[4:8]) is not None
    assert resumed.write_block(rows[8:], acts[8:]) is not None

    fresh = new_store(tmp_path / "fresh")
    for a, b in ((0, 4), (4, 8), (8, 10)):
        fresh.write_block(rows[a:b], acts[a:b])

    assert sorted(resumed.ids()) == sorted(fresh.ids()) and len(resumed) == len(fresh) == 10
    r, f = by_id(resumed), by_id(fresh)
    for sid in f:
        np.testing.assert_array_equal(r[sid], f[sid])


def test_interrupt_in_process_leaves_no_visible_block(tmp_path, monkeypatch):
    store = new_store(tmp_path / "s")
    store.write_block(make_rows(3), make_acts(3))

    def boom(self, tmp, rows, arr, rank):
        (tmp / "index.jsonl").write_text("partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ActivationStore, "_write_block_files", boom)
    with pytest.raises(KeyboardInterrupt):
        store.write_block(make_rows(3, 3), make_acts(3, seed=1))
    monkeypatch.undo()
    assert os.listdir(tmp_path / "s" / "blocks") == store.block_names()
    assert len(ActivationStore.open(tmp_path / "s")) == 3


def test_live_writers_temp_block_is_not_cleaned(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    new_store(tmp_path / "s")
    blocks = tmp_path / "s" / "blocks"
    tmp = blocks / ".tmp-live"
    tmp.mkdir()
    fd = os.open(blocks / ".tmp-live.lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another rank is writing this block right now
        assert len(ActivationStore.open(tmp_path / "s")) == 0
        assert tmp.is_dir()
    finally:
        os.close(fd)
    ActivationStore.open(tmp_path / "s")
    assert not tmp.exists()  # its writer is gone now


def test_duplicate_ids_across_ranks_first_wins(tmp_path):
    rank0 = new_store(tmp_path / "s")
    rank1 = ActivationStore.create_or_open(tmp_path / "s", FP, RULE, FMT)
    rows = make_rows(5)
    a0, a1 = make_acts(5, seed=10), make_acts(5, seed=11)
    # both ranks believe rows 2..4 are theirs (neither sees the other's block yet)
    nothing_seen_yet = set()
    rank0.written_ids = lambda: nothing_seen_yet
    rank1.written_ids = lambda: nothing_seen_yet
    n0 = rank0.write_block(rows[:4], a0[:4], rank=0)
    n1 = rank1.write_block(rows[2:], a1[2:], rank=1)
    assert n0 < n1  # b000001-r0000 sorts before b000001-r0001

    store = ActivationStore.open(tmp_path / "s")
    assert len(store) == 5 == len(store.index()) == store.read().shape[0]
    assert store.ids() == [r["id"] for r in rows]
    full = store.read()
    np.testing.assert_array_equal(full[:4], a0[:4])  # first occurrence (rank 0's block) wins
    np.testing.assert_array_equal(full[4], a1[4])
    np.testing.assert_array_equal(store.read(HeadSet([(1, 1)]), rows=[3, 4])[:, 0], full[[3, 4], 1, 1])
    assert sum(len(r) for r, _ in store.iter_blocks()) == 5


def test_other_target_is_refused(tmp_path):
    new_store(tmp_path / "s")
    other = TargetFingerprint("other-target", GEOM, "b" * 64)
    with pytest.raises(LitSahsError) as e:
        ActivationStore.create_or_open(tmp_path / "s", other, RULE, FMT)
    msg = str(e.value)
    assert "other-target" in msg and "tiny-target" in msg and "another target" in msg and "--store" in msg


def test_other_position_rule_or_prompt_format_is_refused(tmp_path):
    new_store(tmp_path / "s")
    with pytest.raises(LitSahsError, match="position_rule"):
        ActivationStore.create_or_open(tmp_path / "s", FP, "mean_prompt", FMT)
    with pytest.raises(LitSahsError, match="prompt_format"):
        ActivationStore.create_or_open(tmp_path / "s", FP, RULE, "raw")
    assert len(ActivationStore.create_or_open(tmp_path / "s", FP, RULE, dict(FMT))) == 0


def test_bad_inputs_raise(tmp_path):
    store = new_store(tmp_path / "s")
    with pytest.raises(LitSahsError, match="shape"):
        store.write_block(make_rows(2), np.zeros((2, 3, 4, 7), np.float16))
    with pytest.raises(LitSahsError, match="shape"):
        store.write_block(make_rows(3), make_acts(2))
    with pytest.raises(LitSahsError, match="NaN"):
        store.write_block(make_rows(1), np.full((1,) + GEOM.shape, 1e6, np.float32))
    store.write_block(make_rows(2), make_acts(2))
    with pytest.raises(LitSahsError, match="outside"):
        store.read(HeadSet([(0, 0), (3, 0)]))
    with pytest.raises(LitSahsError, match="outside"):
        store.read(HeadSet([(0, 4)]))
    with pytest.raises(LitSahsError, match="row positions"):
        store.read(rows=[2])
    assert len(store) == 2


def test_missing_empty_or_corrupt_store_raises(tmp_path):
    with pytest.raises(LitSahsError, match="no activation store at .*extract"):
        ActivationStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LitSahsError, match="no activation store"):
        ActivationStore.open(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(LitSahsError, match="corrupt"):
        ActivationStore.open(tmp_path / "bad")
    (tmp_path / "bad" / "manifest.json").write_text('{"format_version": 1, "dtype": "float16"}')
    with pytest.raises(LitSahsError, match="corrupt"):
        ActivationStore.open(tmp_path / "bad")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(LitSahsError, match="not an activation store"):
        new_store(tmp_path / "other")
    # an empty existing directory is fine to create into
    assert len(new_store(tmp_path / "empty")) == 0
