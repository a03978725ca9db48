"""SentencePiece tokenizer and chat templates written as plain code.

Special tokens in text. `encode` splits the text at the literal strings of the special
tokens ("<s>", "</s>", "<unk>") and emits their ids, so a rendered chat turn's "</s>"
becomes the eos id, never the characters "<", "/", "s", ">". The text between them is
encoded by SentencePiece; only the chunk at the very start of the text gets SentencePiece's
dummy-prefix space ("▁"), chunks that follow a special token do not. That is what
transformers (>= 4.40, `legacy=False`) does for Llama/Mistral tokenizers; the tests check
it token for token. Runs of spaces are kept (transformers ignores the model's
remove_extra_whitespaces flag, and so do we). One known difference remains: a run of
several spaces before a word is split the SentencePiece way, "▁", "▁two", where the
HF tokenizer writes "▁▁", "two" (about 2% of lm-eval prompts with the Mistral vocabulary).

Chat templates. `zephyr` renders exactly
    "<|system|>\\n{system}</s>\\n<|user|>\\n{user}</s>\\n<|assistant|>\\n{assistant}</s>\\n"
and the generation prompt "<|assistant|>\\n". SPIN trains with an empty system turn in
front ("<|system|>\\n</s>\\n..."): pass `empty_system=True`. The same `encode_chat` serves
generation (prompt ids) and training (ids + mask), so the two can never disagree — the
flaw of the original SPIN code, which generated with an "### Instruction:" prompt and
trained on Zephyr's. That prompt is still available as template "instruction" for anyone
reproducing the original.

`encode_chat` encodes each assistant answer on its own (as a continuation, no dummy
prefix), so the mask of answer tokens is exact: the answer tokens plus their closing eos,
never the "\\n" after it, never a token shared with the prompt.
"""
from __future__ import annotations

import json
import os
import re
from typing import List, Optional, Sequence, Tuple

import sentencepiece as spm
from .errors import UserError

TEMPLATES = ("zephyr", "instruction")


class TokenizerError(UserError):
    pass


