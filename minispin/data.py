"""SFT records in, pairs files in and out.

SFT data (what generate.py and `train.py --sft` read). Accepted files:
* .jsonl — one JSON record per line; .json — a list of records (or {"data": [...]});
* .parquet — ultrachat_200k's own files (needs pyarrow).
Accepted records, first match wins:
* {"messages": [{"role", "content"}, ...]}  (UltraChat; "prompt_id" is used as the id)
* {"prompt": str, "completion": str}
* {"question": str, "answer": str}          (GSM8K)
SPIN's rule: the prompt is the FIRST user turn, the real answer y is the FIRST assistant
turn after it; later turns are dropped. A record without both is skipped and counted
(or an error with file and line under strict=True).

Ids are stable across runs and machines: the record's own prompt_id when it has one, else
a hash of (prompt, real answer); repeats of the same pair get "#2", "#3", ...

Pairs file (generate.py writes it, judge.py annotates it, train.py reads it), one JSON
object per line:
    {"id", "prompt": [{"role": "user", "content": x}], "real": y, "generated": y',
     "gen": {generation settings}}
optional fields a later stage adds: "scores": {"real", "generated"}, "margin",
"swap" (bool: the judge preferred y', so y' is the chosen side), "noise" (per-pair noise
scale). Writers append one line at a time and flush, so a crash loses at most the line
being written; readers drop a torn last line (no trailing newline) and nothing else.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple
from .errors import UserError

PAIR_REQUIRED = ("id", "prompt", "real", "generated")


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


def _iter_file(path: str) -> Iterator[Tuple[int, dict]]:
    """(line or row number, record) from .jsonl / .json / .parquet."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file not found")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        for i, rec in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, rec
        return
    if path.endswith(".json"):
        with open(path) as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records")
        for i, rec in enumerate(data, 1):
            yield i, rec
        return
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None


def _first_turns(rec: dict) -> Tuple[Optional[str], Optional[str]]:
    if isinstance(rec.get("messages"), list):
        user = answer = None
        for m in rec["messages"]:
            if not isinstance(m, dict):
                continue
            if user is None and m.get("role") == "user":
                user = m.get("content")
            elif user is not None and m.get("role") == "assistant":
                answer = m.get("content")
                break
        return user, answer
    if "prompt" in rec and "completion" in rec:
        return rec["prompt"], rec["completion"]
    if "question" in rec and "answer" in rec:
        return rec["question"], rec["answer"]
    return rec.get("prompt") or rec.get("question"), None


def pair_id(prompt: str, real: str) -> str:
    return hashlib.sha1(json.dumps([prompt, real]).encode()).hexdigest()[:16]


def read_sft(path: str, strict: bool = False, limit: Optional[int] = None) -> Tuple[List[SFTExample], ReadStats]:
    """SFT examples (first user turn, first answer) from one file, plus what was skipped."""
    stats = ReadStats()
    out: List[SFTExample] = []
    seen: Dict[str, int] = {}
    for lineno, rec in _iter_file(path):
        if limit is not None and len(out) >= limit:
            break
        stats.records += 1
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        user, answer = _first_turns(rec)
        problem = None
        if not isinstance(user, str) or not user.strip():
            problem = "no user turn"
        elif not isinstance(answer, str) or not answer.strip():
            problem = "no assistant answer"
        if problem:
            if strict:
                raise DataError(f"{path}:{lineno}: record has {problem} (SPIN needs a first user "
                                "turn and an assistant answer after it)")
            stats.skip(problem)
            continue
        base = str(rec["prompt_id"]) if rec.get("prompt_id") else pair_id(user, answer)
        seen[base] = seen.get(base, 0) + 1
        ident = base if seen[base] == 1 else f"{base}#{seen[base]}"
        out.append(SFTExample(ident, [{"role": "user", "content": user}], answer))
        stats.kept += 1
    return out, stats


# ---------------------------------------------------------------------- pairs files
def read_jsonl(path: str, repair: bool = False) -> List[dict]:
    """Records of a JSONL file. A torn last line (crash mid-write: no newline at the end,
    not valid JSON) is dropped — and cut from the file when repair=True. Any other bad
    line is an error with file and line."""
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
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # last line without newline: torn write
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(len(raw) - len(line))
                break
            raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
    return out


