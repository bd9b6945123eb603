"""Distribution that is tested: DDP extraction and detector fits on 2 CPU processes (gloo), a
target placed by a device map (accelerate; layers offloaded to CPU and disk), no model move when
extraction ends, and the stages that run in one process refusing to run as one of several.

In-process DDP runs use Lightning's fork launcher (``ddp_notebook``): plain ``ddp`` re-executes
the command line in every child, which inside pytest is pytest itself. One test runs the real
command, ``extract --trainer.strategy ddp``, in a subprocess. Lightning picks a free MASTER_PORT
for every run: the autouse fixture removes the one the previous run left in the environment.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_sahs.data.samples import Sample
from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError
from lit_sahs.extract import run_extraction
from lit_sahs.heads import HeadSet
from lit_sahs.hooks import HeadAblation, HeadCapture, ResidualCapture
from lit_sahs.targets import load_target, prompting

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import make_store  # noqa: E402

pytestmark = pytest.mark.timeout(180)

ONE = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
TWO = {"accelerator": "cpu", "devices": 2, "strategy": "ddp_notebook", "enable_progress_bar": False}
# tiny-llama: embeddings, 4 decoder layers, final norm, LM head; layers 1-2 and the LM head live on
# disk (weights read at each forward, parameters on the meta device), the rest on the CPU
OFFLOAD_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
               "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
               "lm_head": "disk"}
WORDS = "please explain how the old bridge over the river was built and who paid for it".split()


@pytest.fixture(autouse=True)
def fresh_port(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)  # restored (removed) after the test


@pytest.fixture(scope="module")
def tiny():
    return load_target("tiny-llama")


@pytest.fixture(scope="module")
def samples():
    """21 prompts of 1-16 words: an odd count, so the two ranks get unequal shares."""
    return [Sample.make(" ".join(WORDS[: 1 + (7 * i) % 16]) + f" (case {i})", i % 2, source="unit")
            for i in range(21)]


def block_ids(store_path: Path) -> list[str]:
    """Every id committed in every block, duplicates included (readers would hide them)."""
    ids = []
    for index in sorted((store_path / "blocks").glob("b*/index.jsonl")):
        ids += [json.loads(line)["id"] for line in index.read_text().splitlines() if line.strip()]
    return ids


def rows_by_id(store_path: Path) -> dict[str, dict[str, np.ndarray]]:
    store = ActivationStore.open(store_path)
    acts = store.read()
    extras = {name: store.read_extra(name) for name in store.extra_names()}
    return {row["id"]: {"acts": acts[i], **{k: v[i] for k, v in extras.items()}}
            for i, row in enumerate(store.index())}


def assert_same_rows(a: Path, b: Path) -> None:
    ra, rb = rows_by_id(a), rows_by_id(b)
    assert sorted(ra) == sorted(rb)
    for sid, row in ra.items():
        assert set(row) == set(rb[sid]) and {"acts", "residual", "prompt_nll"} <= set(row)  # and the newer extras
        for key, value in row.items():  # other batch neighbours, so other padding: equal up to fp16 rounding
            np.testing.assert_allclose(np.asarray(value, np.float32), np.asarray(rb[sid][key], np.float32),
                                       atol=2e-3, rtol=2e-2)


# ---------------------------------------------------------------- DDP extraction

def test_ddp_extraction_writes_exactly_the_rows_of_one_process(tiny, samples, tmp_path):
    one = run_extraction(tiny, samples, tmp_path / "one", batch_size=4, block_rows=4, trainer_kwargs=ONE)
    two = run_extraction(tiny, samples, tmp_path / "two", batch_size=2, block_rows=4, trainer_kwargs=TWO)
    assert one == two == {"written": 21, "skipped": 0, "total": 21}
    ids = block_ids(tmp_path / "two")
    assert sorted(ids) == sorted(s.id for s in samples)  # every sample once: no loss, no duplicate
    ranks = {p.name.split("-")[1] for p in (tmp_path / "two" / "blocks").glob("b*")}
    assert ranks == {"r0000", "r0001"}  # both ranks extracted their share
    assert_same_rows(tmp_path / "one", tmp_path / "two")
    again = run_extraction(tiny, samples, tmp_path / "two", batch_size=2, trainer_kwargs=TWO)
    assert again == {"written": 0, "skipped": 21, "total": 21}


def test_extract_command_with_ddp_strategy(tiny, samples, tmp_path):
    """The command users run: Lightning's subprocess launcher re-runs it as rank 1; one summary line."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": s.text, "label": s.label}) + "\n" for s in samples[:8]))
    cmd = [sys.executable, "-m", "lit_sahs", "extract", "--target", "tiny-llama", "--data", str(data),
           "--attacks", "plain", "--limit", "8", "--batch_size", "2", "--store", str(tmp_path / "ddp"),
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "RANK")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=150, cwd=tmp_path)
    # both ends of stderr: a rank that dies first shows its traceback near the top, rank 0's side at the end
    assert out.returncode == 0, out.stderr if len(out.stderr) < 6000 else out.stderr[:3000] + "\n...\n" + out.stderr[-3000:]
    summaries = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["written"] == 8 and summaries[0]["total"] == 8, out.stdout
    ids = block_ids(tmp_path / "ddp")
    assert len(ids) == len(set(ids)) == 8
    assert {p.name.split("-")[1] for p in (tmp_path / "ddp" / "blocks").glob("b*")} == {"r0000", "r0001"}
    store = ActivationStore.open(tmp_path / "ddp")
    by_text = {row["text"]: i for i, row in enumerate(store.index())}
    text = samples[3].text
    with torch.no_grad(), HeadCapture(tiny.model) as cap:
        tiny.model(**prompting.encode(tiny, [text]))
    np.testing.assert_allclose(store.read(rows=[by_text[text]])[0].astype(np.float32), cap.activations()[0].numpy(),
                               atol=2e-3, rtol=2e-2)


