"""Recipes: every setting of a SPIN run, typed, from one TOML file plus the command line.

A recipe is a TOML file (configs/*.toml; a name like "tiny" means configs/tiny.toml). Its
keys are flat — `lr = 5e-7`, `max_new_tokens = 256` — and each key belongs to exactly one
section of the typed `Recipe`:

    recipe.model       θ_0 and how text becomes tokens (template, device, dtype)
    recipe.data        the SFT records, truncation, mixing of iteration t-1's pairs, row rules
    recipe.generation  sampling y' ~ p_θt (generate.py, train.py --generate)
    recipe.training    the optimizer, the loss, batches, checkpoints (train.py)
    recipe.fixes       the study's fixes: judge relabeling, noise, the adaptive mode (judge.py)
    recipe.eval        the held-out check and the lm-eval suite (evaluate.py)

One precedence rule, applied by `resolve` and nowhere else:

    built-in defaults < recipe top-level keys < the recipe's [iterations.<t>] table
    (or its [sft] table for supervised fine-tuning) < command-line flags

Anything that cannot be computed is refused here, before a model is loaded: an unknown key
(named with its file and the closest valid key), a value of the wrong type, a number out of
range or not finite, a choice outside its list, a device that does not exist, settings that
contradict each other. Each refusal is one line (RecipeError).

The CLIs build their flags from the same table (`add_flags`): a flag's help text, its type
and its recipe key are written once, on the dataclass field below.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Iterable, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..core.settings import NoiseSettings
from .errors import UserError, redact

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # minispin/
REPO_ROOT = os.path.dirname(PACKAGE_DIR)   # a checkout's root; in an installed minispin, site-packages


def _shipped(name: str) -> str:
    """configs/ or assets/: inside the package when minispin is installed (setup.py ships
    them as minispin/configs and minispin/assets), else at the checkout's root beside it."""
    inside = os.path.join(PACKAGE_DIR, name)
    return inside if os.path.isdir(inside) else os.path.join(REPO_ROOT, name)


CONFIG_DIR = _shipped("configs")
ASSET_ROOT = _shipped("assets")
DEFAULT_RECIPE = os.path.join(CONFIG_DIR, "tiny.toml")
PATH_KEYS = ("model", "data", "eval_data", "judge_model", "judge_prompt")  # also found among the shipped files


class RecipeError(UserError):
    """A recipe key or flag that cannot be used; the message names it and its source."""


def key(default, help: str, *, choices: Tuple = (), lo=None, hi=None, lo_open=False,
        flag: Optional[str] = None, name: Optional[str] = None):
    """A recipe key: its default, help text, allowed values, and (if not --<name>) its flag."""
    return field(default=default, metadata={"help": help, "choices": choices, "lo": lo, "hi": hi,
                                            "lo_open": lo_open, "flag": flag, "name": name})


# ---------------------------------------------------------------------- the sections
@dataclass
class Model:
    path: str = key("", "θ_0, the SFT model folder (Hugging Face format)", name="model")
    template: str = key("auto", "chat template: auto (the checkpoint's own when its "
                        "tokenizer_config.json has one, else zephyr) | checkpoint | zephyr (built "
                        "in; SPIN's empty system turn via empty_system) | instruction (SPIN's "
                        "original generation prompt)",
                        choices=("auto", "checkpoint", "zephyr", "instruction"))
    empty_system: bool = key(True, "put SPIN's empty system turn in front of each prompt")
    device: str = key("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    dtype: str = key("auto", "inference dtype of generation, the local judge and held-out "
                     "checks: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16",
                     choices=("auto", "float32", "bfloat16", "float16"))
    cpu_threads: int = key(0, "torch intra-op threads on CPU (0 = torch's default; tiny models "
                           "run fastest on 1)", lo=0)
    dist_timeout: float = key(1800.0, "seconds a torchrun process waits in a collective for the "
                              "others before the run stops, naming the ranks that did not answer "
                              "(torch's default, 1800); keep it above the longest stage one rank "
                              "runs alone (rank 0 judges pairs, hashes θ_t)", lo=1, hi=10**7)


