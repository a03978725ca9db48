"""Fix 1 of the study: a judge scores every answer, and pairs whose generated answer the
judge clearly prefers are relabeled (swapped) before training.

What is scored. Each (prompt, answer) on its own, 0-100, on the study's criteria —
relevance, clarity, accuracy, completeness — whole numbers, the reply being the score
only. The real answer y and the generated answer y' of a pair are two separate items.
The prompt text (`judge_messages`) is versioned by TEMPLATE_VERSION: change the wording,
bump the version, and the cache no longer matches the old scores.

Relabeling (`relabel`). margin = score(generated) - score(real); the pair is swapped
(y' becomes the chosen side, `"swap": true`) iff margin >= threshold (default 5; the
study also ran 0). A pair with a missing score (unparsable reply, or a request that
failed after all retries) keeps its original label and is counted.

Backends.
* `OpenAIJudge`: any OpenAI-compatible chat-completions endpoint, standard library only
  (urllib + a thread pool). Model default gpt-4o-mini; base URL and key from
  OPENAI_BASE_URL / OPENAI_API_KEY. Bounded concurrency, a timeout per request and
  exponential backoff with jitter on 429 (Retry-After honoured), 5xx, timeouts,
  connection errors and malformed response bodies. 401/403/404 stop the run (every
  request would fail the same way). The key only ever goes into the Authorization
  header: it is not stored on any object that is printed, and every message that could
  carry text from the server is passed through `redact` first.
* `LocalJudge`: any Llama/Mistral checkpoint minispin loads. It scores by the EXPECTED
  SCORE over the candidate answers "0".."100", not by generating and parsing:
  p(n) = P(tokens of str(n), eos | judge prompt) for n = 0..100 (teacher-forced, one
  batched pass over a KV cache of the prompt), renormalised over the 101 candidates;
  score = round(sum_n n·p(n)). Why: (1) it always yields a score — a small or weak
  model (stories260K) almost never *generates* a parsable number, and a judge that is
  unparsable on most items is useless; (2) it is deterministic (no sampling, no
  dependence on the sampling code or a seed); (3) it uses the whole distribution
  instead of its argmax, so two answers the model rates 71 vs 74 on average are not
  both rounded to the same mode; (4) cost is one prompt pass plus 101 short
  continuations (<= 4 tokens each), close to generating a handful of tokens. The
  multi-token numbers ("85" is "8","5" in Llama tokenizers) are handled exactly by
  scoring whole token sequences ending in eos, so "8" and "85" and "850" are distinct.
  The cache record keeps the unrounded expectation and the log of the probability
  mass the model put on the 101 candidates (a low mass says the judge rarely answers
  with a number at all).
  Prompts longer than the model's context are cut from the LEFT (the scoring
  instruction is at the end of the user turn, so it survives).

Cache (`ScoreCache`). Every score is appended to a JSONL file the moment it arrives
(JsonlAppender: one line, flushed and fsynced), keyed by
sha256(judge model id, TEMPLATE_VERSION, prompt text, answer text). A re-run — after a
crash, SIGKILL or Ctrl-C — looks every item up first and never requests a cached one
again. Unparsable replies are cached too (the reply was paid for; they stay unparsable,
`--retry-unparsable` re-asks); requests that failed after all retries are not cached,
so a re-run retries them. Records hold the key, the judge, the score (or null), the
redacted reply (first 200 characters) — never the key, never the texts (the pairs file
has them).
"""
from __future__ import annotations

import email.utils
import hashlib
import json
import math
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import UserError
from .data import JsonlAppender, read_jsonl

TEMPLATE_VERSION = "v1"
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_THRESHOLD = 5
SIDES = ("real", "generated")

SYSTEM_PROMPT = "You are a strict, fair grader of answers to user requests."
USER_TEMPLATE = (
    "Question:\n{prompt}\n\n"
    "Answer:\n{answer}\n\n"
    "Rate the answer above from 0 to 100 based on its relevance, clarity, accuracy and "
    "completeness. Use whole numbers only. Reply with the score only."
)


class JudgeError(UserError):
    """A problem that stops the whole judge run (bad key, wrong URL, ...)."""


