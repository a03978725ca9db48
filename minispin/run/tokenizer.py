"""Tokenizers that follow the checkpoint: its tokenizer.json if it has one, else tokenizer.model.

Two backends behind one API (encode, decode, encode_chat, apply_chat_template, id_to_piece,
bos_id, eos_id, eos_ids, pad_id, unk_id, vocab_size, template):

* tokenizer.json -> the `tokenizers` library (Hugging Face's Rust tokenizer, what
  transformers' fast tokenizers run). The file says everything: added tokens, normalizer,
  pre-tokenizer, model, decoder; `encode(text)` is exactly
  `tokenizers.Tokenizer.encode(text, add_special_tokens=False).ids` and `decode` is its
  decode. This matters for Mistral-7B-v0.1 and zephyr-7b-sft-full, whose tokenizer.json is
  in the 2023 layout (normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer): the
  normalizer runs on every piece of text between added tokens, so "</s>\\n<|user|>" is
  "</s>", "▁", "<0x0A>", "<", ... . That is what uclaml/SPIN and the zephyr SFT saw, and so
  what we encode. The Metaspace layout (pre-tokenizer Metaspace, prepend_scheme "first")
  and byte-level BPE (Llama-3, Qwen2.5) are equally just what their file says.
* tokenizer.model alone (llama2.c's stories260K, the bundled tiny models) -> SentencePiece,
  as before: the text is split at the literal strings of bos/eos/unk, which become their
  ids; the pieces between are encoded by SentencePiece, and only the piece at the very start
  gets the dummy-prefix "▁" (transformers' `legacy=False` rule), never one that starts
  with a space. Runs of spaces are kept (transformers ignores the model's
  remove_extra_whitespaces flag, and so do we). On the Mistral vocabulary this path gives
  the same ids as the Metaspace tokenizer.json (tests: every bundled text). transformers 5
  converting a tokenizer.model to a fast tokenizer itself can split runs of spaces
  differently ("▁▁", "How" for "▁", "▁How"); the checkpoint's own tokenizer.json, when
  there is one, is the truth.

Special tokens, as transformers reads them: bos/eos/unk/pad token strings from
tokenizer_config.json (special_tokens_map.json overrides it when tokenizer_config.json has
no "added_tokens_decoder", as in transformers 5), mapped to ids by the vocabulary. A key
that is absent falls back to config.json's *_token_id, then to the tokenizer file itself
(SentencePiece's own ids; for tokenizer.json the token its post-processor puts first as
bos, and the first of "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>" that is a special
added token as eos). An explicit null (Qwen2.5's bos_token) means none: bos_id is None and
bos=True adds nothing, as transformers adds nothing. `eos_id` is the tokenizer's eos (the
end-of-turn token of an instruct model, e.g. Llama-3.1-Instruct's "<|eot_id|>");
`eos_ids` are all stop ids: eos_id, then config.json's and generation_config.json's
eos_token_id (an int or a list), de-duplicated. pad_id falls back to eos_id (padding is
always masked). A bare file path reads no neighbouring files.

continuation=True encodes text that follows earlier tokens, so without the prefix that a
fresh encode puts in front of the text's first piece (the piece before the first added
token); pieces after an added token inside the text are encoded as the layout says:
  2023 layout        the Prepend("▁") of the first piece is dropped (later pieces keep it);
  Metaspace          the "▁" that prepend_scheme adds to the first piece is dropped;
  byte-level BPE     add_prefix_space's space is dropped; with add_prefix_space false
                     (Llama-3, Qwen2.5) continuation changes nothing;
  SentencePiece      no dummy prefix on the first piece.
For tokenizer.json it is computed with a twin of the file that has that prefix switched off
(the ids of the first piece come from the twin, the rest from the file itself).

Chat templates (minispin/run/chat.py renders them): "checkpoint" (the folder's own
chat_template; the default when there is one), "zephyr" (the default otherwise) and
"instruction". empty_system=True puts SPIN's empty system turn in front ("zephyr": "<|system|>\\n</s>\\n...")
unless the conversation starts with a system message; "instruction" ignores it.

encode_chat: ids and the answer mask. The conversation is rendered once and the whole
text is tokenized once, so the ids are what the tokenizer gives for the rendered text (what
the model saw in SFT), with bos in front unless the template wrote it. chat.py gives each
answer's character span; the tokens' character offsets (from `tokenizers`, or from
SentencePiece's piece spans) give the mask: 1 on the tokens inside an answer and on the
tail tokens that close it, up to and including the first special token there ("</s>",
"<|eot_id|>", "<|im_end|>"; a template that writes " </s>" gets "▁", "</s>"; a tail with
no special token leaves only the answer), 0 elsewhere. A token that covers both answer and
template text (e.g. "▁It" in "### Response: It", whose space the template wrote) makes
encode_chat raise a TokenizerError: minispin refuses rather than guesses whose token it is.
"""
from __future__ import annotations