@dataclass
class Data:
    path: str = key("", "SFT records: .jsonl/.json/.parquet with {messages}, {prompt, completion} "
                    "or {question, answer} records", name="data")
    num_prompts: int = key(0, "use the first N usable records only; 0 = all", lo=0)
    shuffle_seed: int = key(-1, "shuffle the SFT records before taking num_prompts, as uclaml/SPIN "
                            "and the study did (datasets' shuffle(seed): numpy default_rng(seed)."
                            "permutation); -1 = file order", lo=-1, hi=2**62)
    max_length: int = key(1024, "prompt + answer tokens at most (SPIN's truncation rule)", lo=3)
    max_prompt_length: int = key(512, "prompt tokens kept (its END) when a pair is too long", lo=2)
    mix_previous: bool = key(True, "for t >= 1 also train on iteration t-1's pairs (SPIN's recipe)")
    rows: str = key("minispin", "how a pair becomes training rows: minispin (the prompt with <s>, "
                    "answers as its continuation, the whole conversation's tokens; truncation "
                    "cuts answers to fit) | spin (uclaml/SPIN's rows token for token: no <s>, "
                    "each piece tokenized alone, attention 0 on every eos inside, SPIN's "
                    "truncation) | study (the study's rows: as spin, but no system turn and "
                    "each answer text is the template of the whole [user, assistant] "
                    "conversation, so the question is repeated and labelled)",
                    choices=("minispin", "spin", "study"))
    # issue 17: which records the shuffle runs over (the study's and uclaml/SPIN's selection)
    shuffle_rows: str = key("usable", "what shuffle_seed permutes: usable (the records our reader "
                            "keeps) | all (every record of the file, as datasets' "
                            "Dataset.shuffle does for uclaml/SPIN and the study, then the first "
                            "num_prompts; a selected record with an empty prompt or answer is kept, "
                            "as their generate.py keeps it)", choices=("usable", "all"))


@dataclass
class Generation:
    generate: bool = key(False, "if iteration t's pairs are missing, generate them first in "
                         "the same job (train.py)")
    max_new_tokens: int = key(256, "most tokens sampled per answer (SPIN: 256)", lo=1)
    temperature: float = key(1.0, "sampling temperature; 0 = greedy (SPIN: 1.0)", lo=0)
    top_p: float = key(1.0, "nucleus sampling: keep the most likely tokens up to probability P "
                       "(SPIN: 1.0 = off)", lo=0, lo_open=True, hi=1)
    top_k: int = key(0, "keep only the K most likely tokens; 0 = off", lo=0)
    gen_batch_size: int = key(32, "prompts per sampling batch, per process", lo=1)
    compile: bool = key(False, "torch.compile the decode step (CUDA graphs on GPU); eager is "
                        "the reference")
    gen_template: str = key("", "chat template of the GENERATION prompt; empty = the training "
                            "template. uclaml/SPIN generated with 'instruction' while training "
                            "on zephyr (their issues #9, #33): set it to reproduce that",
                            choices=("", "auto", "checkpoint", "zephyr", "instruction"))
    gen_bos: bool = key(True, "start the generation prompt with <s> (uclaml/SPIN: no, "
                        "add_special_tokens=False)")
    decode: str = key("minispin", "how y' becomes text: minispin (decode without special "
                      "tokens) | spin (uclaml/SPIN: decode with them, remove '</s>', strip "
                      "leading whitespace)", choices=("minispin", "spin"))


