"""The plan of one train.py iteration, printed at its start, and an ETA for the whole of it.

    plan for iteration 0: 1. generate 64 prompts -> 2. reference pass 64 pairs -> 3. train
    16 steps (8 pairs each) -> 4. export iter0/model -> 5. held-out 100 examples x 2 models
    -> 6. diagnostics 64 pairs x 2 models, 100 held-out samples x 2 models

Each stage's progress bar (`Plan.bar`) is labelled with its stage ("[3/5 train]") and shows
the ETA of the whole iteration: the rest of this stage at its measured pace, plus every later
stage from a pace measured on this run. Two paces are measured: seconds per sampled token
(generation and the held-out check decode) and seconds per row forward (the reference pass
runs one forward per row; a training step runs batch x 2 rows, each a forward and a backward,
counted as 3 forwards, plus one more for an online reference); the judge's pace is its own
(seconds per answer scored, an API's or a local model's). A later stage whose pace is not
measured yet (the training steps while generating) makes the ETA a lower bound, shown
as "≥". The export is not timed, nor the diagnostics' scoring passes (their sampling is).
The counts come from the recipe and the files already there (a pairs file's lines, a cached
held-out check), so a re-run plans only what is left.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

_current: Optional["Plan"] = None


@dataclass
class Stage:
    name: str        # generate | judge | reference | train | export | heldout | diagnostics
    count: int       # units to do: prompts, pairs, steps, 1, examples x models
    unit: str
    kind: str        # "decode", "forward" or "judge": which measured pace estimates it; "" = not timed
    work: float      # sampled tokens or row forwards of one process per unit it does
    text: str        # how the plan line says it
    share: int = 1   # processes the units are split among
    done: float = 0  # units done (while its bar runs)
    started: Optional[float] = None
    finished: bool = False


@dataclass
class Plan:
    iteration: int
    stages: List[Stage] = field(default_factory=list)
    pace: Dict[str, float] = field(default_factory=dict)   # kind -> seconds per unit of work
    pairs: int = 0   # the pairs it will train on (at most, before generation; 0 = not known)

    def describe(self) -> str:
        steps = [f"{i}. {s.text}" for i, s in enumerate(self.stages, 1)]
        return f"plan for iteration {self.iteration}: " + " -> ".join(steps)

    def stage(self, name: str) -> Optional[Stage]:
        return next((s for s in self.stages if s.name == name), None)

    def eta(self, now: Optional[float] = None) -> str:
        """The whole iteration's time left, as the bars show it: '4m10s', '≥ 1m02s' or '?'."""
        now = time.time() if now is None else now
        left, unknown = 0.0, False
        for s in self.stages:
            if s.finished or not s.kind:
                continue
            todo = max(0.0, s.count - s.done)
            if s.started is not None and s.done > 0:   # this stage's own pace
                left += (now - s.started) / s.done * todo
            elif s.kind in self.pace and (s.count or s.started is not None):
                left += todo / s.share * s.work * self.pace[s.kind]
            elif todo or s.started is None:   # not measured yet, or its count not known yet
                unknown = True
        if unknown and left == 0:
            return "?"
        return ("≥ " if unknown else "") + format_seconds(left)

    def bar(self, name: str, total: int, share: Optional[int] = None, **tqdm_kwargs):
        """A tqdm bar for a stage of this plan: its description names the stage and the
        whole iteration's ETA; its pace is measured for the later stages of the same kind.
        share: processes this bar's `total` is split among (default: the plan's; 1 when
        the bar counts only this process's part). The stages before it are over."""
        from tqdm import tqdm
        plan, index = self, next((i for i, s in enumerate(self.stages, 1) if s.name == name), 0)
        stage = self.stage(name)
        for earlier in self.stages[:index - 1]:
            earlier.finished = True
        if stage is not None:   # a resumed bar starts at `initial`: only the rest is timed
            stage.count, stage.done, stage.started = total - tqdm_kwargs.get("initial", 0), 0, time.time()
            stage.share = stage.share if share is None else share
        label = f"[{index}/{len(self.stages)} {name}]"

        class StageBar(tqdm):
            def update(self, n=1):
                if stage is not None:
                    stage.done += n
                    if stage.kind and stage.work:
                        plan.pace[stage.kind] = ((time.time() - stage.started)
                                                 / (stage.done / stage.share * stage.work))
                    self.set_description_str(f"{label} iteration ETA {plan.eta()}", refresh=False)
                return super().update(n)

            def close(self):
                if stage is not None and stage.done >= stage.count:
                    stage.finished = True
                return super().close()

        tqdm_kwargs.pop("desc", None)
        return StageBar(total=total, desc=f"{label} iteration ETA {self.eta()}", **tqdm_kwargs)


