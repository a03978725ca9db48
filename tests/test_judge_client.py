"""The OpenAI judge (the openai client) against hostile local servers on 127.0.0.1
(threads, no network): redirects, servers that echo the key, stalled replies, non-2xx and
non-JSON replies, proxies, a missing openai package; and the study's judge prompt, request
and cache keying.

The study's prompt below is restated from its source (Joyyang158/self-improvement-of-LLMs,
utils/gpt_reward.py), not read from our file, so the file is checked against it."""
import hashlib
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import REPO, STORIES, run_cli
from minispin.study.judge import (SYSTEM_PROMPT, JudgeError, LocalJudge, OpenAIJudge, ScoreCache,
                            format_summary, item_key, judge_pairs, load_prompt_template, redact)

# a realistic-looking key: none of its 4-character pieces occurs in our own messages
KEY = "sk-proj-Qm7ZrT2vXk9LwP4nB8cY1hJd6Fs3Ga0E"
STUDY_PROMPT_FILE = os.path.join(REPO, "configs", "prompts", "study-judge.txt")
STUDY_PROMPT = """ You are tasked with evaluating the quality of the given answer based on the provided question. Your task is to assign a score between 0 and 100, where 0 indicates very poor quality, and 100 indicates excellent quality. You should use a 1-point increment scale, meaning the score can be any whole number between 0 and 100 (e.g. 73,91,68) and avoiding scores that are always multiples of 5. Consider factors such as relevance, clarity, accuracy, and completeness. Provide only the score without any explanation.

Question: {question}

Answer: {answer}

Score:
"""  # noqa: E501 -- one line, as in the study


def key_fragments(text, n=4):
    """Every n-character piece of KEY that occurs in `text`."""
    return sorted({KEY[i:i + n] for i in range(len(KEY) - n + 1) if KEY[i:i + n] in text})


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    # a proxy set on the CI machine must not carry these 127.0.0.1 requests away
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


# ---------------------------------------------------------------- test servers
def completion(content) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]}).encode()


def send(h, code, body: bytes = b"", headers=(), reason=None):
    h.send_response(code, reason)
    for k, v in headers:
        h.send_header(k, v)
    if not any(k.lower() == "content-length" for k, _ in headers):
        h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hung up (what half of these tests do) is not news


class Server:
    """An HTTP/1.1 server on 127.0.0.1 that records every request (method, path,
    headers by lower-case name, body) and answers it with `respond(handler, record, n)`, n counting the
    requests with the same body so far."""

    def __init__(self, respond):
        self.requests, self.closing = [], threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            owner = server

            def log_message(self, *a):
                pass

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                rec = {"method": self.command, "path": self.path,
                       "headers": {k.lower(): v for k, v in self.headers.items()},
                       "body": self.rfile.read(length) if length else b""}
                with server.lock:
                    n = sum(r["body"] == rec["body"] for r in server.requests)
                    server.requests.append(rec)
                try:
                    respond(self, rec, n)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_CONNECT = handle_any

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made = []

    def make(respond):
        made.append(Server(respond))
        return made[-1]
    yield make
    for s in made:
        s.close()


def judge_for(url, **kw):
    kw = dict(dict(api_key=KEY, timeout=2.0, max_retries=2, concurrency=1), **kw)
    return OpenAIJudge(base_url=url + "/v1", **kw)


def one_pair(i=0):
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
            "real": f"It is {2 * i}.", "generated": f"Maybe {2 * i + 1}."}


