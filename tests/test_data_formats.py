"""Every record format read_pairs / read_sft accept, the SPIN Parquet converter, and the
one-line errors for bad data. Fixtures are written here, in the layouts the upstream code
writes: uclaml/SPIN spin/generate.py (loser_*.jsonl), spin/convert_data.py (JSON lists and
train_prefs-00000-of-00001.parquet through HF datasets), the study's
utils/preference_data.py (train.json, indent 4), TRL's preference records and
HuggingFaceH4/ultrachat_200k's train_sft Parquet shards."""
import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import REPO, run_cli
from minispin.run.data import (DataError, JsonlAppender, read_jsonl, read_pairs, read_sft,
                           write_spin_parquet)

QA = [("What is 2 + 3?", "2 + 3 = 5", "It is 6."),
      ("Name a colour.", "Blue.", "  Red, I think.\n"),
      ("Héllo — 你好?", "Hi! 👋", "")]            # non-ASCII, and an empty y' is allowed


def expected_id(prompt, real):
    """The documented id: first 16 hex digits of sha1 over the JSON of [prompt, real]."""
    return hashlib.sha1(json.dumps([prompt, real]).encode()).hexdigest()[:16]


def conv(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def spin_records(qa=QA):
    return [{"real": conv(q, r), "generated": conv(q, g)} for q, r, g in qa]


def ours(qa=QA):
    return [{"id": expected_id(q, r), "prompt": [{"role": "user", "content": q}], "real": r,
             "generated": g} for q, r, g in qa]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def write_json(path, records):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=4)
    return str(path)


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), str(path))
    return str(path)


MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])


# ---------------------------------------------------------------------- read_pairs formats
def test_our_pairs_jsonl_is_returned_as_written(tmp_path):
    recs = [{"id": "a", "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}],
             "real": "y", "generated": "z", "gen": {"seed": 1}, "scores": {"real": 3, "generated": None},
             "margin": None, "swap": True, "noise": 0.5},
            {"id": "b", "prompt": [{"role": "user", "content": "q"}], "real": "", "generated": "g"}]
    assert read_pairs(write_jsonl(tmp_path / "pairs.jsonl", recs)) == recs


def test_spin_parquet_train_prefs(tmp_path):
    # SPIN's layout as HF datasets writes it: list<struct<content, role>> columns
    recs = spin_records() + spin_records()[:1]          # a repeated pair gets "#2"
    table = pa.Table.from_pylist(recs, schema=pa.schema([("real", pa.list_(MESSAGE)),
                                                          ("generated", pa.list_(MESSAGE))]))
    path = str(tmp_path / "train_prefs-00000-of-00001.parquet")
    pq.write_table(table, path)
    want = ours()
    want.append(dict(want[0], id=want[0]["id"] + "#2"))
    assert read_pairs(path) == want


@pytest.mark.parametrize("layout", ["loser_0.jsonl", "synthetic_train.json", "study_train.json"])
def test_spin_and_study_json(tmp_path, layout):
    recs = spin_records()
    if layout.startswith("study"):
        # utils/preference_data.py: a swapped pair holds the judged-better answer in "real"
        q, r, g = QA[0]
        recs[0] = {"real": conv(q, g), "generated": conv(q, r)}
    path = (write_jsonl if layout.endswith(".jsonl") else write_json)(tmp_path / layout, recs)
    want = ours()
    if layout.startswith("study"):
        q, r, g = QA[0]
        want[0] = {"id": expected_id(q, g), "prompt": [{"role": "user", "content": q}], "real": g, "generated": r}
    assert read_pairs(path) == want


def test_spin_record_with_system_turn_keeps_the_user_turn(tmp_path):
    sys_turn = {"role": "system", "content": "You are helpful."}
    rec = {"real": [sys_turn] + conv("q", "r"), "generated": [sys_turn] + conv("q", "g")}
    [pair] = read_pairs(write_jsonl(tmp_path / "p.jsonl", [rec]))
    assert pair == {"id": expected_id("q", "r"), "prompt": [{"role": "user", "content": "q"}],
                    "real": "r", "generated": "g"}


