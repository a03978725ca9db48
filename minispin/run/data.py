"""SFT records in, pairs files in and out.

Files. A data file is read by what it holds, not by its name: a file that starts with
Parquet's magic bytes "PAR1" is read with pyarrow (an optional extra; never opened as
text), a file whose first character is "[" is a JSON list of records (uclaml/SPIN's
synthetic_*.json, the study's train.json/test.json), a file holding one JSON object with
a "data" list is that list, and anything else is JSONL, one record per line. Text must be
UTF-8 (a leading byte-order mark is allowed). Every record is named in errors by where it
sits: "file:line" for JSON text, "file:row N" for Parquet, "file:data[i]" for a "data"
list. An empty file, or one without a usable record, is an error: training on nothing, or
generating an empty pairs file that later runs would reuse, is never what was meant.

A data path may also be a glob pattern ("data/train_sft-*.parquet"): a split stored as
shards, ultrachat_200k's train_sft for one. The files it matches are read in name order as
one file (datasets' own order for "-00000-of-00003" names), each record still named by
its own file.

SFT data (what generate.py and `train.py --sft` read). Accepted records, first match wins:
* {"messages": [{"role", "content"}, ...]}   ultrachat_200k (its "prompt_id" is the id)
* {"real": [user, assistant], ...}           uclaml/SPIN's and the study's pairs
* a prompt {"prompt"|"question"} and an answer {"completion"|"chosen"|"real"|"answer"},
  each a string or a list of messages: {prompt, completion}, GSM8K's {question, answer},
  TRL's {prompt, chosen, rejected} (chosen is the real answer; a chosen conversation
  without a prompt works too), and our own pairs files.
The prompt and answer are joined into one conversation, and SPIN's rule picks from it the
FIRST user turn and the FIRST assistant turn after it; later turns are dropped. A record
without both is skipped and counted (an error with file and line under strict=True).

Pairs (what `train.py --pairs` and judge.py read). Accepted records:
* ours: {"id", "prompt": [messages], "real": y, "generated": y', "gen": {...}} plus what a
  later stage adds: "scores": {"real", "generated"}, "margin", "swap" (bool: the judge
  preferred y', so y' is the chosen side), "noise" (the pair's noise scale σ >= 0).
  Returned as written, after checking every field above.
* uclaml/SPIN's and the study's {"real": [user, assistant], "generated": [user, assistant]}
  (Parquet train_prefs/test_prefs, JSON or JSONL): both sides must answer one user turn.
* TRL's {"prompt", "chosen", "rejected"}, strings or messages (chosen -> real, rejected
  -> generated); without "prompt", chosen and rejected are whole conversations.
Foreign records come out in our schema {"id", "prompt", "real", "generated"}: the prompt
is the first user turn (a TRL prompt list is kept whole, since the answers reply to all
of it), and a system turn inside "real" is dropped.

Ids are stable across runs and machines: the record's own "prompt_id" (or "id") when it
has one, else a hash of (first user turn, real answer); repeats get "#2", "#3", ... Ids
written in our pairs format must be unique.

Validation is strict because a bad value found later costs more: a null answer or a lone
UTF-16 surrogate (JSON "\\ud800") crashes the tokenizer, "noise": "abc" would crash or be
misread mid-run. Every error is one line, "file:line: field: what is wrong (what to do)",
raised as DataError.

Our writers append one line at a time and flush, so a crash loses at most the line being
written; read_jsonl drops a torn last line (no trailing newline) and nothing else.
write_spin_parquet writes pairs in uclaml/SPIN's Parquet layout for its trainer.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple
from .errors import MissingFileError, UserError, json_loads, redact_all, writing

PAIR_REQUIRED = ("id", "prompt", "real", "generated")
CHAT_ROLES = ("system", "user", "assistant")   # what the chat templates render
SPIN_PARQUET_NAME = "{split}_prefs-00000-of-00001.parquet"   # uclaml/SPIN's file names

_BOM = b"\xef\xbb\xbf"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(UserError):
    """Bad input data; the message starts with file:line."""


@dataclass
class SFTExample:
    id: str
    prompt: List[dict]  # [{"role": "user", "content": x}]
    real: str


@dataclass
class ReadStats:
    records: int = 0
    kept: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str):
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


# ---------------------------------------------------------------------- reading files
def _decode(raw: bytes, path: str, first_line: int = 1) -> str:
    """UTF-8 text of raw (which starts at first_line); a bad byte is named with its line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{column}) (save the file as UTF-8)") from None


