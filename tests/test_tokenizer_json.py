"""tokenizer.json backend and checkpoint chat templates.

Oracles: the `tokenizers` library on the checkpoint's own tokenizer.json (ids, offsets,
decode), and transformers' apply_chat_template on a PreTrainedTokenizerFast built from the
same folder (rendering, special-token ids). Three layouts:
  legacy     the Mistral-7B-v0.1 / zephyr tokenizer.json (2023 layout: Prepend + Replace)
  metaspace  the same vocabulary with pre-tokenizer Metaspace(prepend_scheme="first"), built here
  bytelevel  a Llama-3-style byte-level BPE trained here with `tokenizers` (Qwen2.5 variant too)
"""
import glob
import json
import os
import re
import shutil

import pytest
from tokenizers import Regex, Tokenizer as Oracle, decoders, models, pre_tokenizers, processors, trainers

from helpers import MISTRAL_TOK, REPO
from minispin import load_tokenizer
from minispin.run.tokenizer import TokenizerError

MISTRAL_JSON = os.path.join(REPO, "assets", "tokenizers", "mistral-7b-v0.1.tokenizer.json")

# ---------------------------------------------------------------- chat templates as shipped
# alignment-handbook's zephyr template (zephyr-7b-sft-full's tokenizer_config.json)
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
          "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + "
          "message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + "
          "message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n"
          "{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")

# meta-llama/Llama-3.1-8B-Instruct, tokenizer_config.json "chat_template"
LLAMA31 = r'''{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
'''

# Qwen/Qwen2.5-*-Instruct, tokenizer_config.json "chat_template"
QWEN25 = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

# Llama-3's split pattern (its tokenizer.json pre-tokenizer)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ---------------------------------------------------------------- bundled texts and folders
def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def bundled_texts():
    """GSM8K questions and answers, the UltraChat prompts, every string of the eval samples."""
    texts = []
    for name in ("train", "test"):
        for r in _jsonl(os.path.join(REPO, "assets", "data", "gsm8k", f"{name}.jsonl")):
            texts += [r["question"], r["answer"]]
    with open(os.path.join(REPO, "assets", "data", "ultrachat_eval_prompts.json"), encoding="utf-8") as f:
        texts += [r["data"] for r in json.load(f)]
    for path in sorted(glob.glob(os.path.join(REPO, "assets", "eval", "*", "*.jsonl"))):
        for r in _jsonl(path):
            texts += list(_strings(r))
    return list(dict.fromkeys(t for t in texts if t))


def _write(folder, tokenizer_json: dict, tokenizer_config: dict, config=None, generation=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json, f, ensure_ascii=False)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", **tokenizer_config), f)
    for name, data in (("config.json", config), ("generation_config.json", generation)):
        if data is not None:
            with open(os.path.join(folder, name), "w") as f:
                json.dump(data, f)
    return str(folder)


def _train_byte_level(texts) -> dict:
    tok = Oracle(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1200, special_tokens=BYTE_LEVEL_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    return json.loads(tok.to_str())


@pytest.fixture(scope="module")
def texts():
    return bundled_texts()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, texts):
    root = tmp_path_factory.mktemp("tokenizers")
    with open(MISTRAL_JSON, encoding="utf-8") as f:
        legacy = json.load(f)
    mistral_specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    metaspace = dict(legacy, normalizer=None, pre_tokenizer={
        "type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False})
    byte_level = _train_byte_level(texts[:4000:2])
    qwen = dict(byte_level, post_processor={"type": "ByteLevel", "add_prefix_space": False,
                                            "trim_offsets": False, "use_regex": False})
    bl = {t: byte_level["model"]["vocab"][t] for t in BYTE_LEVEL_SPECIALS}
    return {
        "legacy": _write(root / "legacy", legacy, dict(mistral_specials, chat_template=ZEPHYR)),
        "metaspace": _write(root / "metaspace", metaspace, mistral_specials),
        "bytelevel": _write(root / "bytelevel", byte_level,
                            dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA31),
                            config={"eos_token_id": [bl["<|end_of_text|>"], bl["<|eot_id|>"]]},
                            generation={"eos_token_id": [bl["<|end_of_text|>"], bl["<|eom_id|>"],
                                                         bl["<|eot_id|>"]]}),
        "qwen": _write(root / "qwen", qwen,
                       dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=QWEN25),
                       config={"bos_token_id": bl["<|endoftext|>"], "eos_token_id": bl["<|im_end|>"]},
                       generation={"eos_token_id": [bl["<|im_end|>"], bl["<|endoftext|>"]]}),
    }


_loaded = {}


def ours_and_oracle(folders, layout, template=None):
    key = (layout, template)
    if key not in _loaded:
        folder = folders[layout]
        _loaded[key] = (load_tokenizer(folder, template=template),
                        Oracle.from_file(os.path.join(folder, "tokenizer.json")))
    return _loaded[key]