def test_trl_strings(tmp_path):
    recs = [{"prompt": q, "chosen": r, "rejected": g} for q, r, g in QA]
    assert read_pairs(write_jsonl(tmp_path / "trl.jsonl", recs)) == ours()


def test_trl_conversational(tmp_path):
    recs = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": r}],
             "rejected": [{"role": "assistant", "content": g}]} for q, r, g in QA]
    # a prompt with a system turn is kept whole: the answers reply to all of it
    recs.append({"id": 17, "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                 "chosen": [{"role": "assistant", "content": "C"}],
                 "rejected": [{"role": "assistant", "content": "R"}]})
    got = read_pairs(write_json(tmp_path / "trl.json", recs))
    assert got[:3] == ours()
    assert got[3] == {"id": "17", "prompt": recs[3]["prompt"], "real": "C", "generated": "R"}


def test_trl_implicit_prompt_and_ultrafeedback_style(tmp_path):
    # no "prompt": chosen/rejected are whole conversations (uclaml/SPIN spin/reformat.py
    # writes these, with an empty rejected answer); with "prompt" and "prompt_id" as in
    # HuggingFaceH4/ultrafeedback_binarized
    # (a null in a Parquet column some other row uses means absent)
    recs = [{"prompt": None, "prompt_id": None, "chosen": conv("q1", "good"), "rejected": conv("q1", ""),
             "score_chosen": None, "score_rejected": None},
            {"prompt": "q2", "prompt_id": "pid-2", "chosen": conv("q2", "yes"), "rejected": conv("q2", "no"),
             "score_chosen": 8.0, "score_rejected": 2.0}]
    path = write_parquet(tmp_path / "prefs.parquet", recs)
    assert read_pairs(path) == [
        {"id": expected_id("q1", "good"), "prompt": [{"role": "user", "content": "q1"}], "real": "good", "generated": ""},
        {"id": "pid-2", "prompt": [{"role": "user", "content": "q2"}], "real": "yes", "generated": "no"}]


def test_format_is_read_from_the_content_not_the_name(tmp_path):
    parquet_named_json = tmp_path / "pairs.json"
    write_parquet(parquet_named_json, spin_records())
    assert read_pairs(str(parquet_named_json)) == ours()
    list_named_jsonl = write_json(tmp_path / "pairs.jsonl", spin_records())
    assert read_pairs(list_named_jsonl) == ours()
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": spin_records()}, indent=2))
    assert read_pairs(str(wrapped)) == ours()
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in spin_records()).encode())
    assert read_pairs(str(bom)) == ours()


# ---------------------------------------------------------------------- read_sft formats
def sft(path):
    examples, stats = read_sft(str(path))
    return [(e.id, e.prompt, e.real) for e in examples], stats


def user(x):
    return [{"role": "user", "content": x}]


ULTRA = [{"prompt": "Tell me about cats.", "prompt_id": "u1",
          "messages": conv("Tell me about cats.", "Cats purr.") + conv("More?", "They nap.")},
         {"prompt": "Hi", "prompt_id": "u2",
          "messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "early"}]
          + conv("Hi", "Hello!")},
         {"prompt": "lonely", "prompt_id": "u3", "messages": user("lonely")}]   # no answer: skipped


@pytest.mark.parametrize("name", ["train_sft-00000-of-00003.parquet", "ultrachat.jsonl"])
def test_sft_ultrachat(tmp_path, name):
    path = tmp_path / name
    (write_parquet if name.endswith(".parquet") else write_jsonl)(path, ULTRA)
    got, stats = sft(path)
    # SPIN's rule: the first user turn, the first assistant turn after it
    assert got == [("u1", user("Tell me about cats."), "Cats purr."), ("u2", user("Hi"), "Hello!")]
    assert (stats.records, stats.kept, stats.skipped) == (3, 2, {"no assistant answer": 1})