# ---------------------------------------------------------------- redirects
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_stops_the_run_and_the_key_stays(servers, tmp_path, code):
    target = servers(lambda h, rec, n: send(h, 200, completion("99")))
    location = target.url + "/v1/chat/completions?echo=" + KEY  # a Location that carries the key
    origin = servers(lambda h, rec, n: send(h, code, completion("97"), [("Location", location)]))
    logs = []
    judge = judge_for(origin.url)
    cache = ScoreCache(str(tmp_path / "c.jsonl"))
    with pytest.raises(JudgeError) as e:
        judge_pairs([one_pair()], judge, cache, log=logs.append)
    cache.close()
    msg = str(e.value)
    # nothing reached the redirect target: no Authorization header, no request at all
    assert target.requests == []
    # the run stopped at the first reply; neither the 3xx body's score nor anything else was kept
    assert len(origin.requests) == 1 and len(cache) == 0 and open(tmp_path / "c.jsonl").read() == ""
    assert f"HTTP {code}" in msg and origin.url + "/v1/chat/completions" in msg
    assert target.url + "/v1/chat/completions" in msg and "\n" not in msg
    assert key_fragments(msg + "\n".join(logs)) == []


def test_the_openai_clients_default_would_have_followed_the_redirect(servers):
    """The control for the test above: the openai client as it comes (follow_redirects on)
    posts to the redirect target and hands back its reply, so the test above can fail."""
    import openai
    target = servers(lambda h, rec, n: send(h, 200, completion("99"), [("Content-Type", "application/json")]))
    origin = servers(lambda h, rec, n: send(h, 307, b"", [("Location", target.url + "/v1/chat/completions")]))
    client = openai.OpenAI(api_key=KEY, base_url=origin.url + "/v1", max_retries=0, timeout=5)
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])
    assert reply.choices[0].message.content == "99"
    assert [r["method"] for r in target.requests] == ["POST"]


# ---------------------------------------------------------------- the key in server replies
def test_key_echoed_whole_or_in_part_never_leaks(servers, tmp_path):
    """Each fault is one item's only reply (max_retries=0), so what the server echoed
    reaches the failure line, and the last reply reaches the cache: none of it carries a
    fragment of the key."""
    auth = "Bearer " + KEY
    big = "x" * 40000 + KEY[10:30] + "y" * 25496 + auth + "z" * 5000  # the key far beyond the 200 shown
    faults = [
        (500, json.dumps({"error": "a" * 100 + " upstream broke; auth was " + auth}).encode(), None),
        (500, json.dumps({"error": f"partial header: {auth[:27]}"}).encode(), None),
        (502, f"Incorrect API key provided: {KEY[:8]}{'*' * 20}{KEY[-4:]}".encode(), None),  # OpenAI-style mask
        (503, big.encode(), None),
        (500, b"{}", f"Broken {KEY[5:25]}"),                          # in the reason phrase
        (200, f"<html>proxy says {auth}</html>".encode(), None),      # 200, not JSON
        (200, json.dumps({"error": {"message": f"key {KEY}"}}).encode(), None),  # JSON, no choices
        (429, json.dumps({"error": f"slow down {KEY[3:19]}"}).encode(), None),
        (400, json.dumps({"error": {"message": f"bad request from {auth[:30]}"}}).encode(), None),
    ]

    def respond(h, rec, n):
        answer = json.loads(rec["body"])["messages"][-1]["content"].split("Answer:\n")[1].split("\n")[0]
        if answer.startswith("fault "):
            code, body, reason = faults[int(answer.split()[1])]
            return send(h, code, body, [("Content-Type", "application/json")] if body[:1] == b"{" else (),
                        reason=reason)
        return send(h, 200, completion(f"Score 70. By the way your key is {auth}"))

    server = servers(respond)
    logs = []
    judge = judge_for(server.url, max_retries=0)
    cache_path = str(tmp_path / "cache.jsonl")
    cache = ScoreCache(cache_path)
    pairs = [dict(one_pair(0), id=f"p{i}", real=f"fault {i}", generated="fine") for i in range(len(faults))]
    out, summary = judge_pairs(pairs, judge, cache, log=logs.append)
    cache.close()
    # every fault was served once, with the key; each failed its item; "fine" was scored
    assert len(server.requests) == len(faults) + 1
    assert all(r["headers"]["authorization"] == auth for r in server.requests)
    assert summary["items_failed"] == len(faults) and sum("failed:" in m for m in logs) == len(faults)
    recs = [json.loads(line) for line in open(cache_path)]
    assert len(recs) == 1 and recs[0]["score"] is None and "your key is Bearer ***" in recs[0]["reply"]
    written = "\n".join(logs + [open(cache_path).read(), json.dumps(out), json.dumps(summary),
                                format_summary(summary), repr(judge), repr(vars(judge))])
    assert key_fragments(written) == []
    for echo in ("auth was Bearer ***", "partial header: Bearer ***", "provided: ***", "proxy says Bearer ***",
                 "key ***", "slow down ***", "bad request from Bearer ***"):
        assert echo in written  # the echoes were there, and were redacted

    # the run-stopping errors redact too: 401 echoing the header, whole and in part
    stop = servers(lambda h, rec, n: send(h, 401, f"bad key {auth} / {KEY[-9:]}".encode()))
    with pytest.raises(JudgeError) as e:
        judge_for(stop.url).score("q", "a")
    assert "401" in str(e.value) and key_fragments(str(e.value)) == [] and "\n" not in str(e.value)
    # and the one that fails after the client's retries
    dead = servers(lambda h, rec, n: send(h, 500, f"auth was {auth}".encode(), [("retry-after-ms", "1")]))
    res = judge_for(dead.url, max_retries=1).score("q", "a")
    assert "HTTP 500" in res["error"] and "auth was Bearer ***" in res["error"]
    assert key_fragments(res["error"]) == [] and len(dead.requests) == 2


