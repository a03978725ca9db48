"""judge.py against a real chat-completions server on 127.0.0.1 (faults injected), the
cache across SIGINT/SIGKILL, the relabel rule, and the local expected-score judge."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from helpers import REPO, STORIES, run_cli
from minispin.run.data import read_jsonl
from minispin.study.fixes import margin_histogram
from minispin.study.judge import LocalJudge, OpenAIJudge, ScoreCache, item_key, judge_pairs, parse_score, relabel

KEY = "sk-proj-Vb3Kq8ZmT1xR7nW4cY9pL2hG6dF0sJ5a"  # random-looking: no 4-character piece of it is in our own output
REFUSAL = "I cannot grade this, sorry."


# ---------------------------------------------------------------- the fake server
def answer_of(user_content):
    m = re.search(r"Answer:\n(.*)\n\nRate the answer", user_content, re.S)
    return m.group(1) if m else None


def true_score(answer):
    m = re.search(r"\[\[score=(\d+)\]\]", answer)
    if m:
        return int(m.group(1))
    return int(hashlib.sha256(answer.encode()).hexdigest(), 16) % 101


class FakeChat:
    """Chat-completions on an ephemeral port. Counts requests per answer text and per
    phase. Markers in an answer inject faults on its FIRST request ([[fault=500]],
    [[fault=429]], [[fault=slow]], [[fault=badjson]]) or on every one ([[fault=garbage]]).

    A gate can hold the replies: after `allow(n)` the next n requests are answered and
    the later ones wait (counted in `held`) until the test allows more or `open_gate()`s,
    so a test can stop a client at an exact point instead of racing it."""

    def __init__(self, delay=0.0, slow_s=3.0):
        self.delay, self.slow_s = delay, slow_s
        self.lock = threading.Lock()
        self.gate = threading.Condition(self.lock)
        self.allowed = None  # replies the gate lets through in all; None: every one
        self.passed = self.held = 0
        self.phase = 1
        self.log = []  # (phase, time, answer, outcome)
        self.auth_seen = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, code, body: bytes, headers=()):
                try:
                    self.send_response(code)
                    for k, v in headers:
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                auth = self.headers.get("Authorization", "")
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "no such route"}')
                if auth != "Bearer " + KEY:
                    return self._send(401, b'{"error": "bad key"}')
                req = json.loads(raw)
                user = [m for m in req["messages"] if m["role"] == "user"][-1]["content"]
                ans = answer_of(user)
                with server.lock:
                    n = sum(1 for r in server.log if r[2] == ans)
                    outcome = "ok"
                    if "[[fault=garbage]]" in ans:
                        outcome = "garbage"
                    elif n == 0:
                        for f in ("500", "429", "slow", "badjson"):
                            if f"[[fault={f}]]" in ans:
                                outcome = f
                    server.log.append((server.phase, time.time(), ans, outcome))
                    server.held += 1
                    server.gate.notify_all()
                    server.gate.wait_for(lambda: server.allowed is None or server.passed < server.allowed)
                    server.held -= 1
                    server.passed += 1
                if server.delay:
                    time.sleep(server.delay)
                if outcome == "500":  # a careless server that echoes the credentials
                    return self._send(500, json.dumps({"error": f"upstream broke; auth was {auth}"}).encode())
                if outcome == "429":
                    return self._send(429, b'{"error": "rate limited"}', [("Retry-After", "1")])
                if outcome == "slow":
                    time.sleep(server.slow_s)
                if outcome == "badjson":
                    return self._send(200, b"<html>proxy hiccup</html>")
                s = true_score(ans)
                content = REFUSAL if outcome == "garbage" else [f"{s}", f"Score: {s}", f"{s}/100", f" **{s}**\n"][s % 4]
                body = {"id": "x", "object": "chat.completion", "model": req["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}]}
                return self._send(200, json.dumps(body).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def allow(self, n):
        """Let n more replies through the gate; later requests are held."""
        with self.gate:
            self.allowed = self.passed + n
            self.gate.notify_all()

    def open_gate(self):
        with self.gate:
            self.allowed = None
            self.gate.notify_all()

    def gate_state(self):
        with self.lock:
            return self.passed, self.held

    def counts(self, phase=None):
        with self.lock:
            return Counter(r[2] for r in self.log if phase is None or r[0] == phase)

    def times(self, ans):
        with self.lock:
            return [r[1] for r in self.log if r[2] == ans]

    def close(self):
        self.open_gate()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeChat()
    yield s
    s.close()


def make_pairs(n, faults=()):
    pairs = []
    for i in range(n):
        pairs.append({"id": f"p{i}", "prompt": [{"role": "user", "content": f"Question number {i}: what is {i}+{i}?"}],
                      "real": f"The answer is {2 * i}. (real {i})", "generated": f"I think it is {2 * i + 1}. (gen {i})",
                      "gen": {"seed": i}})
    for i, (side, marker) in enumerate(faults):
        pairs[i][side] += " " + marker
    return pairs


def assert_no_key(*texts):
    for t in texts:  # not the key, nor any 4-character piece of it
        assert [KEY[i:i + 4] for i in range(len(KEY) - 3) if KEY[i:i + 4] in t] == []


def tree_text(root):
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), errors="replace") as fh:
                out.append(fh.read())
    return "\n".join(out)


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    # a proxy set on the CI machine must not carry these 127.0.0.1 requests away (the
    # CLI's subprocess inherits the environment)
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


# ---------------------------------------------------------------- parsing and the rule
@pytest.mark.parametrize("reply,score", [
    ("85", 85), (" 85.\n", 85), ("Score: 85", 85), ("85/100", 85), ("**85**", 85), ("85.0", 85),
    ("0", 0), ("100", 100), ("The score is 70.", 70),
    ("", None), (None, None), (REFUSAL, None), ("70 or 80", None), ("101", None), ("-3", None),
    ("85.5", None), ("I would say that this answer deserves about 85 because it is good", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_swap_rule_exact_at_threshold():
    def p(r, g):
        return {"id": f"{r}-{g}", "scores": {"real": r, "generated": g}}
    pairs = [p(50, 55), p(50, 54), p(50, 50), p(50, 49), p(0, 100), {"id": "u", "scores": {"real": None, "generated": 9}}]
    out, s = relabel(pairs, threshold=5)
    assert [q["swap"] for q in out] == [True, False, False, False, True, False]
    assert [q["margin"] for q in out] == [5, 4, 0, -1, 100, None]
    assert (s["judged"], s["swapped"], s["unscored"]) == (5, 2, 1)
    out0, s0 = relabel(pairs, threshold=0)
    assert [q["swap"] for q in out0] == [True, True, True, False, True, False]
    # an unscored pair is never swapped (fixes.py: a missing score is not evidence)
    out2, _ = relabel([{"id": "x", "scores": {"real": 3, "generated": None}, "swap": True}], 5)
    assert out2[0]["swap"] is False and out2[0]["margin"] is None
    assert "margin" not in pairs[0]  # pure


def test_margin_histogram_bins():
    h = margin_histogram([-100, -91, -90, -1, 0, 9, 10, 99, 100])
    assert len(h) == 20 and sum(h.values()) == 9
    assert h["-100..-91"] == 2 and h["-90..-81"] == 1 and h["-10..-1"] == 1
    assert h["0..9"] == 2 and h["10..19"] == 1 and h["90..100"] == 2


# ---------------------------------------------------------------- HTTP client + faults
def test_http_judge_with_faults(server, tmp_path):
    faults = [("real", "[[fault=500]]"), ("generated", "[[fault=429]]"), ("real", "[[fault=slow]]"),
              ("generated", "[[fault=garbage]]"), ("real", "[[fault=badjson]]"),
              ("real", "[[score=50]]"), ("real", "[[score=50]]")]
    pairs = make_pairs(14, faults)
    pairs[5]["generated"] += " [[score=55]]"   # margin 5: swaps at threshold 5
    pairs[6]["generated"] += " [[score=54]]"   # margin 4: does not
    pairs[13] = dict(pairs[12], id="dup")       # same texts as p12: one request per text
    logs = []
    judge = OpenAIJudge(base_url=server.url, api_key=KEY, timeout=1.0, max_retries=4, concurrency=4)
    cache_path = str(tmp_path / "cache.jsonl")
    cache = ScoreCache(cache_path)
    out, s = judge_pairs(pairs, judge, cache, threshold=5, log=logs.append)
    cache.close()

    # every pair judged, counted unparsable, or failed (the 2xx body that was no chat
    # completion: the client does not ask again, and it is not cached); none lost or duplicated
    assert [p["id"] for p in out] == [p["id"] for p in pairs]
    assert s["pairs"] == 14 and s["failed"] == 1 and s["unparsable"] == 1
    assert s["judged"] + s["unparsable"] + s["failed"] == 14
    for p in out:
        for side in ("real", "generated"):
            expect = None if "[[fault=garbage]]" in p[side] or "[[fault=badjson]]" in p[side] else true_score(p[side])
            assert p["scores"][side] == expect
    assert out[3]["margin"] is None and out[3]["swap"] is False
    assert out[4]["margin"] is None and out[4]["swap"] is False
    assert out[5]["margin"] == 5 and out[5]["swap"] is True
    assert out[6]["margin"] == 4 and out[6]["swap"] is False
    assert s["swapped"] == sum(p["swap"] for p in out)

    # the server: a transient fault costs exactly one extra request; garbage is a reply
    counts = server.counts()
    answers = {p[side] for p in pairs for side in ("real", "generated")}
    assert set(counts) == answers and len(answers) == 26
    for ans, n in counts.items():
        transient = any(f"[[fault={f}]]" in ans for f in ("500", "429", "slow"))
        assert n == (2 if transient else 1), ans
    t429 = server.times(pairs[1]["generated"])
    assert t429[1] - t429[0] >= 0.95  # Retry-After: 1 honoured (the client's first backoff is at most 0.5 s)

    # the cache: one record per distinct answer scored, unparsable recorded with its reply
    recs = read_jsonl(cache_path)
    assert len(recs) == 25 and len({r["key"] for r in recs}) == 25
    bad = [r for r in recs if r["score"] is None]
    assert len(bad) == 1 and bad[0]["reply"] == REFUSAL

    # the key: the 500 body echoed it, yet it is in no log line, record or repr
    assert_no_key("\n".join(logs), open(cache_path).read(), json.dumps(out), json.dumps(s),
                  repr(judge), repr(vars(judge)))

    # a re-run asks only for the failed item; the next pays for nothing; --retry-unparsable
    # re-asks only the garbage item
    before = sum(server.counts().values())
    cache = ScoreCache(cache_path)
    out2, s2 = judge_pairs(pairs, judge, cache, threshold=5, log=logs.append)
    assert sum(server.counts().values()) == before + 1 and s2["items_cached_before"] == 25
    assert s2["failed"] == 0 and out2[4]["scores"]["real"] == true_score(pairs[4]["real"])
    assert [q for i, q in enumerate(out2) if i != 4] == [q for i, q in enumerate(out) if i != 4]
    out3, s3 = judge_pairs(pairs, judge, cache, threshold=5, log=logs.append)
    assert sum(server.counts().values()) == before + 1 and s3["items_cached_before"] == 26
    assert out3 == out2
    judge_pairs(pairs, judge, cache, threshold=5, retry_unparsable=True, log=logs.append)
    cache.close()
    assert sum(server.counts().values()) == before + 2


def test_http_judge_gives_up_and_reports(tmp_path):
    # nothing listens on this port: every attempt fails, the pair keeps its label, the run
    # says so, and nothing is cached (a re-run retries)
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    judge = OpenAIJudge(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, timeout=0.5, max_retries=1,
                        concurrency=2)
    cache = ScoreCache(str(tmp_path / "c.jsonl"))
    pairs = make_pairs(2)
    pairs[1]["swap"] = True
    out, s = judge_pairs(pairs, judge, cache, log=lambda m: None)
    assert s["failed"] == 2 and s["judged"] == 0 and s["items_failed"] == 4 and len(cache) == 0
    assert [p["swap"] for p in out] == [False, False]  # unscored: never swapped


def test_wrong_key_stops_the_run(server, tmp_path):
    from minispin.study.judge import JudgeError
    judge = OpenAIJudge(base_url=server.url, api_key="sk-wrong-key-123456", timeout=2)
    with pytest.raises(JudgeError) as e:
        judge_pairs(make_pairs(3), judge, ScoreCache(str(tmp_path / "c.jsonl")), log=lambda m: None)
    assert "401" in str(e.value) and "sk-wrong-key-123456" not in str(e.value)


@pytest.mark.slow
def test_ctrl_c_taken_by_a_worker_thread_still_stops_the_judge(tmp_path):
    """The kernel may deliver SIGINT to any thread of the process. Delivered to a judge
    worker (pthread_kill makes that happen here on purpose), it must still stop the run at
    once — no new requests, "stopping" said — not when the requests in flight return: the
    main thread waits in short slices."""
    release, waiting = threading.Event(), threading.Semaphore(0)
    said, workers = [], []

    class Held:  # a backend whose requests return only when the test releases them
        judge_id, concurrency = "held", 2

        def score(self, prompt, answer, stop=None):
            # the worker of THIS run (not another "judge*" thread an earlier test left
            # behind), with SIGINT deliverable to it whatever mask the suite inherited;
            # the mask it had is kept for the failure message
            old_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            workers.append((threading.get_ident(), sorted(old_mask)))
            waiting.release()
            release.wait(30)
            return {"score": 50, "reply": "50"}

    def interrupt_a_worker():
        for _ in range(2):
            assert waiting.acquire(timeout=30)
        said.append((time.time(), "sent"))
        signal.pthread_kill(workers[0][0], signal.SIGINT)
        time.sleep(5)           # the two requests in flight return only after this
        release.set()

    helper = threading.Thread(target=interrupt_a_worker)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            judge_pairs(make_pairs(4), Held(), ScoreCache(str(tmp_path / "c.jsonl")),
                        log=lambda m: said.append((time.time(), m)))
            pytest.fail(f"no KeyboardInterrupt: SIGINT handler {signal.getsignal(signal.SIGINT)!r}, "
                        f"main thread's mask {sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))}, "
                        f"workers (ident, mask before) {workers}, said {said}")
    finally:
        release.set()
        helper.join()
    sent = next(t for t, m in said if m == "sent")
    stopping = [t for t, m in said if "stopping" in m]
    assert stopping and stopping[0] - sent < 2, said
    assert waiting.acquire(timeout=0) is False   # no third request was started


def test_ctrl_c_while_requests_are_still_being_submitted_says_stopping(tmp_path):
    """Ctrl-C the moment the first request starts, while the main thread may still be handing
    out the rest: the run stops with "stopping" said (the requests in flight were counted), and
    the queued ones are never sent."""
    release, said, started = threading.Event(), [], []

    class Held:
        judge_id, concurrency = "held", 2

        def score(self, prompt, answer, stop=None):
            started.append(answer)
            if len(started) == 1:
                os.kill(os.getpid(), signal.SIGINT)
            release.wait(30)
            return {"score": 50, "reply": "50"}

    releaser = threading.Timer(3, release.set)
    releaser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            judge_pairs(make_pairs(100), Held(), ScoreCache(str(tmp_path / "c.jsonl")),
                        log=lambda m: said.append(m))
    finally:
        release.set()
        releaser.cancel()
    assert any("stopping" in m for m in said), said
    assert len(started) <= 2, len(started)


# ---------------------------------------------------------------- the CLI, killed midway
class CLIRun:
    """judge.py in a subprocess, its stdout and stderr collected line by line as they come."""

    def __init__(self, run_dir, url):
        env = dict(os.environ, OPENAI_API_KEY=KEY, OPENAI_BASE_URL=url, PYTHONUNBUFFERED="1")
        # --backend openai: the tiny recipe's own judge_backend is "local". --timeout 60: a
        # reply the test's gate holds must not time out and be asked again
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "judge.py"), "--iter", "0", "--run-dir", str(run_dir),
             "--backend", "openai", "--concurrency", "2", "--timeout", "60"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out, self.err = [], []
        self.pumps = [threading.Thread(target=lambda f=f, sink=sink: sink.extend(f), daemon=True)
                      for f, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.pumps:
            t.start()

    def wait_until(self, condition, what, limit=120):
        t0 = time.time()
        while not condition():
            if self.proc.poll() is not None:
                self.finish()
                raise AssertionError(f"judge.py exited ({self.proc.returncode}) before {what}: {''.join(self.err)}")
            assert time.time() - t0 < limit, f"judge.py: no {what} within {limit} s"
            time.sleep(0.02)

    def finish(self, timeout=120):
        self.proc.wait(timeout=timeout)
        for t in self.pumps:
            t.join(timeout=10)
        return "".join(self.out), "".join(self.err)


@pytest.mark.slow
def test_cli_sigint_sigkill_resume_pays_twice_at_most_the_requests_in_flight(tmp_path):
    # The server's gate makes every step deterministic: the judge is stopped exactly when
    # it has been answered a given number of times and both its workers wait on a reply.
    server = FakeChat()
    try:
        run_dir = tmp_path / "run"
        pairs = make_pairs(24, [("real", "[[fault=500]]"), ("generated", "[[fault=garbage]]")])
        os.makedirs(run_dir / "iter0")
        with open(run_dir / "iter0" / "pairs.jsonl", "w") as f:
            for p in pairs:
                f.write(json.dumps(p) + "\n")
        cache_path = str(run_dir / "judge_cache.jsonl")
        key_to_answer = {item_key(f"openai:gpt-4o-mini@{server.url}", p["prompt"][0]["content"], p[s]): p[s]
                         for p in pairs for s in ("real", "generated")}
        outputs = []

        def cached_answers():
            return {key_to_answer[r["key"]] for r in read_jsonl(cache_path)}

        # phase 1: Ctrl-C with two requests in flight -> clean exit 130, both finish and are cached
        server.allow(6)
        run = CLIRun(run_dir, server.url)
        run.wait_until(lambda: server.gate_state() == (6, 2), "6 replies and both workers waiting")
        run.proc.send_signal(signal.SIGINT)
        run.wait_until(lambda: "stopping" in "".join(run.err), "'stopping' after SIGINT")
        server.allow(2)  # the judge has stopped starting requests: release the two in flight
        out, err = run.finish()
        outputs += [out, err]
        assert run.proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        assert server.gate_state() == (8, 0)  # nothing was asked after Ctrl-C
        after1 = cached_answers()
        assert len(after1) == 7  # 8 replies, one of them the [[fault=500]] item's first
        # every reply the server sent in phase 1 ended in the cache (in-flight ones included)
        with server.lock:
            answered = {r[2] for r in server.log if r[0] == 1 and r[3] in ("ok", "garbage")}
        assert answered == after1

        # phase 2: SIGKILL with two requests in flight (no chance to clean up)
        server.phase = 2
        server.allow(6)
        run = CLIRun(run_dir, server.url)
        run.wait_until(lambda: server.gate_state() == (14, 2), "6 more replies and both workers waiting")
        run.proc.kill()
        out, err = run.finish()
        outputs += [out, err]
        assert run.proc.returncode == -signal.SIGKILL
        phase2 = server.counts(2)
        assert not (set(phase2) & after1), "re-requested an item cached before phase 2"
        after2 = cached_answers()
        assert len(after2) == 13

        # phase 3: to the end
        server.phase = 3
        server.open_gate()
        run = CLIRun(run_dir, server.url)
        out, err = run.finish()
        outputs += [out, err]
        assert run.proc.returncode == 0, err
        phase3 = server.counts(3)
        assert not (set(phase3) & after2), "re-requested an item cached before phase 3"
        # what the SIGKILL cost twice: the requests in flight at the kill, at most the concurrency (2)
        assert 0 < len(set(phase3) & set(phase2)) <= 2
        assert set(phase3) | after2 == set(key_to_answer.values())

        # every pair judged or counted unparsable, once, in order
        judged = read_jsonl(str(run_dir / "iter0" / "judged.jsonl"))
        assert [p["id"] for p in judged] == [p["id"] for p in pairs]
        summary = json.load(open(run_dir / "iter0" / "judge_summary.json"))
        assert summary["judged"] == 23 and summary["unparsable"] == 1 and summary["failed"] == 0
        assert summary["swapped"] == sum(p["swap"] for p in judged)
        recs = read_jsonl(cache_path)
        assert len({r["key"] for r in recs}) == len(recs) == 48  # nothing scored twice
        assert "judged 23" in outputs[-2] and "margin histogram" in outputs[-2]
        # the key: not in any output or file
        assert_no_key(*outputs, tree_text(run_dir))
    finally:
        server.close()


# ---------------------------------------------------------------- the local judge
def test_local_judge_stories260k_deterministic(tmp_path):
    j = LocalJudge(STORIES)
    q, a = "Tom has 3 apples and eats one. How many are left?", "Tom has 2 apples left."
    r1 = j.score(q, a)
    r2 = j.score(q, a)
    assert isinstance(r1["score"], int) and 0 <= r1["score"] <= 100
    assert r1 == r2
    assert LocalJudge(STORIES).score(q, a) == r1  # a fresh load: the same score
    assert r1["score"] == round(r1["expected"]) or abs(r1["score"] - r1["expected"]) == 0.5

    # the KV-cache shortcut equals scoring each candidate with a plain full forward
    ids, _ = j.prompt_ids(q, a)
    lp = j.candidate_logps(ids)
    for n in (0, 7, 42, 100):
        cand = j.cands[n, :int(j.cand_len[n])].tolist()
        x = torch.tensor([ids + cand])
        with torch.no_grad():
            logp = j.model(x)[0].float().log_softmax(-1)
        ref = sum(float(logp[len(ids) - 1 + i, c]) for i, c in enumerate(cand))
        assert abs(float(lp[n]) - ref) < 1e-3

    # a prompt longer than the context is cut from the left and still scored
    long = j.score(q, "and then " * 400)
    assert long.get("truncated") and 0 <= long["score"] <= 100

    # through judge_pairs + cache: the second pass computes nothing
    cache = ScoreCache(str(tmp_path / "c.jsonl"))
    pairs = make_pairs(2)
    out, s = judge_pairs(pairs, j, cache, log=lambda m: None)
    n_req = j.requests
    out2, s2 = judge_pairs(pairs, j, cache, log=lambda m: None)
    assert j.requests == n_req and out2 == out and s["judged"] == 2


def test_cli_local_backend_writes_judged_and_summary(tmp_path, capsys):
    class cli:  # the judge.py command, run in this process
        main = staticmethod(lambda args: run_cli("judge.py", *args))
    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "iter1")
    pairs = make_pairs(3)
    with open(run_dir / "iter1" / "pairs.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    rc = cli.main(["--iter", "1", "--run-dir", str(run_dir), "--backend", "local", "--judge-model", STORIES,
                   "--threshold", "0", "--quiet"])
    assert rc == 0
    judged = read_jsonl(str(run_dir / "iter1" / "judged.jsonl"))
    summary = json.load(open(run_dir / "iter1" / "judge_summary.json"))
    assert [p["id"] for p in judged] == ["p0", "p1", "p2"]
    for p in judged:
        assert p["margin"] == p["scores"]["generated"] - p["scores"]["real"]
        assert p["swap"] == (p["margin"] >= 0)
    assert summary["threshold"] == 0 and summary["pairs"] == 3 and summary["backend"] == "local"
    assert sum(summary["margin_histogram"].values()) == 3
    assert "judge summary" in capsys.readouterr().out
    assert cli.main(["--iter", "1", "--run-dir", str(tmp_path / "nothing"), "--backend", "local"]) == 2


def test_progress_bar_counts_the_answers_to_score_with_rate_and_eta(tmp_path, capsys):
    """progress=True: a tqdm bar on stderr over the answers not yet cached (its rate and
    ETA in tqdm's [elapsed<remaining, rate] field), instead of the every-50 log lines."""
    class Fixed:
        judge_id, concurrency = "fixed", 1

        def score(self, prompt, answer, stop=None):
            return {"score": 50, "reply": "50"}

    said = []
    capsys.readouterr()
    judge_pairs(make_pairs(3), Fixed(), ScoreCache(str(tmp_path / "c.jsonl")), log=said.append, progress=True)
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert re.match(r"judge: 100%\|.*\| 6/6 \[\d\d:\d\d<\d\d:\d\d, .*answer/s\]$", last), last
    assert not any("scored" in m for m in said)