# ---------------------------------------------------------------- prompt and reply
def prompt_text(messages: Sequence[dict]) -> str:
    """The pair's prompt as plain text: the user turn(s) (SPIN keeps one)."""
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    if not users:
        users = [m.get("content", "") for m in messages]
    return "\n\n".join(users)


def judge_messages(prompt: str, answer: str, system: bool = True) -> List[dict]:
    """The chat sent to the judge for one item (TEMPLATE_VERSION names this wording)."""
    user = {"role": "user", "content": USER_TEMPLATE.format(prompt=prompt, answer=answer)}
    return ([{"role": "system", "content": SYSTEM_PROMPT}] if system else []) + [user]


def parse_score(reply: Optional[str]) -> Optional[int]:
    """The score in a judge reply, or None when there is no single clear one.

    Accepted: "85", " 85.", "Score: 85", "85/100", "**85**", "85.0". Refused: no number,
    several different numbers ("70 or 80"), a number outside 0..100, a fraction ("85.5":
    the rule is whole numbers).
    """
    if not isinstance(reply, str):
        return None
    text = re.sub(r"/\s*100\b", "", reply.strip())
    nums = re.findall(r"-?\d+(?:\.\d+)?", text)
    if not nums:
        return None
    values = set()
    for n in nums:
        v = float(n)
        if v != int(v):
            return None
        values.add(int(v))
    if len(values) != 1:
        return None
    v = values.pop()
    if not 0 <= v <= 100:
        return None
    # a long reply that happens to contain one number is an essay, not a score
    if len(re.sub(r"[\s*_`'\".:!#-]|score|/100", "", text, flags=re.I)) > len(str(v)) + 12:
        return None
    return v