def read_pairs(path: str) -> List[dict]:
    """Pairs with their required fields checked (error: file, line and field)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: pairs file not found")
    pairs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            for key in PAIR_REQUIRED:
                if key not in rec:
                    raise DataError(f"{path}:{lineno}: pair is missing required field '{key}'")
            if not isinstance(rec["prompt"], list) or not rec["prompt"]:
                raise DataError(f"{path}:{lineno}: 'prompt' must be a non-empty list of messages")
            pairs.append(rec)
    return pairs


class JsonlAppender:
    """Append records one line at a time, flushed (and fsynced) as they are written."""

    def __init__(self, path: str, fsync: bool = True):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        read_jsonl(path, repair=True)  # never append after a torn line
        self.f = open(path, "a")
        self.fsync = fsync

    def write(self, rec: dict):
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        if self.fsync:
            os.fsync(self.f.fileno())

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_jsonl_atomic(path: str, records: Iterable[dict]):
    """Write a whole file via a temporary sibling and rename (readers never see half)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj):
    """One JSON document, written via a temporary sibling and rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- training batches
# Tokenization, SPIN's truncation rule and collation for train.py. A pair becomes
# prompt ids (with <s>), real answer ids and generated answer ids, each answer encoded
# as a continuation of the prompt and closed by eos — exactly the tokens the chat template
# renders for the whole conversation, so training sees what generation produced.

@dataclass
class TokenizedPair:
    key: str                 # "<source>/<id>": unique across mixed iterations
    prompt: List[int]
    real: List[int]
    generated: List[int]
    swap: bool = False       # judge relabeling: y' is the chosen side
    noise: float = 0.0       # per-pair reference-noise scale (0 = none)
    attention: Optional[Tuple[List[int], List[int], List[int]]] = None  # per-token attention
    #                          masks of (prompt, real, generated); None = attend everywhere


@dataclass
class TruncationStats:
    pairs: int = 0
    prompts: int = 0         # prompts that lost their start
    real: int = 0            # real answers cut
    generated: int = 0       # generated answers cut

    def as_dict(self) -> dict:
        return {"pairs": self.pairs, "truncated_prompts": self.prompts,
                "truncated_real": self.real, "truncated_generated": self.generated}


def truncate_pair(prompt: List[int], real: List[int], generated: List[int], max_length: int,
                  max_prompt_length: int, bos_id: Optional[int] = None):
    """SPIN's truncation rule, returning (prompt, real, generated, (cut_p, cut_r, cut_g)).

    Only when prompt + the longer answer exceeds max_length: first the prompt keeps its
    END (its last max_prompt_length tokens; a leading <s> stays in front), then, if still
    too long, both answers are cut to the room left (max_length - prompt length). (SPIN's
    code cut answers to max_length - max_prompt_length; cutting "to fit" keeps more.)
    A cut answer loses its closing eos.
    """
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be smaller than "
                         f"max_length ({max_length})")
    cut_p = cut_r = cut_g = False
    if len(prompt) + max(len(real), len(generated)) > max_length:
        if len(prompt) > max_prompt_length:
            if bos_id is not None and prompt and prompt[0] == bos_id:
                prompt = [bos_id] + prompt[len(prompt) - (max_prompt_length - 1):]
            else:
                prompt = prompt[-max_prompt_length:]
            cut_p = True
        room = max_length - len(prompt)
        if len(real) > room:
            real, cut_r = real[:room], True
        if len(generated) > room:
            generated, cut_g = generated[:room], True
    return prompt, real, generated, (cut_p, cut_r, cut_g)


def truncate_pair_spin(prompt, real, generated, max_length: int, max_prompt_length: int):
    """uclaml/SPIN's own truncation rule (spin/alignment/utils.py, tokenize_batch_element),
    on (ids, attention) pairs; returns (prompt, real, generated, (cut_p, cut_r, cut_g)).

    When prompt + the longer answer exceeds max_length, the prompt keeps its last
    max_prompt_length tokens; if that is still too long, BOTH answers are cut to
    max_length - max_prompt_length tokens — even when the prompt is shorter than that, so
    the row can end well below max_length. Cut answers lose their appended eos."""
    longer = max(len(real[0]), len(generated[0]))
    cut_p = cut_r = cut_g = False
    if len(prompt[0]) + longer > max_length:
        cut_p = len(prompt[0]) > max_prompt_length
        prompt = tuple(x[-max_prompt_length:] for x in prompt)
    if len(prompt[0]) + longer > max_length:
        room = max_length - max_prompt_length
        cut_r, cut_g = len(real[0]) > room, len(generated[0]) > room
        real = tuple(x[:room] for x in real)
        generated = tuple(x[:room] for x in generated)
    return prompt, real, generated, (cut_p, cut_r, cut_g)


def spin_tokens(tok, text: str):
    """uclaml/SPIN's tokenization of one piece: tokenizer(text, add_special_tokens=False)
    (no BOS; the checkpoint's own tokenizer.json), attention 0 at every eos inside it."""
    ids = tok.encode(text)
    return ids, [0 if i == tok.eos_id else 1 for i in ids]


def spin_row_texts(tok, rec: dict, empty_system: bool = True):
    """uclaml/SPIN's texts (spin/alignment/data.py, apply_chat_template): the prompt is the
    chat template of [system "", first user turn] with the generation prompt; each answer is
    the template of its assistant message alone, with the generation prompt stripped from
    its front — for zephyr "{answer}</s>\n"."""
    prompt = tok.apply_chat_template(rec["prompt"], add_generation_prompt=True, empty_system=empty_system)
    prefix = tok.apply_chat_template([], add_generation_prompt=True)
    answers = []
    for side in ("real", "generated"):
        text = tok.apply_chat_template([{"role": "assistant", "content": rec[side]}])
        answers.append(text[len(prefix):] if prefix and text.startswith(prefix) else text)
    return prompt, answers[0], answers[1]


def tokenize_pairs(tok, pairs: List[dict], source: str, max_length: int, max_prompt_length: int,
                   empty_system: bool = True, stats: Optional[TruncationStats] = None,
                   rows: str = "minispin"):
    """Pairs records -> TokenizedPair list, truncated and counted in stats.

    rows="minispin" (default): the prompt is encode_chat's ids (with <s>), each answer is
    encoded as the continuation of the prompt plus eos — exactly the tokens of the whole
    rendered conversation, i.e. what generation produced and what the model will see —
    and truncation cuts answers to the room left (truncate_pair).
    rows="spin": uclaml/SPIN's rows, token for token — no <s>; prompt and answers each
    tokenized on their own (spin_row_texts, spin_tokens) with attention 0 at every eos
    inside them; one more eos appended to each answer; SPIN's truncation
    (truncate_pair_spin)."""
    if rows not in ("minispin", "spin"):
        raise ValueError(f"rows must be minispin or spin, got {rows!r}")
    stats = stats if stats is not None else TruncationStats()
    out = []
    for rec in pairs:
        attention = None
        if rows == "spin":
            texts = spin_row_texts(tok, rec, empty_system)
            prompt, real, gen = (spin_tokens(tok, t) for t in texts)
            real, gen = (real[0] + [tok.eos_id], real[1] + [1]), (gen[0] + [tok.eos_id], gen[1] + [1])
            prompt, real, gen, cut = truncate_pair_spin(prompt, real, gen, max_length, max_prompt_length)
            (prompt, att_p), (real, att_r), (gen, att_g) = prompt, real, gen
            attention = (list(att_p), list(att_r), list(att_g))
        else:
            prompt, _ = tok.encode_chat(rec["prompt"], add_generation_prompt=True, empty_system=empty_system)
            real = tok.encode(rec["real"], continuation=True) + [tok.eos_id]
            gen = tok.encode(rec["generated"], continuation=True) + [tok.eos_id]
            prompt, real, gen, cut = truncate_pair(prompt, real, gen, max_length, max_prompt_length,
                                                   bos_id=tok.bos_id)
        stats.pairs += 1
        stats.prompts += cut[0]
        stats.real += cut[1]
        stats.generated += cut[2]
        noise = rec.get("noise") or 0.0
        out.append(TokenizedPair(f"{source}/{rec['id']}", list(prompt), list(real), list(gen),
                                 swap=bool(rec.get("swap", False)), noise=float(noise), attention=attention))
    return out, stats


def tokenize_sft(tok, examples: List[SFTExample], max_length: int, max_prompt_length: int,
                 empty_system: bool = True, stats: Optional[TruncationStats] = None):
    """SFT examples -> TokenizedPair list with the real answer only (generated = [])."""
    stats = stats if stats is not None else TruncationStats()
    out = []
    for ex in examples:
        prompt, _ = tok.encode_chat(ex.prompt, add_generation_prompt=True, empty_system=empty_system)
        real = tok.encode(ex.real, continuation=True) + [tok.eos_id]
        prompt, real, _, cut = truncate_pair(prompt, real, [], max_length, max_prompt_length,
                                             bos_id=tok.bos_id)
        stats.pairs += 1
        stats.prompts += cut[0]
        stats.real += cut[1]
        out.append(TokenizedPair(f"sft/{ex.id}", prompt, real, []))
    return out, stats


def _pad_rows(rows: List[Tuple[List[int], List[int]]], pad_id: int):
    """(ids, mask) rows -> right-padded (input_ids, loss_mask) LongTensors."""
    import torch
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        loss_mask[i, :len(mask)] = torch.tensor(mask, dtype=torch.long)
    return input_ids, loss_mask


def collate_pairs(items: List[TokenizedPair], pad_id: int) -> dict:
    """B pairs -> one [real; generated] batch of 2B right-padded rows.

    Rows 0..B-1 are prompt + real answer, rows B..2B-1 prompt + generated answer;
    loss_mask is 1 on answer tokens only. Right padding is safe under the causal mask:
    no real token attends to a pad. swap (B,) bool and noise (B,) float are the
    pair-level fields the loss and the reference pass read.
    """
    import torch
    rows = [(p.prompt + p.real, [0] * len(p.prompt) + [1] * len(p.real)) for p in items]
    rows += [(p.prompt + p.generated, [0] * len(p.prompt) + [1] * len(p.generated)) for p in items]
    input_ids, loss_mask = _pad_rows(rows, pad_id)
    batch = {"input_ids": input_ids, "loss_mask": loss_mask, "keys": [p.key for p in items],
             "swap": torch.tensor([p.swap for p in items], dtype=torch.bool),
             "noise": torch.tensor([p.noise for p in items], dtype=torch.float32)}
    if any(p.attention is not None for p in items):
        # uclaml/SPIN's rows hide some tokens (every eos inside the prompt and the answers)
        # from attention; padding is hidden too
        atts = [[a for _, _, a in pair_rows(p)] for p in items]
        att_rows = [(r, r) for r in [a[0] for a in atts] + [a[1] for a in atts]]
        batch["attention_mask"] = _pad_rows(att_rows, 0)[0]
    return batch


def collate_sft(items: List[TokenizedPair], pad_id: int) -> dict:
    """B examples -> (input_ids, loss_mask) of prompt + real answer."""
    rows = [(p.prompt + p.real, [0] * len(p.prompt) + [1] * len(p.real)) for p in items]
    input_ids, loss_mask = _pad_rows(rows, pad_id)
    return {"input_ids": input_ids, "loss_mask": loss_mask, "keys": [p.key for p in items]}


def pair_rows(p: TokenizedPair):
    """The two rows of a pair as training sees them: [(side, input_ids, labels,
    attention_mask)] for the real and the generated answer; labels are -100 where no loss
    is taken (the prompt)."""
    att_p, att_r, att_g = p.attention or ([1] * len(p.prompt), [1] * len(p.real), [1] * len(p.generated))
    out = []
    for side, ans, att in (("real", p.real, att_r), ("generated", p.generated, att_g)):
        out.append((side, p.prompt + ans, [-100] * len(p.prompt) + list(ans), list(att_p) + list(att)))
    return out


def dump_rows(path: str, items: List[TokenizedPair]):
    """train.py --dump-rows: one JSON line per answer row, unpadded, in training's input
    order: {"id", "source", "side", "input_ids", "labels", "attention_mask"}."""
    def records():
        for p in items:
            source, _, pid = p.key.partition("/")
            for side, ids, labels, att in pair_rows(p):
                yield {"id": pid, "source": source, "side": side, "input_ids": ids, "labels": labels,
                       "attention_mask": att}
    write_jsonl_atomic(path, records())
