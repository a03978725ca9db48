"""lm-evaluation-harness over minispin's model: the study's eight-task suite and its table.

    import minispin.study.evaluation   # registers the "minispin" model with lm-eval
    lm_eval.simple_evaluate(model="minispin", model_args="pretrained=PATH,dtype=bfloat16",
                            tasks=["arc_easy"])

`MinispinLM` answers lm-eval's three request types with model.py and sampling.py only
(no transformers model or tokenizer):

* loglikelihood. lm-eval tokenizes each (context, continuation) pair exactly as its "hf"
  backend does (context + continuation encoded whole, then split after the context's
  tokens; we inherit that code path from `TemplateLM`) and hands us token lists. A
  multiple-choice question asks for the SAME context with 2-10 continuations, so we pack
  a question into one row: the context once, then each choice's tokens, each choice at
  the positions it would have right after the context and seeing only the context and
  itself (a block mask; RoPE takes the positions as given). A 25-shot ARC question is then
  one ~1000-token row instead of four, which is where most of the speed over the "hf"
  backend comes from; the numbers are the same to ~1e-6 in fp32. Rows are sorted by length
  (longest first, so a batch holds rows of similar length) and a batch is ONE forward.
  The vocabulary projection and log-softmax run only at the scored positions, never over
  B x T x vocab. A request longer than the model's context window gets its own row, left
  truncated exactly as the "hf" backend truncates it.
* loglikelihood_rolling: lm-eval's rolling windows (BOS-prefixed, disjoint), scored as above.
* generate_until: prompts left-truncated to max_length - max_gen_toks, then
  `sampling.generate` (greedy unless the task asks to sample) in rounds of `gen_chunk`
  tokens; a row leaves when it emits eos or its text contains a stop sequence, and the
  text is cut at the first stop sequence, as the "hf" backend cuts it.
* torchrun: each rank holds a whole model; lm-eval's evaluator splits the documents
  across ranks (rank/world_size below) and gathers the per-document metrics through
  all_gather / gather_object, which we implement on torch.distributed (gloo or nccl).

Offline tasks. `local_task_dir()` turns the overlays in minispin/tasks/*.yaml into task
files lm-eval can read: each `include:`s the INSTALLED lm-eval task (prompt, choices,
metrics, filters unchanged) and swaps only the data for the samples in assets/eval. Their
names end in "_local" (arc_easy_local, ..., the group mmlu_local).

The suite. `SPIN_SUITE` lists the study's tasks with their shot counts and the metric its
table reports (Open LLM Leaderboard convention); `results_row` and `markdown_table` turn
lm-eval results into that table.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lm_eval
import lm_eval.models  # noqa: F401  lm-eval's own model names first: a registry that is
#                        not empty when "hf" is looked up would never load them (cheap:
#                        lazy placeholders, no transformers import)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..run.checkpoint import load_model
from ..run import distributed as D
from ..run.errors import UserError, writing
from ..run.recipe import ASSET_ROOT
from ..core.sampling import generate
from ..run.tokenizer import load_tokenizer

TASK_TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks")
EVAL_DATA = os.path.join(ASSET_ROOT, "eval")   # the offline samples: in the checkout or the installed package
LM_EVAL_TASKS = os.path.join(os.path.dirname(os.path.abspath(lm_eval.__file__)), "tasks")


# ---------------------------------------------------------------------------- the suite
@dataclass(frozen=True)
class SuiteTask:
    name: str        # lm-eval task (or group) name
    num_fewshot: int
    metric: str      # key in lm-eval's results: "metric,filter"
    column: str      # table header


SPIN_SUITE: Tuple[SuiteTask, ...] = (
    SuiteTask("arc_challenge", 25, "acc_norm,none", "arc_challenge (25)"),
    SuiteTask("arc_easy", 25, "acc_norm,none", "arc_easy (25)"),
    SuiteTask("truthfulqa_mc1", 0, "acc,none", "truthfulqa_mc1 (0)"),
    SuiteTask("truthfulqa_mc2", 0, "acc,none", "truthfulqa_mc2 (0)"),
    SuiteTask("winogrande", 5, "acc,none", "winogrande (5)"),
    SuiteTask("gsm8k", 5, "exact_match,strict-match", "gsm8k (5)"),
    SuiteTask("hellaswag", 10, "acc_norm,none", "hellaswag (10)"),
    SuiteTask("mmlu", 5, "acc,none", "mmlu (5)"),
)
SUITES = {"spin": SPIN_SUITE}
LOCAL_SUFFIX = "_local"


def local_name(name: str) -> str:
    return name if name.endswith(LOCAL_SUFFIX) else name + LOCAL_SUFFIX


_LOCAL_DIR: Optional[str] = None


def local_task_dir() -> str:
    """A folder of task YAMLs for the offline samples (made once per process).

    The overlays in minispin/tasks/ name the installed lm-eval tasks folder and the data
    folder by placeholders; here they become absolute paths, so the tasks load whatever
    the current directory and wherever lm-eval is installed.
    """
    global _LOCAL_DIR
    if _LOCAL_DIR is None or not os.path.isdir(_LOCAL_DIR):
        out = tempfile.mkdtemp(prefix="minispin-tasks-")
        for fname in sorted(os.listdir(TASK_TEMPLATES)):
            if not fname.endswith(".yaml"):
                continue
            with open(os.path.join(TASK_TEMPLATES, fname)) as f:
                text = f.read()
            text = text.replace("@LM_EVAL_TASKS@", LM_EVAL_TASKS).replace("@EVAL_DATA@", EVAL_DATA)
            with open(os.path.join(out, fname), "w") as f:
                f.write(text)
        _LOCAL_DIR = out
    return _LOCAL_DIR


def task_manager(offline: bool):
    """lm-eval's TaskManager: the installed tasks, or (offline) only ours — indexing the
    thousands of installed YAML files takes ~10 s and our overlays include theirs by path."""
    from lm_eval.tasks import TaskManager
    if offline:
        return TaskManager(include_path=local_task_dir(), include_defaults=False)
    return TaskManager()


def local_tasks() -> List[str]:
    """Names of the shipped offline tasks (and the mmlu_local group)."""
    return sorted(f[:-5] for f in os.listdir(TASK_TEMPLATES) if f.endswith(".yaml"))


# ---------------------------------------------------------------------------- the table
def results_row(results: dict, tasks: Sequence[SuiteTask]) -> Dict[str, Optional[float]]:
    """{column: value} for one model's lm-eval results, plus "Average" over the tasks found.

    A task is looked up under its name or its "_local" name (offline runs).
    """
    found = {**results.get("results", {}), **results.get("groups", {})}
    row: Dict[str, Optional[float]] = {}
    for t in tasks:
        metrics = found.get(t.name) or found.get(local_name(t.name)) or {}
        value = metrics.get(t.metric)
        if value is None:  # a task outside the suite: its first reported metric
            value = next((v for k, v in metrics.items() if "," in k and "_stderr" not in k
                          and isinstance(v, (int, float))), None)
        row[t.column] = None if value is None or value == "N/A" else float(value)
    values = [v for v in row.values() if v is not None]
    row["Average"] = sum(values) / len(values) if values else None
    return row


def markdown_table(rows: Dict[str, Dict[str, Optional[float]]]) -> str:
    """Rows {model label: results_row(...)} -> a Markdown table, 4 decimals, as in the study."""
    columns = list(next(iter(rows.values())).keys()) if rows else []
    lines = ["| Model | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label, row in rows.items():
        cells = ["-" if row.get(c) is None else f"{row[c]:.4f}" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resolve_tasks(names: Optional[Sequence[str]] = None, suite: Optional[str] = "spin",
                  num_fewshot: Optional[int] = None) -> List[SuiteTask]:
    """The tasks to run: a suite's, or the named ones (suite entries keep their shot
    count and metric; other lm-eval tasks get num_fewshot or 0 and their first metric).
    num_fewshot, when given, overrides every task's shot count."""
    by_name = {t.name: t for ts in SUITES.values() for t in ts}
    if names:
        tasks = []
        for n in names:
            base = n[:-len(LOCAL_SUFFIX)] if n.endswith(LOCAL_SUFFIX) else n
            tasks.append(by_name.get(base) or SuiteTask(base, 0, "", base))
    else:
        if suite not in SUITES:
            raise UserError(f"unknown suite {suite!r} (choose from {sorted(SUITES)})")
        tasks = list(SUITES[suite])
    if num_fewshot is not None:
        tasks = [SuiteTask(t.name, num_fewshot, t.metric,
                           re.sub(r" \(\d+\)$", "", t.column) + f" ({num_fewshot})") for t in tasks]
    return tasks


