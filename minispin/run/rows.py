"""Pairs -> training rows: tokenization, truncation, collation, and the rows of the originals.

A pair {"prompt", "real", "generated"} becomes token rows in one of three ways, chosen by
the recipe key `rows` (tokenize_pairs is the one place that reads it):

* "minispin" (our default): the prompt as the chat template renders it, with <s>; each
  answer encoded as the continuation of the prompt plus eos, i.e. exactly the tokens of the
  whole rendered conversation (what generation produced and what the model will see);
  truncation keeps the prompt's end and cuts answers to the room left (truncate_pair).
* "spin": uclaml/SPIN's rows token for token (spin/run_spin.py apply_chat_template and
  spin/alignment/utils.py tokenize_batch_element): the prompt is the template of
  [system "", user] with the generation prompt, each answer the template of its assistant
  message alone with "<|assistant|>\n" stripped; every piece tokenized on its own without
  <s>, attention 0 at every eos inside it, one more eos appended to each answer, SPIN's
  truncation (truncate_pair_spin).
* "study": the study's rows (github Joyyang158/self-improvement-of-LLMs, SPIN/spin/run_spin.py,
  the "W/o System Prompt" apply_chat_template, 6fda59a to HEAD): the prompt is the template
  of [user] alone (no system turn) with the generation prompt, and each ANSWER text is the
  template of the whole [user, assistant] conversation. Its strip of "<|assistant|>\n"
  never fires (the text starts with the user turn), so every answer row is prompt +
  prompt-again + answer, and the loss is taken on the repeated question too. Tokenized by
  the same tokenize_batch_element as uclaml/SPIN's (the study's SPIN/spin/alignment/utils.py
  is byte-identical), so from the texts on it is "spin".

Each rule is a pure function here; tests/test_fidelity.py and tests/test_study_fidelity.py
compare the rows with restatements of the original code, token for token.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .data import SFTExample, write_jsonl_atomic

ROWS = ("minispin", "spin", "study")   # the values of the recipe key `rows`
STUDY_ASSISTANT_PREFIX = "<|assistant|>\n"   # run_spin.py: apply_chat_template(assistant_prefix=...)


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


def study_row_texts(tok, rec: dict):
    """The study's texts (SPIN/spin/run_spin.py, "W/o System Prompt" apply_chat_template):
    prompt = the template of [first user turn] with the generation prompt, no system turn;
    each answer = the template of [first user turn, the answer] (the whole conversation),
    with "<|assistant|>\\n" stripped from its front only if it starts with it, which a
    template that writes the user turn first never does. Zephyr:
    prompt "<|user|>\\n{q}</s>\\n<|assistant|>\\n", answer "<|user|>\\n{q}</s>\\n<|assistant|>\\n{a}</s>\\n"."""
    user = {"role": "user", "content": next(m["content"] for m in rec["prompt"] if m["role"] == "user")}
    prompt = tok.apply_chat_template([user], add_generation_prompt=True)
    answers = []
    for side in ("real", "generated"):
        text = tok.apply_chat_template([user, {"role": "assistant", "content": rec[side]}])
        if text.startswith(STUDY_ASSISTANT_PREFIX):   # re.sub(f"^{re.escape(prefix)}", "", s)
            text = text[len(STUDY_ASSISTANT_PREFIX):]
        answers.append(text)
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
    (truncate_pair_spin).
    rows="study": the study's texts (study_row_texts), then exactly as "spin"."""
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {', '.join(ROWS)}, got {rows!r}")
    stats = stats if stats is not None else TruncationStats()
    out = []
    for rec in pairs:
        attention = None
        if rows in ("spin", "study"):
            texts = spin_row_texts(tok, rec, empty_system) if rows == "spin" else study_row_texts(tok, rec)
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


def row_lengths(items: List[TokenizedPair]) -> List[int]:
    """The 2B row lengths of collate_pairs' batch: prompt + real answer for each pair, then
    prompt + generated answer for each pair."""
    return ([len(p.prompt) + len(p.real) for p in items] +
            [len(p.prompt) + len(p.generated) for p in items])


def collate_pairs(items: List[TokenizedPair], pad_id: int) -> dict:
    """B pairs -> one [real; generated] batch of 2B right-padded rows.

    Rows 0..B-1 are prompt + real answer, rows B..2B-1 prompt + generated answer;
    loss_mask is 1 on answer tokens only. Right padding is safe under the causal mask:
    no real token attends to a pad. lengths (2B,): each row's tokens before padding. swap
    (B,) bool and noise (B,) float are the pair-level fields the loss and the reference
    pass read.
    """
    import torch
    rows = [(p.prompt + p.real, [0] * len(p.prompt) + [1] * len(p.real)) for p in items]
    rows += [(p.prompt + p.generated, [0] * len(p.prompt) + [1] * len(p.generated)) for p in items]
    input_ids, loss_mask = _pad_rows(rows, pad_id)
    batch = {"input_ids": input_ids, "loss_mask": loss_mask, "keys": [p.key for p in items],
             "lengths": torch.tensor(row_lengths(items), dtype=torch.long),
             "swap": torch.tensor([p.swap for p in items], dtype=torch.bool),
             "noise": torch.tensor([p.noise for p in items], dtype=torch.float32)}
    if any(p.attention is not None for p in items):
        # uclaml/SPIN's rows hide some tokens (every eos inside the prompt and the answers)
        # from attention; padding is hidden too
        atts = [[a for _, _, _, a in pair_rows(p)] for p in items]
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


def items_fingerprint(items: List[TokenizedPair]) -> str:
    """A hash of the rows a run trains on: pair keys, token ids, swap and noise."""
    h = hashlib.sha256()
    for p in items:
        h.update(json.dumps([p.key, p.prompt, p.real, p.generated, p.swap, p.noise,
                             p.attention]).encode())
    return h.hexdigest()[:16]
