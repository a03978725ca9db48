"""The jinja environment chat templates render in: transformers' engine, with sizes checked.

The engine is the one transformers uses (chat_template_utils._compile_jinja_template):
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and the loopcontrols
extension; a `tojson` filter that does not escape HTML; `raise_exception` and
`strftime_now`; the `{% generation %}` tag renders its body. What a template writes with it
is what transformers writes (tests/test_trust.py compares with plain jinja, and the
tokenizer tests with transformers' apply_chat_template).

A template comes with a downloaded model folder, so it is untrusted beyond what jinja's
sandbox already stops (attribute access, mutation, range() past 100,000). What the sandbox
does not stop is size: one expression can ask for gigabytes ('x' * 3000000000, a string
doubled with `~` in a loop), and a timer or a count of the output only notices once the
memory is gone. So every step that can build text or a list longer than its arguments is
sized BEFORE it runs and refused past OUTPUT_LIMIT characters (or items):

    * + ** %               (call_binop; `%` by its fields and widths)
    ~                      (jinja compiles it to a plain join: LimitedCodeGenerator sends it
                            through limited_concat)
    str.format, format_map (by fields, so '{0}' * 3000 counts each, and widths)
    str.replace, str.join, str.expandtabs, any call with a size argument past the limit
    the replace, join, indent, wordwrap and format filters; every filter's size arguments
    {{ ... }}              (finalize: a list of a million references to one long string
                            is small, its printed text is not)

and every call's and filter's result is checked after. chat.ChatTemplate adds the count of
the output stream and a timer (loops). A refusal raises TemplateLimit, which chat.py turns
into one line naming the file.
"""
from __future__ import annotations

import functools
import json
import re
import string
from datetime import datetime

OUTPUT_LIMIT = 4_000_000  # characters of one render (a million-token conversation is far below)

PERCENT_WIDTH = r"%[-+ #0]*(\d+)|%[-+ #0]*\d*\.(\d+)"   # '%0999999999d', '%.999999999f'
BRACE_WIDTH = r"\{[^{}]*:[^{}]*?(\d+)"                    # '{:>999999999}'


class TemplateLimit(Exception):
    pass


def limit(size: int, what: str):
    if size > OUTPUT_LIMIT:
        raise TemplateLimit(f"{what} past the output limit")


def too_big(n) -> bool:
    """A size argument (ljust, center, batch, tojson's indent, ...) past the limit."""
    return isinstance(n, int) and not isinstance(n, bool) and n > OUTPUT_LIMIT


def check_widths(fmt, pattern: str):
    """A format string's field widths and precisions."""
    if isinstance(fmt, str) and any(int(w) > OUTPUT_LIMIT for m in re.findall(pattern, fmt)
                                    for w in (m if isinstance(m, tuple) else (m,)) if w):
        raise TemplateLimit("a format width past the output limit")