def run_tasks(lm, tasks: Sequence[SuiteTask], offline: bool = False, limit=None, **kwargs):
    """lm-eval on `tasks`, each with its own shot count; returns lm-eval's results dict
    (None on ranks other than 0). offline: the "_local" tasks on the shipped samples."""

    if offline:
        missing = [t.name for t in tasks if local_name(t.name) not in local_tasks()]
        if missing:
            raise UserError(f"no offline copy of {missing}; offline tasks: "
                             f"{', '.join(local_name(t.name) for t in SPIN_SUITE)}")
    names = [local_name(t.name) if offline else t.name for t in tasks]
    tm = task_manager(offline)
    try:
        loaded = tm.load(names)   # lm-eval builds each task, and datasets fetches its data, here
    except Exception as e:
        if offline or not network_error(e):
            raise
        raise UserError(f"cannot reach the Hugging Face Hub for the tasks' datasets ({type(e).__name__}); "
                        f"{NETWORK_HINT}") from None
    objects = []
    for name, t in zip(names, tasks):
        group = loaded["groups"].get(name)
        leaves = group.get_all_tasks() if group is not None else [loaded["tasks"][name]]
        for leaf in leaves:
            leaf.set_config(key="num_fewshot", value=t.num_fewshot)
        objects.append(group if group is not None else leaves[0])
    kwargs.setdefault("log_samples", False)
    return lm_eval.simple_evaluate(model=lm, tasks=objects, limit=limit, task_manager=tm, **kwargs)