import bisect
import copy
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from .chat import BUILT_IN, TEMPLATES, ChatTemplate, TokenizerError
from .errors import MissingFileError, json_loads

__all__ = ["Tokenizer", "SentencePieceTokenizer", "JsonTokenizer", "TokenizerError", "TEMPLATES",
           "load_tokenizer"]

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")
# eos of a bare tokenizer.json (no tokenizer_config.json beside it): the usual names
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")


def _check_text(text, what: str = "text"):
    if not isinstance(text, str):
        raise TokenizerError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{what} has a lone surrogate {text[e.start]!r} at character {e.start}, "
                             "which is not valid Unicode: decode the source with errors='replace' "
                             "or fix its encoding") from None


class Tokenizer:
    """What both backends share: special tokens, chat templates, answer masks."""

    path: str
    vocab_size: int
    template: str

    # ------------------------------------------------------------------ backend hooks
    def _tokens(self, text: str, continuation: bool, offsets: bool
                ) -> Tuple[List[int], Optional[List[Tuple[int, int]]]]:
        raise NotImplementedError

    def _token_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def _defaults(self) -> Dict[str, Optional[int]]:
        raise NotImplementedError

    def _is_special(self, i: int) -> bool:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    @property
    def adds_bos(self) -> bool:
        """Whether transformers' `encode(text)` (add_special_tokens=True) puts bos in front:
        for a tokenizer.json, whether its post-processor starts with a special token (SmolLM2's
        has bos <|im_start|> but adds nothing); SentencePiece (Llama's slow tokenizer) does."""
        return self.bos_id is not None

    # ------------------------------------------------------------------ set-up
    def _configure(self, folder: "_Folder", template: Optional[str]):
        tokens, ids = folder.tokens, folder.ids
        defaults = self._defaults()

        def token_id(key):
            if tokens.get(key) is None:
                return None
            i = self._token_id(tokens[key])
            if i is None:
                raise TokenizerError(f"{folder.tokens_origin}: {key} {tokens[key]!r} is not in the "
                                     f"vocabulary of {self.path}: wrong tokenizer files?")
            return i

        self.bos_id = token_id("bos_token") if "bos_token" in tokens else \
            next(iter(ids["bos_token_id"]), defaults["bos"])
        self.eos_id = token_id("eos_token")
        if self.eos_id is None:
            self.eos_id = next(iter(ids["eos_token_id"] + ids["generation eos_token_id"]), defaults["eos"])
        if self.eos_id is None:
            raise TokenizerError(f"{folder.origin or self.path}: no eos token (set eos_token in "
                                 "tokenizer_config.json or eos_token_id in config.json)")
        self.eos_ids = list(dict.fromkeys([self.eos_id] + ids["eos_token_id"] + ids["generation eos_token_id"]))
        self.unk_id = token_id("unk_token") if tokens.get("unk_token") is not None else defaults["unk"]
        pad = token_id("pad_token")
        if pad is None:
            pad = next(iter(ids["pad_token_id"]), defaults["pad"])
        self.pad_id = self.eos_id if pad is None else pad
        for i in [self.bos_id, self.unk_id, self.pad_id] + self.eos_ids:
            if i is not None and not 0 <= i < self.vocab_size:
                raise TokenizerError(f"{folder.origin or self.path}: special token id {i} is outside "
                                     f"the vocabulary of {self.path} ({self.vocab_size} tokens)")

        # the special tokens a template sees, as strings (transformers' special_tokens_map)
        variables = {k: v for k, v in tokens.items() if k in SPECIAL_KEYS and v is not None}
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("unk_token", self.unk_id)):
            if key not in tokens and i is not None:
                variables[key] = self.id_to_piece(i)
        if template is None:
            template = "checkpoint" if folder.chat_template else "zephyr"
        if template not in TEMPLATES:
            raise TokenizerError(f"unknown chat template '{template}' (choose from {', '.join(TEMPLATES)})")
        if template == "checkpoint":
            if not folder.chat_template:
                raise TokenizerError(f"{folder.origin or self.path}: template 'checkpoint' but the "
                                     "model has no chat_template (choose zephyr or instruction)")
            source, origin = folder.chat_template
        else:
            source, origin = BUILT_IN[template], f"built-in template '{template}'"
        self.template = template
        self.chat = ChatTemplate(template, source, origin, variables)

    # ------------------------------------------------------------------ plain text
    def encode(self, text: str, bos: bool = False, eos: bool = False, continuation: bool = False) -> List[int]:
        """Text -> ids; added/special tokens written in the text become their ids.

        bos=True puts bos_id in front (if the tokenizer has one), eos=True appends eos_id;
        continuation=True: the text follows earlier tokens (module docstring).
        """
        _check_text(text)
        ids = ([self.bos_id] if bos and self.bos_id is not None else []) + \
            list(self._tokens(text, continuation, False)[0])
        return ids + [self.eos_id] if eos else ids

    # ------------------------------------------------------------------ chat
    def _messages(self, messages, empty_system: bool) -> List[dict]:
        if not isinstance(messages, (list, tuple)):
            raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
            _check_text(m["role"], f"message {i} role")
            _check_text(m["content"], f"message {i} content")
            # transformers drops keys whose value is None before rendering
            out.append({k: v for k, v in m.items() if v is not None})
        if empty_system and self.template != "instruction" and (not out or out[0]["role"] != "system"):
            out.insert(0, {"role": "system", "content": ""})
        return out

    def apply_chat_template(self, messages, add_generation_prompt: bool = False,
                            empty_system: bool = False) -> str:
        """The rendered text (bos only if the template writes it; encode_chat adds it)."""
        return self.chat.render(self._messages(messages, empty_system), add_generation_prompt)

    def encode_chat(self, messages, add_generation_prompt: bool = False, empty_system: bool = False,
                    bos: bool = True) -> Tuple[List[int], List[int]]:
        """Rendered conversation -> (ids, mask): mask is 1 on each answer and its end-of-turn token."""
        text, spans = self.chat.answer_spans(self._messages(messages, empty_system), add_generation_prompt)
        _check_text(text, "rendered conversation")
        ids, offsets = self._tokens(text, False, True)
        mask = [0] * len(ids)
        for k, (start, end, turn_end) in enumerate(spans):
            closing = []  # tail tokens up to the first special one
            for j, (a, b) in enumerate(offsets):
                for boundary in (start, end):
                    if a < boundary < b:
                        raise TokenizerError(
                            f"answer {k}: token {self.id_to_piece(ids[j])!r} covers both answer and "
                            f"template text (character {boundary} of the rendered conversation, "
                            f"template '{self.template}'); minispin will not guess whose token it is")
                if start <= a < end and b <= end:
                    mask[j] = 1
                elif end <= a < turn_end and closing is not None:
                    closing.append(j)
                    if self._is_special(ids[j]):
                        for c in closing:
                            mask[c] = 1
                        closing = None
        if bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids, mask = [self.bos_id] + ids, [0] + mask
        return ids, mask


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2, sentencepiece_pb2
        self.path = model_file
        self._piece_spans = sentencepiece_pb2.SentencePieceText
        try:
            proto = sentencepiece_model_pb2.ModelProto()
            with open(model_file, "rb") as f:
                proto.ParseFromString(f.read())
            # transformers ignores the normalizer's remove_extra_whitespaces (llama2.c's models,
            # stories260K's among them, set it): keep runs of spaces as transformers does
            proto.normalizer_spec.remove_extra_whitespaces = False
            self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            # a second processor without the dummy prefix encodes text that continues a sequence
            proto.normalizer_spec.add_dummy_prefix = False
            self.sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except Exception as e:  # protobuf DecodeError, sentencepiece RuntimeError
            raise TokenizerError(f"{model_file}: not a SentencePiece model ({type(e).__name__}: {e}); "
                                 "restore tokenizer.model from the model's source") from None
        self.vocab_size = self.sp.vocab_size()
        if self.vocab_size <= 0:
            raise TokenizerError(f"{model_file}: not a SentencePiece model (no pieces)")

    def _token_id(self, token):
        i = self.sp.piece_to_id(token)  # unknown pieces map to unk: check the way back
        return i if self.sp.id_to_piece(i) == token else None

    def _defaults(self):
        sp_pad = self.sp.pad_id()
        return {"bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "unk": self.sp.unk_id(),
                "pad": sp_pad if sp_pad >= 0 else None}

    def _configure(self, folder, template):
        super()._configure(folder, template)
        specials = {}
        for i in (self.bos_id, self.eos_id, self.unk_id):
            if i is not None and 0 <= i < self.vocab_size:
                specials[self.sp.id_to_piece(i)] = i
        self.special_ids = specials
        self._special_re = re.compile(
            "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")

    def _is_special(self, i):
        return i in self.special_ids.values()

    def _tokens(self, text, continuation, offsets):
        ids, spans = [], []
        first, pos = not continuation, 0
        for chunk in self._special_re.split(text) if self.special_ids else [text]:
            if not chunk:
                continue
            if chunk in self.special_ids:
                ids.append(self.special_ids[chunk])
                spans.append((pos, pos + len(chunk)))
            else:
                # like transformers: no dummy space in front of text that starts with one
                sp = self.sp if first and not chunk.startswith(" ") else self.sp_cont
                if offsets:
                    pieces = self._piece_spans()
                    pieces.ParseFromString(sp.encode(chunk, out_type="serialized_proto"))
                    # piece spans are in UTF-8 bytes: map them to characters
                    char_starts = [0]
                    for ch in chunk:
                        char_starts.append(char_starts[-1] + len(ch.encode("utf-8")))
                    for p in pieces.pieces:
                        ids.append(p.id)
                        spans.append((pos + bisect.bisect_right(char_starts, p.begin) - 1,
                                      pos + bisect.bisect_left(char_starts, p.end)))
                else:
                    ids.extend(sp.encode(chunk))
            first = False
            pos += len(chunk)
        return ids, (spans if offsets else None)

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids]
        if skip_special_tokens:  # SentencePiece writes no text for bos/eos
            return self.sp.decode(ids)
        # special tokens as their text, SentencePiece's decode for the runs between them
        out, run = [], []
        for i in ids + [None]:
            if i is None or self._is_special(i):
                out.append(self.sp.decode(run))
                run = []
                if i is not None:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        return "".join(out)

    def id_to_piece(self, i):
        return self.sp.id_to_piece(int(i))


