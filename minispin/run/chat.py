"""Chat templates: rendered with jinja2 as transformers renders them, and where each answer lies.

Three templates. "checkpoint" is the model folder's own `chat_template` (chat_template.jinja,
or tokenizer_config.json's "chat_template": a string, or a list of named templates of
which "default" is taken). "zephyr" and "instruction" are built in, written here as jinja
too so that every template goes through the same code:

    zephyr       "<|system|>\\n{system}</s>\\n<|user|>\\n{user}</s>\\n<|assistant|>\\n{answer}</s>\\n",
                 generation prompt "<|assistant|>\\n" (eos_token stands for "</s>")
    instruction  "### Instruction: {question}\\n\\n### Response: " then each answer and eos:
                 the prompt uclaml/SPIN's generate.py wrote, one user turn only

The engine is transformers' own (jinja's ImmutableSandboxedEnvironment with its settings
and globals), built in template_sandbox.py, which also sizes the steps that can build long
text (it lists them) before they run: a template comes with a downloaded model folder and
is untrusted. Here a render is streamed and cut at OUTPUT_LIMIT characters and TIME_LIMIT
seconds (a timer, in the main thread); a refusal is one line naming the file. At render
time the template sees messages, tools=None, documents=None, add_generation_prompt and the
special tokens (bos_token, eos_token, ...) as strings.

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

import signal
import threading
import time
from typing import Dict, List, Tuple

from .errors import UserError
from .template_sandbox import OUTPUT_LIMIT, TemplateLimit, sandboxed_environment

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
    """Bad tokenizer file, chat template or text (re-exported by minispin.run.tokenizer)."""


TIME_LIMIT = 10.0         # seconds of one render


class ChatTemplate:
    """One compiled template; `origin` names where it came from, for error messages."""

    def __init__(self, name: str, source: str, origin: str, special_tokens: Dict[str, str]):
        import jinja2
        self.name, self.source, self.origin = name, source, origin
        self.special_tokens = dict(special_tokens)  # bos_token, eos_token, ...: strings
        try:
            self._template = sandboxed_environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{origin}: chat template line {e.lineno}: {e.message}") from None

    def _render_limited(self, **kw) -> str:
        """The render, streamed and cut at OUTPUT_LIMIT characters, under a TIME_LIMIT timer
        (SIGALRM: only in the main thread; elsewhere the deadline is checked per chunk)."""
        deadline = time.monotonic() + TIME_LIMIT
        timer = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        if timer:
            def expired(signum, frame):
                raise TemplateLimit(f"more than {TIME_LIMIT:g} s")
            old = signal.signal(signal.SIGALRM, expired)
            signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
        try:
            out, n = [], 0
            for chunk in self._template.generate(**kw):
                n += len(chunk)
                if n > OUTPUT_LIMIT:
                    raise TemplateLimit(f"more than {OUTPUT_LIMIT} characters of output")
                if time.monotonic() > deadline:
                    raise TemplateLimit(f"more than {TIME_LIMIT:g} s")
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
        except TemplateLimit as e:
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