# ---------------------------------------------------------------- sizes, before building
def printed_size(x, budget: int = OUTPUT_LIMIT, depth: int = 0) -> int:
    """An upper bound of len(str(x)), or more than budget once it passes budget."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, (list, tuple, set, frozenset, dict)):
        if depth > 50:
            return budget + 1
        total = 2  # brackets
        for item in (x.items() if isinstance(x, dict) else x):
            total += 2 + printed_size(item, budget - total, depth + 1)  # ", " or ": "
            if total > budget:
                return budget + 1
        return total
    if isinstance(x, bool) or x is None:
        return 5
    if isinstance(x, int):
        return int(abs(x).bit_length() * 0.30103) + 2  # digits and sign
    if isinstance(x, float):
        return len(repr(x))
    return 0  # Undefined, Namespace, loop objects: their text is that of what they hold, sized when built


def format_size(fmt: str, args, kwargs) -> int:
    """An upper bound of fmt.format(*args, **kwargs): its text plus each field's value (a
    field may name one value many times: '{0}{0}{0}')."""
    total, auto = len(fmt), 0
    longest = max((printed_size(v) for v in list(args) + list(kwargs.values())), default=0)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
    except ValueError:
        return total  # malformed: str.format refuses it itself
    for field in fields:
        head = re.split(r"[.\[]", field, maxsplit=1)[0]
        if head == "":
            value, auto = (args[auto] if auto < len(args) else ""), auto + 1
        elif head.isdigit():
            value = args[int(head)] if int(head) < len(args) else ""
        else:
            value = kwargs.get(head, "")
        total += printed_size(value) if head == field else longest  # '{0.x}', '{b[0]}': the longest
        if total > OUTPUT_LIMIT:
            break
    return total


def percent_size(fmt: str, values) -> int:
    """An upper bound of fmt % values: '%s' fields take their tuple item once each,
    '%(name)s' fields the named value every time they appear."""
    if isinstance(values, dict):
        return len(fmt) + sum(printed_size(values.get(n, "")) for n in re.findall(r"%\(([^)]*)\)", fmt))
    return len(fmt) + sum(printed_size(v) for v in (values if isinstance(values, tuple) else (values,)))


def replaced_size(text: str, old: str, new: str, count=-1) -> int:
    n = text.count(old) if old else len(text) + 1
    if count is not None and count >= 0:
        n = min(n, count)
    return len(text) + n * max(len(new) - len(old), 0)


def joined_size(items: list, sep: str) -> int:
    return sum(printed_size(i) for i in items) + len(sep) * max(len(items) - 1, 0)


def str_method_size(method, args, kwargs):
    """The result size of a str method that can outgrow its arguments; None for others."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, str):
        return None
    if name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        return replaced_size(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    if name == "join" and args:
        return joined_size(args[0], owner)
    if name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        return len(owner) * max(size, 1) if isinstance(size, int) else None
    return None


def filter_size(name: str, args: list, kwargs: dict):
    """The result size of a filter that can outgrow its arguments (args without jinja's
    context / environment); None for others."""
    if not args or not isinstance(args[0], str) and name != "join":
        return None
    arg = lambda i, key, default: kwargs.get(key, args[i] if len(args) > i else default)  # noqa: E731
    if name == "replace" and len(args) >= 3 and all(isinstance(a, str) for a in args[:3]):
        return replaced_size(args[0], args[1], args[2], arg(3, "count", None))
    if name == "join" and "attribute" not in kwargs and len(args) < 3:
        return joined_size(args[0], str(arg(1, "d", "")))
    if name == "indent":
        width = arg(1, "width", 4)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(args[0]) + (args[0].count("\n") + 1) * width
    if name == "wordwrap":
        return len(args[0]) * (1 + len(str(arg(3, "wrapstring", None) or "\n")))
    if name == "format":  # the %-style filter: '%s'|format(x), '%(n)s'|format(n=x)
        check_widths(args[0], PERCENT_WIDTH)
        return percent_size(args[0], kwargs if kwargs else tuple(args[1:]))
    return None


# ---------------------------------------------------------------- the environment
def sandboxed_environment():
    import jinja2
    from jinja2.compiler import CodeGenerator, optimizeconst
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    jinja_objects = (jinja2.Environment, jinja2.runtime.Context, jinja2.nodes.EvalContext)

    class GenerationBlock(Extension):
        """{% generation %}...{% endgeneration %}: the body, rendered as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class LimitedCodeGenerator(CodeGenerator):
        """`a ~ b` through the environment's checked concat, not jinja's plain join."""

        @optimizeconst
        def visit_Concat(self, node, frame):
            self.write("environment.limited_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "**", "%"])
        code_generator_class = LimitedCodeGenerator

        def limited_concat(self, values):
            limit(sum(printed_size(v) for v in values), "a concatenation (~)")
            return "".join(str(v) for v in values)

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 4096:
                raise TemplateLimit(f"an exponent of {right}")
            if operator == "*":
                for a, b in ((left, right), (right, left)):
                    if hasattr(a, "__len__") and isinstance(b, int) and len(a) * max(b, 0) > OUTPUT_LIMIT:
                        raise TemplateLimit(f"a repetition to {len(a) * b} items")
            if operator == "%" and isinstance(left, str):
                check_widths(left, PERCENT_WIDTH)
                limit(percent_size(left, right), "a % format")
            if operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
                limit(len(left) + len(right), "a concatenation")
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value):  # 'text'.format(...) / format_map(...)
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            check_widths(value.__self__, BRACE_WIDTH)

            def sized(*args, **kwargs):
                mapped = value.__name__ == "format_map" and args and isinstance(args[0], dict)
                limit(format_size(value.__self__, *(((), args[0]) if mapped else (args, kwargs))), "a format")
                return wrapped(*args, **kwargs)
            return sized

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            if any(too_big(a) for a in list(args) + list(kwargs.values())):
                raise TemplateLimit("a call with a size argument past the output limit")
            if getattr(__obj, "__name__", "") == "join" and args and isinstance(getattr(__obj, "__self__", None), str):
                args = (list(args[0]),) + args[1:]  # sized, then joined: a generator is read once
            size = str_method_size(__obj, args, kwargs)
            if size is not None:
                limit(size, f"a str.{__obj.__name__}")
            out = super().call(__context, __obj, *args, **kwargs)
            if hasattr(out, "__len__"):
                limit(len(out), "a call's result")
            return out

    def checked_filter(name, f):
        @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_context marks
        def checked(*args, **kwargs):
            if any(too_big(a) for a in list(args) + list(kwargs.values())):
                raise TemplateLimit(f"a '{name}' filter with a size argument past the output limit")
            own = [a for a in args if not isinstance(a, jinja_objects)]
            if name == "join" and own:  # sized, then joined: a generator is read once
                items = list(own[0])
                args = tuple(items if a is own[0] else a for a in args)
                own[0] = items
            size = filter_size(name, own, kwargs)
            if size is not None:
                limit(size, f"a {name}" if name != "indent" else "an indent")
            out = f(*args, **kwargs)
            if hasattr(out, "__len__"):
                limit(len(out), f"the '{name}' filter's result")
            return out
        return checked

    def finalize(value):  # every {{ ... }}, before str() writes it
        limit(printed_size(value), "an output expression")
        return value

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes <, >, & for HTML; chat templates want plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, finalize=finalize,
                         extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    for name in list(env.filters):
        env.filters[name] = checked_filter(name, env.filters[name])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
