"""The settings the core's training loop reads, as plain dataclasses (no torch here, so the
recipe can build them without loading it). The run builds them from a recipe
(run/iteration.py's train_settings); the loop never sees the recipe."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NoiseSettings:
    """What the `noise` key / --noise flag says (all off by default)."""
    ref_sigma: float = 0.0       # σ of the reference-logit noise (0 = off)
    side: str = "real"           # which answers' reference logits get it: real | generated | both
    mode: str = "frozen"         # frozen: one draw per answer | fresh: a new draw every step
    neftune_alpha: float = 0.0   # NEFTune α (0 = off)
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.ref_sigma > 0 or self.neftune_alpha > 0


def _bookkeeping():
    """A TrainSettings field that cannot change any loss or weight: left out of the resume key."""
    return field(metadata={"resume": False})


@dataclass(frozen=True)
class TrainSettings:
    """Everything the training loop reads. Each field is a recipe key of the same name
    (iteration.train_settings copies them), plus the run's seed and its parsed noise.
    A field is in the resume key unless it is declared with _bookkeeping()."""
    beta: float
    loss_type: str
    label_smoothing: float
    ref_mode: str
    optimizer: str
    lr: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    optim_eps: float
    rmsprop_alpha: float
    lr_scheduler: str
    warmup_ratio: float
    epochs: int
    batch_size: int
    last_batch: str  # drop | fill: how many steps an epoch has, and which pairs the last one sees
    max_grad_norm: float
    mixed_precision: str  # in the key as the precision it resolves to on this device
    fp32_logits: bool
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str
    lora_base_dtype: str
    seed: int
    noise: NoiseSettings  # what the fixes do to each pair (swap, σ) is in the data fingerprint
    # bookkeeping: any process count, any micro-batching, any logging trains alike
    max_steps: int = _bookkeeping()  # what it changes, the number of steps, is in the key itself
    micro_batch_size: int = _bookkeeping()
    ref_batch_size: int = _bookkeeping()
    activation_checkpointing: bool = _bookkeeping()
    compile_train: bool = _bookkeeping()  # the same maths compiled: checkpoints move between both
    # the same sums over the same tokens, laid out without padding (equal to rounding,
    # tests/test_packing.py): a run may resume packed from a padded checkpoint and back
    packing: bool = _bookkeeping()
    report_to: str = _bookkeeping()
    checkpoint_every: int = _bookkeeping()
    keep_checkpoints: int = _bookkeeping()
    keep_checkpoints_after_export: bool = _bookkeeping()
    export_dtype: str = _bookkeeping()
