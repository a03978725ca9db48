"""Chat templates: rendered with jinja2 as transformers renders them, and where each answer lies.

Three templates. "checkpoint" is the model folder's own `chat_template` (chat_template.jinja,
or tokenizer_config.json's "chat_template": a string, or a list of named templates of
which "default" is taken). "zephyr" and "instruction" are built in, written here as jinja
too so that every template goes through the same code:

    zephyr       "<|system|>\\n{system}</s>\\n<|user|>\\n{user}</s>\\n<|assistant|>\\n{answer}</s>\\n",
                 generation prompt "<|assistant|>\\n" (eos_token stands for "</s>")
    instruction  "### Instruction: {question}\\n\\n### Response: " then each answer and eos:
                 the prompt uclaml/SPIN's generate.py wrote, one user turn only

The engine is the one transformers uses (chat_template_utils._compile_jinja_template):
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and the loopcontrols
extension; a `tojson` filter that does not escape HTML; `raise_exception` and
`strftime_now`; and at render time messages, tools=None, documents=None,
add_generation_prompt and the special tokens (bos_token, eos_token, ...) as strings. The
`{% generation %}` tag that some templates use to mark answers renders its body, as in
transformers; we do not need its marks (below).

A template comes with a downloaded model folder, so it is untrusted beyond what the sandbox
already stops: one render may produce at most OUTPUT_LIMIT characters (checked on the
stream, and before any `*`, `+`, `**`, `%`, format width or call whose size argument would
pass it) and
take at most TIME_LIMIT seconds (a timer, in the main thread); either ends in one line
naming the file. Limits: a string doubled with `~` inside `{% set %}` is caught only by the
time limit.

Where the answers are. `answer_spans` finds, for each assistant message i, the characters
of its content in the rendered text and the end of its turn. It renders twice more:
  probe = the conversation up to i with message i's content replaced by a sentinel word:
          the text before the sentinel is everything the template writes up to the
          answer, the text after it (the "tail") what closes the turn ("</s>\\n",
          "<|eot_id|>", "<|im_end|>\\n");
  turn  = the conversation up to and including message i, as the template renders it.
The answer is turn[len(head) : len(turn) - len(tail)]: whatever the template made of the
content (Llama-3 trims it; that trimmed text is what the model is trained on). Whitespace
that the template writes between the generation prompt and the answer (Llama-2-chat's
"[/INST] " + answer) counts as the answer's: prompted with the generation prompt, the
model writes "▁Hello" itself. Text that ends the generation prompt (the "instruction"
template's "### Response: ") does not: a token that covers it and the answer
("▁It") makes the tokenizer refuse, since the prompt alone would be tokenized differently.
A third render, the generation prompt, decides which case applies. Limits: the
template must render a conversation's first i+1 messages as a prefix of the whole
conversation's text, and must render message i the same way whatever its content, up to
the content itself. Templates that rewrite earlier turns once later ones follow (e.g.
dropping the reasoning of past turns) fail this check, and we refuse with a TokenizerError
rather than guess. The tokenizer (tokenizer.py) turns these character spans into the token
mask.
"""
from __future__ import annotations

import json
import re
import signal
import threading
import time
from datetime import datetime
from typing import Dict, List, Tuple

from .errors import UserError