@dataclass
class Training:
    beta: float = key(0.1, "β (the paper's λ): inverse temperature of the implicit reward",
                      lo=0, lo_open=True)
    loss_type: str = key("sigmoid", "sigmoid (SPIN) | hinge | ipo (log-probs per answer token, "
                         "as TRL) | ipo_sum (the same on summed log-probs) | robust",
                         choices=("sigmoid", "hinge", "ipo", "ipo_sum", "robust"))
    label_smoothing: float = key(0.0, "ε for sigmoid (conservative) and robust losses; 0 = SPIN",
                                 lo=0, hi=1)
    ref_mode: str = key("precompute", "precompute: θ_t's log-probs once per iteration, stored in "
                        "iter<t>/ref_logps.jsonl | online: a frozen sharded θ_t recomputed "
                        "every step", choices=("precompute", "online"))
    optimizer: str = key("rmsprop", "rmsprop (SPIN) | adamw", choices=("rmsprop", "adamw"))
    lr: float = key(5e-7, "peak learning rate", lo=0, lo_open=True)
    weight_decay: float = key(0.0, "weight decay", lo=0)
    adam_beta1: float = key(0.9, "AdamW β1", lo=0, hi=1)
    adam_beta2: float = key(0.999, "AdamW β2", lo=0, hi=1)
    optim_eps: float = key(1e-8, "ε of RMSprop / AdamW", lo=0, lo_open=True)
    rmsprop_alpha: float = key(0.99, "RMSprop smoothing constant", lo=0, hi=1)
    lr_scheduler: str = key("linear", "linear | cosine | constant, after warmup",
                            choices=("linear", "cosine", "constant"))
    warmup_ratio: float = key(0.1, "fraction of the steps spent warming up linearly from 0",
                              lo=0, hi=1)
    epochs: int = key(2, "passes over the pairs", lo=1)
    # issue 17: HF Trainer keeps an epoch's last partial batch (steps per epoch = ceil)
    last_batch: str = key("drop", "an epoch's incomplete last global batch: drop | fill (steps per "
                          "epoch = ceil: the batch is completed with the epoch's first pairs, as "
                          "HF Trainer's accelerate data loader does with even_batches)",
                          choices=("drop", "fill"))
    batch_size: int = key(64, "GLOBAL batch: pairs per optimizer step over all processes "
                          "(accumulation = batch / (micro batch x processes))", lo=1)
    micro_batch_size: int = key(8, "pairs per process per forward (each pair = 2 rows)", lo=1)
    ref_batch_size: int = key(0, "pairs per process in the reference pass (0 = 2 x micro)", lo=0)
    max_grad_norm: float = key(1.0, "clip the global gradient norm (0 = no clipping)", lo=0)
    max_steps: int = key(0, "stop after this many optimizer steps (0 = all epochs)", lo=0)
    mixed_precision: str = key("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32: compute "
                               "dtype; master weights and gradient reduction stay fp32",
                               choices=("auto", "bf16", "fp32"))
    activation_checkpointing: bool = key(False, "recompute each block's activations in backward "
                                         "(less memory)")
    compile_train: bool = key(False, "torch.compile each transformer block of the policy and of "
                              "the online reference, and RMSprop's update (fuses the elementwise "
                              "work; the first steps pay the compile); same losses as eager up to "
                              "rounding")
    packing: bool = key(False, "lay the 2B rows of each micro-batch end to end (own positions, "
                        "block-diagonal causal mask, per-row segment sums) instead of padding "
                        "them to the longest: the same losses up to rounding, no padded "
                        "positions computed (flex_attention on CUDA, SDPA with a mask elsewhere)")
    fp32_logits: bool = key(True, "lm_head in fp32 on the answer positions, so bf16 compute never "
                            "rounds the logits the log-probs come from (uclaml/SPIN: bf16 "
                            "logits; false reproduces that)")
    report_to: str = key("none", "where each step's metrics go besides iter<t>/metrics.jsonl: none, "
                         "or a comma-separated list of tensorboard (event files beside it) and "
                         "wandb (W&B; WANDB_MODE=offline works without network), under HF "
                         "Trainer's and TRL's names: train/loss, train/rewards/chosen, ... "
                         "(minispin/run/reporting.py; needs pip install tensorboard / wandb)")
    checkpoint_every: int = key(500, "save a sharded checkpoint every N steps (0 = only at the end)",
                                lo=0)
    keep_checkpoints: int = key(2, "how many checkpoints to keep", lo=1)
    keep_checkpoints_after_export: bool = key(False, "keep ckpt/ after the export is written")
    export_dtype: str = key("float32", "dtype of the exported HF model (float32 keeps every small "
                            "update; bfloat16 halves the size)",
                            choices=("float32", "bfloat16", "float16"))
    sft_limit: int = key(0, "--sft: use only the first N records (0 = all)", lo=0)
    lora_rank: int = key(0, "LoRA (docs/training.md): train rank-r adapters on a frozen base "
                         "instead of every weight; 0 = off (full fine-tuning)", lo=0)
    lora_alpha: float = key(16.0, "LoRA scale: the adapters add (alpha / rank)·B·A to each target",
                            lo=0, lo_open=True)
    lora_dropout: float = key(0.0, "LoRA dropout on the adapters' input (uclaml/SPIN's LoRA "
                              "config: 0.1; > 0 makes runs depend on the process count)", lo=0)
    lora_targets: str = key("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                            "LoRA: comma-separated projections that get adapters")
    lora_base_dtype: str = key("auto", "LoRA: storage dtype of the frozen base; auto = the compute "
                               "dtype (bfloat16 under bf16 mixed precision, else float32); the "
                               "adapters and their optimizer state are always float32",
                               choices=("auto", "bfloat16", "float32"))


@dataclass
class Fixes:
    relabel: bool = key(False, "fix 1: train on judged pairs, the generated answer becoming the "
                        "chosen side where score(generated) - score(real) >= the threshold")
    adaptive: bool = key(False, "fix 3: per judged pair, |margin| >= τ -> the judge decides (swap "
                         "iff margin >= τ), |margin| < τ or unscored -> original label plus "
                         "ref-logit noise σ = adaptive_sigma")
    adaptive_sigma: float = key(0.5, "σ of the small-margin pairs under --adaptive", lo=0)
    noise: str = key("", "fix 2, comma-separated key=value: ref-logit=σ (Gaussian noise on the "
                     "REFERENCE logits; the study: 0.5), side=real|generated|both (by the "
                     "answer's origin; default real), mode=frozen|fresh (fresh: a new draw at "
                     "every step, needs --ref-mode online), neftune=α (NEFTune on the policy's "
                     "input embeddings, training only), seed=N (default: the run's seed). E.g. "
                     "'ref-logit=0.5,side=real' or 'neftune=5'", flag="--noise")
    judge_threshold: float = key(5, "judge margin threshold τ of relabel and adaptive: swap iff "
                                 "score(y') - score(y) >= τ (the study ran 0, where ties swap, and 5)",
                                 lo=0, hi=100, flag="--threshold")
    judge_backend: str = key("none", "who judges when judged pairs are missing or out of date: "
                             "local (a checkpoint, by expected score) | openai (any OpenAI-"
                             "compatible endpoint) | none (print the judge.py command and stop)",
                             choices=("none", "local", "openai"), flag="--judge")
    judge_model: str = key("", "the judge: an OpenAI model name (default gpt-4o-mini) or a local "
                           "checkpoint folder (default θ_0, the recipe's SFT model)")
    judge_base_url: str = key("", "chat-completions base URL (default $OPENAI_BASE_URL, else "
                              "https://api.openai.com/v1)")
    judge_concurrency: int = key(8, "parallel judge requests", lo=1)
    judge_timeout: float = key(60.0, "seconds the judge's client waits to connect, and for each "
                               "read and write", lo=0, lo_open=True)
    judge_max_retries: int = key(6, "retries per judge request (the openai client's, with its "
                                 "backoff)", lo=0)
    judge_prompt: str = key("", "a judge prompt template file with {question} and {answer}, used "
                            "verbatim (the study's: configs/prompts/study-judge.txt); empty = ours")
    judge_system: str = key("ours", "the judge's system message: ours | none (no system message) | "
                            "any other text, used as it is (the study: an empty one, \"\")")
    judge_api_defaults: bool = key(False, "send no temperature and no max_tokens, so the API's "
                                   "defaults apply (the study); else temperature 0, 8 tokens")


@dataclass
class Eval:
    eval_data: str = key("", "held-out SFT records for the check after each iteration")
    heldout_examples: int = key(0, "held-out examples evaluated after the iteration (0 = none)",
                                lo=0)
    heldout_max_new_tokens: int = key(256, "greedy tokens per held-out answer", lo=1)
    diagnostics: bool = key(True, "with the held-out check, also measure the diagnostics that need "
                            "the models (docs/diagnostics.md): both models score the iteration's pairs "
                            "and sample each held-out prompt once more; off keeps only the keys read "
                            "from files (y' length, distinct-2, the judge's)")
    eval_bos: str = key("auto", "lm-eval requests start with the tokenizer's BOS: auto (as lm-eval's "
                        "hf backend since v0.4.9.2: the BOS the tokenizer itself adds — <s> for Llama "
                        "and Mistral, none for SmolLM2 — unless the text starts with it) | yes | no (the "
                        "hf backend up to v0.4.9.1, which the study ran)", choices=("auto", "yes", "no"))


SECTIONS = {"model": Model, "data": Data, "generation": Generation, "training": Training,
            "fixes": Fixes, "eval": Eval}
TOP_KEYS = ("name", "run_dir", "seed")  # plain Recipe fields, not in a section


@dataclass
class Recipe:
    name: str = "tiny"
    run_dir: str = ""                  # default runs/<name> (relative to the current folder)
    seed: int = 42                     # data order, noise and sampling seeds derive from it
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    generation: Generation = field(default_factory=Generation)
    training: Training = field(default_factory=Training)
    fixes: Fixes = field(default_factory=Fixes)
    eval: Eval = field(default_factory=Eval)
    source: str = ""                   # the TOML file it came from
    given: frozenset = frozenset()     # keys set by a command-line flag
    sampling_from: str = ""            # generation_config.json, where it set sampling keys
    where: Dict[str, str] = field(default_factory=dict)  # key -> what set it: the file, a table, a flag
    named: Dict[str, str] = field(default_factory=dict)  # key -> the Hub id it was given as (hub.py)

    def noise_settings(self) -> "NoiseSettings":
        return parse_noise(self.fixes.noise, self.seed)


# ---------------------------------------------------------------------- the key table
@dataclass(frozen=True)
class KeyInfo:
    key: str            # TOML key
    section: str        # "" for the top-level Recipe fields
    attr: str           # dataclass attribute
    type: type
    default: Any
    meta: dict

    @property
    def flag(self) -> str:
        return self.meta.get("flag") or "--" + self.key.replace("_", "-")


def _table() -> Dict[str, KeyInfo]:
    table = {
        "name": KeyInfo("name", "", "name", str, "tiny", {"help": "recipe name (default: the file's stem)"}),
        "run_dir": KeyInfo("run_dir", "", "run_dir", str, "", {"help": "where iterations live (default runs/<name>)"}),
        "seed": KeyInfo("seed", "", "seed", int, 42, {"help": "seed of the data order, of any noise and of "
                                                      "sampling ((seed, prompt id) per prompt)",
                                                      "lo": 0, "hi": 2**62}),  # torch seeds are 64-bit
    }
    types = {"str": str, "int": int, "float": float, "bool": bool}
    for sec, cls in SECTIONS.items():
        for f in fields(cls):
            name = f.metadata.get("name") or f.name
            assert name not in table, f"recipe key {name} defined twice"
            table[name] = KeyInfo(name, sec, f.name, types[f.type] if isinstance(f.type, str) else f.type,
                                  f.default, dict(f.metadata))
    return table


KEYS = _table()


# ---------------------------------------------------------------------- values
def _convert(info: KeyInfo, value, where: str):
    """A TOML or flag value -> the key's type, checked (RecipeError names `where`)."""
    t = info.type
    if t is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: '{info.key}' must be true or false, got {value!r}")
    elif t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise RecipeError(f"{where}: '{info.key}' must be a whole number, got {value!r}")
    elif t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: '{info.key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise RecipeError(f"{where}: '{info.key}' must be a finite number, got {value!r}")
        value = float(value)
    elif not isinstance(value, str):
        raise RecipeError(f"{where}: '{info.key}' must be a string, got {value!r}")
    m = info.meta
    if m.get("choices") and value not in m["choices"]:
        raise RecipeError(f"{where}: '{info.key}' must be one of {', '.join(m['choices'])}, got {value!r}")
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and (value < lo or (m.get("lo_open") and value == lo)):
        raise RecipeError(f"{where}: '{info.key}' must be {'>' if m.get('lo_open') else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise RecipeError(f"{where}: '{info.key}' must be <= {hi}, got {value!r}")
    return value


# the names uclaml/SPIN's and transformers' configs use for some keys, so their users get a hint
FOREIGN_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "optim": "optimizer",
                 "per_device_train_batch_size": "micro_batch_size", "lr_scheduler_type": "lr_scheduler",
                 "gradient_checkpointing": "activation_checkpointing", "model_name_or_path": "model",
                 "max_new_token": "max_new_tokens", "bf16": "mixed_precision"}


def _unknown(k: str, where: str, valid: Iterable[str]) -> RecipeError:
    close = [FOREIGN_NAMES[k]] if k in FOREIGN_NAMES else difflib.get_close_matches(k, list(valid), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return RecipeError(f"{where}: unknown key '{k}'{hint}; the keys are listed in minispin/run/recipe.py")


def find_recipe(path: Optional[str]) -> str:
    """A TOML path (from the current folder, else among the shipped files, so
    "configs/tiny.toml" works anywhere) or the name of a shipped recipe ("tiny" or
    "tiny.toml"); the default is the tiny recipe."""
    if path is not None and not str(path).strip():
        raise RecipeError("--config: an empty path; give a recipe file or name, or leave the flag out")
    path = path or DEFAULT_RECIPE
    stem = path[:-5] if path.endswith(".toml") else path
    for candidate in (path, _resolve_path(path), os.path.join(CONFIG_DIR, f"{stem}.toml")):
        if os.path.isfile(candidate):
            return candidate
    shipped = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".toml")) if os.path.isdir(CONFIG_DIR) else []
    raise RecipeError(f"recipe {path} not found (a TOML file, or one of: {', '.join(shipped) or 'none shipped'})")


