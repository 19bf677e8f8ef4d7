"""`TrainConfig`: every knob of a training run, typed, documented and validated at construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapterhub_server.errors import InvalidRequestError

DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

Method = Literal["lora"]
Scheduler = Literal["cosine", "linear"]
METHODS: tuple[str, ...] = ("lora",)
SCHEDULERS: tuple[str, ...] = ("cosine", "linear")


class TrainConfigError(InvalidRequestError):
    """A `TrainConfig` field has an invalid value; `param` names the field."""


@dataclass(frozen=True)
class TrainConfig:
    """One supervised fine-tuning run: data, method, optimisation and where to publish."""

    data: Path
    """JSONL training file: one `{"messages": [...]}` or `{"prompt", "completion"}` per line."""
    base_model: str | None = None
    """`--base-model` as the server resolves it: local HF directory, hub id, or None for the
    embedded default (SmolLM2-135M-Instruct)."""
    method: Method = "lora"
    """Fine-tuning method. Only LoRA in this version."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA alpha: scale = alpha / r (alpha / sqrt(r) with `rslora`)."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training, in [0, 1)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Leaf names of the linear modules to adapt."""
    rslora: bool = False
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""
    epochs: int = 3
    """Passes over the data; ignored when `max_steps` is set."""
    max_steps: int | None = None
    """Optimizer steps to run (cycling through the data as needed); overrides `epochs`."""
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    warmup_ratio: float = 0.1
    """Fraction of the steps over which the learning rate rises linearly to `lr`, in [0, 1)."""
    scheduler: Scheduler = "cosine"
    """Decay after warmup: cosine or linear, to zero at the last step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this before each step; 0 disables clipping."""
    batch_size: int = 4
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is averaged over all their trained tokens."""
    max_seq_len: int = 512
    """Sequences are truncated to this many tokens."""
    seed: int = 0
    """Seeds LoRA initialisation, dropout and the data order: same seed, same adapter."""
    name: str | None = None
    """Adapter name to publish under in the registry; None = do not publish."""
    registry: Path | None = None
    """Registry directory; None = `adapterhub_server.registry.default_registry_dir()`."""
    alias: str | None = None
    """Alias to point at the published version (e.g. "prod")."""
    description: str | None = None
    """Description stored with the published version; None = generated."""
    output_dir: Path | None = None
    """Also write the PEFT adapter directory here (adapter_config.json + safetensors)."""
    log_every: int = 10
    """Log (and record in lineage) the mean loss every this many optimizer steps."""
    device: str | None = None
    """torch device ("cpu", "cuda", "cuda:1"); None = CUDA when available, else CPU."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise types in place
        set_(self, "data", Path(self.data))
        if self.registry is not None:
            set_(self, "registry", Path(self.registry))
        if self.output_dir is not None:
            set_(self, "output_dir", Path(self.output_dir))
        if isinstance(self.target_modules, str):
            set_(self, "target_modules", tuple(_split_csv(self.target_modules)))
        else:
            set_(self, "target_modules", tuple(self.target_modules))

        if self.method not in METHODS:
            _fail("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.scheduler not in SCHEDULERS:
            _fail("scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        _positive_int(self, "r", "epochs", "batch_size", "grad_accum", "log_every")
        if self.max_steps is not None:
            _positive_int(self, "max_steps")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            _fail("seed", f"must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 2:
            _fail("max_seq_len", f"must be an integer >= 2, got {self.max_seq_len!r}")
        _finite(self, "alpha", "lr", "dropout", "warmup_ratio", "weight_decay", "max_grad_norm")
        if self.alpha <= 0:
            _fail("alpha", f"must be > 0, got {self.alpha}")
        if self.lr <= 0:
            _fail("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            _fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if not 0 <= self.warmup_ratio < 1:
            _fail("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm < 0:
            _fail("max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        if self.weight_decay < 0:
            _fail("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not self.target_modules or not all(
            isinstance(m, str) and m.strip() for m in self.target_modules
        ):
            _fail("target_modules", "must name at least one module, e.g. q_proj,v_proj")
        if not self.data.is_file():
            _fail("data", f"training data file {str(self.data)!r} does not exist")
        if self.name is None and self.output_dir is None:
            _fail("name", "nothing would be kept: give --name (publish) and/or --output-dir")
        if self.name is None and self.alias is not None:
            _fail("alias", "--alias needs --name")
        if self.name is not None:
            from adapterhub_server.lora.adapter import validate_adapter_name

            validate_adapter_name(self.name)
        if self.alias is not None:
            from adapterhub_server.registry.refs import validate_alias

            validate_alias(self.alias)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, tuples as lists (the lineage `hyperparameters`)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _split_csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _fail(param: str, message: str) -> None:
    raise TrainConfigError(f"{param}: {message}", param=param)


def _positive_int(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(name, f"must be a positive integer, got {value!r}")


def _finite(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            _fail(name, f"must be a finite number, got {value!r}")