def _without_prefix(spec: dict) -> Tuple[dict, bool]:
    """A copy of a tokenizer.json spec that puts no prefix in front of a piece (continuation)."""
    spec = dict(spec, normalizer=copy.deepcopy(spec.get("normalizer")),
                pre_tokenizer=copy.deepcopy(spec.get("pre_tokenizer")))  # vocab and merges shared
    changed = False

    def normalizer(n):
        nonlocal changed
        if not n:
            return n
        if n.get("type") == "Prepend":
            changed = True
            return None
        if n.get("type") == "Sequence":
            n["normalizers"] = [m for m in map(normalizer, n["normalizers"]) if m is not None]
        return n

    def pre_tokenizer(p):
        nonlocal changed
        if not p:
            return
        if p.get("type") == "Sequence":
            for q in p["pretokenizers"]:
                pre_tokenizer(q)
        elif p.get("type") == "Metaspace":
            changed |= p.get("prepend_scheme", "never") != "never" or bool(p.get("add_prefix_space"))
            p["prepend_scheme"] = "never"
            if "add_prefix_space" in p:  # tokenizers < 0.14 wrote this instead
                p["add_prefix_space"] = False
        elif p.get("type") == "ByteLevel":
            changed |= bool(p.get("add_prefix_space"))
            p["add_prefix_space"] = False

    spec["normalizer"] = normalizer(spec.get("normalizer"))
    pre_tokenizer(spec.get("pre_tokenizer"))
    return spec, changed