def read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise RecipeError(f"{path}: not valid TOML (arrays or tables nested too deeply)") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not valid UTF-8 text") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror})") from None


def _resolve_path(value: str) -> str:
    """A relative path in a recipe: as given when it exists from the current folder, else
    among the shipped files — "assets/..." under ASSET_ROOT, "configs/..." under CONFIG_DIR,
    anything else under the checkout's root when there is one — so the shipped recipes work from any folder,
    from a checkout or from an installed package. A path found nowhere is left as given
    (the code that opens it names it)."""
    if not value or os.path.isabs(value) or os.path.exists(value):
        return value
    head, _, rest = os.path.normpath(value).replace(os.sep, "/").partition("/")
    roots = {"assets": ASSET_ROOT, "configs": CONFIG_DIR}
    if head in roots and rest:
        alt = os.path.join(roots[head], rest)
    elif CONFIG_DIR == os.path.join(REPO_ROOT, "configs"):  # a checkout (installed: no root to try)
        alt = os.path.join(REPO_ROOT, value)
    else:
        return value
    return alt if os.path.exists(alt) else value


def resolve(config: Optional[str] = None, flags: Optional[Dict[str, Any]] = None,
            iteration: Optional[int] = None, sft: bool = False, fetch: Any = False) -> Recipe:
    """THE precedence rule: defaults < recipe < [iterations.<t>] / [sft] table < flags.

    flags: {recipe key: value} of the flags actually given (None values are ignored).
    A Hub id in model, data or eval_data becomes its local path in huggingface_hub's cache
    (hub.py): fetched first with fetch=True (train.py, generate.py, judge.py), or for the keys
    fetch names; else only found when already cached, and left as the id when not
    (--print-config and library use never download).
    """
    path = find_recipe(config)
    raw = read_toml(path)
    values: Dict[str, Any] = {}
    where_of: Dict[str, str] = {}

    def take(items: dict, where: str):
        for k, v in items.items():
            if k not in KEYS:
                raise _unknown(k, where, KEYS)
            values[k] = _convert(KEYS[k], v, where)
            where_of[k] = where

    tables = {"iterations", "sft"}
    take({k: v for k, v in raw.items() if k not in tables}, path)
    its = raw.get("iterations", {})
    if not isinstance(its, dict):
        raise RecipeError(f"{path}: [iterations] must be a table of [iterations.<t>] tables")
    for t, table in its.items():
        if not (isinstance(t, str) and t.isdigit()) or not isinstance(table, dict):
            raise RecipeError(f"{path}: [iterations.{t}]: expected tables named by iteration number")
    for name, table in (("sft", raw.get("sft")),) + tuple(its.items()):
        for k, v in (table or {}).items():  # check every table, used or not
            if k not in KEYS:
                raise _unknown(k, f"{path} [{'sft' if name == 'sft' else 'iterations.' + name}]", KEYS)
            _convert(KEYS[k], v, f"{path} [{name}]")
    if sft:
        table, label = raw.get("sft") or {}, "[sft]"
    else:
        table, label = its.get(str(iteration if iteration is not None else 0), {}), f"[iterations.{iteration}]"
    take(table, f"{path} {label}")
    given = set()
    for k, v in (flags or {}).items():
        if v is None:
            continue
        if k not in KEYS:
            raise RecipeError(f"internal: flag for unknown recipe key '{k}'")
        values[k] = _convert(KEYS[k], v, KEYS[k].flag)
        if k in PATH_KEYS and not values[k].strip():
            raise RecipeError(f"{KEYS[k].flag}: an empty path; give a file or folder, or leave the flag out")
        where_of[k] = KEYS[k].flag
        given.add(k)
    for k in PATH_KEYS:
        if k in values and where_of.get(k) != KEYS[k].flag:
            values[k] = _resolve_path(values[k])
    from .hub import HUB_KEYS, resolve_values
    named = resolve_values(values, where_of, HUB_KEYS if fetch is True else (fetch or ()))
    sampling_from = take_checkpoint_sampling(values, where_of)

    recipe = Recipe(source=path, given=frozenset(given), sampling_from=sampling_from, where=dict(where_of),
                    named=named)
    recipe.name = values.get("name", os.path.splitext(os.path.basename(path))[0])
    recipe.run_dir = values.get("run_dir") or os.path.join("runs", recipe.name)
    recipe.seed = values.get("seed", 42)
    for sec, cls in SECTIONS.items():
        kw = {KEYS[k].attr: v for k, v in values.items() if KEYS[k].section == sec}
        setattr(recipe, sec, cls(**kw))
    check(recipe, where_of)
    return recipe