def test_sft_prompt_completion_question_answer_trl_spin_and_ours(tmp_path):
    recs = [{"prompt": "p1", "completion": "c1"},
            {"question": "p2", "answer": "c2"},
            {"prompt": "p3", "chosen": "c3", "rejected": "r3"},
            {"prompt": user("p4"), "chosen": [{"role": "assistant", "content": "c4"}],
             "rejected": [{"role": "assistant", "content": "r4"}]},
            {"chosen": conv("p5", "c5"), "rejected": conv("p5", "")},
            {"real": conv("p6", "c6"), "generated": conv("p6", "g6")},
            {"id": "mine", "prompt": user("p7"), "real": "c7", "generated": "g7", "gen": {}}]
    got, _ = sft(write_jsonl(tmp_path / "mixed.jsonl", recs))
    want = [(expected_id(f"p{i}", f"c{i}"), user(f"p{i}"), f"c{i}") for i in range(1, 7)]
    assert got == want + [("mine", user("p7"), "c7")]


def test_sft_study_json_list_and_repeats(tmp_path):
    recs = spin_records() + spin_records()[1:2]
    got, _ = sft(write_json(tmp_path / "train.json", recs))
    ids = [expected_id(q, r) for q, r, _ in QA] + [expected_id(QA[1][0], QA[1][1]) + "#2"]
    assert got == [(i, user(q), r) for i, (q, r, _) in zip(ids, [*QA, QA[1]])]


# ---------------------------------------------------------------------- converter
def test_spin_parquet_round_trip(tmp_path):
    pairs = [dict(p, id=f"p{i}", gen={"seed": 1}) for i, p in enumerate(ours())]
    path = str(tmp_path / "train_prefs-00000-of-00001.parquet")
    assert write_spin_parquet(pairs, path) == 3
    table = pq.read_table(path)
    assert table.schema.field("real").type == pa.list_(MESSAGE)
    assert table.schema.field("generated").type == pa.list_(MESSAGE)
    rows = table.to_pylist()
    for row, (q, r, g) in zip(rows, QA):   # what spin/alignment/data.py's apply_chat_template reads
        assert row["real"] == [{"content": q, "role": "user"}, {"content": r, "role": "assistant"}]
        assert row["generated"] == [{"content": q, "role": "user"}, {"content": g, "role": "assistant"}]
    assert read_pairs(path) == [{k: p[k] for k in ("id", "prompt", "real", "generated")} for p in pairs]


