"""Models and data by name: a Hugging Face Hub id where a recipe or a flag takes a path.

    model = "alignment-handbook/zephyr-7b-sft-full@ac6e600e..."      ORG/NAME[@REVISION]
    data  = "hf://datasets/HuggingFaceH4/ultrachat_200k@REV/data/train_sft-....parquet"
    data  = "HuggingFaceH4/ultrachat_200k:train_sft"                 ORG/NAME[@REVISION]:SPLIT

A value that exists on disk is a local path and wins. Anything else of these shapes is
fetched once, when the recipe is resolved (recipe.resolve), by huggingface_hub: its cache
(HF_HOME / HF_HUB_CACHE), resumed downloads, HF_HUB_OFFLINE and the token of `hf auth login`
are all its own. Only the files minispin reads are downloaded: a model's config, tokenizer
and safetensors weights (never .bin, .pt or Mistral's consolidated.safetensors), one data
file. The value becomes the local path in the cache, so nothing past the recipe knows about
the Hub.

A split names the data files minispin reads: the repository's files named `<split>-*` or
`<split>.*` (the layout `datasets` writes), or under a `<split>/` folder, of a format minispin
reads (.parquet, .jsonl, .json). A split stored as several shards (ultrachat_200k's train_sft
is three) becomes a glob pattern in the cache that matches exactly those shards, read in
name order as one file (data.py), the order `datasets` loads them in.

Every failure is one line that names the value, where it came from (the recipe file's key or
the flag) and the command that fetches it.
"""
from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

from .errors import UserError

# what minispin reads from a model folder (checkpoint.py, tokenizer.py, config.py)
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "model-*.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja"]
DATA_EXTENSIONS = (".parquet", ".jsonl", ".json")
HUB_KEYS = ("model", "data", "eval_data")   # recipe keys that take a Hub id
# local folders that a minispin command makes: a missing one is named with that command
MAKERS = {"SmolLM2-135M-Instruct": "`minispin-fetch-smollm2 --out {path}` (in a checkout: "
                                   "`python scripts/fetch_smollm2.py --out {path}`)"}

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REV = r"[^\s:@]+"
MODEL_ID = re.compile(rf"^(?:hf://)?(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>{_REV}))?$")
DATA_FILE = re.compile(rf"^hf://datasets/(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[^\s:@/]+))?/(?P<path>\S+)$")
DATA_SPLIT = re.compile(rf"^(?:hf://datasets/)?(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[^\s:@/]+))?:(?P<split>[\w.-]+)$")


class HubError(UserError):
    """A Hub id that cannot be fetched; the message names the id, its source and the fix."""


@dataclass(frozen=True)
class HubRef:
    kind: str                 # "model" | "dataset"
    repo: str                 # ORG/NAME
    revision: Optional[str]   # branch, tag or commit; None = main
    path: str = ""            # a dataset file inside the repository
    split: str = ""           # or a dataset split

    def fetch_command(self) -> str:
        """The command that puts the files into huggingface_hub's cache on a connected machine."""
        cmd = "hf download " + self.repo
        if self.kind == "dataset":
            cmd += " --repo-type dataset"
        if self.revision:
            cmd += f" --revision {self.revision}"
        if self.path:
            cmd += f" {self.path}"
        elif self.split:
            cmd += f" --include '*{self.split}*'"
        return cmd


def parse(value: str, key: str) -> Optional[HubRef]:
    """The Hub id in a recipe value, or None when it is a local path (one that exists, or
    that has no Hub id's shape)."""
    if not value or os.path.exists(value):
        return None
    if key == "model":
        m = MODEL_ID.match(value)
        return HubRef("model", m["repo"], m["rev"]) if m else None
    m = DATA_FILE.match(value)
    if m:
        return HubRef("dataset", m["repo"], m["rev"], path=m["path"])
    m = DATA_SPLIT.match(value)
    return HubRef("dataset", m["repo"], m["rev"], split=m["split"]) if m else None


def source_of(key: str, where: str) -> str:
    """Where a value came from, as a message says it: the flag, or the recipe file's key."""
    return where if where.startswith("--") else f"'{key}' in {where}"


