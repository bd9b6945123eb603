"""`python -m lit_sahs serve` as a client sees it: one server process for the module (packaged SmolLM2, a
detector fitted in memory and saved), spoken to with the official `openai` client and raw HTTP."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from lit_sahs.artifact import save_detector
from lit_sahs.detectors.guard import SafetyGuard
from lit_sahs.prompts import encode_prompts
from lit_sahs.screen import Screener
from lit_sahs.targets import prompting
from test_guard import FLAGS, HEADS, PROMPTS, fit_flagging_detector

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
SECRET = "zebra quartz lantern"  # a word run that must never reach the server's log
NEW_TOKENS = 12
BODY_LIMIT = 200_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def detector(smollm2):
    return fit_flagging_detector(smollm2, PROMPTS, FLAGS, HEADS)


@pytest.fixture(scope="module")
def server(detector, tmp_path_factory):
    """(base URL, log path): a server started on a free loopback port, always killed at the end."""
    tmp = tmp_path_factory.mktemp("serve")
    path = save_detector(detector, tmp / "det")
    port = free_port()
    log_path = tmp / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lit_sahs", "serve", "--detector", str(path), "--port", str(port),
           "--max_new_tokens", "32", "--max_batch_size", "8", "--batch_timeout", "0.05",
           "--max_body_bytes", str(BODY_LIMIT)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health in 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def raw(url: str, body: bytes, headers=None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_metadata_and_health(server, detector):
    url, _ = server
    meta = get(url + "/v1/metadata")
    assert meta["target"] == meta["model"] == "smollm2-135m-instruct"
    assert meta["family"] == "logistic" and meta["categories"] == ["unsafe"]
    assert meta["threshold"] == pytest.approx(float(detector.threshold))
    assert meta["fingerprint"]["weights_hash"] == detector.fingerprint.weights_hash
    assert get(url + "/health")["status"] == "ok"


def test_moderations_flag_as_the_detector_and_score_as_the_screener(client, smollm2, detector):
    res = client.moderations.create(input=PROMPTS, model="smollm2-135m-instruct")
    assert [r.flagged for r in res.results] == [bool(f) for f in FLAGS]
    served = np.array([r.category_scores.model_extra["unsafe"] for r in res.results])
    expected = Screener(smollm2, detector).score(PROMPTS).scores
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)
    assert [r.categories.model_extra["unsafe"] for r in res.results] == [bool(f) for f in FLAGS]
    one = client.moderations.create(input=PROMPTS[0])  # a single string, no model named
    assert len(one.results) == 1 and one.results[0].flagged


def test_concurrent_requests_are_batched_and_answered_alike(server, client):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: client.moderations.create(input=p).results[0].flagged, PROMPTS * 2))
    assert results == [bool(f) for f in FLAGS] * 2
    assert get(server[0] + "/health")["largest_batch"] > 1


def test_chat_refuses_the_flagged_and_answers_the_rest_as_the_guard(client, smollm2, detector):
    guard = SafetyGuard(smollm2, detector)
    bad = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=NEW_TOKENS,
                                         messages=[{"role": "user", "content": PROMPTS[0]}])
    assert bad.choices[0].message.content == guard.refusal and bad.choices[0].finish_reason == "content_filter"
    conv = [{"role": "system", "content": "You are a geography teacher. Answer in one sentence."},
            {"role": "user", "content": "Name a river in Europe."},
            {"role": "assistant", "content": "The Danube."},
            {"role": "user", "content": PROMPTS[1]}]
    good = client.chat.completions.create(model="smollm2-135m-instruct", messages=conv, max_tokens=NEW_TOKENS)
    own = guard.generate([conv], max_new_tokens=NEW_TOKENS)
    assert not own.flagged[0]
    assert good.choices[0].message.content == own.responses[0] and good.choices[0].message.content
    assert good.choices[0].finish_reason in ("stop", "length")
    assert good.usage.prompt_tokens == int(encode_prompts(smollm2, [conv])["attention_mask"].sum())


def test_a_conversation_renders_through_the_one_chat_template_path(smollm2):
    """A single user turn given as text or as a one-message conversation is the same prompt; a system
    prompt and earlier turns come before it, the assistant prefix last (the first-token position)."""
    text = PROMPTS[1]
    a = prompting.encode(smollm2, [text])
    b = prompting.encode(smollm2, [[{"role": "user", "content": text}]])
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": text}]
    ids = prompting.encode(smollm2, [conv, text])["input_ids"]
    rendered = smollm2.tokenizer.decode(ids[0])
    assert rendered.index("Be brief.") < rendered.index("Hello.") < rendered.index(text)
    assert rendered.endswith(prompting.render_prompt(smollm2.tokenizer, text)[-20:])
    with pytest.raises(Exception, match="last message must be the user"):
        prompting.encode(smollm2, [conv[:-1]])


def test_bad_requests_get_one_clear_4xx_and_the_server_keeps_serving(server, client):
    url, _ = server

    def still_serving():
        assert client.moderations.create(input=PROMPTS[1]).results[0].flagged is False

    status, body = raw(url + "/v1/moderations", b'{"input": ["unterminated')
    assert status == 400 and body["error"]["message"] == "the request body is not valid JSON"
    still_serving()
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.moderations.create(input="   ")
    still_serving()
    with pytest.raises(openai.BadRequestError, match="longer than the target's context"):
        client.moderations.create(input="word " * 9000)
    still_serving()
    with pytest.raises(openai.BadRequestError, match="longer than the target's context"):
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "word " * 9000}])
    still_serving()
    status, body = raw(url + "/v1/moderations", json.dumps({"input": "x" * (BODY_LIMIT + 10)}).encode())
    assert status == 413 and "larger than" in body["error"]["message"]
    still_serving()
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPTS[1]}])
    still_serving()
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[])
    still_serving()
    with pytest.raises(openai.BadRequestError, match="last message must be the user"):
        client.chat.completions.create(model="smollm2-135m-instruct",
                                       messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    still_serving()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=10_000,
                                       messages=[{"role": "user", "content": PROMPTS[1]}])
    still_serving()
    status, body = raw(url + "/v1/moderations", json.dumps({"input": [1, 2]}).encode())
    assert status == 400 and body["error"]["message"].startswith("input")
    still_serving()


def test_no_prompt_text_in_the_log(server, client):
    url, log_path = server
    client.moderations.create(input=f"Tell me about the {SECRET}")
    client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=2,
                                   messages=[{"role": "system", "content": SECRET}, {"role": "user", "content": SECRET}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "assistant", "content": SECRET}])
    log = log_path.read_text()
    assert "moderation: 1 input(s)" in log and "chat: 2 message(s)" in log  # the requests were logged ...
    assert SECRET not in log and "banana" not in log  # ... without their text


def test_the_service_nudges_answers_below_answer_below(smollm2, detector):
    """A served chat prompt scored below answer_below does not open with a refusal; metadata says the setting."""
    from lit_sahs.refusal import refusal_token_ids
    from lit_sahs.serving import GuardService

    conv = [{"role": "user", "content": "Tell me about yourself."}]  # SmolLM2's own answer opens with "I"
    plain = GuardService(detector, smollm2, threshold=1.0)  # this detector flags the prompt at its own 0.5
    nudged = GuardService(detector, smollm2, threshold=1.0, answer_below=1.0)
    assert plain.metadata()["answer_below"] is None and nudged.metadata()["answer_below"] == 1.0
    banned = set(refusal_token_ids(smollm2.tokenizer))
    answers = [svc.chat([conv], 6)[0] for svc in (plain, nudged)]
    assert not any(a["flagged"] for a in answers) and answers[0]["score"] < 1.0
    first = [smollm2.tokenizer.encode(a["content"], add_special_tokens=False)[0] for a in answers]
    assert first[0] in banned and first[1] not in banned


def test_the_service_ablates_the_refusal_direction_of_answered_prompts(smollm2, detector, tmp_path):
    """With a direction, the served answer keeps the nudged first token and decodes on ablated; metadata says
    which direction; a direction for another target is refused when the service starts."""
    from test_refusal_direction import residual_store, unit

    from lit_sahs.errors import LitSahsError
    from lit_sahs.refusal_direction import from_store
    from lit_sahs.serving import GuardService

    conv = [{"role": "user", "content": "Tell me about yourself."}]
    path = unit(smollm2, seed=2).save(tmp_path / "d.safetensors")
    nudged = GuardService(detector, smollm2, threshold=1.0, answer_below=1.0)
    ablated = GuardService(detector, smollm2, threshold=1.0, answer_below=1.0, answer_direction=str(path))
    assert ablated.metadata()["answer_direction"] == {"layer": 3, "rows": {"harmful": 1, "benign": 1}}
    assert nudged.metadata()["answer_direction"] is None
    a, b = (svc.chat([conv], 8)[0]["content"] for svc in (nudged, ablated))
    enc = lambda t: smollm2.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    assert enc(a)[0] == enc(b)[0]
    other = from_store(residual_store(tmp_path / "s")[0]).save(tmp_path / "other.safetensors")
    with pytest.raises(LitSahsError, match="made for target 'synthetic-target'"):
        GuardService(detector, smollm2, threshold=1.0, answer_below=1.0, answer_direction=str(other))


@pytest.mark.parametrize("args, message", [(["--threshold", "1.5"], "threshold must be a probability in [0, 1]"),
                                           (["--answer_below", "2"], "--answer_below must be a probability"),
                                           (["--answer_below", "off", "--answer_direction", "d.safetensors"],
                                            "turns the answer side off"),
                                           (["--max_batch_size", "0"], "max_batch_size must be >= 1")])
def test_bad_options_are_one_error_before_anything_loads(cli, args, message):
    code, _, err = cli(["serve", "--detector", "does/not/exist", *args])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and message in err