class JsonTokenizer(Tokenizer):
    def __init__(self, json_file: str):
        from tokenizers import Tokenizer as RustTokenizer
        self.path = json_file
        try:
            with open(json_file, encoding="utf-8") as f:
                source = f.read()
            spec = json_loads(source)
            self.tk = RustTokenizer.from_str(source)
            twin, changed = _without_prefix(spec)
        except Exception as e:  # not JSON, or JSON that is not a tokenizer
            raise TokenizerError(f"{json_file}: not a tokenizer.json the tokenizers library can read "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                 "restore it from the model's source") from None
        added = self.tk.get_added_tokens_decoder()
        self._added_ids = set(added)
        self._special = {i for i, t in added.items() if t.special}
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self._bare_defaults = self._read_defaults(spec, added)
        # the twin for continuation is built on first use (a second copy of the vocabulary)
        self._twin_parts = (twin["normalizer"], twin["pre_tokenizer"]) if changed else None
        self._twin = None if changed else self.tk

    def _continuation_tokenizer(self):
        if self._twin is None:
            from tokenizers import Tokenizer as RustTokenizer
            with open(self.path, "rb") as f:
                spec = json_loads(f.read().decode("utf-8"))
            spec["normalizer"], spec["pre_tokenizer"] = self._twin_parts
            self._twin = RustTokenizer.from_str(json.dumps(spec))
        return self._twin

    def _read_defaults(self, spec, added):
        bos = None
        post = spec.get("post_processor") or {}
        for p in post.get("processors", [post]):
            p = p or {}
            single = p.get("single") or []
            if p.get("type") == "TemplateProcessing" and single and "SpecialToken" in single[0]:
                bos = self.tk.token_to_id(single[0]["SpecialToken"]["id"])
        specials = {t.content: i for i, t in added.items() if t.special}
        eos = next((specials[n] for n in EOS_NAMES if n in specials), None)
        unk = (spec.get("model") or {}).get("unk_token")
        return {"bos": bos, "eos": eos, "unk": self.tk.token_to_id(unk) if unk else None, "pad": None}

    def _defaults(self):
        return self._bare_defaults

    @property
    def adds_bos(self):
        return self.bos_id is not None and self._bare_defaults["bos"] is not None

    def _token_id(self, token):
        return self.tk.token_to_id(token)

    def _is_special(self, i):
        return i in self._special

    def _tokens(self, text, continuation, offsets):
        enc = self.tk.encode(text, add_special_tokens=False)
        ids, spans = enc.ids, enc.offsets
        if continuation and self._twin_parts is not None:
            # the twin encodes the first piece without its prefix; the pieces after the first
            # added token are the file's own (both split the text at the same added tokens)
            cont = self._continuation_tokenizer().encode(text, add_special_tokens=False)
            k = next((j for j, i in enumerate(ids) if i in self._added_ids), len(ids))
            kc = next((j for j, i in enumerate(cont.ids) if i in self._added_ids), len(cont.ids))
            ids, spans = cont.ids[:kc] + ids[k:], cont.offsets[:kc] + spans[k:]
        return list(ids), (list(spans) if offsets else None)

    def decode(self, ids, skip_special_tokens=True):
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, i):
        return self.tk.id_to_token(int(i))