def resolve(value: str, key: str, where: str, local_only: bool = False) -> str:
    """The local path of a recipe value: the value itself unless it is a Hub id, else the
    files fetched into huggingface_hub's cache. local_only: only look in the cache, and give
    the value back unchanged when it is not there (for --print-config, which fetches nothing)."""
    ref = parse(value, key)
    if ref is None:
        return value
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise HubError(f"{source_of(key, where)}: {value} is not a local path, and reading it from the "
                       "Hugging Face Hub needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        return _fetch(ref, local_only)
    except Exception as e:  # ours, or huggingface_hub's own errors, named by their class
        if local_only:
            return value
        if os.path.basename(value) in MAKERS:
            raise HubError(missing(key, value, where)) from None
        why = str(e) if isinstance(e, HubError) else _explain(ref, e)
        local = "" if value.startswith("hf://") else "no such local path; as a Hugging Face Hub id: "
        raise HubError(f"{source_of(key, where)}: {value}: {local}{why}") from None


def resolve_values(values: Dict[str, object], where_of: Dict[str, str], fetch: Iterable[str] = ()) -> Dict[str, str]:
    """Replace each Hub id among the recipe's values by its local path, in place; returns
    {key: the id as given} for what was a Hub id. fetch: the keys this run reads, fetched
    when not cached; the others are only looked up in the cache (a run given --pairs never
    reads `data`, so an uncached data id must not stop it)."""
    named = {}
    for k in HUB_KEYS:
        v = values.get(k)
        if isinstance(v, str) and parse(v, k):
            named[k] = v
            values[k] = resolve(v, k, where_of.get(k, "recipe"), local_only=k not in fetch)
    return named


def _fetch(ref: HubRef, local_only: bool) -> str:
    from huggingface_hub import hf_hub_download, snapshot_download
    if ref.kind == "model":
        folder = snapshot_download(ref.repo, revision=ref.revision, allow_patterns=MODEL_FILES,
                                   local_files_only=local_only)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise HubError(f"no config.json in {folder} (not a model repository, or its files are "
                           f"not in the cache; fetch them with `{ref.fetch_command()}`)")
        return folder
    if ref.path:
        return hf_hub_download(ref.repo, ref.path, repo_type="dataset", revision=ref.revision,
                               local_files_only=local_only)
    files = _split_files(ref, _dataset_files(ref, local_only))
    if not files:
        raise HubError(f"no file of split '{ref.split}' ({', '.join(DATA_EXTENSIONS)} named "
                       f"'{ref.split}-*', '{ref.split}.*' or under '{ref.split}/')")
    local = [hf_hub_download(ref.repo, f, repo_type="dataset", revision=ref.revision,
                             local_files_only=local_only) for f in files]
    if len(local) == 1:
        return local[0]
    return _shards_pattern(ref, files, local)


def _shards_pattern(ref: HubRef, files: List[str], local: List[str]) -> str:
    """A split stored as several shards becomes one glob pattern in the snapshot folder that
    matches exactly those shards (data.py reads them in name order, as datasets does)."""
    import glob
    snapshot = local[0][:len(local[0]) - len(files[0])]   # hf_hub_download gives <snapshot>/<file>
    dirs = {os.path.dirname(f) for f in files}
    exts = {os.path.splitext(f)[1] for f in files}
    if len(dirs) == 1 and len(exts) == 1:
        d, ext = dirs.pop(), exts.pop()
        for name in (f"{glob.escape(ref.split)}-*{ext}", f"*{ext}"):
            pattern = os.path.join(glob.escape(snapshot), glob.escape(d), name)
            if sorted(glob.glob(pattern)) == sorted(local):
                return pattern
    at = f"@{ref.revision}" if ref.revision else ""
    raise HubError(f"split '{ref.split}' is {len(files)} files that no one pattern names: give them as "
                   f"one local pattern, or one of them as hf://datasets/{ref.repo}{at}/{files[0]} "
                   f"(the others: {', '.join(files[1:])})")


def _dataset_files(ref: HubRef, local_only: bool) -> List[str]:
    """The repository's file names: from the Hub, or from the cached snapshot when offline."""
    from huggingface_hub import constants, snapshot_download
    if not (local_only or constants.HF_HUB_OFFLINE):
        from huggingface_hub import HfApi
        return HfApi().list_repo_files(ref.repo, repo_type="dataset", revision=ref.revision)
    folder = snapshot_download(ref.repo, repo_type="dataset", revision=ref.revision, local_files_only=True)
    return [os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
            for d, _, names in os.walk(folder) for f in names]


def _split_files(ref: HubRef, names: List[str]) -> List[str]:
    s = ref.split
    keep = [n for n in names if n.endswith(DATA_EXTENSIONS) and (
        fnmatch.fnmatch(os.path.basename(n), f"{s}-*") or fnmatch.fnmatch(os.path.basename(n), f"{s}.*")
        or f"/{s}/" in f"/{n}")]
    return sorted(keep)


def _explain(ref: HubRef, e: Exception) -> str:
    """huggingface_hub's error as what happened and what to do, in one line."""
    from huggingface_hub import constants
    from huggingface_hub import errors as E
    what = f"the {'model' if ref.kind == 'model' else 'dataset'} repository {ref.repo}"
    if isinstance(e, E.GatedRepoError):
        return (f"{what} is gated: accept its terms at https://huggingface.co/"
                f"{'datasets/' if ref.kind == 'dataset' else ''}{ref.repo} and log in with `hf auth login`")
    if isinstance(e, E.RepositoryNotFoundError):
        return (f"{what} does not exist on the Hugging Face Hub, or is private (log in with "
                "`hf auth login`); a local path must exist")
    if isinstance(e, E.RevisionNotFoundError):
        return f"{what} has no revision '{ref.revision}'"
    if isinstance(e, (E.LocalEntryNotFoundError, E.OfflineModeIsEnabled)):
        if constants.HF_HUB_OFFLINE:
            return (f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; "
                    f"fetch it with `{ref.fetch_command()}` (on a connected machine, into this cache), "
                    "or unset HF_HUB_OFFLINE")
        return (f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot be reached "
                f"({' '.join(str(e).split())[:200]}); fetch it with `{ref.fetch_command()}` where the Hub "
                "is reachable, into this cache")
    if isinstance(e, E.EntryNotFoundError):   # after the local case, its subclass
        return f"{what} has no file '{ref.path}'"
    return f"cannot be fetched from the Hugging Face Hub ({type(e).__name__}: {' '.join(str(e).split())[:300]})"


def missing(key: str, value: str, where: str) -> str:
    """The one-line message for a local model or data path that does not exist."""
    if os.path.basename(value.rstrip("/")) in MAKERS:
        maker = MAKERS[os.path.basename(value.rstrip("/"))].format(path=value)
        return f"{value} ({source_of(key, where)}) does not exist; make it with {maker}"
    what = ("ORG/NAME[@REVISION] (a model repository)" if key == "model" else
            "hf://datasets/ORG/NAME[@REVISION]/FILE or ORG/NAME[@REVISION]:SPLIT (a dataset file)")
    return (f"{value} ({source_of(key, where)}) does not exist; give a local "
            f"{'model folder' if key == 'model' else 'data file'}, or a Hugging Face Hub id: {what}")