def _skip_ws(text: str, idx: int) -> int:
    while idx < len(text) and text[idx] in " \t\r\n":
        idx += 1
    return idx


def _parquet_rows(path: str) -> Iterator[Tuple[str, object]]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    row = 0
    try:
        # batch by batch: ultrachat_200k's shards need not sit in memory as Python objects
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", rec
    except (pyarrow.ArrowException, OSError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: unreadable Parquet after row {row} ({why}) (is the file "
                        "complete? write it again)") from None


def _json_document(path: str) -> Iterator[Tuple[str, object]]:
    """A whole-file JSON list, read element by element so each record knows its line, or
    an object: its "data" list, else the object itself as the only record."""
    with open(path, "rb") as f:
        raw = f.read()
    text = _decode(raw[len(_BOM):] if raw.startswith(_BOM) else raw, path)
    decoder = json.JSONDecoder()

    def fail(e: json.JSONDecodeError):
        return DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}) "
                         "(fix the JSON syntax there)")

    idx = _skip_ws(text, 0)
    if not text.startswith("[", idx):
        try:
            doc = json_loads(text)
        except json.JSONDecodeError as e:
            raise fail(e) from None
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            for i, rec in enumerate(doc["data"]):
                yield f"{path}:data[{i}]", rec
        else:
            line = 1 + text.count("\n", 0, idx)
            yield f"{path}:{line}", doc
        return
    line, counted = 1, 0
    idx = _skip_ws(text, idx + 1)
    while not text.startswith("]", idx):
        line, counted = line + text.count("\n", counted, idx), idx
        try:
            rec, end = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as e:
            raise fail(e) from None
        yield f"{path}:{line}", rec
        idx = _skip_ws(text, end)
        if text.startswith(",", idx):
            idx = _skip_ws(text, idx + 1)
        elif not text.startswith("]", idx):
            raise fail(json.JSONDecodeError("Expecting ',' delimiter", text, idx))
    if _skip_ws(text, idx + 1) < len(text):
        raise fail(json.JSONDecodeError("Extra data", text, _skip_ws(text, idx + 1)))


def _jsonl_lines(path: str) -> Iterator[Tuple[str, object]]:
    with open(path, "rb") as f:   # bytes: a bad byte is reported with its line, not as a crash
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                rec = json_loads(line.rstrip())   # rstrip: columns of an error stay on its line
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}) "
                                "(each line of a JSONL file is one JSON record)") from None
            yield f"{path}:{lineno}", rec


def _is_json_document(path: str) -> bool:
    """A JSON list, or an object spread over lines (its first line is no whole record)."""
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip(b" \t\r\n" + _BOM)), b"")
    first = (first[len(_BOM):] if first.startswith(_BOM) else first).lstrip()
    if first.startswith(b"["):
        return True
    if not first.startswith(b"{"):
        return False
    try:
        json_loads(first)
        return False
    except ValueError:   # not JSON (or not UTF-8) on its own: the start of a larger document
        return True


def data_files(path: str) -> List[str]:
    """The files a data path names: the path itself when it exists, else the files its glob
    pattern matches, in name order; [] when there are none."""
    if os.path.exists(path) or not glob.has_magic(path):
        return [path] if os.path.exists(path) else []
    return sorted(f for f in glob.glob(path) if os.path.isfile(f))


def _iter_file(path: str) -> Iterator[Tuple[str, object]]:
    """(where, record) for every record of a data file, or of the files a pattern matches;
    where is "file:line" (or row)."""
    if not os.path.exists(path) and glob.has_magic(path):
        files = data_files(path)
        if not files:
            raise MissingFileError(f"{path}: no data file matches this pattern")
        for f in files:
            yield from _iter_file(f)
        return
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder (give one data file: .jsonl, .json or .parquet, "
                        "or a pattern such as folder/train-*.parquet)")
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: data file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1":
        yield from _parquet_rows(path)
    elif path.endswith(".parquet"):
        raise DataError(f"{path}: not a Parquet file (it does not start with PAR1; is it "
                        "complete, or another format renamed?)")
    elif _is_json_document(path):
        yield from _json_document(path)
    else:
        yield from _jsonl_lines(path)