def test_spin_parquet_swap_and_cli(tmp_path, capsys):
    pairs = ours()
    pairs[1]["swap"], pairs[2]["noise"] = True, 0.5
    src = write_jsonl(tmp_path / "judged.jsonl", pairs)
    class cli:  # the converter, run as a program in this process
        main = staticmethod(lambda args: run_cli("scripts/to_spin_parquet.py", *args))

    assert cli.main([src]) == 0
    out = tmp_path / "train_prefs-00000-of-00001.parquet"
    assert "wrote 3 pairs" in capsys.readouterr().out
    back = read_pairs(str(out))
    assert (back[1]["real"], back[1]["generated"]) == (pairs[1]["generated"], pairs[1]["real"])
    assert [b["real"] for b in back[::2]] == [pairs[0]["real"], pairs[2]["real"]]

    (tmp_path / "ds").mkdir()
    assert cli.main([src, "--out", str(tmp_path / "ds"), "--split", "test", "--ignore-swap"]) == 0
    back = read_pairs(str(tmp_path / "ds" / "test_prefs-00000-of-00001.parquet"))
    assert back[1]["real"] == pairs[1]["real"]

    assert cli.main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("pairs", "--out", "--split", "--ignore-swap"))

    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"id": "x", "prompt": "oops", "real": "", "generated": ""}'])
    assert cli.main([bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:1: prompt:" in err


# ---------------------------------------------------------------------- bad input
GOOD = {"id": "a", "prompt": [{"role": "user", "content": "q"}], "real": "r", "generated": "g"}

PAIR_CASES = {   # name: (line 2 of the file, the field the error must name)
    "malformed JSON": ('{"id": "b", "prompt": ', "malformed JSON"),
    "bare number": ("42", "expected a JSON object"),
    "real null": (dict(GOOD, id="b", real=None), "real:"),
    "generated number": (dict(GOOD, id="b", generated=5), "generated:"),
    "id number": (dict(GOOD, id=7), "id:"),
    "missing generated": ({k: v for k, v in GOOD.items() if k != "generated"}, "'generated'"),
    "duplicate id": (GOOD, "id:"),
    "noise string": (dict(GOOD, id="b", noise="abc"), "noise:"),
    "noise negative": (dict(GOOD, id="b", noise=-0.1), "noise:"),
    "noise NaN": ('{"id": "b", "prompt": [{"role": "user", "content": "q"}], "real": "r", '
                  '"generated": "g", "noise": NaN}', "noise:"),
    "swap string": (dict(GOOD, id="b", swap="yes"), "swap:"),
    "margin string": (dict(GOOD, id="b", margin="big"), "margin:"),
    "score string": (dict(GOOD, id="b", scores={"real": "7", "generated": 3}), "scores.real:"),
    "prompt string": (dict(GOOD, id="b", prompt="q"), "prompt:"),
    "prompt empty": (dict(GOOD, id="b", prompt=[]), "prompt:"),
    "prompt message without content": (dict(GOOD, id="b", prompt=[{"role": "user"}]), "prompt[0]:"),
    "prompt content null": (dict(GOOD, id="b", prompt=[{"role": "user", "content": None}]), "prompt[0].content:"),
    "prompt unknown role": (dict(GOOD, id="b", prompt=[{"role": "human", "content": "q"}]), "prompt[0].role:"),
    "prompt without user turn": (dict(GOOD, id="b", prompt=[{"role": "system", "content": "q"}]), "prompt:"),
    "lone surrogate in real": ('{"id": "b", "prompt": [{"role": "user", "content": "q"}], '
                               '"real": "ok \\ud800", "generated": "g"}', "real:"),
    "lone surrogate in prompt": ('{"id": "b", "prompt": [{"role": "user", "content": "\\udfff"}], '
                                 '"real": "r", "generated": "g"}', "prompt[0].content:"),
    "spin sides without user turn": ({"real": [{"role": "assistant", "content": "r"}],
                                      "generated": [{"role": "assistant", "content": "g"}]}, "prompt:"),
    "spin side without answer": ({"real": user("q"), "generated": conv("q", "g")}, "real:"),
    "spin prompts differ": ({"real": conv("q", "r"), "generated": conv("other", "g")}, "generated:"),
    "spin generated null": ({"real": conv("q", "r"), "generated": None}, "generated:"),
    "trl missing rejected": ({"prompt": "q", "chosen": "r"}, "'rejected'"),
    "trl chosen null": ({"prompt": "q", "chosen": None, "rejected": "g"}, "chosen:"),
    "trl strings without prompt": ({"chosen": "r", "rejected": "g"}, "prompt:"),
    "sft record": ({"question": "q", "answer": "a"}, "record:"),
    "ultrachat record": ({"prompt": "q", "prompt_id": "x", "messages": conv("q", "a")}, "looks like SFT data"),
}


@pytest.mark.parametrize("case", list(PAIR_CASES))
def test_bad_pair_names_file_line_and_field(tmp_path, case):
    line2, field = PAIR_CASES[case]
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, line2, dict(GOOD, id="c")])
    with pytest.raises(DataError) as e:
        read_pairs(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: ") and field in msg and "\n" not in msg, msg


SFT_CASES = {
    "malformed JSON": ('{"question": "q", ', "malformed JSON"),
    "bare number": ("42", "expected a JSON object"),
    "messages string": ({"messages": "hello"}, "messages:"),
    "message not an object": ({"messages": ["hello"]}, "messages[0]:"),
    "content null": ({"messages": [{"role": "user", "content": None}]}, "messages[0].content:"),
    "role number": ({"messages": [{"role": 1, "content": "x"}]}, "messages[0].role:"),
    "lone surrogate": ('{"question": "q", "answer": "\\ud83d"}', "answer:"),
    "question number": ({"question": 5, "answer": "a"}, "question:"),
    "completion list of numbers": ({"prompt": "p", "completion": [1]}, "completion[0]:"),
    "no known field": ({"text": "just text"}, "record:"),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_bad_sft_record_names_file_line_and_field(tmp_path, case):
    line2, field = SFT_CASES[case]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"question": "q", "answer": "a"}, line2])
    with pytest.raises(DataError) as e:
        read_sft(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: ") and field in msg and "\n" not in msg, msg


def test_invalid_utf8_names_file_and_line(tmp_path):
    for name, reader in (("pairs.jsonl", read_pairs), ("sft.jsonl", read_sft)):
        path = tmp_path / name
        path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "b", "real": "caf\xe9"}\n')
        with pytest.raises(DataError) as e:
            reader(str(path))
        assert str(e.value).startswith(f"{path}:2: invalid UTF-8")
    listed = tmp_path / "list.json"
    listed.write_bytes(b'[\n  {"question": "q",\n   "answer": "\xff"}\n]')
    with pytest.raises(DataError) as e:
        read_sft(str(listed))
    assert str(e.value).startswith(f"{listed}:3: invalid UTF-8")