class _Folder:
    """What a model folder says about its tokenizer besides the vocabulary."""

    def __init__(self, folder: Optional[str]):
        self.origin = folder
        self.tokens: Dict[str, Optional[str]] = {}
        self.tokens_origin = ""
        self.config: dict = {}
        # bos/eos/pad ids of config.json and generation_config.json, each a list of ints
        self.ids: Dict[str, List[int]] = {k: [] for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                           "generation eos_token_id")}
        self.chat_template: Optional[Tuple[str, str]] = None  # (source, file it came from)
        if folder is None:
            return
        path = lambda name: os.path.join(folder, name)  # noqa: E731
        tok_cfg = _read_json(path("tokenizer_config.json"))
        self.tokens_origin = path("tokenizer_config.json")
        for key in SPECIAL_KEYS:
            if key in tok_cfg:
                self.tokens[key] = _token_string(tok_cfg[key], self.tokens_origin, key)
        if "added_tokens_decoder" not in tok_cfg and os.path.isfile(path("special_tokens_map.json")):
            self.tokens_origin = path("special_tokens_map.json") + " / tokenizer_config.json"
            for key, value in _read_json(path("special_tokens_map.json")).items():
                if key in SPECIAL_KEYS:
                    self.tokens[key] = _token_string(value, path("special_tokens_map.json"), key)
        self.config = _read_json(path("config.json"))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            self.ids[key] = _id_list(self.config.get(key), path("config.json"), key)
        self.ids["generation eos_token_id"] = _id_list(
            _read_json(path("generation_config.json")).get("eos_token_id"),
            path("generation_config.json"), "eos_token_id")
        if os.path.isfile(path("chat_template.jinja")):  # where transformers >= 4.49 saves it
            try:
                with open(path("chat_template.jinja"), encoding="utf-8") as f:
                    self.chat_template = (f.read(), path("chat_template.jinja"))
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{path('chat_template.jinja')}: not UTF-8 text ({e})") from None
        elif tok_cfg.get("chat_template"):
            source = tok_cfg["chat_template"]
            if isinstance(source, list):  # named templates: transformers takes "default"
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                if "default" not in named:
                    raise TokenizerError(f"{path('tokenizer_config.json')}: chat_template lists "
                                         f"{sorted(map(str, named))} but no 'default'")
                source = named["default"]
            if not isinstance(source, str):
                raise TokenizerError(f"{path('tokenizer_config.json')}: chat_template must be a string")
            self.chat_template = (source, path("tokenizer_config.json"))


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json_loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e}); restore it from the model's source") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _id_list(value, origin: str, key: str) -> List[int]:
    """config.json's token ids: null, an int, or a list of ints (eos of Llama-3.x)."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{origin}: {key} must be an integer or a list of integers, got {value!r}")
    return values


def _token_string(value, origin: str, key: str) -> Optional[str]:
    """A special token as the files write it: "<s>", {"content": "<s>", ...} or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{origin}: {key} must be a string or {{\"content\": ...}}, got {value!r}")
    return value


def load_tokenizer(path: str, template: Optional[str] = None) -> Tokenizer:
    """A model folder (tokenizer.json, else tokenizer.model) or a .json / .model file.

    template: "checkpoint", "zephyr" or "instruction"; None (or "auto", the recipe's word
    for it) = "checkpoint" when the folder has a chat template, else "zephyr". A vocabulary larger than config.json's vocab_size is
    refused (its ids would index outside the embedding); a smaller one is fine (Qwen2.5
    pads its embedding).
    """
    path = os.fspath(path)
    template = None if template == "auto" else template
    if os.path.isdir(path):
        folder = path
        candidates = [os.path.join(path, n) for n in ("tokenizer.json", "tokenizer.model")]
        file = next((c for c in candidates if os.path.isfile(c)), None)
        if file is None:
            raise MissingFileError(f"{path}: no tokenizer.json or tokenizer.model in the model folder")
    elif os.path.isfile(path):
        folder, file = None, path
    else:
        raise MissingFileError(f"{path}: tokenizer not found (give a model folder, a "
                                "tokenizer.json or a tokenizer.model)")
    tok = JsonTokenizer(file) if file.endswith(".json") else SentencePieceTokenizer(file)
    info = _Folder(folder)
    n = info.config.get("vocab_size")
    if isinstance(n, int) and tok.vocab_size > n:
        raise TokenizerError(f"{file}: vocabulary has {tok.vocab_size} tokens but "
                             f"{os.path.join(folder, 'config.json')} says vocab_size {n}: wrong tokenizer "
                             "for this model?")
    tok._configure(info, template)
    return tok