def test_redact_leaves_no_fragment_and_nothing_else():
    pieces = [KEY, KEY[:4], KEY[-4:], KEY[7:19], KEY[:3], "Bearer " + KEY[1:]]
    for piece in pieces:
        text = f"before {piece} after {piece[::-1]}"
        out = redact(text, [KEY])
        assert key_fragments(out) == []
        assert out.startswith("before ") and " after " in out
    assert redact("sk- and the rest: nothing secret here", [KEY]) == "sk- and the rest: nothing secret here"
    assert redact(KEY + KEY, [KEY]) == "******"  # one *** per run, each as long as it can be
    assert redact("abc abcd", ["abc"]) == "*** ***d"  # a short secret: its whole occurrences
    # texts glued from random pieces of the key and other characters: no piece survives
    rng = random.Random(0)
    for _ in range(2000):
        parts = []
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(KEY))
            parts.append(KEY[i:rng.randint(i, len(KEY))] if rng.random() < 0.5 else
                         "".join(rng.choice("abXZ -:/sk*") for _ in range(rng.randint(0, 8))))
        text = "".join(parts)
        assert key_fragments(redact(text, [KEY])) == [], text


# ---------------------------------------------------------------- timeouts
def staller(head_too):
    """A server that answers nothing (head_too) or only the status line and headers, and
    then holds the connection open until the test ends."""
    def respond(h, rec, n):
        if not head_too:
            h.send_response(200)
            h.send_header("Content-Length", "200")
            h.end_headers()
            h.wfile.flush()
        h.owner.closing.wait(30)
    return respond


@pytest.mark.parametrize("head_too", [False, True], ids=["body", "headers"])
def test_a_stalled_server_costs_one_timeout_per_attempt(servers, head_too):
    server = servers(staller(head_too))
    judge = judge_for(server.url, timeout=1.0, max_retries=0)
    t0 = time.monotonic()
    res = judge.score("q", "a")
    elapsed = time.monotonic() - t0
    assert "score" not in res and "Timeout" in res["error"], res
    assert 1.0 <= elapsed <= 2 * 1.0, f"a stalled reply held one request {elapsed:.1f} s under timeout=1"
    assert len(server.requests) == 1


