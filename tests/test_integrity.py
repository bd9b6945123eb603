"""Store integrity: per-file checksums recorded at commit, checked on read, and `store verify [--repair]`."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from lit_sahs.data import blocks as _blocks
from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet
from synthetic import make_store

REPAIR = "store verify"


@pytest.fixture
def store_dir(tmp_path):
    make_store(tmp_path / "s")
    return tmp_path / "s"


def by_id(store: ActivationStore) -> dict[str, np.ndarray]:
    return dict(zip(store.ids(), store.read(), strict=True))


def second_block(path):
    return path / "blocks" / ActivationStore.open(path).block_names()[1]


def flip_bits(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x24  # two bits of one byte
    f.write_bytes(bytes(data))


def truncate(f):
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])


DAMAGE = {"bit flip": flip_bits, "truncated": truncate, "deleted": lambda f: f.unlink()}


def test_commit_records_a_checksum_of_every_file(store_dir):
    block = second_block(store_dir)
    doc = json.loads((block / _blocks.CHECKSUMS).read_text())
    files = {p.relative_to(block).as_posix() for p in block.rglob("*") if p.is_file()} - {_blocks.CHECKSUMS}
    assert set(doc["files"]) == files and "index.jsonl" in files and "zarr.json" in files
    assert sum(k.startswith("c/") for k in files) == 4 * 3  # one chunk per (layer, head)
    assert all(doc["files"][k] == _blocks.file_digest(block / k) for k in files)


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_chunk_is_one_error_naming_block_and_store(store_dir, how):
    block = second_block(store_dir)
    DAMAGE[how](block / "c" / "0" / "2" / "1" / "0")  # layer 2, head 1 (a head with planted signal)
    store = ActivationStore.open(store_dir)
    for read in (store.read, lambda: store.read(HeadSet([(2, 1)])), lambda: list(store.iter_blocks()),
                 lambda: store.read(HeadSet([(2, 1)]), rows=[70])):
        with pytest.raises(LitSahsError) as e:
            read()
        msg = str(e.value)
        assert block.name in msg and str(store_dir) in msg and f"{REPAIR} {store_dir} --repair" in msg
    # a read that does not touch the damaged chunk still works (and hashes only what it reads)
    assert store.read(HeadSet([(0, 0)])).shape == (180, 1, 8)


def test_damaged_index_extra_or_checksum_list_is_named(store_dir):
    block = second_block(store_dir)
    flip_bits(block / "extra-residual.npy")
    with pytest.raises(LitSahsError, match=f"{block.name}.*extra-residual.npy does not match"):
        ActivationStore.open(store_dir).read_extra("residual")
    (block / "index.jsonl").write_text((block / "index.jsonl").read_text().replace('"label": 1', '"label": 0', 1))
    with pytest.raises(LitSahsError, match=f"{block.name}.*index.jsonl does not match"):
        ActivationStore.open(store_dir)
    (block / _blocks.CHECKSUMS).unlink()  # the block's zarr.json says it had a list
    with pytest.raises(LitSahsError, match=f"{block.name}.*checksums.json is missing"):
        ActivationStore.open(store_dir).read()


def test_verify_lists_exactly_the_damaged_block_and_repair_rewrites_only_its_rows(store_dir, cli):
    original = by_id(ActivationStore.open(store_dir))
    assert cli(["store", "verify", str(store_dir)])[0] == 0
    block = second_block(store_dir)
    lost = {r["id"] for r in _blocks.load_index(block)}
    flip_bits(block / "c" / "0" / "3" / "0" / "0")

    code, out, err = cli(["store", "verify", str(store_dir)])
    assert code == 2 and "1 of 3 blocks" in err and "--repair" in err
    bad = [line for line in out.splitlines() if line.startswith("bad ")]
    assert len(bad) == 1 and block.name in bad[0] and "c/0/3/0/0" in bad[0] and "64 rows" in bad[0]
    assert json.loads(out.splitlines()[-1])["bad"] == [block.name]

    code, out, err = cli(["store", "verify", str(store_dir), "--repair"])
    assert code == 0 and f"removed {block.name}" in out and not block.exists()
    repaired = ActivationStore.open(store_dir)
    assert set(repaired.ids()) == set(original) - lost and len(repaired) == 180 - 64
    for sid, acts in by_id(repaired).items():  # every other row, unchanged, and it reads fine
        np.testing.assert_array_equal(acts, original[sid])
    assert cli(["store", "verify", str(store_dir)])[0] == 0
    assert not list((store_dir / "blocks").glob(".tmp-*"))

    # re-running the same extraction writes exactly the removed rows again
    before = set(repaired.block_names())
    rerun = make_store(store_dir)
    new = [b for b in rerun.block_names() if b not in before]
    assert len(new) == 1 and {r["id"] for r in _blocks.load_index(store_dir / "blocks" / new[0])} == lost
    assert by_id(rerun).keys() == original.keys()
    for sid, acts in by_id(rerun).items():
        np.testing.assert_array_equal(acts, original[sid])


def test_verify_reads_old_blocks_in_full_and_finds_undecodable_ones(store_dir, cli):
    make_unsealed(store_dir)
    block = second_block(store_dir)
    truncate(block / "c" / "0" / "1" / "2" / "0")
    code, out, err = cli(["store", "verify", str(store_dir)])
    assert code == 2 and "written without checksums were read in full" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("bad ")] == [block.name]
    with pytest.raises(LitSahsError, match=f"{block.name}.*does not decode.*--repair"):
        ActivationStore.open(store_dir).read()  # not a raw zstd RuntimeError


def make_unsealed(path):
    """Turn every block into what lit_sahs wrote before checksums: no list, no marker in zarr.json."""
    for block in (path / "blocks").iterdir():
        (block / _blocks.CHECKSUMS).unlink()
        meta = json.loads((block / "zarr.json").read_text())
        del meta["attributes"]["lit_sahs"]["checksums"]
        (block / "zarr.json").write_text(json.dumps(meta))


def test_store_written_before_checksums_still_reads(store_dir, caplog):
    expected = by_id(ActivationStore.open(store_dir))
    make_unsealed(store_dir)
    with caplog.at_level(logging.WARNING):
        store = ActivationStore.open(store_dir)
        ActivationStore.open(store_dir)
    assert sum("without checksums" in r.message for r in caplog.records) == 1  # warned once per store
    for sid, acts in by_id(store).items():
        np.testing.assert_array_equal(acts, expected[sid])
    assert store.read_extra("residual").shape == (180, 16)
    # a deleted chunk of an old block is still named, not silent NaN
    (second_block(store_dir) / "c" / "0" / "0" / "0" / "0").unlink()
    with pytest.raises(LitSahsError, match=f"{second_block(store_dir).name}.*missing or holds non-finite"):
        ActivationStore.open(store_dir).read()


def test_unknown_store_subcommand(cli, tmp_path):
    code, _, err = cli(["store", "check", str(tmp_path)])
    assert code == 2 and err.startswith("error:") and "store verify" in err
    code, _, err = cli(["store", "verify", str(tmp_path / "absent")])
    assert code == 2 and "no activation store" in err