NETWORK_HINT = ("without network, run the shipped samples with --offline (or set "
                             "HF_DATASETS_OFFLINE=1 when the datasets are in your cache)")


def check_hub_reachable(timeout: float = 10.0):
    """One request to the hub ($HF_ENDPOINT) before lm-eval loads the tasks: without network
    the hub's client retries for half a minute, warning at each try, then datasets raises
    a traceback several layers deep. Any HTTP answer counts as reachable; nothing is asked
    when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE say to use the cache."""
    import urllib.error
    import urllib.request
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", e)
        raise UserError(f"cannot reach the Hugging Face Hub at {endpoint} ({why}) to load the tasks' "
                        f"datasets; {NETWORK_HINT}") from None


# what requests, httpx, urllib3 and huggingface_hub call a connection that failed
NETWORK_ERRORS = {"ConnectionError", "ConnectError", "ConnectTimeout", "NewConnectionError", "MaxRetryError",
                  "LocalEntryNotFoundError", "OfflineModeIsEnabled"}


def network_error(exc: Optional[BaseException]) -> bool:
    """True when exc, or an exception it was raised from or while handling, is a failed
    connection: datasets and the hub wrap them several layers deep."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in NETWORK_ERRORS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ---------------------------------------------------------------------------- the model
def _block_mask(seg: torch.Tensor, pos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """(B, 1, T, T) boolean mask for packed rows; True = may attend.

    seg: 0 for a row's shared context, j >= 1 for its j-th continuation, -1 for padding.
    A token sees earlier-positioned tokens of the context and of its own segment; a
    padding token sees only padding (never nothing: a fully masked query gives NaN).
    """
    seg_q, seg_k = seg[:, :, None], seg[:, None, :]
    pos_q, pos_k = pos[:, :, None], pos[:, None, :]
    diff = pos_q - pos_k
    allowed = ((seg_k == 0) | (seg_k == seg_q)) & (diff >= 0)
    if window is not None:
        allowed &= diff < window
    return allowed[:, None]


@register_model("minispin")
class MinispinLM(TemplateLM):
    """lm-eval model over a minispin Transformer (an HF Llama/Mistral folder).

    model_args: pretrained=PATH, dtype (default bfloat16 on GPU, float32 on CPU),
    device, batch_size (rows per forward; a packed row is one question with all its
    choices), max_length (default config.max_position_embeddings, as the "hf" backend),
    max_gen_toks (default 256), gen_chunk (tokens per generation round, default 64).
    """

    def __init__(self, pretrained: str, dtype: Optional[str] = None, device: Optional[str] = None,
                 batch_size=8, max_batch_size: Optional[int] = None, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, gen_chunk: int = 64, add_bos_token=None, **kwargs):
        super().__init__()
        # None: as lm-eval's "hf" backend does by default since v0.4.9.2 (PR #3347 lets the
        # tokenizer add <s>); up to v0.4.9.1, which the study ran, it added none
        if isinstance(add_bos_token, str):
            add_bos_token = {"true": True, "false": False, "none": None, "auto": None}[add_bos_token.lower()]
        self.add_bos_token = add_bos_token
        if kwargs:
            logging.getLogger(__name__).warning("minispin backend ignores model_args %s", sorted(kwargs))
        self._device = D.pick_device(device)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: lm-eval splits the documents
            env = D.init_distributed(str(self._device) if device else "auto")
            self._device, self._rank, self._world_size = env.device, env.rank, env.world_size
        self.dtype = D.compute_dtype(dtype, self._device)
        self.pretrained = str(pretrained)
        self.model = load_model(self.pretrained, dtype=self.dtype, device=self._device)
        self.tok = load_tokenizer(self.pretrained)
        if isinstance(batch_size, str):
            batch_size = int(batch_size) if batch_size.isdigit() else (max_batch_size or 8)
        self._batch_size = max(1, int(batch_size))
        cfg = self.model.config
        self._max_length = int(max_length) if max_length else int(cfg.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.gen_chunk = max(1, int(gen_chunk))
        self.requests_done = 0  # requests this rank answered (torchrun: its share)
        # text the "hf" backend never shows: ids skipped when decoding generations
        self._skip_ids = {i for i in (self.tok.bos_id, self.tok.eos_id, self.tok.unk_id, self.tok.pad_id)
                          if i is not None and i >= 0}

    # ------------------------------------------------------------------ lm-eval plumbing
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None and self.tok.bos_id >= 0 else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        """As the "hf" backend: an explicit add_special_tokens wins, then add_bos_token; by
        default <s> first if the tokenizer puts it there (Tokenizer.adds_bos) and the text
        does not already start with it."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if add_special_tokens is None:
                add_special_tokens = self.tok.adds_bos and \
                    not string.startswith(self.tok.id_to_piece(self.prefix_token_id))
        return self.tok.encode(string, bos=bool(add_special_tokens))

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self._skip_ids])

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        import torch.distributed as dist
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.model.num_params(), "model_dtype": str(self.dtype),
                "model_name": self.pretrained, "backend": "minispin",
                "add_bos_token": "default" if self.add_bos_token is None else self.add_bos_token}

    # ------------------------------------------------------------------ loglikelihood
    def _window(self, ctx: List[int], cont: List[int]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(prefix, continuation) the model sees: the "hf" backend's left truncation, i.e.
        the last max_length + 1 tokens of context + continuation."""
        if len(cont) > self.max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
        whole = (ctx + cont)[-(self.max_length + 1):]
        return tuple(whole[:len(whole) - len(cont)]), tuple(cont)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        # 1. group the requests into packed rows: one row per distinct prefix, holding each
        #    distinct continuation once (exact duplicates share the answer)
        self.requests_done += len(requests)
        rows: Dict[Tuple[int, ...], Dict[Tuple[int, ...], List[int]]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            prefix, cont = self._window(list(ctx), list(cont))
            rows.setdefault(prefix, {}).setdefault(cont, []).append(i)
        order = sorted(rows, key=lambda p: -(len(p) + sum(len(c) - 1 for c in rows[p])))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="minispin loglikelihood")
        # 2. one forward per batch of rows, longest rows first
        for start in range(0, len(order), self.batch_size):
            batch = [(p, list(rows[p].items())) for p in order[start:start + self.batch_size]]
            for (prefix, conts), answers in zip(batch, self._score_rows(batch)):
                for (cont, idx), answer in zip(conts, answers):
                    for i in idx:
                        results[i] = answer
                        string = requests[i][0]
                        if string is not None:
                            self.cache_hook.add_partial("loglikelihood", string, answer)
                    pbar.update(len(idx))
        pbar.close()
        return results

    @torch.no_grad()
    def _score_rows(self, batch) -> List[List[Tuple[float, bool]]]:
        """batch: [(prefix, [(continuation, request ids), ...]), ...] -> per row, per
        continuation: (sum of log p(continuation | prefix), is it the greedy output)."""
        ids_rows, seg_rows, pos_rows = [], [], []
        slots, targets, owner = [], [], []  # per scored token: (row, slot), token, answer no.
        n_answers = 0
        packed = False
        for b, (prefix, conts) in enumerate(batch):
            P = len(prefix)
            ids, seg, pos = list(prefix), [0] * P, list(range(P))
            for j, (cont, _) in enumerate(conts):
                # the first continuation token is predicted at the prefix's last slot; the
                # others from the continuation's own tokens, placed after everything so far
                start = len(ids)
                body = cont[:-1]
                ids += body
                seg += [j + 1] * len(body)
                pos += range(P, P + len(body))
                packed |= len(conts) > 1 and len(body) > 0
                slots += [(b, P - 1)] + [(b, start + k) for k in range(len(body))]
                targets += cont
                owner += [n_answers] * len(cont)
                n_answers += 1
            ids_rows.append(ids)
            seg_rows.append(seg)
            pos_rows.append(pos)
        T = max(len(r) for r in ids_rows)
        B = len(batch)
        pad = self.tok.pad_id if self.tok.pad_id is not None and self.tok.pad_id >= 0 else 0
        ids = torch.full((B, T), pad, dtype=torch.long)
        seg = torch.full((B, T), -1, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        for b in range(B):
            n = len(ids_rows[b])
            ids[b, :n] = torch.tensor(ids_rows[b])
            seg[b, :n] = torch.tensor(seg_rows[b])
            pos[b, :n] = torch.tensor(pos_rows[b])
        dev = self._device
        ids, seg, pos = ids.to(dev), seg.to(dev), pos.to(dev)
        # without packed continuations a right-padded batch is plain causal: the model's
        # default mask (and SDPA's fastest kernel) is exact for every real token
        mask = _block_mask(seg, pos, self.model.config.sliding_window) if packed else None
        hidden = self.model(ids, pos if packed else None, mask, return_hidden=True)
        where = torch.tensor(slots, dtype=torch.long, device=dev)
        h = hidden[where[:, 0], where[:, 1]]
        logits = F.linear(h, self.model.output_weight).float()
        logp = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor(targets, dtype=torch.long, device=dev)
        tok_lp = logp.gather(1, tgt[:, None])[:, 0]
        missed = (logits.argmax(dim=-1) != tgt).to(torch.float64)
        own = torch.tensor(owner, dtype=torch.long, device=dev)
        sums = torch.zeros(n_answers, dtype=torch.float64, device=dev).index_add_(0, own, tok_lp.double())
        misses = torch.zeros(n_answers, dtype=torch.float64, device=dev).index_add_(0, own, missed)
        flat = list(zip(sums.tolist(), (misses == 0).tolist()))
        out, k = [], 0
        for _, conts in batch:
            out.append(flat[k:k + len(conts)])
            k += len(conts)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Perplexity-style scores: each string in lm-eval's disjoint rolling windows."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owners, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy (or sampled, if the task asks) continuations cut at the stop sequences."""
        self.requests_done += len(requests)
        eos_text = self.tok.id_to_piece(self.eot_token_id)
        groups: Dict[str, List[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=str)), []).append(i)
        results: List[Optional[str]] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="minispin generate_until")
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text not in until:
                until.append(eos_text)
            max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not do_sample:
                temperature = 0.0
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            top_k = int(kwargs.pop("top_k", 0) or 0)
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks {max_gen} leaves no room for the prompt "
                                 f"(max_length {self.max_length})")
            prompts = [self.tok_encode(requests[i].args[0])[-max_ctx:] for i in idx]
            texts = self._generate(prompts, max_gen, until, temperature, top_p, top_k,
                                   seed=kwargs.pop("seed", 1234))
            for i, text in zip(idx, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            pbar.update(len(idx))
        pbar.close()
        return results

    def _generate(self, prompts: List[List[int]], max_gen: int, until: List[str], temperature: float,
                  top_p: float, top_k: int, seed: int) -> List[str]:
        """Generate in rounds of gen_chunk tokens until eos, a stop sequence or max_gen.

        The sampler knows eos but not stop strings; rather than always running max_gen
        steps, unfinished rows continue from their tokens so far (a new prefill) each round.
        Greedy rows get the same tokens as one long run.
        """
        new: List[List[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        while live:
            steps = min(self.gen_chunk, max_gen - len(new[live[0]]))
            outs = generate(self.model, [prompts[i] + new[i] for i in live], steps,
                            temperature=temperature, top_p=top_p, top_k=top_k,
                            eos_id=self.eot_token_id, seed=seed + len(new[live[0]]),
                            batch_size=self.batch_size)
            still = []
            for i, out in zip(live, outs):
                new[i] += out
                text = self.tok_decode(new[i])
                if len(out) == steps and len(new[i]) < max_gen and not any(s and s in text for s in until):
                    still.append(i)
            live = still
        texts = []
        for ids in new:
            text = self.tok_decode(ids)
            for s in until:
                if s:
                    text = text.split(s)[0]
            texts.append(text)
        return texts


# ---------------------------------------------------------------------------- files
_ITER_MODEL = re.compile(r"^(?P<run>.*)/(?P<iter>iter\d+)/model/?$")


def results_paths(models: List[str], output: Optional[str] = None):
    """(labels, per-model results.json paths, table path) for evaluate.py.

    A model at runs/<name>/iter<t>/model is labelled iter<t> and writes
    runs/<name>/iter<t>/eval/results.json (the run layout); other folders are labelled by
    their name. The table goes to runs/<name>/eval/results.md when every model belongs to
    one run, else runs/eval/results.md. With `output`, everything goes under that folder."""
    labels, taken = [], set()
    for path in models:
        m = _ITER_MODEL.match(os.path.normpath(path).replace(os.sep, "/"))
        label = m.group("iter") if m else os.path.basename(os.path.normpath(path))
        label = os.path.normpath(path) if label in taken else label
        taken.add(label)
        labels.append(label)
    if output:
        return labels, [os.path.join(output, lab.replace(os.sep, "_"), "results.json") for lab in labels], \
            os.path.join(output, "results.md")
    runs, jsons = set(), []
    for path, lab in zip(models, labels):
        m = _ITER_MODEL.match(os.path.normpath(path).replace(os.sep, "/"))
        runs.add(m.group("run") if m else None)
        jsons.append(os.path.join(m.group("run"), m.group("iter"), "eval", "results.json") if m
                     else os.path.join("runs", "eval", lab.replace(os.sep, "_"), "results.json"))
    run = runs.pop() if len(runs) == 1 else None
    return labels, jsons, os.path.join(run or "runs", "eval", "results.md")


def results_json(results: dict) -> str:
    import json
    from ..run.errors import redact
    return redact(json.dumps(results, indent=2, default=str))


def write_text(path: str, text: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with writing(path), open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def finish_distributed():
    """End a torchrun evaluation cleanly (every rank waits for rank 0's files)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