def test_json_list_errors_name_the_line_of_the_record(tmp_path):
    recs = spin_records()
    recs[2] = {"real": conv("q", "r"), "generated": conv("q", None)}
    path = write_json(tmp_path / "train.json", recs)
    starts = [i for i, line in enumerate(open(path).read().splitlines(), 1) if line == "    {"]
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}:{starts[2]}: generated[1].content:")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": "c" "completion": "d"}\n]')
    with pytest.raises(DataError) as e:
        read_sft(str(broken))
    assert str(e.value).startswith(f"{broken}:3: malformed JSON")


def test_parquet_errors(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "train_prefs-00000-of-00001.parquet",
                         [spin_records()[0], {"real": None, "generated": conv("q", "g")}])
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}:row 2: real:")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(open(path, "rb").read()[:40])
    with pytest.raises(DataError) as e:
        read_pairs(str(cut))
    assert str(e.value).startswith(f"{cut}: unreadable Parquet")
    text = tmp_path / "text.parquet"
    text.write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(DataError) as e:
        read_pairs(str(text))
    assert str(e.value).startswith(f"{text}: not a Parquet file")
    # without pyarrow: one line that says how to get it
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    for reader in (read_pairs, read_sft):
        with pytest.raises(DataError) as e:
            reader(path)
        assert str(e.value) == f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"


def test_empty_or_unusable_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    for reader in (read_pairs, read_sft):
        with pytest.raises(DataError, match=r"empty"):
            reader(str(empty))
    with pytest.raises(DataError, match=r"empty"):
        read_pairs(write_json(tmp_path / "none.json", []))
    unusable = write_jsonl(tmp_path / "unusable.jsonl", [{"messages": user("q")}, {"prompt": "p"}])
    with pytest.raises(DataError) as e:
        read_sft(unusable)
    assert str(e.value).startswith(f"{unusable}: no usable record: all 2 skipped (2 no assistant answer)")
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match="is a folder"):
        read_pairs(str(folder))


# ---------------------------------------------------------------------- files we append to
def test_torn_last_line_with_a_split_character_is_dropped_and_cut(tmp_path):
    path = tmp_path / "cache.jsonl"
    whole = json.dumps({"k": 1}).encode() + b"\n"
    path.write_bytes(whole + json.dumps({"k": "é"}, ensure_ascii=False).encode()[:-3])  # cut inside é
    assert read_jsonl(str(path)) == [{"k": 1}]
    with JsonlAppender(str(path), fsync=False) as w:   # repairs before appending
        w.write({"k": 2})
    assert read_jsonl(str(path)) == [{"k": 1}, {"k": 2}]
    path.write_bytes(whole + b"\xff\n" + whole)         # a bad byte mid-file is an error
    with pytest.raises(DataError, match=r"cache.jsonl:2: invalid UTF-8"):
        read_jsonl(str(path))


def test_appending_after_a_whole_last_line_without_newline(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"k": 1}')   # edited by hand: whole, but unterminated
    with JsonlAppender(str(path), fsync=False) as w:
        w.write({"k": 2})
    assert read_jsonl(str(path)) == [{"k": 1}, {"k": 2}]
