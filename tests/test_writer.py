"""The background block writer: bounded queue, errors surfaced in the caller, whole blocks only."""
import threading
import time

import pytest

from lit_sahs.data import blocks as _blocks
from lit_sahs.data.samples import Sample
from lit_sahs.data.store import ActivationStore
from lit_sahs.data.verify import verify_store
from lit_sahs.data.writer import BlockWriter
from lit_sahs.errors import LitSahsError
from lit_sahs.extract import run_extraction

TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def tiny():
    from lit_sahs.targets import load_target

    return load_target("tiny-llama")


def _samples(n=8):
    return [Sample.make(f"prompt number {i} about {'bombs' if i % 2 else 'bread'}", i % 2, source="unit")
            for i in range(n)]


def test_injected_write_failure_ends_extraction_with_whole_blocks_only(tiny, tmp_path, monkeypatch):
    real = _blocks.write_block_files
    calls = []

    def fails_on_second_block(zstore, tmp, rows, arr, rank):
        calls.append(len(rows))
        if len(calls) == 2:
            real(zstore, tmp, rows, arr, rank)  # the temp block is half written when the disk "fills"
            raise OSError(28, "No space left on device")
        return real(zstore, tmp, rows, arr, rank)

    monkeypatch.setattr(_blocks, "write_block_files", fails_on_second_block)
    store_path = tmp_path / "store"
    with pytest.raises(LitSahsError, match="No space left on device"):
        run_extraction(tiny, _samples(), store_path, batch_size=2, block_rows=2, trainer_kwargs=TRAINER)
    assert not [p.name for p in (store_path / "blocks").iterdir() if p.name.startswith(".")]  # no temp left
    checks, incomplete = verify_store(store_path)
    assert not incomplete and all(not c.problems for c in checks)
    assert len(checks) == 1 and len(ActivationStore.open(store_path)) == 2  # blocks after the failure: never written

    monkeypatch.setattr(_blocks, "write_block_files", real)
    again = run_extraction(tiny, _samples(), store_path, batch_size=2, block_rows=2, trainer_kwargs=TRAINER)
    assert again == {"written": 6, "skipped": 2, "total": 8}


def test_background_and_inline_writes_give_the_same_store(tiny, tmp_path):
    from lit_sahs.extract import HeadExtractor, StoreWriter, _extraction_trainer, EncodeBatch, SampleDataset
    from torch.utils.data import DataLoader

    out = {}
    for background in (True, False):
        module = HeadExtractor(tiny)
        writer = StoreWriter(tmp_path / str(background), block_rows=3, background=background)
        trainer = _extraction_trainer(module, writer, TRAINER)
        loader = DataLoader(SampleDataset(_samples()), batch_size=2, collate_fn=EncodeBatch(tiny))
        trainer.predict(module, loader, return_predictions=False)
        store = ActivationStore.open(tmp_path / str(background))
        out[background] = (writer.rows_written, store.index(), store.read(), store.read_extra("prompt_nll"))
    assert out[True][0] == out[False][0] == 8
    assert out[True][1] == out[False][1]
    assert (out[True][2] == out[False][2]).all() and (out[True][3] == out[False][3]).all()


class _SlowStore:
    path = "slow-store"

    def __init__(self):
        self.release = threading.Event()
        self.written = []

    def write_block(self, rows, acts, rank=0, extras=None, tag=""):
        self.release.wait(5)
        self.written.append(list(rows))
        return "b"


def test_queue_is_bounded_and_close_waits_for_every_block():
    store = _SlowStore()
    w = BlockWriter(store, max_pending=1)
    w.submit([{"id": "a"}], [[0.0]])  # taken by the thread, which blocks in write_block
    time.sleep(0.05)
    w.submit([{"id": "b"}], [[0.0]])  # fills the queue
    t = threading.Thread(target=w.submit, args=([{"id": "c"}], [[0.0]]))
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # a third block waits for room instead of piling up in memory
    store.release.set()
    t.join(5)
    w.close()
    assert [r[0]["id"] for r in store.written] == ["a", "b", "c"] and w.rows_written == 3


def test_writer_error_is_raised_in_the_caller():
    class Broken:
        path = "broken-store"

        def write_block(self, *a, **k):
            raise ValueError("codec exploded")

    w = BlockWriter(Broken())
    w.submit([{"id": "a"}], [[0.0]])
    with pytest.raises(LitSahsError, match="codec exploded"):
        w.close()