def transformers_tokenizer(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------- plain text
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["legacy", "metaspace", "bytelevel"])
def test_encode_and_decode_match_tokenizers(folders, texts, layout):
    ours, oracle = ours_and_oracle(folders, layout)
    expected = [e.ids for e in oracle.encode_batch(texts, add_special_tokens=False)]
    got = [ours.encode(t) for t in texts]
    assert sum(g != e for g, e in zip(got, expected)) == 0
    # bos=True is what the file's post-processor adds (<s>, <|begin_of_text|>)
    sample = texts[::20]
    assert [ours.encode(t, bos=True) for t in sample] == [e.ids for e in oracle.encode_batch(sample)]
    assert ours.encode("x", eos=True)[-1] == ours.eos_id
    # decode, with special tokens skipped (the default) and kept
    mixed = [ids + [ours.eos_id] + ids[:5] for ids in expected[::20]]
    assert [ours.decode(ids) for ids in mixed] == oracle.decode_batch(mixed)
    assert [ours.decode(ids, skip_special_tokens=False) for ids in mixed] == \
        oracle.decode_batch(mixed, skip_special_tokens=False)


def test_special_tokens_in_text_follow_the_file(folders):
    """SPIN's legacy tokenization: the 2023 layout puts "▁" after every special token."""
    ours, oracle = ours_and_oracle(folders, "legacy")
    text = "</s>\n<|user|>\nHi</s>"
    assert ours.encode(text) == oracle.encode(text, add_special_tokens=False).ids
    assert ours.encode("</s>\n<|user|>")[:3] == [2, 28705, 13]  # "</s>", "▁", "<0x0A>"
    meta, meta_oracle = ours_and_oracle(folders, "metaspace")
    assert meta.encode(text) == meta_oracle.encode(text, add_special_tokens=False).ids
    assert meta.encode("</s>\n<|user|>")[:2] == [2, 13]  # no "▁" after </s> in this layout


def test_sentencepiece_backend_equals_metaspace_file(folders, texts):
    """The tokenizer.model path (kept for stories260K) against `tokenizers` on the same vocabulary."""
    sp = load_tokenizer(MISTRAL_TOK)
    _, oracle = ours_and_oracle(folders, "metaspace")
    sample = texts[::6]
    expected = [e.ids for e in oracle.encode_batch(sample, add_special_tokens=False)]
    assert sum(sp.encode(t) != e for t, e in zip(sample, expected)) == 0
    after_eos = [e.ids[1:] for e in oracle.encode_batch(["</s>" + t for t in sample], add_special_tokens=False)]
    assert sum(sp.encode(t, continuation=True) != e for t, e in zip(sample, after_eos)) == 0


@pytest.mark.slow
def test_continuation(folders, texts):
    """continuation=True drops the prefix a fresh encode puts before the text's first piece."""
    sample = texts[::8]
    # Metaspace "first" never prefixes a piece that follows a special token: encode after "</s>"
    meta, meta_oracle = ours_and_oracle(folders, "metaspace")
    after_eos = [e.ids[1:] for e in meta_oracle.encode_batch(["</s>" + t for t in sample], add_special_tokens=False)]
    assert sum(meta.encode(t, continuation=True) != e for t, e in zip(sample, after_eos)) == 0
    # byte-level without add_prefix_space: nothing to drop
    bl, bl_oracle = ours_and_oracle(folders, "bytelevel")
    assert all(bl.encode(t, continuation=True) == bl.encode(t) for t in sample[::5])
    after_eot = [e.ids[1:] for e in bl_oracle.encode_batch(["<|eot_id|>" + t for t in sample[::5]],
                                                           add_special_tokens=False)]
    assert [bl.encode(t, continuation=True) for t in sample[::5]] == after_eot
    # 2023 layout: the first piece without Prepend("▁") (a copy of the file without it is the
    # oracle), the pieces after a special token as the file encodes them (with their "▁")
    legacy, legacy_oracle = ours_and_oracle(folders, "legacy")
    with open(MISTRAL_JSON, encoding="utf-8") as f:
        spec = json.load(f)
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    no_prefix = Oracle.from_str(json.dumps(spec))
    expected = [e.ids for e in no_prefix.encode_batch(sample, add_special_tokens=False)]
    assert sum(legacy.encode(t, continuation=True) != e for t, e in zip(sample, expected)) == 0
    for head, tail in [("It is 5.", "\n<|user|>\nok"), (" two  spaces", " x"), ("", "y")]:
        got = legacy.encode(head + "</s>" + tail, continuation=True)
        want = no_prefix.encode(head, add_special_tokens=False).ids + \
            legacy_oracle.encode("</s>" + tail, add_special_tokens=False).ids
        assert got == want, (head, tail)
    assert legacy.encode("</s>\nx", continuation=True)[:3] == [2, 28705, 13]