TEMPLATES = ("checkpoint", "zephyr", "instruction")

ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception(\"unknown role '\" ~ message['role'] ~ \"' (system, user or assistant)\") }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ eos_token ~ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

INSTRUCTION = (
    "{% if messages | selectattr('role', 'equalto', 'user') | list | length != 1"
    " or messages[0]['role'] != 'user' %}"
    "{{ raise_exception(\"template 'instruction' renders one user turn (and its answer)\") }}"
    "{% endif %}"
    "{{ '### Instruction: ' ~ messages[0]['content'] ~ '\\n\\n### Response: ' }}"
    "{% for message in messages[1:] %}{{ message['content'] ~ eos_token }}{% endfor %}")

BUILT_IN = {"zephyr": ZEPHYR, "instruction": INSTRUCTION}

# a plain word: templates that trim or strip the content leave it as it is
SENTINEL = "MINISPINANSWERSENTINEL"


class TokenizerError(UserError):
    """Bad tokenizer file, chat template or text (re-exported by minispin.tokenizer)."""


OUTPUT_LIMIT = 4_000_000  # characters of one render (a million-token conversation is far below)
TIME_LIMIT = 10.0         # seconds of one render


class _TemplateLimit(Exception):
    pass


def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """{% generation %}...{% endgeneration %}: the body, rendered as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes <, >, & for HTML; chat templates want plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    def too_big(n) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n > OUTPUT_LIMIT

    def check_widths(fmt, pattern: str):
        """A format string's field widths and precisions ('%0999999999d', '{:>999999999}')."""
        if isinstance(fmt, str) and any(int(w) > OUTPUT_LIMIT for w in re.findall(pattern, fmt)):
            raise _TemplateLimit("a format width past the output limit")

    PERCENT_WIDTH = r"%[-+ #0]*(\d+)|%[-+ #0]*\d*\.(\d+)"
    BRACE_WIDTH = r"\{[^{}]*:[^{}]*?(\d+)"

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox, with sizes checked before a string or list is built."""
        intercepted_binops = frozenset(["*", "+", "**", "%"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 4096:
                raise _TemplateLimit(f"an exponent of {right}")
            if operator == "*":
                for a, b in ((left, right), (right, left)):
                    if hasattr(a, "__len__") and isinstance(b, int) and len(a) * max(b, 0) > OUTPUT_LIMIT:
                        raise _TemplateLimit(f"a repetition to {len(a) * b} items")
            if operator == "%":
                for fmt in re.findall(PERCENT_WIDTH, left) if isinstance(left, str) else []:
                    if any(w and int(w) > OUTPUT_LIMIT for w in fmt):
                        raise _TemplateLimit("a format width past the output limit")
            if operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__") \
                    and len(left) + len(right) > OUTPUT_LIMIT:
                raise _TemplateLimit("a concatenation past the output limit")
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value):  # 'text'.format(...) / format_map: widths first
            wrapped = super().wrap_str_format(value)
            if wrapped is not None:
                check_widths(value.__self__, BRACE_WIDTH)
            return wrapped

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            if any(too_big(a) for a in list(args) + list(kwargs.values())):
                raise _TemplateLimit("a call with a size argument past the output limit")

            return super().call(__context, __obj, *args, **kwargs)

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    plain_format = env.filters["format"]

    def format_filter(value, *args, **kwargs):  # "%0999999999d"|format(1)
        for fmt in re.findall(PERCENT_WIDTH, value) if isinstance(value, str) else []:
            if any(w and int(w) > OUTPUT_LIMIT for w in fmt):
                raise _TemplateLimit("a format width past the output limit")
        return plain_format(value, *args, **kwargs)
    env.filters["format"] = format_filter
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class ChatTemplate:
    """One compiled template; `origin` names where it came from, for error messages."""

    def __init__(self, name: str, source: str, origin: str, special_tokens: Dict[str, str]):
        import jinja2
        self.name, self.source, self.origin = name, source, origin
        self.special_tokens = dict(special_tokens)  # bos_token, eos_token, ...: strings
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{origin}: chat template line {e.lineno}: {e.message}") from None

    def _render_limited(self, **kw) -> str:
        """The render, streamed and cut at OUTPUT_LIMIT characters, under a TIME_LIMIT timer
        (SIGALRM: only in the main thread; elsewhere the deadline is checked per chunk)."""
        deadline = time.monotonic() + TIME_LIMIT
        timer = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        if timer:
            def expired(signum, frame):
                raise _TemplateLimit(f"more than {TIME_LIMIT:g} s")
            old = signal.signal(signal.SIGALRM, expired)
            signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
        try:
            out, n = [], 0
            for chunk in self._template.generate(**kw):
                n += len(chunk)
                if n > OUTPUT_LIMIT:
                    raise _TemplateLimit(f"more than {OUTPUT_LIMIT} characters of output")
                if time.monotonic() > deadline:
                    raise _TemplateLimit(f"more than {TIME_LIMIT:g} s")
                out.append(chunk)
            return "".join(out)
        finally:
            if timer:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)

    def render(self, messages: List[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._render_limited(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except _TemplateLimit as e:
            raise TokenizerError(f"{self.origin}: chat template '{self.name}' stopped: {e} (a template "
                                 f"may write at most {OUTPUT_LIMIT} characters in {TIME_LIMIT:g} s); "
                                 "use template 'zephyr' or fix the template") from None
        except Exception as e:  # raise_exception, undefined names, type errors in the template
            raise TokenizerError(f"{self.origin}: chat template '{self.name}' refused the "
                                 f"conversation: {type(e).__name__}: {e}") from None

    def answer_spans(self, messages: List[dict], add_generation_prompt: bool = False
                     ) -> Tuple[str, List[Tuple[int, int, int]]]:
        """The rendered text and, per assistant message, (answer start, answer end, turn end)."""
        text = self.render(messages, add_generation_prompt)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            probe = self.render(messages[:i] + [dict(message, content=SENTINEL)])
            last = i == len(messages) - 1 and not add_generation_prompt
            turn = text if last else self.render(messages[:i + 1])
            if probe.count(SENTINEL) != 1:
                self._refuse(i, "renders the content of an assistant message "
                                f"{probe.count(SENTINEL)} times")
            start = probe.index(SENTINEL)
            head, tail = probe[:start], probe[start + len(SENTINEL):]
            end = len(turn) - len(tail)
            if not (turn.startswith(head) and turn.endswith(tail) and end >= start):
                self._refuse(i, "renders the text around an assistant message differently "
                                "depending on its content")
            if i > 0:
                # whitespace between the generation prompt and the answer (Llama-2-chat's
                # "[/INST] {answer}") is the model's to write: it joins the answer's first token
                prompt = self.render(messages[:i], add_generation_prompt=True)
                if head.startswith(prompt) and head[len(prompt):].isspace():
                    start = len(prompt)
            if not text.startswith(turn):
                self._refuse(i, "renders earlier turns differently once later turns follow")
            spans.append((start, end, len(turn)))
        return text, spans

    def _refuse(self, i: int, why: str):
        raise TokenizerError(f"{self.origin}: chat template '{self.name}' {why} (message {i}); "
                             "the answer mask cannot be computed exactly, so minispin refuses "
                             "to guess: use template 'zephyr' or fix the template")
