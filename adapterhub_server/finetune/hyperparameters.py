"""From an OpenAI job request to the trainer's `TrainConfig`, validated with the trainer's rules
and bounded by the server's.

OpenAI's three hyperparameters map onto the trainer's (`"auto"` = the trainer's default;
learning rate = the trainer's default for the method (1e-3 LoRA, 2e-5 full) x
`learning_rate_multiplier`); the AdapterHub
extensions map one to one. The config is built as a real `TrainConfig`, so a value the
trainer would refuse is refused here, with `param` naming the request field, before the job
is queued. Defaults come from `TrainConfig` itself, so they cannot drift from the trainer's.
Then every value is held to `FineTuningLimits` and to the base model (its context, its
modules), and the job's total work, estimated from the upload's statistics, to
`--max-fine-tuning-tokens`: what could never finish, or could only fail later, is a 400 now.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub_server.errors import AdapterHubError, InvalidRequestError
from adapterhub_server.finetune.limits import BaseModelInfo, FineTuningLimits
from adapterhub_server.finetune.process import redact_paths
from client.types import (
    FineTuningHyperparameters,
    FineTuningJobCreateRequest,
    FineTuningJobHyperparameters,
)
from trainer import (
    ALL_LINEAR,
    DEFAULT_LR,
    JsonlStats,
    TrainConfig,
    TrainConfigError,
    auto_epochs,
    check_against_base,
)

EXTENSIONS: dict[str, str] = {
    "training_method": "method",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "use_rslora": "rslora",
    "use_dora": "dora",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices",
    "max_steps": "max_steps",
    "warmup_ratio": "warmup_ratio",
    "max_seq_len": "max_seq_len",
    "grad_accum": "grad_accum",
    "packing": "batching",
    "extract_rank": "extract_rank",
}
"""Request hyperparameter -> `TrainConfig` field, for the AdapterHub extensions."""

_OPENAI = {"n_epochs": "epochs", "batch_size": "batch_size", "learning_rate_multiplier": "lr"}
_TOP_LEVEL = {"data": "training_file", "eval_data": "validation_file", "name": "suffix"}


@dataclass(frozen=True)
class TrainingPlan:
    """What a job will run: the trainer's config and the hyperparameters to report."""

    config: dict[str, Any]
    """`TrainConfig` fields, JSON-ready: the trainer's `--config` file."""
    hyperparameters: FineTuningJobHyperparameters
    """Every value resolved (no "auto")."""
    estimated_tokens: int
    """The job's total work as `estimate_work` counts it."""


def requested_hyperparameters(
    request: FineTuningJobCreateRequest,
) -> tuple[FineTuningHyperparameters, str]:
    """The request's hyperparameters and the `param` prefix they were given under.

    Raises:
        InvalidRequestError: both `method.supervised.hyperparameters` and the deprecated
            top-level `hyperparameters` are set.
    """
    supervised = request.method.supervised if request.method else None
    nested = supervised.hyperparameters if supervised else None
    if nested is not None and request.hyperparameters is not None:
        raise InvalidRequestError(
            "give hyperparameters either in method.supervised.hyperparameters or in the "
            "deprecated top-level hyperparameters, not both",
            param="hyperparameters",
        )
    if nested is not None:
        return nested, "method.supervised.hyperparameters"
    return request.hyperparameters or FineTuningHyperparameters(), "hyperparameters"