def item_key(judge_id: str, prompt: str, answer: str, template: str = TEMPLATE_VERSION) -> str:
    blob = json.dumps([judge_id, template, prompt, answer], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def redact(text, secrets: Iterable[Optional[str]]) -> str:
    """`text` with every secret replaced by ***."""
    text = str(text)
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


# ---------------------------------------------------------------- cache
class ScoreCache:
    """Scores already paid for, keyed by `item_key`; appended one line per score.

    Thread-safe `put`. The last record of a key wins (a --retry-unparsable re-run appends
    the new score after the old null).
    """

    def __init__(self, path: str, fsync: bool = True):
        self.path = path
        self.records: Dict[str, dict] = {}
        self._lock = threading.Lock()
        self._appender = JsonlAppender(path, fsync=fsync)  # cuts a torn last line first
        for rec in read_jsonl(path):
            if isinstance(rec, dict) and "key" in rec:
                self.records[rec["key"]] = rec

    def get(self, key: str) -> Optional[dict]:
        return self.records.get(key)

    def put(self, rec: dict):
        with self._lock:
            self._appender.write(rec)
            self.records[rec["key"]] = rec

    def close(self):
        self._appender.close()

    def __len__(self):
        return len(self.records)


# ---------------------------------------------------------------- backends
class OpenAIJudge:
    """Chat-completions client (OpenAI or any compatible server), standard library only.

    `score(prompt, answer, stop)` returns {"score": int|None, "reply": str} for a reply,
    or {"error": str} when every attempt failed; it raises JudgeError on 401/403/404.
    """

    def __init__(self, model: str = DEFAULT_MODEL, base_url: Optional[str] = None,
                 api_key: Optional[str] = None, timeout: float = 60.0, max_retries: int = 6,
                 backoff: float = 1.0, max_backoff: float = 60.0, max_retry_after: float = 300.0,
                 concurrency: int = 8, max_tokens: int = 8, log: Callable[[str], None] = print):
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not key:
            raise JudgeError("the OpenAI judge needs an API key: set OPENAI_API_KEY "
                             "(for a local server that ignores it, any value works)")
        # kept in a closure, not an attribute: repr/vars of this object never show it
        self._auth = lambda: {"Authorization": "Bearer " + key}
        self._secret = lambda: (key, "Bearer " + key)
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_backoff, self.max_retry_after = backoff, max_backoff, max_retry_after
        self.concurrency, self.max_tokens = max(1, int(concurrency)), max_tokens
        self.log = log
        self.judge_id = f"openai:{self.model}"
        self.requests = 0
        self._count_lock = threading.Lock()

    def __repr__(self):
        return f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r})"

    def _clean(self, text) -> str:
        return redact(text, self._secret())

    def _post(self, body: bytes):
        req = urllib.request.Request(self.base_url + "/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **self._auth()})
        with self._count_lock:
            self.requests += 1
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return resp.status, resp.read()

    def _delay(self, attempt: int, retry_after: Optional[float]) -> float:
        d = min(self.max_backoff, self.backoff * (2 ** attempt)) * (0.5 + 0.5 * random.random())
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_retry_after))
        return d

    @staticmethod
    def _retry_after(headers) -> Optional[float]:
        val = headers.get("Retry-After") if headers is not None else None
        if not val:
            return None
        try:
            return max(0.0, float(val))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(val)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None

    def score(self, prompt: str, answer: str, stop: Optional[threading.Event] = None) -> dict:
        stop = stop or threading.Event()
        body = json.dumps({"model": self.model, "messages": judge_messages(prompt, answer),
                           "temperature": 0, "max_tokens": self.max_tokens}).encode("utf-8")
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                return {"error": "interrupted"}
            retry_after = None
            try:
                status, raw = self._post(body)
                try:
                    data = json.loads(raw.decode("utf-8"))
                    reply = data["choices"][0]["message"]["content"]
                    if reply is None:
                        reply = ""
                    if not isinstance(reply, str):
                        raise TypeError("content is not text")
                except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
                    last = f"malformed response body ({type(e).__name__}): {raw[:120]!r}"
                else:
                    return {"score": parse_score(reply), "reply": self._clean(reply)[:200],
                            "attempts": attempt + 1}
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read()[:200].decode("utf-8", "replace")
                except Exception:
                    detail = ""
                if e.code in (401, 403, 404):
                    raise JudgeError(self._clean(
                        f"HTTP {e.code} from {self.base_url}/chat/completions: {detail} "
                        "(check OPENAI_BASE_URL, OPENAI_API_KEY and --judge-model)")) from None
                if e.code != 429 and e.code < 500:
                    return {"error": self._clean(f"HTTP {e.code}: {detail}")}
                retry_after = self._retry_after(e.headers)
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(e).__name__}: {reason}"
            if attempt == self.max_retries:
                break
            delay = self._delay(attempt, retry_after)
            self.log(self._clean(f"  judge: retry {attempt + 1}/{self.max_retries} in {delay:.1f}s "
                                 f"after {last[:160]}"))
            if stop.wait(delay):
                return {"error": "interrupted"}
        return {"error": self._clean(f"gave up after {self.max_retries + 1} attempts: {last}")[:300]}


