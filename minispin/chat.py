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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
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

    def render(self, messages: List[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
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