# ---------------------------------------------------------------------- checking fields
def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return "an object"


def _text(value, at: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{at}: {name}: must be a string, got {_kind(value)} (write the text "
                        "as a JSON string)")
    bad = None if value.isascii() else _LONE_SURROGATE.search(value)   # isascii: fast path
    if bad:
        raise DataError(f"{at}: {name}: holds a lone surrogate U+{ord(bad.group()):04X} at "
                        f"character {bad.start()}, which is not Unicode text (fix or remove "
                        "it: it cannot be tokenized)")
    return value


def _messages(value, at: str, name: str, text_role: Optional[str] = None) -> List[dict]:
    """A list of {role, content} messages, as clean copies; a plain string is one message
    of text_role when text_role is given."""
    if text_role is not None and isinstance(value, str):
        return [{"role": text_role, "content": _text(value, at, name)}]
    if not isinstance(value, list) or not value:
        what = "a string or " if text_role is not None else ""
        raise DataError(f"{at}: {name}: must be {what}a non-empty list of {{\"role\", \"content\"}} "
                        f"messages, got {_kind(value)}")
    out = []
    for i, m in enumerate(value):
        item = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}: {item}: must be a message, got {_kind(m)} (each message is "
                            "{\"role\": \"user\"|\"assistant\"|\"system\", \"content\": text})")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{at}: {item}: message has no '{key}' (each message is "
                                "{\"role\": \"user\"|\"assistant\"|\"system\", \"content\": text})")
        if not isinstance(m["role"], str):
            raise DataError(f"{at}: {item}.role: must be a string, got {_kind(m['role'])} (use "
                            "\"system\", \"user\" or \"assistant\")")
        out.append({"role": m["role"], "content": _text(m["content"], at, f"{item}.content")})
    return out


def _check_prompt(messages: List[dict], at: str, name: str = "prompt") -> List[dict]:
    """A prompt the chat templates can render: known roles, ending with a user turn."""
    for i, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{at}: {name}[{i}].role: '{m['role']}' is not a chat role "
                            "(use system, user or assistant)")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{at}: {name}: has no user turn (the prompt must hold the user "
                        "message the answers reply to)")
    if messages[-1]["role"] != "user":
        raise DataError(f"{at}: {name}: ends with a {messages[-1]['role']} turn (it must end "
                        "with the user turn the answers reply to)")
    return messages


def _first_exchange(messages: List[dict]) -> Tuple[Optional[str], Optional[str]]:
    """SPIN's rule: the first user turn and the first assistant turn after it."""
    user = None
    for m in messages:
        if user is None and m["role"] == "user":
            user = m["content"]
        elif user is not None and m["role"] == "assistant":
            return user, m["content"]
    return user, None


def _own_id(rec: dict) -> Optional[str]:
    for key in ("prompt_id", "id"):
        v = rec.get(key)
        if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v):
            return str(v)
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pair_id(prompt: str, real: str) -> str:
    """The id of a record without one: a hash of its prompt and real answer."""
    return hashlib.sha1(json.dumps([prompt, real]).encode()).hexdigest()[:16]


class _Ids:
    """Stable ids: a record's own, else the hash; repeats get "#2", "#3", ..."""

    def __init__(self):
        self.seen: Dict[str, int] = {}

    def __call__(self, base: str) -> str:
        self.seen[base] = self.seen.get(base, 0) + 1
        return base if self.seen[base] == 1 else f"{base}#{self.seen[base]}"


# ---------------------------------------------------------------------- SFT data
_SFT_PROMPT_KEYS = ("prompt", "question")
_SFT_ANSWER_KEYS = ("completion", "chosen", "real", "answer")
_SFT_ONLY_KEYS = ("messages", "completion", "question", "answer")   # never in a pairs record


