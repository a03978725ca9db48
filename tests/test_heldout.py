"""The laptop run's held-out metrics, checked against transformers and by hand."""
import torch

from helpers import REPO
from minispin import load_model, load_tokenizer
from minispin.run.data import SFTExample
from minispin.run.rows import collate_sft, tokenize_sft
from minispin.study.heldout import final_number, heldout_metrics

TINY_SFT = f"{REPO}/assets/models/tiny-sft"


def test_final_number():
    assert final_number("so 3 + 4 = 7\n#### 7") == "7"
    assert final_number("#### 1,234 ") == "1234" and final_number("#### -2.5") == "-2.5"
    assert final_number("the answer is 7") is None and final_number("#### 7 apples") is None


def test_answer_nll_equals_transformers_cross_entropy():
    from transformers import AutoModelForCausalLM
    examples = [SFTExample("a", [{"role": "user", "content": "Tom has 3 apples and buys 4. How many?"}],
                           "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"),
                SFTExample("b", [{"role": "user", "content": "What is 10 - 6?"}], "10 - 6 = 4\n#### 4")]
    model, tok = load_model(TINY_SFT), load_tokenizer(TINY_SFT)
    got = heldout_metrics(model, tok, examples, max_new_tokens=16)
    hf = AutoModelForCausalLM.from_pretrained(TINY_SFT, dtype=torch.float32).eval()
    batch = collate_sft(tokenize_sft(tok, examples, 512, 256)[0], tok.pad_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in zip(batch["input_ids"], batch["loss_mask"]):
            n = int(mask.nonzero().max()) + 1  # through the answer's eos (pad is eos too)
            logits = hf(ids[None, :n]).logits[0, :-1]
            target, m = ids[1:n], mask[1:n].bool()
            total += torch.nn.functional.cross_entropy(logits[m], target[m], reduction="sum").item()
            count += int(m.sum())
    assert abs(got["answer_nll"] - total / count) < 1e-4
    # 16 new tokens cannot finish a GSM8K answer: nothing counts as formatted
    assert got["format_rate"] == 0.0 and got["examples"] == 2


def test_the_progress_bar_counts_each_example_once_while_scoring_and_once_while_answering(capsys):
    """progress="label": the bar's total is the number of examples (3 here, not 6), it
    reaches 3/3 while scoring, starts over and reaches 3/3 while answering, and the
    metrics are the same as without it."""
    examples = [SFTExample(str(i), [{"role": "user", "content": f"What is {i} + 1?"}], f"{i} + 1 = {i + 1}\n#### {i + 1}")
                for i in range(3)]
    model, tok = load_model(TINY_SFT), load_tokenizer(TINY_SFT)
    quiet = heldout_metrics(model, tok, examples, max_new_tokens=8, batch_size=2)
    capsys.readouterr()
    shown = heldout_metrics(model, tok, examples, max_new_tokens=8, batch_size=2, progress="held-out θ_0")
    err = capsys.readouterr().err.replace("\r", "\n")
    assert shown == quiet
    for stage in ("scoring", "answering"):
        counts = [line.split("|")[2].split()[0] for line in err.splitlines()
                  if line.startswith(f"held-out θ_0 ({stage}):")]
        assert counts, f"no {stage} bar in: {err!r}"
        assert counts[0] == "0/3" and counts[-1] == "3/3" and all(c.endswith("/3") for c in counts), (stage, counts)