def test_tls_timeout_and_certificate(servers, tmp_path, monkeypatch):
    """Under TLS a stalled reply still times out, an honest reply is scored, and a
    certificate the client does not trust is an error (no fallback to no verification)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate for 127.0.0.1")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    stall = staller(head_too=False)
    server = servers(lambda h, rec, n: stall(h, rec, n) if n == 0 else send(h, 200, completion("77")))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.httpd.socket = tls.wrap_socket(server.httpd.socket, server_side=True)
    url = server.url.replace("http://", "https://")
    untrusting = judge_for(url, max_retries=0)
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # read when the judge's client makes its TLS context
    judge = judge_for(url, timeout=1.0, max_retries=0)
    t0 = time.monotonic()
    res = judge.score("q", "a")
    assert "Timeout" in res["error"] and time.monotonic() - t0 <= 2 * 1.0
    assert judge.score("q", "a")["score"] == 77
    assert "CERTIFICATE_VERIFY_FAILED" in untrusting.score("q", "a")["error"]
    assert len(server.requests) == 2  # the untrusted handshake never got to send a request


# ---------------------------------------------------------------- what is never scored
def test_only_a_2xx_json_completion_is_scored(servers):
    valid = completion("88")

    def respond(h, rec, n):
        kind = json.loads(rec["body"])["messages"][-1]["content"].split("Answer:\n")[1].split("\n")[0]
        if kind == "500":
            return send(h, 500, valid)
        if kind == "418":
            return send(h, 418, valid)
        if kind == "number":  # valid JSON, not a completion
            return send(h, 200, b"85", [("Content-Type", "text/plain")])
        if kind == "html":
            return send(h, 200, b"<html>88</html>")
        if kind == "short":  # a complete JSON object, but the body ended before Content-Length
            h.send_response(200)
            h.send_header("Content-Length", str(len(valid) + 50))
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(valid + b"   ")
            h.close_connection = True
            return
        return send(h, 200, valid)

    server = servers(respond)
    judge = judge_for(server.url, max_retries=1)
    for kind in ("500", "418", "number", "html", "short"):
        res = judge.score("q", kind)
        assert "score" not in res and "error" in res, (kind, res)
    assert judge.score("q", "fine")["score"] == 88  # the same body, from a 2xx, is scored
    per_kind = Counter(json.loads(r["body"])["messages"][-1]["content"].split("Answer:\n")[1].split("\n")[0]
                       for r in server.requests)
    # the client retries a 5xx and a cut-off body; a 2xx body that is not a completion is not asked again
    assert per_kind == {"500": 2, "418": 1, "number": 1, "html": 1, "short": 2, "fine": 1}


# ---------------------------------------------------------------- proxies
def test_http_proxy_gets_the_absolute_url(servers, monkeypatch):
    proxy = servers(lambda h, rec, n: send(h, 200, completion("64")))
    monkeypatch.setenv("http_proxy", proxy.url)
    judge = OpenAIJudge(base_url="http://judge.invalid/v1", api_key=KEY, timeout=2, max_retries=0)
    assert judge.score("q", "a")["score"] == 64
    assert proxy.requests[0]["path"] == "http://judge.invalid/v1/chat/completions"


def test_https_proxy_tunnel_never_sees_the_key(servers, monkeypatch):
    proxy = servers(lambda h, rec, n: send(h, 403, b"no tunnels here"))
    monkeypatch.setenv("https_proxy", "http://user:pw@" + proxy.url.split("://")[1])
    judge = OpenAIJudge(base_url="https://judge.invalid/v1", api_key=KEY, timeout=2, max_retries=0)
    res = judge.score("q", "a")
    assert "error" in res and "403" in res["error"]
    connect = proxy.requests[0]
    assert connect["method"] == "CONNECT" and connect["path"] == "judge.invalid:443"
    assert connect["headers"]["proxy-authorization"] == "Basic dXNlcjpwdw=="  # base64("user:pw")
    assert "authorization" not in connect["headers"] and key_fragments(json.dumps(connect["headers"])) == []


# ---------------------------------------------------------------- the study's judge
def test_study_prompt_file_is_the_studys_prompt_verbatim():
    with open(STUDY_PROMPT_FILE, "rb") as f:
        assert f.read() == STUDY_PROMPT.encode("utf-8")
    assert load_prompt_template(STUDY_PROMPT_FILE) == STUDY_PROMPT


def test_study_request_is_the_studys_request(servers):
    server = servers(lambda h, rec, n: send(h, 200, completion("73")))
    study = judge_for(server.url, prompt_template=load_prompt_template(STUDY_PROMPT_FILE),
                      system_prompt="", temperature=None, max_tokens=None)
    q, a = "What is {x} in {answer}?\n  Two lines. ", "  It is {question}; 42.\n"
    assert study.score(q, a)["score"] == 73
    body = json.loads(server.requests[0]["body"])
    # the study's gpt_inference: a system message with empty content, then prompt.format(...)
    assert body["messages"] == [{"role": "system", "content": ""},
                                {"role": "user", "content": STUDY_PROMPT.format(question=q, answer=a)}]
    assert "temperature" not in body and "max_tokens" not in body and body["model"] == "gpt-4o-mini"

    ours = judge_for(server.url)
    ours.score(q, a)
    body = json.loads(server.requests[1]["body"])
    assert body["temperature"] == 0 and body["max_tokens"] == 8
    assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert f"Question:\n{q}\n\nAnswer:\n{a}\n\n" in body["messages"][1]["content"]


def test_cache_never_crosses_prompts_or_settings(servers, tmp_path):
    server = servers(lambda h, rec, n: send(h, 200, completion("61")))
    pairs = [one_pair(i) for i in range(3)]
    cache = ScoreCache(str(tmp_path / "c.jsonl"))
    study_prompt = load_prompt_template(STUDY_PROMPT_FILE)
    study = dict(prompt_template=study_prompt, system_prompt="", temperature=None, max_tokens=None)
    runs = [({}, 6), ({}, 0), (study, 6), (study, 0), ({**study, "temperature": 1.0}, 6),
            ({**study, "prompt_template": study_prompt + " "}, 6), ({**study, "system_prompt": None}, 6),
            ({"max_tokens": 16}, 6), ({"prompt_template": study_prompt}, 6), ({}, 0), (study, 0)]
    for settings, new_requests in runs:
        before = len(server.requests)
        _, s = judge_pairs(pairs, judge_for(server.url, **settings), cache, log=lambda m: None)
        assert len(server.requests) - before == new_requests, settings
        assert s["judged"] == 3
    cache.close()
    # our default keys are the ones caches had before templates existed (the judge id names a
    # server other than OpenAI's: test_the_judge_id_names_the_endpoint)
    pt, ans = pairs[0]["prompt"][0]["content"], pairs[0]["real"]
    old_key = hashlib.sha256(json.dumps([f"openai:gpt-4o-mini@{server.url}/v1", "v1", pt, ans],
                                        ensure_ascii=False).encode()).hexdigest()
    assert cache.get(old_key)["template"] == "v1"


def test_the_judge_id_names_the_endpoint(monkeypatch):
    """Two OpenAI-compatible servers may serve different models under one name: their scores
    must not share cache keys. OpenAI's own endpoint keeps the id older caches were made with,
    and a user:password in the URL never reaches the id (it is written into the cache file)."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    ids = {url: OpenAIJudge(api_key=KEY, base_url=url).judge_id for url in
           [None, "https://api.openai.com/v1/", "http://127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1",
            "https://alice:s3cret-pw@judge.example.org/openai/v1"]}
    assert ids[None] == ids["https://api.openai.com/v1/"] == "openai:gpt-4o-mini"
    assert ids["http://127.0.0.1:8000/v1"] == "openai:gpt-4o-mini@http://127.0.0.1:8000/v1"
    assert ids["http://127.0.0.1:8001/v1"] == "openai:gpt-4o-mini@http://127.0.0.1:8001/v1"
    assert ids["https://alice:s3cret-pw@judge.example.org/openai/v1"] == \
        "openai:gpt-4o-mini@https://judge.example.org/openai/v1"
    keys = {item_key(i, "q", "a") for i in ids.values()}
    assert len(keys) == 4