def _sft_conversation(rec: dict, at: str) -> List[dict]:
    # null is absence here: Parquet files hold every column for every row
    if rec.get("messages") is not None:
        return _messages(rec["messages"], at, "messages")
    pkey = next((k for k in _SFT_PROMPT_KEYS if rec.get(k) is not None), None)
    akey = next((k for k in _SFT_ANSWER_KEYS if rec.get(k) is not None), None)
    if pkey is None and akey is None:
        raise DataError(f"{at}: record: has none of the SFT fields (keys: {', '.join(sorted(rec)) or 'none'}; "
                        "expected messages, prompt+completion, question+answer, prompt+chosen "
                        "or real)")
    conv = _messages(rec[pkey], at, pkey, "user") if pkey else []
    return conv + (_messages(rec[akey], at, akey, "assistant") if akey else [])


def read_sft(path: str, strict: bool = False, limit: Optional[int] = None,
             every_record: bool = False) -> Tuple[List[Optional[SFTExample]], ReadStats]:
    """SFT examples (first user turn, first answer) from one file, plus what was skipped.

    every_record=True (the study's and uclaml/SPIN's selection, pairs.read_sft_prompts): one
    entry per record of the file, in order, None where a record has no user turn or no
    answer after it; a prompt or answer that is empty or blank is KEPT, as their
    generate.py (which takes real[0] and real[1] as they are) keeps it."""
    stats = ReadStats()
    out: List[Optional[SFTExample]] = []
    ids = _Ids()
    for at, rec in _iter_file(path):
        if limit is not None and len(out) >= limit:
            break
        stats.records += 1
        if not isinstance(rec, dict):
            raise DataError(f"{at}: expected a JSON object (one record), got {_kind(rec)} (each "
                            "record is one {...} object)")
        user, answer = _first_exchange(_sft_conversation(rec, at))
        problem = None
        if user is None or not (user.strip() or every_record):
            problem = "no user turn"
        elif answer is None or not (answer.strip() or every_record):
            problem = "no assistant answer"
        if problem:
            if strict:
                raise DataError(f"{at}: record has {problem} (SPIN needs a first user "
                                "turn and an assistant answer after it)")
            stats.skip(problem)
            if every_record:
                out.append(None)
            continue
        ident = ids(_own_id(rec) or pair_id(user, answer))
        out.append(SFTExample(ident, [{"role": "user", "content": user}], answer))
        stats.kept += 1
    if not stats.kept and limit != 0:
        if not stats.records:
            raise DataError(f"{path}: no records (the file is empty; check the path, or make "
                            "the data again)")
        skipped = ", ".join(f"{n} {why}" for why, n in stats.skipped.items())
        raise DataError(f"{path}: no usable record: all {stats.records} skipped ({skipped}) "
                        "(SPIN needs a first user turn and an assistant answer after it)")
    return out, stats


# ---------------------------------------------------------------------- pairs files
def _check_own_pair(rec: dict, at: str) -> dict:
    for key in PAIR_REQUIRED:
        if key not in rec:
            raise DataError(f"{at}: pair is missing required field '{key}' (every pair needs "
                            "id, prompt, real and generated)")
    if not isinstance(rec["id"], str) or not rec["id"]:
        raise DataError(f"{at}: id: must be a non-empty string, got {_kind(rec['id'])} (write "
                        "it in quotes)")
    if not isinstance(rec["prompt"], list):
        raise DataError(f"{at}: prompt: must be a non-empty list of {{\"role\", \"content\"}} "
                        f"messages, got {_kind(rec['prompt'])}")
    _check_prompt(_messages(rec["prompt"], at, "prompt"), at)
    for key in ("real", "generated"):
        _text(rec[key], at, key)
    if "swap" in rec and not isinstance(rec["swap"], bool):
        raise DataError(f"{at}: swap: must be true or false, got {_kind(rec['swap'])} (true: "
                        "the generated answer is the chosen side)")
    if "noise" in rec and not (_number(rec["noise"]) and rec["noise"] >= 0):
        raise DataError(f"{at}: noise: must be a finite number >= 0 (the pair's noise scale; "
                        f"0 = none), got {_kind(rec['noise'])}")
    if rec.get("margin") is not None and not _number(rec["margin"]):
        raise DataError(f"{at}: margin: must be a finite number or null, got {_kind(rec['margin'])} "
                        "(judge.py writes it; null means unscored)")
    scores = rec.get("scores")
    if scores is not None:
        if not isinstance(scores, dict):
            raise DataError(f"{at}: scores: must be an object {{\"real\", \"generated\"}} or null, "
                            f"got {_kind(scores)} (judge.py writes it)")
        for side in ("real", "generated"):
            if scores.get(side) is not None and not _number(scores[side]):
                raise DataError(f"{at}: scores.{side}: must be a finite number or null, got "
                                f"{_kind(scores[side])} (judge.py writes it; null means unscored)")
    return rec


