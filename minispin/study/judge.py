"""Fix 1 of the study: a judge scores every answer, and pairs whose generated answer the
judge clearly prefers are relabeled (swapped) before training.

What is scored. Each (prompt, answer) on its own, 0-100, on the study's criteria —
relevance, clarity, accuracy, completeness — whole numbers, the reply being the score
only. The real answer y and the generated answer y' of a pair are two separate items.

The prompt. Ours by default: SYSTEM_PROMPT, then USER_TEMPLATE, temperature 0, at most 8
reply tokens; TEMPLATE_VERSION names exactly that set. Any other prompt is a template
text with the placeholders {question} and {answer} (`load_prompt_template` reads one from
a file), used VERBATIM: the two placeholders are filled in one pass and nothing else in
the text is touched (no stripping; other braces stay as written, so a question that
itself contains "{answer}" is not filled twice). The system message, the temperature and
max_tokens are settings too; None leaves a message out, or a field out of the request so
the API's own default applies.

The study's judge (Joyyang158/self-improvement-of-LLMs, utils/gpt_reward.py) is
configs/prompts/study-judge.txt — its prompt string exactly, leading space and final
newline included — sent as a system message with empty content and then the user
prompt, with no temperature and no max_tokens (the API's defaults):
    OpenAIJudge(prompt_template=load_prompt_template("configs/prompts/study-judge.txt"),
                system_prompt="", temperature=None, max_tokens=None)

Relabeling (`relabel`). margin = score(generated) - score(real); the pair is swapped
(y' becomes the chosen side, `"swap": true`) iff margin >= threshold (default 5; the
study also ran 0). A pair with a missing score (unparsable reply, or a request that
failed after all retries) keeps its original label and is counted.

Backends.
* `OpenAIJudge`: any OpenAI-compatible chat-completions endpoint, through the official
  `openai` client (the optional extra: pip install "minispin[judge]") and a thread pool.
  Model default gpt-4o-mini; base URL and key from OPENAI_BASE_URL / OPENAI_API_KEY;
  $HTTPS_PROXY / $HTTP_PROXY / $NO_PROXY honoured by the client's httpx. Waits are the
  client's, set explicitly: `timeout` on every connect, read and write (httpx's: a server
  trickling bytes, each within it, can hold a request longer), and `max_retries` with the
  client's backoff on 408/409/429 (Retry-After honoured), 5xx, timeouts and connection
  errors. OPENAI_LOG=info shows its retries. The key stays with its endpoint:
  - redirects are never followed: a 3xx stops the run (JudgeError naming the endpoint
    and where it pointed), as 401/403/404 do. The client's default follows them;
  - a user:password@ in the base URL is not sent (httpx would send it as Basic auth in
    the key's place); the URL's query is kept;
  - only a 2xx reply whose body is a chat completion is ever scored; any other body
    fails the item (not cached: a re-run asks again);
  - every text that may carry bytes from the server (errors, cached replies) is redacted,
    then cut: `redact` removes every run of 4 or more characters that also occurs in the
    key, so a server that echoes the Authorization header, or a part of it ("sk-…Ga0E"),
    leaks no fragment. repr/vars of the judge never show the key (the client holds it).
* `LocalJudge`: any Llama/Mistral checkpoint minispin loads, with the same prompt
  templates. It scores by the EXPECTED SCORE over the candidate answers "0".."100",
  not by generating and parsing:
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
sha256(judge model id, settings tag, prompt text, answer text). The settings tag is
TEMPLATE_VERSION for our default settings (so caches made before templates existed stay
valid) and otherwise a hash of every setting that shapes the request: the template text,
the system message, temperature and max_tokens (local: the template text, the chat
template, the empty system turn and the dtype). A cache made under one prompt is never
reused under another. A re-run — after a crash, SIGKILL or Ctrl-C — looks every item up
first and never requests a cached one again; what a SIGKILL can cost twice is the requests
in flight at that moment, at most `concurrency` of them (a reply that arrives after the
kill was paid for but is never written). Unparsable replies are cached too (the
reply was paid for; they stay unparsable, `--retry-unparsable` re-asks); requests that
failed after all retries are not cached, so a re-run retries them. Records hold the key,
the judge, the settings tag, the score (or null), the redacted reply (first 200
characters) — never the key, never the texts (the pairs file has them).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import threading
import time
import urllib.parse
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..run.errors import UserError, json_loads, redact as redact_urls
from ..run.data import JsonlAppender, read_jsonl

TEMPLATE_VERSION = "v1"
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_THRESHOLD = 5
SIDES = ("real", "generated")

SYSTEM_PROMPT = "You are a strict, fair grader of answers to user requests."
USER_TEMPLATE = (
    "Question:\n{question}\n\n"
    "Answer:\n{answer}\n\n"
    "Rate the answer above from 0 to 100 based on its relevance, clarity, accuracy and "
    "completeness. Use whole numbers only. Reply with the score only."
)
PLACEHOLDERS = ("{question}", "{answer}")
MIN_SECRET_FRAGMENT = 4                 # no run of this many key characters is ever shown


class JudgeError(UserError):
    """A problem that stops the whole judge run (bad key, wrong URL, a redirect, ...)."""


# ---------------------------------------------------------------- prompt and reply
def prompt_text(messages: Sequence[dict]) -> str:
    """The pair's prompt as plain text: the user turn(s) (SPIN keeps one)."""
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    if not users:
        users = [m.get("content", "") for m in messages]
    return "\n\n".join(users)


