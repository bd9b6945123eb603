"""Stores read through fsspec: a file:// and a memory:// URL read what the local path reads."""
import uuid

import fsspec
import numpy as np
import pytest

from lit_sahs.data.blocks import DamagedBlock
from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet
from tests.synthetic import FP, make_store


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsspec") / "store"
    make_store(path, n_base=30)
    return path


@pytest.fixture
def memory_url(local):
    url = f"memory://stores/{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.put(str(local), url, recursive=True)
    yield url
    fs.rm(url, recursive=True)


def same_reads(a: ActivationStore, b: ActivationStore) -> None:
    heads = HeadSet([(2, 1), (0, 2), (3, 0)])
    assert a.index() == b.index() and len(a) == len(b) > 0 and a.block_names() == b.block_names()
    np.testing.assert_array_equal(a.read(), b.read())
    np.testing.assert_array_equal(a.read(heads), b.read(heads))
    np.testing.assert_array_equal(a.read(heads, rows=[5, 0, 5]), b.read(heads, rows=[5, 0, 5]))
    assert a.extra_names() == b.extra_names() == ["prompt_nll", "residual"]
    np.testing.assert_array_equal(a.read_extra("residual"), b.read_extra("residual"))
    for (ra, xa), (rb, xb) in zip(a.iter_blocks(heads), b.iter_blocks(heads)):
        assert ra == rb
        np.testing.assert_array_equal(xa, xb)


def test_file_url_reads_through_fsspec_like_the_path(local):
    store = ActivationStore.open(local.resolve().as_uri())
    assert store.remote and str(store.path).startswith("file://")
    same_reads(ActivationStore.open(local), store)


def test_memory_url_reads_like_the_path(local, memory_url):
    store = ActivationStore.open(memory_url)
    assert store.remote
    same_reads(ActivationStore.open(local), store)


def test_memory_store_checks_checksums(local, memory_url):
    fs = fsspec.filesystem("memory")
    block = ActivationStore.open(local).block_names()[1]
    chunk = f"{memory_url}/blocks/{block}/c/0/2/1/0"
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(chunk, bytes(data))
    store = ActivationStore.open(memory_url)
    store.read(HeadSet([(0, 0)]))  # other chunks of the block are fine
    with pytest.raises(DamagedBlock, match=f"{block}.*c/0/2/1/0 does not match its checksum"):
        store.read(HeadSet([(2, 1)]))


def test_url_stores_are_read_only(local, memory_url):
    store = ActivationStore.open(memory_url)
    with pytest.raises(LitSahsError, match="read-only"):
        store.write_block([{"id": "x", "label": 0}], np.zeros((1,) + store.geometry.shape))
    with pytest.raises(LitSahsError, match="not local"):
        ActivationStore.create_or_open(memory_url, FP, "rule", {"fmt": 1})
    with pytest.raises(LitSahsError, match="no activation store"):
        ActivationStore.open("memory://stores/nothing-here")


def test_file_url_is_written_as_a_local_path(tmp_path):
    url = (tmp_path / "new").resolve().as_uri()
    store = ActivationStore.create_or_open(url, FP, "rule", {"fmt": 1})
    assert not store.remote and store.path == tmp_path / "new"


def test_locate_on_a_memory_store(local, memory_url):
    from lit_sahs.locate import locate

    a, b = locate(local), locate(memory_url)
    assert a.scores == b.scores and b.meta["store"] == memory_url


def test_locate_command_on_a_store_url(local, memory_url, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)  # mlruns/ lands here
    code, _, err = cli(["locate", "--store", memory_url])
    assert code == 2 and "needs --out" in err
    code, out, err = cli(["locate", "--store", memory_url, "--out", str(tmp_path / "r")])
    assert code == 0, err
    assert (tmp_path / "r" / "ranking.json").exists()