def plan_training(
    request: FineTuningJobCreateRequest,
    *,
    name: str,
    data: Path,
    train_stats: JsonlStats,
    eval_data: Path | None,
    eval_stats: JsonlStats | None,
    base: BaseModelInfo,
    limits: FineTuningLimits,
    registry: Path | None,
    seed: int,
    description: str,
    output_dir: Path,
) -> TrainingPlan:
    """Resolve and validate a job request into the trainer's config.

    `name` is the adapter name to publish under; `train_stats` / `eval_stats` are what the
    files' upload learned about them (record counts and token estimates: the files are not
    read again here). Every value is bounded by `limits` and by the `base` model, and the
    job's total work (`estimate_work`) by `limits.max_fine_tuning_tokens`. `output_dir`
    receives the fine-tuned weights of a `full` job (the trainer needs a place for them; the
    published result is the extracted LoRA either way).

    Raises:
        InvalidRequestError: a value the trainer would refuse, one beyond a limit, or an
            extension this trainer version does not know; `param` names the request field.
    """
    hp, prefix = requested_hyperparameters(request)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    default_lr = DEFAULT_LR[hp.training_method or "lora"]
    multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
    kwargs: dict[str, Any] = {
        "data": data,
        "base_model": str(base.path),
        "base_model_id": base.model_id,
        "registry": registry,
        "name": name,
        "seed": seed,
        "description": description,
        "lr": default_lr * multiplier,
    }
    if hp.n_epochs != "auto":
        kwargs["epochs"] = hp.n_epochs
    if hp.batch_size != "auto":
        kwargs["batch_size"] = hp.batch_size
    if eval_data is not None:
        _require_field(fields, "eval_data", "validation_file")
        kwargs["eval_data"] = eval_data
    method = hp.training_method or "lora"
    if hp.extract_rank is not None and method != "full":
        raise InvalidRequestError(
            f"{prefix}.extract_rank: only applies to training_method 'full'",
            param=f"{prefix}.extract_rank",
        )
    if method == "full":
        kwargs["output_dir"] = output_dir
    for hp_name, field in EXTENSIONS.items():
        value = getattr(hp, hp_name)
        if value is None:
            continue
        _require_field(fields, field, f"{prefix}.{hp_name}")
        if hp_name == "packing":
            value = "packed" if value else "padded"
        kwargs[field] = tuple(value) if isinstance(value, list) else value
    # The trainer's defaults may exceed a small model's context or a server's rank limit:
    # fit them rather than refuse a request that asked for nothing.
    fitted = {"max_seq_len": base.context_length, "r": limits.max_lora_rank}
    if method == "full":
        fitted["extract_rank"] = limits.max_lora_rank
    for field, limit in fitted.items():
        if field not in kwargs and field in fields and limit is not None:
            kwargs[field] = min(fields[field].default, limit)
    try:
        config = TrainConfig(**kwargs)
        if config.epochs is None:
            # "auto" is resolved now, from the upload's record count, so that the job
            # reports the number it runs with.
            epochs = auto_epochs(train_stats.records, config.batch_size, config.grad_accum)
            config = dataclasses.replace(config, epochs=epochs)
    except TrainConfigError as exc:
        raise _renamed(exc, prefix) from None
    except AdapterHubError as exc:  # the name check raises AdapterValidationError
        raise InvalidRequestError(
            redact_paths(exc.message), param=_request_param(exc.param, prefix)
        ) from None
    _check_limits(config, base, limits, prefix)
    work = estimate_work(config, train_stats, eval_stats)
    if work.tokens > limits.max_fine_tuning_tokens:
        param = "max_steps" if config.max_steps is not None else "n_epochs"
        raise InvalidRequestError(
            f"the job would train on about {work.tokens:,} tokens ({work.describe()}), over "
            f"this server's limit of {limits.max_fine_tuning_tokens:,} "
            "(--max-fine-tuning-tokens): use fewer epochs or steps, a smaller max_seq_len, "
            "or less data",
            param=f"{prefix}.{param}",
        )
    lora = config.method == "lora"
    return TrainingPlan(
        config=config.to_dict(),
        hyperparameters=FineTuningJobHyperparameters(
            n_epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate_multiplier=multiplier,
            learning_rate=config.lr,
            training_method=config.method,
            lora_r=config.r if lora else None,
            lora_alpha=config.alpha if lora else None,
            lora_dropout=config.dropout if lora else None,
            lora_target_modules=list(config.target_modules) if lora else None,
            use_rslora=config.rslora if lora else None,
            use_dora=config.dora if lora else None,
            modules_to_save=list(config.modules_to_save) if lora else None,
            trainable_token_indices=list(config.trainable_token_indices) if lora else None,
            max_steps=config.max_steps,
            warmup_ratio=config.warmup_ratio,
            max_seq_len=config.max_seq_len,
            grad_accum=config.grad_accum,
            packing=getattr(config, "batching", None) == "packed",
            extract_rank=None if lora else getattr(config, "extract_rank", None),
        ),
        estimated_tokens=work.tokens,
    )


EVALUATIONS_PER_RUN = 6
"""Passes over the validation file in a run: the trainer evaluates every fifth of the steps
and once more at the end."""


@dataclass(frozen=True)
class WorkEstimate:
    """How many tokens a job trains on (forward and backward) and evaluates (forward)."""

    tokens: int
    """Training tokens plus evaluation tokens."""
    sequences: int
    """Training sequences: examples x epochs, or steps x batch x accumulation."""
    tokens_per_sequence: int
    """Estimated tokens of one, after truncation to `max_seq_len`."""
    eval_tokens: int
    """Tokens of all evaluation passes."""

    def describe(self) -> str:
        text = f"{self.sequences:,} sequences x ~{self.tokens_per_sequence:,} tokens"
        if self.eval_tokens:
            text += f" + {self.eval_tokens:,} tokens of evaluation"
        return text