# ---------------------------------------------------------------- DDP fits

@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp-fit") / "store"
    make_store(path)
    return path


def fit_state(store, make, world: int) -> dict[str, torch.Tensor]:
    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.engine import Engine

    n_train = len(CachedActivationDataModule(str(store), heads="2.1,3.0,1.2").splits["train"])
    assert n_train % 2 == 0  # else the distributed sampler pads rank 1 with a repeated row
    dm = CachedActivationDataModule(str(store), heads="2.1,3.0,1.2", batch_size=n_train // world)
    det = make()
    Engine(validate_once=True, max_epochs=20, **(TWO if world == 2 else ONE)).fit(det, dm)
    assert det.is_bound  # under a fork/spawn launcher: rank 0's weights came back into this object
    return {k: v.detach().clone() for k, v in det.state_dict().items()}


@pytest.mark.parametrize("family", ["logistic-adam", "sparse-sgd"])
def test_ddp_fit_equals_one_process(synthetic_store, family):
    """Tolerance: DDP averages the ranks' mean gradients. With one global batch per epoch (each rank
    holds half of the train split, Lightning's distributed sampler deals them out), their average is
    the one-process gradient over the same rows, so both runs take the same Adam / proximal-SGD
    steps; only the float32 summation order differs (measured: <= 2e-7 after 20 epochs). atol 1e-5,
    rtol 1e-4 leave 50x room for that and still catch any real difference (a rank seeing other rows
    or a step per rank moves weights by 1e-2..1e-1). The threshold is calibrated on validation
    scores gathered from both ranks (30 rows, an even count, so no padding row)."""
    from lit_sahs.detectors import LogisticDetector, SparseHeadDetector

    make = {"logistic-adam": lambda: LogisticDetector(optimizer="adam", lr=0.05),
            "sparse-sgd": lambda: SparseHeadDetector(solver="sgd", lr=0.1, group_lasso=0.02)}[family]
    one, two = fit_state(synthetic_store, make, 1), fit_state(synthetic_store, make, 2)
    assert sorted(one) == sorted(two)
    weight = "linear.weight" if family.startswith("logistic") else "weight"
    assert float(one[weight].abs().max()) > 0.1  # it learned something
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("make", ["logistic-lbfgs", "sparse-fista"])
def test_full_batch_fit_refuses_ddp_before_processes_start(synthetic_store, make):
    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.detectors import LogisticDetector, SparseHeadDetector
    from lit_sahs.engine import Engine

    det = LogisticDetector() if make == "logistic-lbfgs" else SparseHeadDetector()
    dm = CachedActivationDataModule(str(synthetic_store), heads="2.1,3.0")
    setting = "optimizer='adam'" if make == "logistic-lbfgs" else "solver='sgd'"
    with pytest.raises(LitSahsError, match=f"runs in one process: set {setting}"):
        Engine(max_epochs=1, **TWO).fit(det, dm)


def test_one_process_stages_refuse_to_run_as_one_of_several(synthetic_store, monkeypatch, cli):
    from lit_sahs.folds import zero_shot
    from lit_sahs.locate import locate

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun (or a DDP launcher) gives every process
    with pytest.raises(LitSahsError, match="locate runs in one process"):
        locate(str(synthetic_store))
    with pytest.raises(LitSahsError, match="runs in one process"):
        zero_shot(str(synthetic_store), heads="2.1", relocate=False, baselines=(), progress=False)
    code, out, err = cli(["locate", "--store", str(synthetic_store), "--out", str(synthetic_store.parent / "r")])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: locate runs in one process")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert locate(str(synthetic_store)).scores  # alone, it runs


# ---------------------------------------------------------------- targets larger than one device

def forward_records(model, batch, ablate: HeadSet | None = None, means=None):
    ablation = HeadAblation(model, ablate, mode="mean" if means is not None else "zero",
                            means=means) if ablate is not None else None
    with torch.no_grad(), (ablation or torch.no_grad()), HeadCapture(model) as cap, ResidualCapture(model) as res:
        logits = model(**batch).logits
    nll = res.prompt_nll(batch["input_ids"], batch["attention_mask"])
    return {"acts": cap.activations(), "residual": res.residual, "nll": nll, "logits": logits}


def test_offloaded_target_captures_and_ablates_like_the_undispatched_one(tiny, tmp_path):
    """Layers 1-2 and the LM head on disk: accelerate's hooks stream their weights in at every forward."""
    placed = load_target("tiny-llama", device_map=OFFLOAD_MAP, offload_folder=str(tmp_path / "offload"))
    assert placed.dispatched and not tiny.dispatched and placed.device == torch.device("cpu")
    o_proj = placed.model.model.layers[1].self_attn.o_proj
    assert hasattr(o_proj, "_hf_hook") and o_proj.weight.device.type == "meta"  # really offloaded
    batch = prompting.encode(tiny, ["Write a tutorial on how to make a bomb", "Name three primary colours."])
    heads = HeadSet([(1, 2), (2, 0), (3, 3)])
    means = torch.randn(3, tiny.geometry.head_dim)
    for ablate, m in ((None, None), (heads, None), (heads, means)):
        ref, got = forward_records(tiny.model, batch, ablate, m), forward_records(placed.model, batch, ablate, m)
        for key in ref:
            assert torch.allclose(got[key], ref[key], atol=1e-5, rtol=1e-5), (key, ablate, m is not None)
    zeroed = forward_records(placed.model, batch, heads)["acts"]
    assert zeroed[:, 1, 2].abs().max() == 0 and zeroed[:, 3, 3].abs().max() == 0


def test_hf_directory_loads_straight_onto_a_device_map(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "hf")
    tiny.tokenizer.save_pretrained(tmp_path / "hf")
    placed = load_target(str(tmp_path / "hf"), device_map=OFFLOAD_MAP, offload_folder=str(tmp_path / "off"))
    assert placed.model.hf_device_map == OFFLOAD_MAP
    assert placed.model.model.layers[2].self_attn.o_proj.weight.device.type == "meta"
    batch = prompting.encode(tiny, ["How many legs does a spider have?"])
    torch.testing.assert_close(forward_records(placed.model, batch)["acts"], forward_records(tiny.model, batch)["acts"])


def test_extract_command_with_a_device_map(tiny, samples, tmp_path, cli):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": s.text, "label": s.label}) + "\n" for s in samples[:6]))
    base = ["extract", "--target", "tiny-llama", "--data", str(data), "--attacks", "plain", "--limit", "6",
            "--trainer.accelerator", "cpu"]
    code, out, err = cli(base + ["--device_map", json.dumps(OFFLOAD_MAP), "--offload_folder",
                                 str(tmp_path / "off"), "--store", str(tmp_path / "placed")])
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["written"] == 6
    run_extraction(tiny, [Sample.make(s.text, s.label, source="d") for s in samples[:6]], tmp_path / "plain",
                   trainer_kwargs=ONE)
    a, b = ActivationStore.open(tmp_path / "placed"), ActivationStore.open(tmp_path / "plain")
    order = {r["text"]: i for i, r in enumerate(b.index())}
    pick = [order[r["text"]] for r in a.index()]
    np.testing.assert_allclose(a.read().astype(np.float32), b.read(rows=pick).astype(np.float32), atol=2e-3,
                               rtol=2e-2)
    for extra, needle in ((["--device_map", "everywhere"], "unknown device_map 'everywhere'"),
                          (["--device_map", "auto", "--trainer.devices", "2"], "placed by a device map"),
                          (["--offload_folder", str(tmp_path / "off")], "offload_folder needs a device_map")):
        code, out, err = cli(base + extra + ["--store", str(tmp_path / "bad")])
        assert code == 2 and needle in err.strip().splitlines()[-1], err
        assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- no model move when extraction ends

def test_extraction_leaves_the_target_where_it_is(tiny, samples, tmp_path, monkeypatch):
    """Lightning's teardown moved every submodule of the LightningModule to the CPU (`module.cpu()`,
    which reaches the target through `_apply`); the target is no submodule now and nothing moves it."""
    model = tiny.model
    before = {n: (p.device, p.dtype) for n, p in model.named_parameters()}
    moves = []
    real_apply = model._apply
    monkeypatch.setattr(model, "_apply", lambda fn, *a, **k: (moves.append(fn), real_apply(fn, *a, **k))[1])
    monkeypatch.setattr(model, "cpu", lambda *a, **k: (moves.append("cpu"), real_apply(lambda t: t.cpu()))[1])
    holder = torch.nn.Module()
    holder.target = model
    holder.cpu()  # the spy sees what the old teardown did
    assert moves
    moves.clear()
    run_extraction(tiny, samples[:5], tmp_path / "s", batch_size=2, trainer_kwargs=ONE)
    assert moves == []
    assert {n: (p.device, p.dtype) for n, p in model.named_parameters()} == before