class Tokenizer:
    def __init__(self, model_file: str, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 pad_id: Optional[int] = None, template: str = "zephyr"):
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"{model_file}: tokenizer.model not found")
        self.model_file = model_file
        from sentencepiece import sentencepiece_model_pb2
        proto = sentencepiece_model_pb2.ModelProto()
        with open(model_file, "rb") as f:
            proto.ParseFromString(f.read())
        # transformers ignores the normalizer's remove_extra_whitespaces (llama2.c's models,
        # stories260K's among them, set it): keep runs of spaces as transformers does, so
        # training, generation and lm-eval requests see the same ids as the HF tokenizer
        proto.normalizer_spec.remove_extra_whitespaces = False
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        # a second processor without the dummy prefix encodes text that continues a sequence
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.bos_id = self.sp.bos_id() if bos_id is None else bos_id
        self.eos_id = self.sp.eos_id() if eos_id is None else eos_id
        self.unk_id = self.sp.unk_id()
        sp_pad = self.sp.pad_id()
        # no pad token in Llama/Mistral: pad with eos; padding is always masked anyway
        self.pad_id = pad_id if pad_id is not None else (sp_pad if sp_pad >= 0 else self.eos_id)
        self.vocab_size = self.sp.vocab_size()
        if template not in TEMPLATES:
            raise TokenizerError(f"unknown chat template '{template}' (choose from {TEMPLATES})")
        self.template = template
        specials = {}
        for i in (self.bos_id, self.eos_id, self.unk_id):
            if i is not None and 0 <= i < self.vocab_size:
                specials[self.sp.id_to_piece(i)] = i
        self.special_ids = specials
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")

    # ------------------------------------------------------------------ plain text
    def encode(self, text: str, bos: bool = False, eos: bool = False, continuation: bool = False) -> List[int]:
        """Text -> ids. Special-token strings inside the text become their ids.

        continuation=True: the text continues earlier tokens, so no leading dummy space.
        """
        ids = [self.bos_id] if bos else []
        first = not continuation
        for chunk in self._special_re.split(text):
            if not chunk:
                continue
            if chunk in self.special_ids:
                ids.append(self.special_ids[chunk])
            else:
                # like transformers: no dummy space in front of text that starts with one
                dummy = first and not chunk.startswith(" ")
                ids.extend((self.sp if dummy else self.sp_cont).encode(chunk))
            first = False
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    # ------------------------------------------------------------------ chat
    def _segments(self, messages, add_generation_prompt: bool, empty_system: bool):
        """The rendered conversation as (text, is_answer) pieces."""
        messages = list(messages)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if self.template == "instruction":
            users = [m for m in messages if m["role"] == "user"]
            if len(users) != 1 or messages[0]["role"] != "user":
                raise TokenizerError("template 'instruction' renders one user turn (and its answer)")
            segs = [(f"### Instruction: {users[0]['content']}\n\n### Response: ", False)]
            for m in messages[1:]:
                segs += [(m["content"], True), ("</s>", True)]
            return segs
        if empty_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": ""}] + messages
        segs = []
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise TokenizerError(f"unknown role '{m['role']}' (system, user or assistant)")
            segs.append((f"<|{m['role']}|>\n", False))
            if m["role"] == "assistant":
                segs += [(m["content"], True), ("</s>", True), ("\n", False)]
            else:
                segs.append((f"{m['content']}</s>\n", False))
        if add_generation_prompt:
            segs.append(("<|assistant|>\n", False))
        return segs

    def apply_chat_template(self, messages, add_generation_prompt: bool = False,
                            empty_system: bool = False) -> str:
        """The rendered text (no <s>; encode adds it)."""
        return "".join(t for t, _ in self._segments(messages, add_generation_prompt, empty_system))

    def encode_chat(self, messages, add_generation_prompt: bool = False, empty_system: bool = False,
                    bos: bool = True) -> Tuple[List[int], List[int]]:
        """Rendered conversation -> (ids, mask); mask is 1 on answer tokens and their eos."""
        ids = [self.bos_id] if bos else []
        mask = [0] * len(ids)
        prompt_text = ""
        first = True

        def flush(text, is_answer):
            nonlocal first
            piece = self.encode(text, continuation=not first)
            first = False
            ids.extend(piece)
            mask.extend([int(is_answer)] * len(piece))

        # merge neighbouring prompt pieces so the prompt tokenizes as one string;
        # each answer is encoded on its own
        for text, is_answer in self._segments(messages, add_generation_prompt, empty_system):
            if is_answer:
                if prompt_text:
                    flush(prompt_text, False)
                    prompt_text = ""
                if text:
                    flush(text, True)
            else:
                prompt_text += text
        if prompt_text:
            flush(prompt_text, False)
        return ids, mask


def load_tokenizer(path: str, template: str = "zephyr") -> Tokenizer:
    """A model folder (tokenizer.model + config.json/tokenizer_config.json) or a .model file.

    bos/eos/pad ids come from config.json when present (the model's view), else from the
    SentencePiece model. A vocabulary larger or smaller than config.vocab_size is refused:
    ids would index outside the embedding, or the model would never emit some tokens.
    """
    if os.path.isdir(path):
        model_file = os.path.join(path, "tokenizer.model")
        folder = path
    else:
        model_file, folder = path, os.path.dirname(path)
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"{model_file}: tokenizer.model not found (minispin reads "
                                "SentencePiece tokenizers; tokenizer.json alone is not enough)")
    cfg = {}
    cfg_path = os.path.join(folder, "config.json")
    if os.path.isfile(cfg_path) and os.path.isdir(path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    tok = Tokenizer(model_file, bos_id=cfg.get("bos_token_id"), eos_id=eos,
                    pad_id=cfg.get("pad_token_id"), template=template)
    if "vocab_size" in cfg and cfg["vocab_size"] != tok.vocab_size:
        raise TokenizerError(f"{model_file}: vocabulary has {tok.vocab_size} tokens but "
                             f"{cfg_path} says vocab_size {cfg['vocab_size']}: wrong tokenizer for this model?")
    return tok