# ---------------------------------------------------------------- chat: zephyr on the data
def _expected_mask(text, enc, conversation, header, eot, shown=lambda s: s):
    """The answer mask restated: tokens inside each answer as rendered, plus the eot token after it."""
    mask, pos = [0] * len(enc.ids), 0
    for m in conversation:
        if m["role"] != "assistant":
            continue
        start = text.index(header, pos) + len(header)
        answer = shown(m["content"])
        assert text.startswith(answer + eot, start)
        end = start + len(answer)
        for j, (a, b) in enumerate(enc.offsets):
            if (start <= a < end and b <= end) or (a == end and enc.tokens[j] == eot):
                mask[j] = 1
        pos = end
    return mask


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["legacy", "metaspace", "bytelevel"])
def test_zephyr_encode_chat_on_gsm8k(folders, layout):
    ours, oracle = ours_and_oracle(folders, layout, template="zephyr")
    eos = ours.id_to_piece(ours.eos_id)
    records = _jsonl(os.path.join(REPO, "assets", "data", "gsm8k", "test.jsonl"))
    for r in records:
        conv = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        text = ours.apply_chat_template(conv, empty_system=True)
        assert text == f"<|system|>\n{eos}\n<|user|>\n{r['question']}{eos}\n<|assistant|>\n{r['answer']}{eos}\n"
        ids, mask = ours.encode_chat(conv, empty_system=True)
        enc = oracle.encode(text)  # the post-processor adds the bos the template does not write
        assert ids == enc.ids
        assert mask == _expected_mask(text, enc, conv, "<|assistant|>\n", eos)
        prompt, prompt_mask = ours.encode_chat(conv[:1], add_generation_prompt=True, empty_system=True)
        assert prompt == ids[:len(prompt)] and not any(prompt_mask)


# ---------------------------------------------------------------- chat: checkpoint templates
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "It is 5."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "  Hello there.  \n"}, {"role": "user", "content": "And 2*3?"},
     {"role": "assistant", "content": "6, of course! Ünïcödé 🙂 数学"}],
    [{"role": "user", "content": "Tell me a story.\nMake it short."},
     {"role": "assistant", "content": "Once upon a time, a cat sat.\n\nThe end."}],
]
TURNS = {  # layout: (assistant header, end-of-turn token, what the template makes of the content)
    "legacy": ("<|assistant|>\n", "</s>", lambda s: s),
    "bytelevel": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", str.strip),
    "qwen": ("<|im_start|>assistant\n", "<|im_end|>", lambda s: s),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["legacy", "bytelevel", "qwen"])
def test_checkpoint_templates_match_transformers(folders, layout):
    ours, oracle = ours_and_oracle(folders, layout)
    theirs = transformers_tokenizer(folders[layout])
    assert ours.template == "checkpoint"
    header, eot, shown = TURNS[layout]
    for conv in CONVERSATIONS:
        for messages, gen in ((conv, False), (conv[:-1], True)):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ids, mask = ours.encode_chat(messages, add_generation_prompt=gen)
            enc = oracle.encode(text, add_special_tokens=False)
            bos = [] if ours.bos_id is None or enc.ids[:1] == [ours.bos_id] else [ours.bos_id]
            assert ids == bos + enc.ids
            assert mask == [0] * len(bos) + _expected_mask(text, enc, messages, header, eot, shown)
            assert (sum(mask) > 0) == any(m["role"] == "assistant" for m in messages)
        # the generation prompt is the training sequence's prefix
        first = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompt, _ = ours.encode_chat(conv[:first], add_generation_prompt=True)
        full, _ = ours.encode_chat(conv[:first + 1])
        assert full[:len(prompt)] == prompt


def test_templates_render_as_the_model_cards_show(folders):
    """The transcribed templates, checked against the prompt formats written out by hand."""
    hi = [{"role": "user", "content": "Hi"}]
    llama, _ = ours_and_oracle(folders, "bytelevel")
    assert llama.apply_chat_template(hi, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    qwen, _ = ours_and_oracle(folders, "qwen")
    assert qwen.apply_chat_template(hi, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    zephyr, _ = ours_and_oracle(folders, "legacy")
    assert zephyr.apply_chat_template(hi, add_generation_prompt=True, empty_system=True) == \
        "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_generation_blocks_agree_with_transformers_mask(folders):
    """A template with {% generation %} blocks: transformers' own assistant mask is the oracle."""
    template = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                "'<|end_header_id|>\\n\\n' }}{% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] + '<|eot_id|>' }}{% endgeneration %}{% else %}{{ m['content'] + '<|eot_id|>' }}"
                "{% endif %}{% endfor %}")
    folder = folders["bytelevel"] + "-generation"
    shutil.copytree(folders["bytelevel"], folder)
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(cfg, chat_template=template), f)
    ours, theirs = load_tokenizer(folder), transformers_tokenizer(folder)
    for conv in CONVERSATIONS:
        out = theirs.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
        assert ours.encode_chat(conv) == (list(out["input_ids"]), list(out["assistant_masks"]))


