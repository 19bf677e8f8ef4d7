"""`TrainConfig`: every knob of a training run, typed, documented and validated at construction.

`load_config_file` reads the same fields from a YAML or JSON file (`trainer train --config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapterhub_server.errors import InvalidRequestError

ALL_LINEAR = "all-linear"
"""`target_modules` value meaning every linear module of the base's decoder layers (PEFT's
`all-linear`, which leaves out the output head): q/k/v/o and gate/up/down on Llama,
qkv_proj/o_proj/gate_up_proj/down_proj on Phi-3. Resolved to leaf names against the base
when a run starts (`trainer.modeling.resolve_target_modules`)."""

DEFAULT_TARGET_MODULES: tuple[str, ...] = (ALL_LINEAR,)

Method = Literal["lora", "full"]
Scheduler = Literal["cosine", "linear"]
Batching = Literal["padded", "padding_free", "packed"]
METHODS: tuple[str, ...] = ("lora", "full")
SCHEDULERS: tuple[str, ...] = ("cosine", "linear")
BATCHINGS: tuple[str, ...] = ("padded", "padding_free", "packed")

MODULES_TO_SAVE: dict[str, str] = {"lm_head": "output head", "embed_tokens": "input embeddings"}
"""The names `modules_to_save` accepts, and what each is on the base. Servers hold a full
copy of these two per adapter; any other module would be a dense copy nobody serves."""

DEFAULT_LR = {"lora": 1e-3, "full": 2e-5}
"""Peak learning rates that fit a small dataset in tens of steps: a LoRA update starts from
zero and needs a large rate; full SFT moves pretrained weights and needs a small one."""

RUNTIME_FIELDS = frozenset(
    {
        "checkpoint_dir",
        "resume",
        "keep_checkpoints",
        "log_every",
        "device",
        "save_every",
        "registry_blobs",
    }
)
"""Fields that change how a run is carried out, not what it computes: left out of the
lineage's hyperparameters and free to differ when a run is resumed."""


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
    base_model_id: str | None = None
    """The id the published version records for its base (default: as `base_model` resolves,
    e.g. the directory's name). The server's jobs pass the id the server serves under."""
    eval_data: Path | None = None
    """Optional JSONL in the same formats; its mean loss is reported every `eval_every` steps
    and at the end."""
    method: Method = "lora"
    """`lora`: train low-rank adapters over the frozen base (HF PEFT). `full`: train every
    parameter, save the weights to `output_dir`, and publish a LoRA extracted from the weight
    delta by truncated SVD at `extract_rank`."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA alpha: scale = alpha / r (alpha / sqrt(r) with `rslora`)."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training, in [0, 1)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Leaf names of the linear modules to adapt (`q_proj`, ...), or `all-linear` alone:
    every linear of the base's decoder layers (`ALL_LINEAR`). A run resolves it to the
    base's leaf names, which its lineage records."""
    rslora: bool = False
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""
    dora: bool = False
    """DoRA (PEFT's `use_dora`): every adapted weight becomes a trained magnitude, one per
    output feature and initialised to the norms of W's rows, times the direction
    W + scale * B A normalised per output feature (that norm detached from the gradient,
    as in PEFT). LoRA only."""
    modules_to_save: tuple[str, ...] = ()
    """`lm_head` and/or `embed_tokens` (`MODULES_TO_SAVE`): also train a full copy of the
    base's output head / input embeddings, saved whole in the adapter (PEFT's
    `modules_to_save`). On a base with tied embeddings the copy is untied, as in PEFT.
    LoRA only."""
    trainable_token_indices: tuple[int, ...] = ()
    """Token ids whose input-embedding rows are trained (PEFT's trainable tokens: a delta
    for those rows only; on a tied base the head's rows follow). Each must be below the
    base's vocabulary size, checked when the run starts. Not with `embed_tokens` in
    `modules_to_save`, which already trains every row. LoRA only."""
    epochs: int | None = None
    """Passes over the data; ignored when `max_steps` is set. None = auto (`auto_epochs`):
    3, raised for small datasets so that the run has at least 40 optimizer steps."""
    max_steps: int | None = None
    """Optimizer steps to run (cycling through the data as needed); overrides `epochs`."""
    lr: float | None = None
    """Peak learning rate of AdamW; None = the method's default (`DEFAULT_LR`: 1e-3 for
    LoRA, 2e-5 for full SFT)."""
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
    batching: Batching = "padded"
    """How examples become micro-batches: `padded` (right-padded to the longest in the batch),
    `padding_free` (the batch's examples concatenated into one row, no padding),
    `packed` (examples packed into rows of up to `max_seq_len` tokens; `batch_size` rows per
    micro-batch). In the last two no token attends across examples."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    seed: int = 0
    """Seeds LoRA initialisation, dropout and the data order: same seed, same adapter."""
    extract_rank: int = 64
    """`full` only: rank of the LoRA extracted from the weight delta by truncated SVD."""
    eval_every: int | None = None
    """Optimizer steps between evaluations of `eval_data`; None = 5 evaluations per run."""
    save_every: int = 100
    """Optimizer steps between checkpoints; 0 = only on interrupt (Ctrl-C / SIGTERM)."""
    checkpoint_dir: Path | None = None
    """Where checkpoints go; None = `<output_dir>/checkpoints`, else a directory named after
    the adapter beside the registry."""
    resume: bool = False
    """Continue from the latest complete checkpoint in `checkpoint_dir`."""
    keep_checkpoints: bool = False
    """Keep the checkpoints after a successful run (by default they are removed then)."""
    name: str | None = None
    """Adapter name to publish under in the registry; None = do not publish."""
    registry: Path | str | None = None
    """Registry directory or postgresql:// URL; None =
    `adapterhub_server.registry.default_registry_dir()`."""
    registry_blobs: str | None = None
    """Blob store of a postgresql:// registry (file:///path, s3://bucket/prefix); None =
    $ADAPTERHUB_REGISTRY_BLOBS."""
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
            from adapterhub_server.registry import registry_location

            set_(self, "registry", registry_location(str(self.registry)))
        for name in ("output_dir", "eval_data", "checkpoint_dir"):
            if getattr(self, name) is not None:
                set_(self, name, Path(getattr(self, name)))
        if isinstance(self.target_modules, str):
            set_(self, "target_modules", tuple(_split_csv(self.target_modules)))
        else:
            set_(self, "target_modules", tuple(self.target_modules))

        set_(self, "modules_to_save", _module_names(self.modules_to_save))
        set_(self, "trainable_token_indices", _token_indices(self.trainable_token_indices))

        if self.method not in METHODS:
            _fail("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.lr is None:
            set_(self, "lr", DEFAULT_LR[self.method])
        if self.scheduler not in SCHEDULERS:
            _fail("scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.batching not in BATCHINGS:
            _fail("batching", f"must be one of {', '.join(BATCHINGS)}, got {self.batching!r}")
        _positive_int(self, "r", "batch_size", "grad_accum", "log_every")
        _positive_int(self, "extract_rank")
        for name in ("epochs", "max_steps", "eval_every"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        if not isinstance(self.save_every, int) or self.save_every < 0:
            _fail("save_every", f"must be a non-negative integer, got {self.save_every!r}")
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
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            _fail(
                "target_modules", f"{ALL_LINEAR} already names every linear module: give it alone"
            )
        self._check_kinds()
        if not self.data.is_file():
            _fail("data", f"training data file {str(self.data)!r} does not exist")
        if self.eval_data is not None and not self.eval_data.is_file():
            _fail("eval_data", f"eval data file {str(self.eval_data)!r} does not exist")
        if self.name is None and self.output_dir is None:
            _fail("name", "nothing would be kept: give --name (publish) and/or --output-dir")
        if self.method == "full" and self.output_dir is None:
            _fail("output_dir", "--method full writes the fine-tuned weights: give --output-dir")
        if self.name is None and self.alias is not None:
            _fail("alias", "--alias needs --name")
        if self.name is not None:
            from adapterhub_server.lora.adapter import validate_adapter_name

            validate_adapter_name(self.name)
        if self.alias is not None:
            from adapterhub_server.registry import validate_alias

            validate_alias(self.alias)

    def _check_kinds(self) -> None:
        """DoRA / modules_to_save / trainable tokens: values the base does not decide
        (`trainer.kinds.check_against_base` checks the rest when the base is known)."""
        if not isinstance(self.dora, bool):
            _fail("dora", f"must be true or false, got {self.dora!r}")
        if self.method != "lora":
            for name in ("dora", "modules_to_save", "trainable_token_indices"):
                if getattr(self, name):
                    _fail(
                        name,
                        f"applies to LoRA training only, not method {self.method!r} "
                        "(which trains every weight and publishes an SVD-extracted plain LoRA)",
                    )
        for name in self.modules_to_save:
            if name not in MODULES_TO_SAVE:
                known = ", ".join(f"{k} (the {v})" for k, v in MODULES_TO_SAVE.items())
                _fail("modules_to_save", f"{name!r} is not supported; only {known}")
        for index in self.trainable_token_indices:
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                _fail(
                    "trainable_token_indices",
                    f"token ids must be non-negative integers, got {index!r}",
                )
        counts = Counter(self.trainable_token_indices)
        repeated = sorted(i for i, n in counts.items() if n > 1)
        if repeated:
            _fail("trainable_token_indices", f"{', '.join(map(str, repeated))} given twice")
        if self.trainable_token_indices and "embed_tokens" in self.modules_to_save:
            _fail(
                "trainable_token_indices",
                "embed_tokens in modules_to_save already trains every embedding row: "
                "give one or the other",
            )

    @property
    def is_lora(self) -> bool:
        return self.method == "lora"

    def resolved_checkpoint_dir(self) -> Path:
        """`checkpoint_dir`, or its default (see the field)."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        if self.output_dir is not None:
            return self.output_dir / "checkpoints"
        from adapterhub_server.registry import default_registry_dir

        registry = self.registry if isinstance(self.registry, Path) else default_registry_dir()
        return registry.parent / "checkpoints" / str(self.name)

    def to_dict(self, *, lineage: bool = False) -> dict[str, Any]:
        """JSON-ready: paths as strings, tuples as lists. With `lineage`, only the fields
        that shape the result (the lineage `hyperparameters`)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if lineage and f.name in RUNTIME_FIELDS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif f.name == "registry" and isinstance(value, str):
                from adapterhub_server.registry import describe_location

                value = describe_location(value)  # never a password in lineage or logs
            out[f.name] = value
        return out


def _split_csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _module_names(value: Any) -> tuple[Any, ...]:
    """`modules_to_save` as a tuple: from a comma-separated string (the command line) or a
    list (a config file); repeats dropped, order kept. The names are checked by
    `_check_kinds`."""
    if isinstance(value, str):
        value = _split_csv(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        _fail("modules_to_save", f"must be a list of module names, got {value!r}")
    return tuple(dict.fromkeys(value))


def _token_indices(value: Any) -> tuple[Any, ...]:
    """`trainable_token_indices` as a tuple: from a comma-separated string (the command
    line) or a list (a config file). The values are checked by `_check_kinds`."""
    if isinstance(value, str):
        out: list[int] = []
        for part in _split_csv(value):
            try:
                out.append(int(part))
            except ValueError:
                _fail("trainable_token_indices", f"{part!r} is not an integer token id")
        return tuple(out)
    if not isinstance(value, (list, tuple)):
        _fail("trainable_token_indices", f"must be a list of token ids, got {value!r}")
    return tuple(value)


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


AUTO_EPOCHS = 3
AUTO_MIN_STEPS = 40
AUTO_MAX_EPOCHS = 25


def auto_epochs(num_examples: int, batch_size: int, grad_accum: int = 1) -> int:
    """Epochs when none are given: 3, or more (up to 25) so that a small dataset still gets
    40 optimizer steps; a dozen examples seen three times teach a LoRA nothing."""
    steps_per_epoch = max(1, math.ceil(num_examples / (batch_size * grad_accum)))
    wanted = math.ceil(AUTO_MIN_STEPS / steps_per_epoch)
    return min(AUTO_MAX_EPOCHS, max(AUTO_EPOCHS, wanted))


def field_names() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(TrainConfig))


def load_config_file(path: Path) -> dict[str, Any]:
    """The `TrainConfig` fields in a YAML (`.yaml`/`.yml`) or JSON file.

    Keys are field names; `-` may stand for `_` (`max-steps`). Relative paths are taken
    relative to the working directory, as on the command line.

    Raises:
        TrainConfigError: unreadable file, not a mapping, or an unknown key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TrainConfigError(f"config: cannot read {path}: {exc}", param="config") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise TrainConfigError(f"config: {path} does not parse: {exc}", param="config") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TrainConfigError(f"config: {path} must hold a mapping of fields", param="config")
    known = field_names()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise TrainConfigError(f"config: unknown field {key!r} in {path}", param=str(key))
        values[name] = value
    return values


FINGERPRINT_FIELDS = (
    "method",
    "r",
    "alpha",
    "dropout",
    "target_modules",
    "rslora",
    "dora",
    "modules_to_save",
    "trainable_token_indices",
    "epochs",
    "max_steps",
    "lr",
    "warmup_ratio",
    "scheduler",
    "weight_decay",
    "max_grad_norm",
    "batch_size",
    "grad_accum",
    "max_seq_len",
    "batching",
    "seed",
)
"""The fields a resumed run must share with its checkpoint: they change what the remaining
steps compute (output paths, names and logging may differ)."""