def take_checkpoint_sampling(values: Dict[str, Any], where_of: Dict[str, str]) -> str:
    """THE rule for the checkpoint's sampling defaults: generation_config.json of θ_0 (the
    `model` key) fills max_new_tokens, temperature, top_p and top_k where neither the recipe
    nor a flag set them, so a Llama-3-Instruct samples at its own 0.6 / 0.9 as its authors
    (and HF generate) intend. `do_sample: false` there means greedy (temperature 0), as in
    HF generate, whatever temperature the file also gives. Only the file's own keys count:
    HF's library defaults (top_k 50, max_length 20) are not the checkpoint's choice and are
    not taken. θ_0's file serves every iteration, so the settings do not drift as the model
    changes. The shipped recipes set temperature and max_new_tokens themselves. Returns the
    file's path when it set anything, else ""."""
    folder = values.get("model", "")
    if not folder or not os.path.isdir(folder):
        return ""
    from .config import read_generation_config  # imported late: config.py loads torch
    gen = read_generation_config(folder)
    taken = {k: gen[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k") if k in gen}
    if gen.get("do_sample") is False:
        taken["temperature"] = 0.0
    where = os.path.join(folder, "generation_config.json")
    taken = {k: v for k, v in taken.items() if k not in values}
    for k, v in taken.items():
        values[k] = _convert(KEYS[k], v, where)
        where_of[k] = where
    return where if taken else ""


def check(recipe: Recipe, where_of: Optional[Dict[str, str]] = None):
    """Settings that contradict each other, or that this machine cannot run."""
    where = lambda k: (where_of or {}).get(k, recipe.source or "recipe")  # noqa: E731
    d, t, fx = recipe.data, recipe.training, recipe.fixes
    if d.max_prompt_length >= d.max_length:
        raise RecipeError(f"{where('max_prompt_length')}: max_prompt_length ({d.max_prompt_length}) "
                          f"must be smaller than max_length ({d.max_length})")
    if t.loss_type in ("sigmoid", "robust") and not t.label_smoothing < 0.5:
        # ε >= 0.5 weighs "generated is better" at least as much as "real is better": the
        # sigmoid loss then trains towards the generated answers, the robust one divides by 0
        raise RecipeError(f"{where('label_smoothing')}: the {t.loss_type} loss needs label_smoothing "
                          f"< 0.5, got {t.label_smoothing}")
    check_device(recipe.model.device, where("device"))
    noise = parse_noise(fx.noise, recipe.seed, where("noise"))
    if fx.adaptive and noise.ref_sigma > 0:
        raise RecipeError(f"{where('noise')}: --adaptive sets the reference noise per pair (σ = "
                          "--adaptive-sigma on the small-margin pairs); do not also give "
                          "--noise ref-logit=σ")
    if "adaptive_sigma" in recipe.given and not fx.adaptive:
        raise RecipeError("--adaptive-sigma is the σ of --adaptive; add --adaptive (or use "
                          "--noise ref-logit=σ for noise on every pair)")
    if fx.adaptive and fx.judge_threshold < 0:
        raise RecipeError(f"{where('judge_threshold')}: --adaptive needs a threshold >= 0 "
                          "(pairs with |margin| < τ get the noise)")
    check_lora(recipe, where)
    from .reporting import parse_report_to
    try:
        parse_report_to(t.report_to)
    except ValueError as e:
        raise RecipeError(f"{where('report_to')}: {e}") from None
    if t.packing and noise.neftune_alpha > 0:
        raise RecipeError(f"{where('packing')}: NEFTune scales its noise by the padded row length, "
                          "which packing changes; drop --packing or the neftune noise")
    if (noise.ref_sigma > 0 or fx.adaptive) and noise.mode == "fresh" and t.ref_mode == "precompute":
        raise RecipeError(f"{where('noise')}: mode=fresh draws new reference noise at every step, "
                          "which needs the reference logits at every step: add --ref-mode online, "
                          "or use mode=frozen (one fixed draw per answer, which the precompute "
                          "pass stores)")


LORA_KEYS = ("lora_alpha", "lora_dropout", "lora_targets", "lora_base_dtype")


def check_lora(recipe: Recipe, where):
    t = recipe.training
    if t.lora_rank == 0:
        given = [k for k in LORA_KEYS if k in recipe.given]
        if given:
            raise RecipeError(f"{KEYS[given[0]].flag} sets up LoRA, which is off: add --lora-rank R "
                              "(e.g. 16)")
        return
    from ..core.lora import parse_targets
    try:
        parse_targets(t.lora_targets)
    except ValueError as e:
        raise RecipeError(f"{where('lora_targets')}: 'lora_targets': {e}") from None
    if not t.lora_dropout < 1:
        raise RecipeError(f"{where('lora_dropout')}: 'lora_dropout' must be < 1, got {t.lora_dropout}")
    if t.lora_base_dtype == "bfloat16" and t.mixed_precision == "fp32":
        raise RecipeError(f"{where('lora_base_dtype')}: a bfloat16 base computes in bf16, but "
                          "mixed_precision is fp32: set mixed_precision to bf16 (or auto on a GPU), "
                          "or lora_base_dtype to float32")


def check_device(device: str, where: str = "device"):
    import torch
    if device in ("auto", "cpu"):
        return
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise RecipeError(f"{where}: device '{device}' asked for, but this machine has no "
                              "CUDA GPU (use --device cpu or auto)")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise RecipeError(f"{where}: device '{device}' does not exist "
                              f"({torch.cuda.device_count()} GPU(s) visible)")
        return
    raise RecipeError(f"{where}: device must be auto, cpu, cuda or cuda:N, got '{device}'")


# ---------------------------------------------------------------------- the noise spec
NOISE_KEYS = {"ref-logit": "ref_sigma", "ref_logit": "ref_sigma", "sigma": "ref_sigma",
              "side": "side", "mode": "mode", "neftune": "neftune_alpha", "seed": "seed"}


def parse_noise(spec: str, seed: int, where: str = "--noise") -> NoiseSettings:
    """'ref-logit=0.5,side=real,mode=frozen,neftune=5,seed=1' -> NoiseSettings."""
    out: Dict[str, Any] = {"seed": seed}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        k, eq, v = (s.strip() for s in part.partition("="))
        if not eq:
            raise RecipeError(f"{where}: expected key=value, got {part!r} (keys: ref-logit, side, "
                              "mode, neftune, seed)")
        if k not in NOISE_KEYS:
            raise RecipeError(f"{where}: unknown key {k!r} (keys: ref-logit, side, mode, neftune, seed)")
        name = NOISE_KEYS[k]
        if name == "side" and v not in ("real", "generated", "both"):
            raise RecipeError(f"{where}: side must be real, generated or both, got {v!r}")
        if name == "mode" and v not in ("frozen", "fresh"):
            raise RecipeError(f"{where}: mode must be frozen or fresh, got {v!r}")
        if name in ("ref_sigma", "neftune_alpha"):
            try:
                num = float(v)
            except ValueError:
                num = float("nan")
            if not math.isfinite(num) or num < 0:
                raise RecipeError(f"{where}: {k} must be a finite number >= 0, got {v!r}")
            v = num
        if name == "seed":
            try:
                v = int(v)
            except ValueError:
                raise RecipeError(f"{where}: seed must be a whole number, got {v!r}") from None
            if not 0 <= v <= 2**62:
                raise RecipeError(f"{where}: seed must be between 0 and 2**62, got {v}")
        out[name] = v
    return NoiseSettings(**out)


# ---------------------------------------------------------------------- flags
def add_flags(parser: argparse.ArgumentParser, keys: Iterable[str], group: Optional[str] = None,
              rename: Optional[Dict[str, str]] = None):
    """--flags for these recipe keys (help text, type and choices from the table). Each flag
    stores into dest = the key, default None (= not given)."""
    target = parser.add_argument_group(group) if group else parser
    for k in keys:
        info = KEYS[k]
        flag = (rename or {}).get(k) or info.flag
        text = (info.meta.get("help", "") + f" [recipe key {k}; default: the recipe's, else "
                f"{toml_value(info.default)}]").replace("%", "%%")
        if info.type is bool:
            target.add_argument(flag, dest=k, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        else:
            target.add_argument(flag, dest=k, type=info.type, default=None, help=text,
                                choices=info.meta.get("choices") or None,
                                metavar=None if info.meta.get("choices") else k.split("_")[-1].upper())


def given_flags(args: argparse.Namespace, keys: Iterable[str]) -> Dict[str, Any]:
    """{recipe key: value} of the flags given on the command line (for `resolve`),
    --run-dir included where the command has it."""
    return {k: getattr(args, k) for k in (*keys, "run_dir") if getattr(args, k, None) is not None}


def with_values(recipe: Recipe, **changes) -> Recipe:
    """A copy with some keys set (by key name), e.g. with_values(r, lr=1e-6)."""
    out = replace(recipe)
    for k, v in changes.items():
        info = KEYS[k]
        v = _convert(info, v, k)
        if info.section:
            setattr(out, info.section, replace(getattr(out, info.section), **{info.attr: v}))
        else:
            setattr(out, info.attr, v)
    check(out)
    return out


def as_dict(recipe: Recipe) -> Dict[str, Any]:
    """{key: value} of every recipe key (what train_info.json and fingerprints record)."""
    out = {}
    for k, info in KEYS.items():
        holder = getattr(recipe, info.section) if info.section else recipe
        out[k] = getattr(holder, info.attr)
    return out


def toml_value(v) -> str:
    """A key's value as TOML writes it (strings in JSON's escapes, which TOML reads)."""
    import json
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)


def to_toml(recipe: Recipe) -> str:
    """The resolved recipe as a TOML recipe of top-level keys, every key written: read back
    with `resolve` it gives the same settings (train.py --print-config), except that a URL's
    user:password and key are redacted, as everywhere that prints (errors.redact)."""
    head = [f"# resolved from {recipe.source}" + (f" and {', '.join(sorted(set(recipe.where.values()) - {recipe.source}))}"
                                                 if set(recipe.where.values()) - {recipe.source} else "")]
    values = dict(as_dict(recipe), **recipe.named)   # a Hub id as given, not its place in the cache
    return redact("\n".join(head + [f"{k} = {toml_value(v)}" for k, v in values.items()]) + "\n")


def format_overrides(recipe: Recipe) -> str:
    """The settings that differ from the recipe file's top-level keys — set by its
    [iterations.<t>] / [sft] table, a flag or the checkpoint's generation_config.json —
    as a compact block; "" when there are none."""
    lines = [f"  {k} = {toml_value(recipe.named.get(k, v))}  ({recipe.where[k]}"
             + (f"; fetched to {v})" if k in recipe.named and v != recipe.named[k] else ")")
             for k, v in as_dict(recipe).items() if recipe.where.get(k, recipe.source) != recipe.source]
    # printed, so through the one redaction rule: a judge URL may carry user:password
    return redact(f"settings beyond {recipe.source}:\n" + "\n".join(lines)) if lines else ""


def write_variant(out_path: str, overrides: dict, base: str = DEFAULT_RECIPE) -> str:
    """Copy a recipe with some top-level keys given new values (comments kept), e.g. the
    tiny recipe with more prompts for an experiment or fewer for a test."""
    import re
    with open(base) as f:
        text = f.read()
    for k, value in overrides.items():
        if k not in KEYS:
            raise _unknown(k, "write_variant", KEYS)
        text, n = re.subn(rf"^{re.escape(k)} = .*$", f"{k} = {value}", text, count=1, flags=re.M)
        if n != 1:
            raise RecipeError(f"{base} has no top-level key '{k}' to override")
    with open(out_path, "w") as f:
        f.write(text)
    return out_path