def test_special_token_ids_as_transformers_reads_them(folders):
    for layout in ("legacy", "bytelevel", "qwen"):
        ours, _ = ours_and_oracle(folders, layout)
        theirs = transformers_tokenizer(folders[layout])
        assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id), layout
        if theirs.pad_token_id is not None:
            assert ours.pad_id == theirs.pad_token_id
    llama, _ = ours_and_oracle(folders, "bytelevel")
    ids = {t: llama.encode(t)[0] for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")}
    # eos_id first, then config.json's and generation_config.json's lists, each id once
    assert llama.eos_ids == [ids["<|eot_id|>"], ids["<|end_of_text|>"], ids["<|eom_id|>"]]
    qwen, qwen_oracle = ours_and_oracle(folders, "qwen")
    assert qwen.bos_id is None  # tokenizer_config.json says null; config.json's bos is not used
    assert qwen.encode("Hi there", bos=True) == qwen_oracle.encode("Hi there").ids
    assert qwen.eos_ids == [qwen.encode("<|im_end|>")[0], qwen.encode("<|endoftext|>")[0]]


def test_bare_tokenizer_json_path():
    tok = load_tokenizer(MISTRAL_JSON)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.vocab_size, tok.template) == (1, 2, 0, 32000, "zephyr")
    assert tok.encode("Hello world", bos=True) == Oracle.from_file(MISTRAL_JSON).encode("Hello world").ids


# ---------------------------------------------------------------- refusals and bad input
def test_mask_refuses_a_token_across_the_answer_boundary(folders):
    ours, _ = ours_and_oracle(folders, "legacy", template="instruction")
    assert ours.apply_chat_template(CONVERSATIONS[0][:1]) == "### Instruction: What is 2+3?\n\n### Response: "
    with pytest.raises(TokenizerError, match="covers both answer and template text"):
        ours.encode_chat(CONVERSATIONS[0])  # "▁It": the space is the template's, "It" the answer's


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path, folders):
    folder = tmp_path / "t"
    shutil.copytree(folders["bytelevel"], folder)
    with open(folder / "tokenizer_config.json") as f:
        cfg = json.load(f)
    cfg["chat_template"] = ("{{ messages | length }}{% for m in messages %}{{ m['role'] + ': ' + "
                            "m['content'] + '<|eot_id|>' }}{% endfor %}")
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump(cfg, f)
    tok = load_tokenizer(str(folder))
    with pytest.raises(TokenizerError, match="earlier turns"):
        tok.encode_chat(CONVERSATIONS[1])


@pytest.mark.slow
def test_bad_files_and_text(tmp_path, folders):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=re.escape(str(bad / "tokenizer.json"))):
        load_tokenizer(str(bad))
    (bad / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(str(bad))
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(TokenizerError, match=re.escape(str(bad / "tokenizer.model"))):
        load_tokenizer(str(bad))
    ours, _ = ours_and_oracle(folders, "legacy")
    for call in (lambda: ours.encode("a\ud800b"), lambda: load_tokenizer(MISTRAL_TOK).encode("\ud800"),
                 lambda: ours.encode_chat([{"role": "user", "content": "x\udfffy"}])):
        with pytest.raises(TokenizerError, match="lone surrogate"):
            call()
    with pytest.raises(TokenizerError, match="checkpoint, zephyr, instruction"):
        load_tokenizer(folders["legacy"], template="chatml")
    with pytest.raises(TokenizerError, match="no chat_template"):
        load_tokenizer(folders["metaspace"], template="checkpoint")
    broken = tmp_path / "broken"
    shutil.copytree(folders["metaspace"], broken)
    with open(broken / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "</s>", "chat_template": "{% for m in messages %}\n{{ m['content'] }"}, f)
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: chat template line \d"):
        load_tokenizer(str(broken))
    with open(broken / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<|nope|>"}, f)
    with pytest.raises(TokenizerError, match=re.escape("eos_token '<|nope|>' is not in the vocabulary")):
        load_tokenizer(str(broken))
    with open(broken / "tokenizer_config.json", "w") as f:
        json.dump({}, f)
    for config, message in (({"eos_token_id": "two"}, "config.json: eos_token_id must be an integer"),
                            ({"eos_token_id": [2, 99999]}, "special token id 99999 is outside"),
                            ({"vocab_size": 100}, "says vocab_size 100")):
        with open(broken / "config.json", "w") as f:
            json.dump(config, f)
        with pytest.raises(TokenizerError, match=message):
            load_tokenizer(str(broken))