def _foreign_pair(rec: dict, at: str, real_key: str, gen_key: str) -> dict:
    """uclaml/SPIN / study (real, generated) or TRL (chosen, rejected) -> our schema."""
    sides = []
    for key in (real_key, gen_key):
        if key not in rec:
            raise DataError(f"{at}: pair is missing required field '{key}' (a record with "
                            f"'{real_key}' needs '{gen_key}' too)")
        conv = _messages(rec[key], at, key, "assistant")
        user, answer = _first_exchange(conv)
        if user is None:   # TRL's conversational answer: [{"role": "assistant", ...}]
            answer = next((m["content"] for m in conv if m["role"] == "assistant"), None)
        if answer is None:
            raise DataError(f"{at}: {key}: has no assistant answer (it must hold the answer "
                            "as an assistant turn)")
        sides.append((user, answer))
    (real_user, real), (gen_user, generated) = sides
    if real_user is not None and gen_user is not None and real_user != gen_user:
        raise DataError(f"{at}: {gen_key}: its user turn differs from {real_key}'s (both "
                        "answers must reply to the same prompt)")
    if rec.get("prompt") is not None:   # null: absent (a Parquet column other rows use)
        prompt = _check_prompt(_messages(rec["prompt"], at, "prompt", "user"), at)
    elif real_user is not None or gen_user is not None:
        prompt = [{"role": "user", "content": real_user if real_user is not None else gen_user}]
    else:
        raise DataError(f"{at}: prompt: missing (give \"prompt\", or {real_key}/{gen_key} "
                        "as conversations that start with the user turn)")
    first_user = next(m["content"] for m in prompt if m["role"] == "user")
    return {"id": _own_id(rec) or pair_id(first_user, real), "prompt": prompt,
            "real": real, "generated": generated}


def read_pairs(path: str) -> List[dict]:
    """Pairs in our schema from any accepted pairs format, every field checked (errors name
    the file, the line and the field)."""
    pairs: List[dict] = []
    first_seen: Dict[str, str] = {}
    ids = _Ids()
    for at, rec in _iter_file(path):
        if not isinstance(rec, dict):
            raise DataError(f"{at}: expected a JSON object (one pair), got {_kind(rec)} (each "
                            "pair is one {...} object)")
        if "chosen" in rec or "rejected" in rec:
            pair = _foreign_pair(rec, at, "chosen", "rejected")
        elif isinstance(rec.get("real"), list) or isinstance(rec.get("generated"), list):
            pair = _foreign_pair(rec, at, "real", "generated")
        elif "real" in rec or "generated" in rec or (
                ("id" in rec or "prompt" in rec) and not any(k in rec for k in _SFT_ONLY_KEYS)):
            pair = _check_own_pair(rec, at)
            if pair["id"] in first_seen:
                raise DataError(f"{at}: id: '{pair['id']}' was already used at "
                                f"{first_seen[pair['id']]} (ids in a pairs file must be unique)")
            first_seen[pair["id"]] = at
            pairs.append(pair)
            continue
        else:
            hint = (" (this looks like SFT data: give it to generate.py --data)"
                    if any(k in rec for k in _SFT_ONLY_KEYS) else "")
            raise DataError(f"{at}: record: is not a pair (keys: {', '.join(sorted(rec)) or 'none'}; "
                            f"expected id+prompt+real+generated, real+generated conversations or "
                            f"prompt+chosen+rejected){hint}")
        pair["id"] = ids(pair["id"])
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: no pairs (the file is empty; make them again with "
                        "generate.py)")
    return pairs