def test_load_prompt_template_errors_name_the_file(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("Rate this: {answer}")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Q: {question} A: {answer} caf\xe9".encode("latin-1"))
    for path, what in [(one, "{question}"), (latin, "UTF-8"), (tmp_path / "missing.txt", "not found"),
                       (tmp_path, "cannot read")]:
        with pytest.raises(JudgeError) as e:
            load_prompt_template(str(path))
        msg = str(e.value)
        assert msg.startswith(str(path) + ":") and what in msg and "\n" not in msg
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"  Q: {question}\r\nA: {answer}\r\n")
    assert load_prompt_template(str(crlf)) == "  Q: {question}\r\nA: {answer}\r\n"
    with pytest.raises(JudgeError):
        OpenAIJudge(api_key=KEY, prompt_template="no placeholders")


def test_local_judge_takes_the_same_template_and_needs_no_openai_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)   # `import openai` raises ImportError
    study_prompt = load_prompt_template(STUDY_PROMPT_FILE)
    ours = LocalJudge(STORIES)
    study = LocalJudge(STORIES, prompt_template=study_prompt)
    q, a = "Tom has 3 apples and eats one. How many are left?", "Tom has 2 apples left."
    ids, _ = study.prompt_ids(q, a)
    expect, _ = study.tok.encode_chat([{"role": "user", "content": STUDY_PROMPT.format(question=q, answer=a)}],
                                      add_generation_prompt=True, empty_system=True)
    assert ids == expect and ids != ours.prompt_ids(q, a)[0]
    assert study.settings_tag != ours.settings_tag == "v1"
    cache = ScoreCache(str(tmp_path / "c.jsonl"))
    judge_pairs([one_pair()], ours, cache, log=lambda m: None)
    judge_pairs([one_pair()], study, cache, log=lambda m: None)
    judge_pairs([one_pair()], study, cache, log=lambda m: None)
    assert (ours.requests, study.requests, len(cache)) == (2, 2, 4)