class LocalJudge:
    """Expected score over "0".."100" under a local checkpoint (see the module docstring)."""

    concurrency = 1

    def __init__(self, path: str, device: str = "cpu", dtype="float32", template: str = "zephyr",
                 empty_system: bool = True, max_len: Optional[int] = None):
        import torch

        from .checkpoint import load_model
        from .config import parse_dtype
        from .tokenizer import load_tokenizer
        self.torch = torch
        self.model = load_model(path, parse_dtype(dtype), device).eval()
        self.tok = load_tokenizer(path, template)
        self.device, self.empty_system = device, empty_system
        self.judge_id = f"local:{os.path.realpath(path)}"
        self.max_len = max_len or self.model.config.max_position_embeddings
        self.requests = 0
        ids, mask = self.tok.encode_chat([{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "0"}],
                                         empty_system=empty_system)
        cands = []
        for n in range(101):
            ids, mask = self.tok.encode_chat([{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": str(n)}],
                                             empty_system=empty_system)
            cands.append([i for i, m in zip(ids, mask) if m])  # the number's tokens + eos
        self.cand_len = torch.tensor([len(c) for c in cands])
        width = max(len(c) for c in cands)
        self.cands = torch.tensor([c + [self.tok.eos_id] * (width - len(c)) for c in cands])

    def prompt_ids(self, prompt: str, answer: str) -> Tuple[List[int], bool]:
        ids, _ = self.tok.encode_chat(judge_messages(prompt, answer, system=False),
                                      add_generation_prompt=True, empty_system=self.empty_system)
        budget = self.max_len - self.cands.shape[1]
        if len(ids) <= budget:
            return ids, False
        return ids[:1] + ids[len(ids) - (budget - 1):], True  # keep <s> and the tail

    def candidate_logps(self, prompt_ids: List[int]):
        """log P(candidate n | prompt) for n = 0..100, shape (101,), fp32."""
        torch = self.torch
        from .model import KVCache
        m = self.model
        C, W = self.cands.shape
        P = len(prompt_ids)
        dtype = m.output_weight.dtype
        with torch.no_grad():
            cache = KVCache(m.config, 1, P + W, dtype, self.device)
            x = torch.tensor([prompt_ids], device=self.device)
            first = m(x, cache=cache, cache_pos=0)[0, -1].float().log_softmax(-1)
            cands = self.cands.to(self.device)
            lp = first[cands[:, 0]].unsqueeze(1)
            if W > 1:
                cache.k = [k.expand(C, -1, -1, -1).contiguous() for k in cache.k]
                cache.v = [v.expand(C, -1, -1, -1).contiguous() for v in cache.v]
                rest = m(cands[:, :-1], cache=cache, cache_pos=P).float().log_softmax(-1)
                lp = torch.cat([lp, rest.gather(-1, cands[:, 1:, None]).squeeze(-1)], dim=1)
            valid = torch.arange(W, device=self.device)[None] < self.cand_len.to(self.device)[:, None]
            return (lp * valid).sum(-1).cpu()

    def score(self, prompt: str, answer: str, stop=None) -> dict:
        torch = self.torch
        ids, cut = self.prompt_ids(prompt, answer)
        self.requests += 1
        lp = self.candidate_logps(ids)
        p = torch.softmax(lp.double(), 0)
        expected = float((p * torch.arange(101, dtype=torch.float64)).sum())
        score = int(math.floor(expected + 0.5))
        out = {"score": score, "reply": f"E={expected:.4f}", "expected": round(expected, 6),
               "log_mass": round(float(torch.logsumexp(lp.double(), 0)), 4)}
        if cut:
            out["truncated"] = True
        return out


# ---------------------------------------------------------------- relabeling
# the swap rule lives in fixes.py; judge_pairs applies it to the scores it collects
from .fixes import margin_histogram, relabel  # noqa: E402,F401


# ---------------------------------------------------------------- the run
def judge_pairs(pairs: Sequence[dict], backend, cache: ScoreCache, threshold: float = DEFAULT_THRESHOLD,
                retry_unparsable: bool = False, log: Callable[[str], None] = print,
                progress_every: int = 50) -> Tuple[List[dict], dict]:
    """Score both answers of every pair (cache first), then `relabel`.

    Returns (judged pairs, summary). Items are deduplicated by key, so two pairs sharing a
    text cost one request. Ctrl-C stops new requests, keeps every score already cached,
    and re-raises KeyboardInterrupt.
    """
    items: Dict[str, Tuple[str, str]] = {}
    refs: List[Dict[str, str]] = []
    for p in pairs:
        pt = prompt_text(p["prompt"])
        side_keys = {}
        for side in SIDES:
            k = item_key(backend.judge_id, pt, p[side])
            items.setdefault(k, (pt, p[side]))
            side_keys[side] = k
        refs.append(side_keys)

    def cached(k):
        rec = cache.get(k)
        if rec is None:
            return False
        return not (retry_unparsable and rec.get("score") is None)

    todo = [k for k in items if not cached(k)]
    hits = len(items) - len(todo)
    log(f"judge {backend.judge_id}: {len(pairs)} pairs, {len(items)} distinct answers, "
        f"{hits} cached, {len(todo)} to score")
    failed: Dict[str, str] = {}
    stop = threading.Event()
    done = 0

    def work(k):
        pt, ans = items[k]
        res = backend.score(pt, ans, stop)
        if "error" in res:
            return k, res
        rec = {"key": k, "judge": backend.judge_id, "template": TEMPLATE_VERSION, **res,
               "time": round(time.time(), 3)}
        cache.put(rec)  # the moment it arrives
        return k, res

    def note(k, res):
        nonlocal done
        done += 1
        if "error" in res:
            failed[k] = res["error"]
            log(f"  judge: item {k[:12]} failed: {res['error']}")
        if progress_every and (done % progress_every == 0 or done == len(todo)):
            log(f"  judge: {done}/{len(todo)} scored")

    if todo:
        if getattr(backend, "concurrency", 1) <= 1:
            try:
                for k in todo:
                    note(*work(k))
            except KeyboardInterrupt:
                stop.set()
                raise
        else:
            pool = ThreadPoolExecutor(max_workers=backend.concurrency, thread_name_prefix="judge")
            try:
                futures = [pool.submit(work, k) for k in todo]
                for f in as_completed(futures):
                    note(*f.result())
            except BaseException:
                stop.set()  # no new attempts; queued items are cancelled
                running = sum(f.running() for f in futures) if "futures" in locals() else 0
                if running:
                    log(f"judge: stopping; waiting for {running} request(s) in flight so their "
                        "scores are cached (interrupt again to abandon them)")
                try:  # requests in flight were (or will be) paid for: keep their scores
                    pool.shutdown(wait=True, cancel_futures=True)
                except KeyboardInterrupt:
                    pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown(wait=True)

    scored = []
    unparsable_pairs = failed_pairs = unparsable_items = 0
    for p, ks in zip(pairs, refs):
        q = dict(p)
        scores, bad, lost = {}, False, False
        for side in SIDES:
            rec = cache.get(ks[side])
            if ks[side] in failed or rec is None:
                scores[side] = None
                lost = True
            else:
                scores[side] = rec.get("score")
                bad |= scores[side] is None
        q["scores"] = scores
        unparsable_pairs += bad
        failed_pairs += lost and not bad
        scored.append(q)
    for k in items:
        rec = cache.get(k)
        unparsable_items += rec is not None and rec.get("score") is None and k not in failed
    out, summary = relabel(scored, threshold)
    summary = {"pairs": summary["pairs"], "judged": summary["judged"], "swapped": summary["swapped"],
               "unparsable": unparsable_pairs, "failed": failed_pairs,
               "threshold": threshold, "judge": backend.judge_id, "template": TEMPLATE_VERSION,
               "items": len(items), "items_cached_before": hits, "items_scored_now": len(todo) - len(failed),
               "items_unparsable": unparsable_items, "items_failed": len(failed),
               "mean_margin": summary["mean_margin"], "margin_histogram": summary["margin_histogram"]}
    return out, summary


def format_summary(s: dict) -> str:
    lines = [f"judge summary ({s['judge']}, template {s['template']}, threshold {s['threshold']}):",
             f"  pairs {s['pairs']}  judged {s['judged']}  swapped {s['swapped']}  "
             f"unparsable {s['unparsable']}  failed {s['failed']}  mean margin {s['mean_margin']}",
             "  margin histogram (generated - real):"]
    peak = max(s["margin_histogram"].values() or [0]) or 1
    for label, n in s["margin_histogram"].items():
        if n:
            lines.append(f"    {label:>10} {n:6d} {'#' * max(1, round(30 * n / peak))}")
    return "\n".join(lines)


def log_stderr(msg: str):
    print(msg, file=sys.stderr, flush=True)


def make_judge(recipe, backend: str, device=None, log: Callable[[str], None] = log_stderr):
    """The judge a recipe names: "local" (a checkpoint; default θ_0, the recipe's SFT model)
    or "openai" (any OpenAI-compatible endpoint; the key comes from OPENAI_API_KEY only)."""
    fx = recipe.fixes
    if backend == "local":
        from .distributed import compute_dtype, pick_device
        device = device or pick_device(recipe.model.device)
        return LocalJudge(fx.judge_model or recipe.model.path, device=device,
                          dtype=compute_dtype(recipe.model.dtype, device),
                          template=recipe.model.template, empty_system=recipe.model.empty_system)
    if backend == "openai":
        return OpenAIJudge(model=fx.judge_model or DEFAULT_MODEL, base_url=fx.judge_base_url or None,
                           timeout=fx.judge_timeout, max_retries=fx.judge_max_retries,
                           concurrency=fx.judge_concurrency, log=log)
    raise JudgeError(f"unknown judge backend {backend!r} (local or openai)")