def estimate_work(
    config: TrainConfig, train: JsonlStats, evaluation: JsonlStats | None = None
) -> WorkEstimate:
    """The job's total work from the files' statistics alone.

    A sequence is an example truncated to `max_seq_len` (a packed row under `max_steps` is
    counted as full). The mean example length stands in for each example's: with the cap,
    that errs high, never low.
    """
    per_example = _mean_tokens(train, config.max_seq_len)
    if config.max_steps is not None:
        sequences = config.max_steps * config.batch_size * config.grad_accum
        per_sequence = config.max_seq_len if config.batching == "packed" else per_example
    else:
        sequences = train.records * (config.epochs or 1)
        per_sequence = per_example
    eval_tokens = 0
    if evaluation is not None:
        eval_tokens = (
            EVALUATIONS_PER_RUN * evaluation.records * _mean_tokens(evaluation, config.max_seq_len)
        )
    return WorkEstimate(
        tokens=sequences * per_sequence + eval_tokens,
        sequences=sequences,
        tokens_per_sequence=per_sequence,
        eval_tokens=eval_tokens,
    )


def _mean_tokens(stats: JsonlStats, max_seq_len: int) -> int:
    return min(max_seq_len, -(-stats.estimated_tokens // max(1, stats.records)))


def _check_limits(
    config: TrainConfig, base: BaseModelInfo, limits: FineTuningLimits, prefix: str
) -> None:
    """Refuse what the server would only fail on later, or never finish."""
    ours = "this server's limit"
    rank = "this server's --max-lora-rank"
    bounds = [
        ("epochs", config.epochs, limits.max_epochs, ours),
        ("max_steps", config.max_steps, limits.max_steps, ours),
        ("batch_size", config.batch_size, limits.max_batch_size, ours),
        ("grad_accum", config.grad_accum, limits.max_grad_accum, ours),
        ("max_seq_len", config.max_seq_len, base.context_length, f"the context of {base.model_id}"),
    ]
    if config.method == "lora":
        bounds.append(("r", config.r, limits.max_lora_rank, rank))
    else:
        bounds.append(("extract_rank", config.extract_rank, limits.max_lora_rank, rank))
    for field, value, limit, what in bounds:
        if value is not None and limit is not None and value > limit:
            param = _request_param(field, prefix)
            raise InvalidRequestError(
                f"{param}: must be at most {limit:,} ({what}), got {value:,}", param=param
            )
    if config.lr is not None and config.lr > limits.max_learning_rate:
        param = f"{prefix}.learning_rate_multiplier"
        raise InvalidRequestError(
            f"{param}: the peak learning rate would be {config.lr:g}, over this server's "
            f"limit of {limits.max_learning_rate:g}",
            param=param,
        )
    if base.embeddings is not None:
        try:
            check_against_base(config, base.embeddings)
        except TrainConfigError as exc:
            raise _renamed(exc, prefix) from None
    if base.target_modules is not None:
        unknown = [
            m for m in config.target_modules if m != ALL_LINEAR and m not in base.target_modules
        ]
        if unknown:
            param = _request_param("target_modules", prefix)
            raise InvalidRequestError(
                f"{param}: {', '.join(map(repr, unknown))} not among the adaptable modules "
                f"of {base.model_id} ({', '.join(sorted(base.target_modules))}, "
                f"or {ALL_LINEAR})",
                param=param,
            )


def _require_field(fields: dict[str, Any], field: str, param: str) -> None:
    # The server may run beside an older trainer: refuse what it cannot honour rather than
    # queue a job that fails on an unknown config key.
    if field not in fields:
        raise InvalidRequestError(
            f"{param}: not supported by the installed trainer version", param=param
        )


def _request_param(field: str | None, prefix: str) -> str | None:
    """The request field behind a `TrainConfig` field (`r` -> `<prefix>.lora_r`)."""
    if field is None:
        return None
    if field in _TOP_LEVEL:
        return _TOP_LEVEL[field]
    if field == "seed":
        return "seed"
    for name, target in (*_OPENAI.items(), *EXTENSIONS.items()):
        if target == field:
            return f"{prefix}.{name}"
    return f"{prefix}.{field}"


def _renamed(exc: TrainConfigError, prefix: str) -> InvalidRequestError:
    """The trainer's error, worded with the request's field name instead of its own."""
    param = _request_param(exc.param, prefix)
    message = redact_paths(exc.message)
    if exc.param and message.startswith(f"{exc.param}: "):
        message = f"{param}: {message[len(exc.param) + 2 :]}"
    return InvalidRequestError(message, param=param)