def test_bad_base_url_is_one_line(tmp_path):
    for url in ("ftp://example.com/v1", "not a url", "http://host:notaport/v1"):
        with pytest.raises(JudgeError) as e:
            OpenAIJudge(base_url=url, api_key=KEY)
        assert "base URL" in str(e.value) and "\n" not in str(e.value)


def test_closed_port_is_an_error_not_a_hang():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    res = OpenAIJudge(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, timeout=1, max_retries=0).score("q", "a")
    assert "error" in res and "Connection" in res["error"]


def test_a_url_password_is_never_sent_in_place_of_the_key_and_the_query_is_kept(servers):
    """httpx turns a URL's user:password@ into Basic auth, which would replace the key's
    Bearer header; the judge drops it (it is not the endpoint's key) and keeps the query
    (a gateway's api-version=...) on every request."""
    server = servers(lambda h, rec, n: send(h, 200, completion("70")))
    url = server.url.replace("http://", "http://judge-user:hunter2pw@") + "/v1?api-version=2024-06-01"
    assert OpenAIJudge(base_url=url, api_key=KEY, max_retries=0).score("q", "a")["score"] == 70
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions?api-version=2024-06-01"
    assert req["headers"]["authorization"] == "Bearer " + KEY
    assert "hunter2pw" not in json.dumps(req["headers"]) and "anVkZ2Ut" not in json.dumps(req["headers"])


def test_an_http_judge_without_the_openai_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openai", None)   # `import openai` raises ImportError
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with pytest.raises(JudgeError, match=r'pip install "minispin\[judge\]"'):
        OpenAIJudge()
    os.makedirs(tmp_path / "run" / "iter0")
    (tmp_path / "run" / "iter0" / "pairs.jsonl").write_text(json.dumps(one_pair()) + "\n")
    capsys.readouterr()
    rc = run_cli("judge.py", "--iter", "0", "--run-dir", tmp_path / "run", "--backend", "openai")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and 'pip install "minispin[judge]"' in err[0], err