def check_template(template: str, where: str = "the judge prompt template"):
    """JudgeError unless `template` holds both {question} and {answer}."""
    if not isinstance(template, str):
        raise JudgeError(f"{where}: a judge prompt template must be text, not {type(template).__name__}")
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise JudgeError(f"{where}: the judge prompt lacks {' and '.join(missing)}; write both "
                         "{question} and {answer} where the question and the answer go")


def load_prompt_template(path: str) -> str:
    """A judge prompt template from a UTF-8 text file, exactly as written (line endings,
    leading and trailing whitespace kept); JudgeError naming the file when it cannot be
    read or lacks a placeholder."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise JudgeError(f"{path}: judge prompt file not found (give the path of a text file "
                         "with {question} and {answer} in it)") from None
    except UnicodeDecodeError as e:
        raise JudgeError(f"{path}: judge prompt is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise JudgeError(f"{path}: cannot read the judge prompt ({e.strerror})") from None
    check_template(text, path)
    return text


def fill_template(template: str, question: str, answer: str) -> str:
    """`template` with {question} and {answer} replaced, in one pass: a text that itself
    contains a placeholder is inserted as it is. For the study's prompt this equals its
    `prompt.format(question=..., answer=...)`."""
    values = {"{question}": question, "{answer}": answer}
    return re.sub(r"\{question\}|\{answer\}", lambda m: values[m.group(0)], template)


def judge_messages(prompt: str, answer: str, template: Optional[str] = None,
                   system: Optional[str] = SYSTEM_PROMPT) -> List[dict]:
    """The chat sent to the judge for one item: a system message unless `system` is None
    ("" sends one with empty content, as the study did), then the filled template
    (default USER_TEMPLATE)."""
    user = {"role": "user", "content": fill_template(template or USER_TEMPLATE, prompt, answer)}
    return ([] if system is None else [{"role": "system", "content": system}]) + [user]


def settings_tag(settings: dict, defaults: dict) -> str:
    """What the cache keys a backend's prompt settings by: TEMPLATE_VERSION for our
    defaults, else a hash of the settings (template text included)."""
    if settings == defaults:
        return TEMPLATE_VERSION
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


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
    """The cache key of one item; `template` is the backend's `settings_tag`."""
    blob = json.dumps([judge_id, template, prompt, answer], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def redact(text, secrets: Iterable[Optional[str]], min_fragment: int = MIN_SECRET_FRAGMENT) -> str:
    """`text` with every run of `min_fragment` or more characters that also occurs in a
    secret replaced by ***: the whole secret, and any part a server echoed ("sk-ab…wxyz",
    a header cut short). A secret shorter than `min_fragment` is replaced where it occurs
    whole. Left to right, each run as long as it can be, so no such fragment survives.
    URL credentials (user:password@, ?key=...) go first, by errors.redact, THE rule."""
    text = redact_urls(str(text))
    for secret in secrets:
        if not secret:
            continue
        n = min(min_fragment, len(secret))
        grams = {secret[i:i + n] for i in range(len(secret) - n + 1)}
        first_piece = re.compile("|".join(map(re.escape, sorted(grams))))  # finds where a run starts
        out, pos = [], 0
        while (m := first_piece.search(text, pos)) is not None:
            end = m.end()
            while end < len(text) and text[m.start():end + 1] in secret:
                end += 1
            out += [text[pos:m.start()], "***"]
            pos = end
        text = "".join(out) + text[pos:]
    return text


# ---------------------------------------------------------------- cache
def refuse_foreign_cache(path: str):
    """A cache path aimed at another kind of file (a pairs or judged file, by a slip of
    --cache) is refused before anything is appended to, or cut from, it."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb") as f:
        first = f.readline(1 << 20).strip()
    try:
        rec = json_loads(first.decode("utf-8")) if first else {}
    except (UnicodeDecodeError, ValueError):
        rec = None
    if not isinstance(rec, dict) or (first and "key" not in rec) or "prompt" in rec or "real" in rec:
        raise JudgeError(f"{path}: not a judge score cache (its first line is not a cache record"
                         f"{'; it looks like a pairs or judged file' if isinstance(rec, dict) and 'prompt' in rec else ''}); "
                         "nothing was written to it: give --cache a score cache file or a new path")


class ScoreCache:
    """Scores already paid for, keyed by `item_key`; appended one line per score.

    Thread-safe `put`. The last record of a key wins (a --retry-unparsable re-run appends
    the new score after the old null).
    """

    def __init__(self, path: str, fsync: bool = True):
        self.path = path
        self.records: Dict[str, dict] = {}
        self._lock = threading.Lock()
        refuse_foreign_cache(path)  # before the appender touches the file
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
    """Chat-completions judge on the official `openai` client (OpenAI or any compatible server).

    `score(prompt, answer, stop)` returns {"score": int|None, "reply": str} for a reply,
    or {"error": str} when the request failed after the client's retries; it raises
    JudgeError on a redirect and on 401/403/404. `prompt_template` None means
    USER_TEMPLATE; `system_prompt`, `temperature` and `max_tokens` None leave the system
    message, or the field, out.
    """

    def __init__(self, model: str = DEFAULT_MODEL, base_url: Optional[str] = None,
                 api_key: Optional[str] = None, timeout: float = 60.0, max_retries: int = 6,
                 concurrency: int = 8, max_tokens: Optional[int] = 8, *,
                 prompt_template: Optional[str] = None, system_prompt: Optional[str] = SYSTEM_PROMPT,
                 temperature: Optional[float] = 0):
        try:
            import openai
        except ImportError:
            raise JudgeError('the OpenAI-compatible judge needs the openai package: '
                             'pip install "minispin[judge]" (the local judge needs nothing more)') from None
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not key:
            raise JudgeError("the OpenAI judge needs an API key: set OPENAI_API_KEY "
                             "(for a local server that ignores it, any value works)")
        self._secret = lambda: (key,)  # a closure, not an attribute: vars() never shows it
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        try:
            u = urllib.parse.urlsplit(self.base_url)
            u.port  # ValueError if it is not a port number
        except ValueError as e:
            raise JudgeError(self._clean(f"judge base URL {self.base_url!r}: {e}")) from None
        self.endpoint = urllib.parse.urlunsplit((u.scheme, u.netloc, u.path + "/chat/completions", u.query, ""))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise JudgeError(self._clean(f"judge base URL {self.base_url!r} is not an http(s) URL: "
                                         f"set OPENAI_BASE_URL or --base-url (e.g. {DEFAULT_BASE_URL})"))
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise JudgeError(f"judge timeout must be a positive number of seconds, not {timeout!r}")
        if temperature is not None and not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                                            and temperature >= 0):
            raise JudgeError(f"judge temperature must be a number >= 0 or None, not {temperature!r}")
        if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise JudgeError(f"judge max_tokens must be an integer >= 1 or None, not {max_tokens!r}")
        if prompt_template is not None:
            check_template(prompt_template)
        self.timeout, self.max_retries = float(timeout), max_retries
        self.concurrency = max(1, int(concurrency))
        self.prompt_template = prompt_template
        self.system_prompt, self.temperature, self.max_tokens = system_prompt, temperature, max_tokens
        self._openai = openai
        # both waits set here, not left to the library's defaults; redirects not followed
        # (the client's default would follow them, and httpx keeps the key on a same-origin
        # hop). A user:password@ in the URL is dropped: httpx would send it instead of the key
        self._client = openai.OpenAI(
            api_key=key, base_url=urllib.parse.urlunsplit((u.scheme, u.netloc.rpartition("@")[2], u.path, "", "")),
            default_query=dict(urllib.parse.parse_qsl(u.query)) or None, timeout=self.timeout,
            max_retries=max_retries, http_client=openai.DefaultHttpxClient(follow_redirects=False))
        # the endpoint is part of the judge's identity (two local servers may serve different
        # models under one name), except OpenAI's own: its ids stay those of older caches.
        # Without user:password@, which is not an identity and must not reach the cache file.
        where = "" if self.base_url == DEFAULT_BASE_URL else \
            f"@{u.scheme}://{u.hostname}{f':{u.port}' if u.port else ''}{u.path}"
        self.judge_id = f"openai:{self.model}{where}"
        self.settings_tag = settings_tag(
            {"template": prompt_template or USER_TEMPLATE, "system": system_prompt,
             "temperature": None if temperature is None else float(temperature), "max_tokens": max_tokens},
            {"template": USER_TEMPLATE, "system": SYSTEM_PROMPT, "temperature": 0.0, "max_tokens": 8})

    def __repr__(self):
        return self._clean(f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, "
                           f"settings={self.settings_tag!r})")

    def _clean(self, text) -> str:
        return redact(text, self._secret())

    def _detail(self, text: str) -> str:
        """Server text for a message: redacted, on one line, then cut (redacting first, so
        the cut never keeps part of a secret that the whole text would have shown)."""
        return " ".join(self._clean(text).split())[:200]

    def request_body(self, prompt: str, answer: str) -> dict:
        """The chat-completion arguments for one item; a setting that is None is left out
        (the API's default)."""
        body = {"model": self.model,
                "messages": judge_messages(prompt, answer, self.prompt_template, self.system_prompt)}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def _refusal(self, e, url: str) -> JudgeError:
        """The error for a redirect (never followed: the API key would go with it) or a
        401/403/404 (a wrong key, URL or model: asking again will not help)."""
        status = e.status_code
        if 300 <= status < 400:
            where = e.response.headers.get("location") or "nowhere (no Location header)"
            return JudgeError(self._clean(
                f"HTTP {status} from {url}: it redirects to {self._detail(where)}; redirects are "
                "not followed (the API key would go with them): set OPENAI_BASE_URL or --base-url "
                "to the final address"))
        return JudgeError(self._clean(f"HTTP {status} from {url}: {self._detail(e.response.text)} "
                                      "(check OPENAI_BASE_URL, OPENAI_API_KEY and --judge-model)"))

    def check_endpoint(self):
        """One free authenticated request (GET <base URL>/models, which OpenAI-compatible
        servers answer), without retries, before a run depends on this judge: no answer, a
        redirect or a rejected key (401/403) is a JudgeError now, not after generation. Any
        other reply (2xx; 404 or 405 from a server without that route; 429, 5xx) shows
        someone answers."""
        openai = self._openai
        url = self.endpoint.replace("/chat/completions", "/models", 1)
        try:
            self._client.with_options(max_retries=0).models.with_raw_response.list()
        except openai.APIStatusError as e:
            if 300 <= e.status_code < 400 or e.status_code in (401, 403):
                raise self._refusal(e, url) from None
        except openai.APIError as e:  # no connection, or no reply within the timeout
            cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ is not None else ""
            raise JudgeError(self._clean(
                f"the judge at {url} does not answer: {type(e).__name__}{cause}; start it, or set "
                "OPENAI_BASE_URL or --base-url to where it runs")) from None

    def score(self, prompt: str, answer: str, stop: Optional[threading.Event] = None) -> dict:
        if stop is not None and stop.is_set():
            return {"error": "interrupted"}
        openai = self._openai
        try:
            raw = self._client.chat.completions.with_raw_response.create(**self.request_body(prompt, answer))
        except openai.APIStatusError as e:
            status = e.status_code
            if 300 <= status < 400 or status in (401, 403, 404):
                raise self._refusal(e, self.endpoint) from None
            return {"error": self._detail(f"HTTP {status} (after at most {self.max_retries} retries): "
                                          f"{e.response.text}")}
        except openai.APIError as e:  # timeouts and connection errors, after the client's retries
            cause = f": {e.__cause__}" if e.__cause__ is not None else ""
            return {"error": self._detail(f"{type(e).__name__} (after at most {self.max_retries} retries): "
                                          f"{e}{cause}")}
        try:  # the client parses whatever a 2xx body held: only a chat completion is scored
            reply = raw.parse().choices[0].message.content
            if not isinstance(reply, (str, type(None))):
                raise TypeError("content is not text")
        except (AttributeError, IndexError, KeyError, TypeError, ValueError, openai.APIError) as e:
            return {"error": self._detail(f"malformed response body ({type(e).__name__}): {raw.http_response.text}")}
        reply = reply or ""
        return {"score": parse_score(reply), "reply": self._clean(reply)[:200]}


class LocalJudge:
    """Expected score over "0".."100" under a local checkpoint (see the module docstring).

    `prompt_template` None means USER_TEMPLATE; there is no system message (the chat
    template's own empty system turn follows `empty_system`)."""

    concurrency = 1

    def __init__(self, path: str, device: str = "cpu", dtype="float32", template: str = "zephyr",
                 empty_system: bool = True, max_len: Optional[int] = None,
                 prompt_template: Optional[str] = None):
        import torch

        from ..run.checkpoint import load_model, model_fingerprint
        from ..run.config import parse_dtype
        from ..run.tokenizer import load_tokenizer
        if prompt_template is not None:
            check_template(prompt_template)
        self.torch = torch
        torch_dtype = parse_dtype(dtype)
        self.model = load_model(path, torch_dtype, device).eval()
        self.tok = load_tokenizer(path, template)
        self.device, self.empty_system = device, empty_system
        self.prompt_template = prompt_template
        # by content, not path: a judge model retrained (or replaced) at the same path is
        # another judge, and a copied judge folder is the same one
        self.judge_id = f"local:{model_fingerprint(path)}"
        self.settings_tag = settings_tag(
            {"template": prompt_template or USER_TEMPLATE, "chat_template": template,
             "empty_system": bool(empty_system), "dtype": str(torch_dtype)},
            {"template": USER_TEMPLATE, "chat_template": "zephyr", "empty_system": True,
             "dtype": str(torch.float32)})
        self.max_len = max_len or self.model.config.max_position_embeddings
        self.requests = 0
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
        messages = judge_messages(prompt, answer, self.prompt_template, system=None)
        ids, _ = self.tok.encode_chat(messages, add_generation_prompt=True, empty_system=self.empty_system)
        budget = self.max_len - self.cands.shape[1]
        if len(ids) <= budget:
            return ids, False
        return ids[:1] + ids[len(ids) - (budget - 1):], True  # keep <s> and the tail

    def candidate_logps(self, prompt_ids: List[int]):
        """log P(candidate n | prompt) for n = 0..100, shape (101,), fp32."""
        torch = self.torch
        from ..core.model import KVCache
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
from .fixes import relabel  # noqa: E402


# ---------------------------------------------------------------- the run
def judge_pairs(pairs: Sequence[dict], backend, cache: ScoreCache, threshold: float = DEFAULT_THRESHOLD,
                retry_unparsable: bool = False, log: Callable[[str], None] = print,
                progress_every: int = 50, progress: bool = False) -> Tuple[List[dict], dict]:
    """Score both answers of every pair (cache first), then `relabel`. progress: a tqdm
    bar on stderr (answers scored, rate, ETA) instead of a log line every progress_every.

    Returns (judged pairs, summary). Items are deduplicated by key, so two pairs sharing a
    text cost one request. Ctrl-C stops new requests, keeps every score already cached,
    and re-raises KeyboardInterrupt.
    """
    tag = getattr(backend, "settings_tag", TEMPLATE_VERSION)  # the prompt and request settings
    items: Dict[str, Tuple[str, str]] = {}
    refs: List[Dict[str, str]] = []
    for p in pairs:
        pt = prompt_text(p["prompt"])
        side_keys = {}
        for side in SIDES:
            k = item_key(backend.judge_id, pt, p[side], tag)
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
    done = in_flight = 0
    from ..run.plan import stage_bar   # train.py's "judge" stage and whole-iteration ETA, if it runs us
    bar = stage_bar("judge", len(todo), desc="judge", unit="answer", disable=not (progress and todo), file=sys.stderr)
    counting = threading.Lock()

    def work(k):
        nonlocal in_flight
        with counting:  # counted by the workers: a Ctrl-C may stop the main thread anywhere
            in_flight += 1
        try:
            pt, ans = items[k]
            res = backend.score(pt, ans, stop)
            if "error" in res:
                return k, res
            rec = {"key": k, "judge": backend.judge_id, "template": tag, **res,
                   "time": round(time.time(), 3)}
            cache.put(rec)  # the moment it arrives
            return k, res
        finally:
            with counting:
                in_flight -= 1

    def note(k, res):
        nonlocal done
        done += 1
        if "error" in res:
            failed[k] = res["error"]
            log(f"  judge: item {k[:12]} failed: {res['error']}")
        bar.update(1)
        if progress_every and not progress and (done % progress_every == 0 or done == len(todo)):
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
                pending = set(futures)
                while pending:
                    # a timed wait, not as_completed's endless one: the kernel may hand
                    # Ctrl-C to a worker thread, and the main thread raises the
                    # KeyboardInterrupt only once back in Python — after an endless wait,
                    # not before a request returns
                    finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    for f in finished:
                        note(*f.result())
            except BaseException:
                stop.set()  # no new attempts; queued items are cancelled
                if in_flight:
                    log(f"judge: stopping; waiting for {in_flight} request(s) in flight so their "
                        "scores are cached (interrupt again to abandon them)")
                try:  # requests in flight were (or will be) paid for: keep their scores
                    pool.shutdown(wait=True, cancel_futures=True)
                except KeyboardInterrupt:
                    pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
    bar.close()

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
               "threshold": threshold, "judge": backend.judge_id, "template": tag,
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


def make_judge(recipe, backend: str, device=None):
    """The judge a recipe names: "local" (a checkpoint; default θ_0, the recipe's SFT model)
    or "openai" (any OpenAI-compatible endpoint; the key comes from OPENAI_API_KEY only),
    with the recipe's prompt template, system message and request settings."""
    fx = recipe.fixes
    template = load_prompt_template(fx.judge_prompt) if fx.judge_prompt else None
    if backend == "local":
        from ..core.device import compute_dtype, pick_device
        device = device or pick_device(recipe.model.device)
        return LocalJudge(fx.judge_model or recipe.model.path, device=device,
                          dtype=compute_dtype(recipe.model.dtype, device), template=recipe.model.template,
                          empty_system=recipe.model.empty_system, prompt_template=template)
    if backend == "openai":
        system = {"ours": SYSTEM_PROMPT, "none": None}.get(fx.judge_system, fx.judge_system)
        defaults = fx.judge_api_defaults
        return OpenAIJudge(model=fx.judge_model or DEFAULT_MODEL, base_url=fx.judge_base_url or None,
                           timeout=fx.judge_timeout, max_retries=fx.judge_max_retries,
                           concurrency=fx.judge_concurrency, prompt_template=template,
                           system_prompt=system, temperature=None if defaults else 0,
                           max_tokens=None if defaults else 8)
    raise JudgeError(f"unknown judge backend {backend!r} (local or openai)")