def format_seconds(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def current() -> Optional[Plan]:
    """The plan of the iteration this process runs (None outside train.py's iteration)."""
    return _current


def activate(plan: Optional[Plan]) -> Optional[Plan]:
    global _current
    _current = plan
    return plan


def stage_bar(name: str, total: int, share: Optional[int] = None, **tqdm_kwargs):
    """The stage's bar of the current plan, or a plain tqdm bar when there is none."""
    if _current is not None and _current.stage(name) is not None:
        return _current.bar(name, total, share=share, **tqdm_kwargs)
    from tqdm import tqdm
    return tqdm(total=total, **tqdm_kwargs)


def _lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def make_plan(recipe, t: int, world_size: int, pairs_file: Optional[str] = None,
              prev_pairs_file: Optional[str] = None, export: Optional[str] = None,
              judging: bool = False) -> Plan:
    """The stages of iteration t of this recipe, counted from the recipe and the files of
    its run folder (the pairs files train.py would read, a cached held-out check); the steps
    by the training loop's own rule (core.train.epoch_steps). judging: the iteration will call
    its judge (iteration.judging_needed)."""
    from ..core.train import epoch_steps
    from .layout import export_path, iter_dir, pairs_path
    g, d, tr, ev = recipe.generation, recipe.data, recipe.training, recipe.eval
    pairs_file = pairs_file or pairs_path(recipe.run_dir, t)
    prev_pairs_file = prev_pairs_file or (pairs_path(recipe.run_dir, t - 1) if t >= 1 else None)
    export = export or export_path(recipe.run_dir, t)
    heldout_cached = os.path.isfile(os.path.join(iter_dir(recipe.run_dir, t), "heldout_before.json"))
    plan = Plan(t)
    world = max(1, world_size)
    if os.path.isfile(pairs_file):
        pairs = _lines(pairs_file)
    else:
        pairs = d.num_prompts
        if g.generate:
            what = f"{pairs} prompts" if pairs else "every prompt of the data"
            plan.stages.append(Stage("generate", pairs, "prompt", "decode", g.max_new_tokens,
                                     f"generate {what} ({g.max_new_tokens} new tokens at most)", share=world))
    if t >= 1 and d.mix_previous and os.path.isfile(prev_pairs_file):
        pairs += _lines(prev_pairs_file)
    plan.pairs = pairs
    fx = recipe.fixes
    if judging:
        # at most both answers of every pair; the judge's cache and the shared real answers make it fewer
        plan.stages.append(Stage("judge", 2 * pairs, "answer", "judge", 1,
                                 f"judge {pairs or '?'} pairs ({fx.judge_backend}, {'adaptive' if fx.adaptive else 'relabel'})"))
    per_step = tr.batch_size * 2 * (3 + (tr.ref_mode == "online"))
    if tr.ref_mode == "precompute":
        plan.stages.append(Stage("reference", pairs, "pair", "forward", 2,
                                 f"reference pass {pairs or '?'} pairs", share=world))
    steps = epoch_steps(pairs, tr.batch_size, tr.last_batch) * tr.epochs if pairs else 0
    if tr.max_steps and steps:
        steps = min(steps, tr.max_steps)
    plan.stages.append(Stage("train", steps, "step", "forward", per_step / world,
                             f"train {steps or '?'} steps ({tr.batch_size} pairs each)"))
    plan.stages.append(Stage("export", 1, "model", "", 0, f"export {export}"))
    if ev.eval_data and ev.heldout_examples > 0:
        models = 1 if heldout_cached else 2
        plan.stages.append(Stage("heldout", ev.heldout_examples * models, "example", "decode",
                                 ev.heldout_max_new_tokens,
                                 f"held-out {ev.heldout_examples} examples x {models} model{'s' * (models > 1)}"))
        if ev.diagnostics and os.path.abspath(pairs_file) == os.path.abspath(pairs_path(recipe.run_dir, t)):
            plan.stages.append(Stage("diagnostics", ev.heldout_examples * 2, "sample", "decode",
                                     ev.heldout_max_new_tokens,
                                     f"diagnostics {pairs or '?'} pairs x 2 models, {ev.heldout_examples} "
                                     "held-out samples x 2 models"))
    return plan