def write_spin_parquet(pairs: Iterable[dict], path: str, apply_swap: bool = True) -> int:
    """Pairs -> uclaml/SPIN's Parquet layout, for its trainer (spin/run_spin.py): columns
    real and generated, each [user message, assistant message] of {content, role}, and an
    id column (SPIN's trainer drops columns it does not use). SPIN's real side is the chosen
    one, so a pair with "swap": true is written with its answers exchanged, unless
    apply_swap=False. Per-pair noise has no place in SPIN's layout and is not written.
    Written to a temporary sibling and renamed. Returns the number of rows."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow)") from None
    columns: Dict[str, list] = {"real": [], "generated": [], "id": []}
    for p in pairs:
        prompt = p["prompt"]
        if len(prompt) != 1 or prompt[0].get("role") != "user":
            raise DataError(f"{path}: pair '{p['id']}': prompt must be exactly one user turn "
                            "(uclaml/SPIN's layout holds one user message and one answer)")
        chosen, other = p["real"], p["generated"]
        if apply_swap and p.get("swap"):
            chosen, other = other, chosen
        user = {"content": prompt[0]["content"], "role": "user"}
        columns["real"].append([user, {"content": chosen, "role": "assistant"}])
        columns["generated"].append([user, {"content": other, "role": "assistant"}])
        columns["id"].append(str(p["id"]))
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    schema = pa.schema([("real", pa.list_(message)), ("generated", pa.list_(message)),
                        ("id", pa.string())])
    table = pa.Table.from_pydict(columns, schema=schema)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return table.num_rows


# ---------------------------------------------------------------------- files we append to
def read_jsonl(path: str, repair: bool = False) -> List[dict]:
    """Records of a JSONL file we write ourselves (a missing file holds none). A torn last
    line (crash mid-write: no newline at the end, not a whole record) is dropped — and cut
    from the file when repair=True. Any other bad line is an error with file and line."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json_loads(line.decode("utf-8"))
            problem = None if isinstance(rec, dict) else f"expected a JSON object, got {_kind(rec)}"
        except UnicodeDecodeError:
            problem = "invalid UTF-8"
        except json.JSONDecodeError as e:
            problem = f"malformed JSON line ({e.msg})"
        if problem is None:
            out.append(rec)
            continue
        if lineno == len(lines):   # torn write (a cut can split a multi-byte character too)
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(len(raw) - len(line))
            break
        _decode(line, path, lineno)   # names the bad byte when that is the problem
        raise DataError(f"{path}:{lineno}: {problem}")
    return out


class JsonlAppender:
    """Append records one line at a time, flushed (and fsynced) as they are written."""

    def __init__(self, path: str, fsync: bool = True):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        read_jsonl(path, repair=True)  # never append after a torn line
        # a whole last record without its newline (edited by hand) must not absorb ours
        unterminated = False
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                unterminated = f.read(1) != b"\n"
        self.path = path
        with writing(path):
            self.f = open(path, "a", encoding="utf-8")
            if unterminated:
                self.f.write("\n")
        self.fsync = fsync

    def write(self, rec: dict):
        with writing(self.path):
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.f.flush()
            if self.fsync:
                os.fsync(self.f.fileno())

    def close(self):
        with writing(self.path):
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _write_atomic(path: str, write: Callable):
    """write(f) into a temporary sibling, fsync, then rename over path: readers never see
    half a file, and a full disk leaves the old file (or none). A fault names the file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with writing(path), open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        with writing(path):
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_jsonl_atomic(path: str, records: Iterable[dict]):
    """Write a whole JSONL file atomically (_write_atomic)."""
    _write_atomic(path, lambda f: f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


def write_json_atomic(path: str, obj, indent: int = 1):
    """One JSON document, written atomically (_write_atomic); a URL credential in it is
    redacted (metadata)."""
    def write(f):
        json.dump(redact_all(obj), f, indent=indent, ensure_ascii=False)
        f.write("\n")
    _write_atomic(path, write)
