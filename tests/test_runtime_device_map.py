"""guard and screen with --device_map: a tiny target dispatched with layers offloaded to disk gives the
same scores and flags as the undispatched target."""
import json

import pytest

from lit_sahs.artifact import save_detector
from lit_sahs.heads import HeadSet
from test_distributed import OFFLOAD_MAP
from test_guard import FLAGS, PROMPTS, fit_flagging_detector

HEADS = HeadSet([(1, 2), (2, 0), (3, 1)])  # layers 1 and 2 live on "disk" in OFFLOAD_MAP


@pytest.fixture(scope="module")
def tiny():
    from lit_sahs.targets import load_target

    return load_target("tiny-llama")


@pytest.fixture(scope="module")
def detector_dir(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("det") / "detector"
    save_detector(fit_flagging_detector(tiny, PROMPTS, FLAGS, HEADS), d)
    return d


def _lines(out):
    return [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("command,extra", [("screen", []), ("guard", ["--max_new_tokens", "3"])])
def test_device_map_gives_the_same_flags(cli, detector_dir, tmp_path, command, extra):
    base = [command, "--detector", str(detector_dir), "--target", "tiny-llama", "--batch_size", "3"] + extra
    for p in PROMPTS:
        base += ["--prompt", p]
    code, plain, err = cli(base)
    assert code == 0, err
    code, placed, err = cli(base + ["--device_map", json.dumps(OFFLOAD_MAP),
                                    "--offload_folder", str(tmp_path / "offload")])
    assert code == 0, err
    a, b = _lines(plain), _lines(placed)
    rows_a = [r for r in a if "id" in r]
    rows_b = [r for r in b if "id" in r]
    assert len(rows_a) == len(PROMPTS) and [r["id"] for r in rows_a] == [r["id"] for r in rows_b]
    assert [r["flagged"] for r in rows_a] == [r["flagged"] for r in rows_b]
    for x, y in zip(rows_a, rows_b):
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)
    if command == "guard":
        assert [r["response"] for r in rows_a] == [r["response"] for r in rows_b]


def test_offload_folder_without_device_map_is_refused(cli, detector_dir, tmp_path):
    code, _, err = cli(["screen", "--detector", str(detector_dir), "--target", "tiny-llama", "--prompt", "hi",
                        "--offload_folder", str(tmp_path / "off")])
    assert code == 2 and "offload_folder needs a device_map" in err
