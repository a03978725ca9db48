"""SentencePiece tokenizer (tokenizer.model only) and the Zephyr chat template."""
import json
import shutil

import pytest

from helpers import MISTRAL_TOK, STORIES
from minispin import load_tokenizer
from minispin.run.tokenizer import TokenizerError

CONVERSATION = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 2*3?"},
    {"role": "assistant", "content": "6, of course!"},
]
# Written out by hand from the Zephyr template (alignment-handbook) with SPIN's empty system turn.
EXPECTED_TEXT = ("<|system|>\n</s>\n<|user|>\nWhat is 2+3?</s>\n<|assistant|>\nIt is 5.</s>\n"
                 "<|user|>\nAnd 2*3?</s>\n<|assistant|>\n6, of course!</s>\n")
# Mistral-7B-v0.1 ids, as transformers' LlamaTokenizer writes them for EXPECTED_TEXT
# (1 = <s>, 2 = </s>, 13 = "\n", 28789 28766 489 11143 28766 28767 = "<|assistant|>").
EXPECTED_IDS = [1, 523, 28766, 6574, 28766, 28767, 13, 2, 13, 28789, 28766, 1838, 28766, 28767, 13,
                3195, 349, 28705, 28750, 28806, 28770, 28804, 2, 13, 28789, 28766, 489, 11143, 28766,
                28767, 13, 1313, 349, 28705, 28782, 28723, 2, 13, 28789, 28766, 1838, 28766, 28767, 13,
                2467, 28705, 28750, 28736, 28770, 28804, 2, 13, 28789, 28766, 489, 11143, 28766, 28767,
                13, 28784, 28725, 302, 2363, 28808, 2, 13]
ANSWER_1 = [1313, 349, 28705, 28782, 28723]          # "It is 5."
ANSWER_2 = [28784, 28725, 302, 2363, 28808]          # "6, of course!"


@pytest.fixture(scope="module")
def mistral():
    return load_tokenizer(MISTRAL_TOK)


def test_zephyr_text_ids_and_mask(mistral):
    assert mistral.apply_chat_template(CONVERSATION, empty_system=True) == EXPECTED_TEXT
    ids, mask = mistral.encode_chat(CONVERSATION, empty_system=True)
    assert ids == EXPECTED_IDS
    masked = [i for i, m in zip(ids, mask) if m]
    assert masked == ANSWER_1 + [2] + ANSWER_2 + [2]
    # the answer spans are contiguous and end on their eos, the "\n" after it is not trained
    first = ids.index(1313)
    assert mask[first - 1] == 0 and mask[first:first + 6] == [1] * 6 and mask[first + 6] == 0


def test_generation_prompt_is_the_training_prefix(mistral):
    prompt, pmask = mistral.encode_chat(CONVERSATION[:1], add_generation_prompt=True, empty_system=True)
    assert mistral.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, empty_system=True) == \
        "<|system|>\n</s>\n<|user|>\nWhat is 2+3?</s>\n<|assistant|>\n"
    assert prompt == EXPECTED_IDS[:len(prompt)] and EXPECTED_IDS[len(prompt)] == ANSWER_1[0]
    assert not any(pmask)


def test_without_empty_system_turn(mistral):
    assert mistral.apply_chat_template(CONVERSATION[:2]) == \
        "<|user|>\nWhat is 2+3?</s>\n<|assistant|>\nIt is 5.</s>\n"


def test_special_tokens_in_text_become_ids(mistral):
    ids = mistral.encode("a</s>b<s>", bos=True)
    assert ids[0] == 1 and 2 in ids and ids[-1] == 1
    assert mistral.encode("</s>") == [2]
    assert mistral.decode(mistral.encode("Hello world")) == "Hello world"


@pytest.mark.parametrize("path", [MISTRAL_TOK, STORIES])
def test_matches_transformers_tokenizer(tmp_path, path):
    from transformers import AutoTokenizer
    if path == MISTRAL_TOK:
        shutil.copy(MISTRAL_TOK, tmp_path / "tokenizer.model")
        shutil.copy(f"{STORIES}/tokenizer_config.json", tmp_path / "tokenizer_config.json")
        folder = str(tmp_path)
    else:
        folder = path
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for conv in (CONVERSATION, [{"role": "user", "content": "Tell me a story about a cat.\nMake it short."},
                                {"role": "assistant", "content": "Once upon a time, a cat sat.\n\nThe end."}]):
        text = ours.apply_chat_template(conv, empty_system=True)
        assert ours.encode_chat(conv, empty_system=True)[0] == theirs(text).input_ids
    # leading spaces, spaces after special tokens, single spaces everywhere
    for text in (" x", "</s> x y", "Hello world. A</s>\nB"):
        assert ours.encode(text, bos=True) == theirs(text).input_ids, text


def test_runs_of_spaces_kept_like_transformers():
    """stories260K's SentencePiece model asks to collapse spaces; transformers does not."""
    from transformers import AutoTokenizer
    ours, theirs = load_tokenizer(STORIES), AutoTokenizer.from_pretrained(STORIES)
    for text in ("a.  B", "Hello  world ", "  x y", "A\n\n  b", "x</s>  y"):
        assert ours.encode(text, bos=True) == theirs(text).input_ids, text


def test_bad_messages(mistral):
    with pytest.raises(TokenizerError, match="role"):
        mistral.encode_chat([{"content": "x"}])
    with pytest.raises(TokenizerError, match="unknown role 'bot'"):
        mistral.encode_chat([{"role": "bot", "content": "x"}])


def test_instruction_template_reproduces_original_spin_prompt():
    tok = load_tokenizer(MISTRAL_TOK, template="instruction")
    assert tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True) == \
        "### Instruction: What is 2+3?\n\n### Response: "


# meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json "chat_template"
LLAMA2_CHAT = (r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
               r"{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
               r"{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
               r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               r"{% endif %}{% if loop.index0 == 0 and system_message != false %}"
               r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
               r"{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
               r"{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
               r"{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_checkpoint_template_on_sentencepiece(tmp_path):
    """tokenizer.model + a chat_template: text, ids and mask against transformers."""
    from transformers import AutoTokenizer
    folder = tmp_path / "chat"
    shutil.copytree(STORIES, folder)
    with open(folder / "tokenizer_config.json") as f:
        cfg = json.load(f)
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump(dict(cfg, chat_template=LLAMA2_CHAT), f)
    ours, theirs = load_tokenizer(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    assert ours.template == "checkpoint"
    system = [{"role": "system", "content": "Be kind."}]
    for conv in (CONVERSATION, system + CONVERSATION[:2]):
        text = ours.apply_chat_template(conv)
        assert text == theirs.apply_chat_template(conv, tokenize=False)
        ids, mask = ours.encode_chat(conv)  # the template writes <s> itself: no second one
        enc = theirs(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == enc["input_ids"]
        # restated: each answer's tokens ("▁It" carries the template's space before the answer,
        # which the model writes itself after "[/INST]"), then " " and "</s>"
        expected, pos = [0] * len(ids), 0
        for m in conv:
            if m["role"] == "assistant":
                start = text.index(" " + m["content"] + " </s>", pos)
                end = start + len(m["content"]) + 6
                expected = [1 if start <= a and b <= end else e
                            for e, (a, b) in zip(expected, enc["offset_mapping"])]
                pos = end
        assert mask == expected and sum(mask) > 0
