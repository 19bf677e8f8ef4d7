"""From an OpenAI job request to the trainer's `TrainConfig`, validated with the trainer's rules.

OpenAI's three hyperparameters map onto the trainer's (`"auto"` = the trainer's default;
learning rate = the trainer's default for the method (1e-3 LoRA, 2e-5 full) x
`learning_rate_multiplier`); the AdapterHub
extensions map one to one. The config is built as a real `TrainConfig`, so a value the
trainer would refuse is refused here, with `param` naming the request field, before the job
is queued. Defaults come from `TrainConfig` itself, so they cannot drift from the trainer's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub_server.errors import AdapterHubError, InvalidRequestError
from client.types import (
    FineTuningHyperparameters,
    FineTuningJobCreateRequest,
    FineTuningJobHyperparameters,
)
from trainer.config import DEFAULT_LR, TrainConfig, TrainConfigError, auto_epochs
from trainer.data import read_jsonl

EXTENSIONS: dict[str, str] = {
    "training_method": "method",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "use_rslora": "rslora",
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
    data: Path,
    eval_data: Path | None,
    base_model: str,
    base_model_id: str,
    registry: Path,
    seed: int,
    description: str,
    output_dir: Path,
) -> TrainingPlan:
    """Resolve and validate a job request into the trainer's config.

    `output_dir` receives the fine-tuned weights of a `full` job (the trainer needs a place
    for them; the published result is the extracted LoRA either way).

    Raises:
        InvalidRequestError: a value the trainer would refuse, or an extension this
            trainer version does not know; `param` names the request field.
    """
    hp, prefix = requested_hyperparameters(request)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    default_lr = DEFAULT_LR[hp.training_method or "lora"]
    multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
    kwargs: dict[str, Any] = {
        "data": data,
        "base_model": base_model,
        "base_model_id": base_model_id,
        "registry": registry,
        "name": request.suffix,
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
    for name, field in EXTENSIONS.items():
        value = getattr(hp, name)
        if value is None:
            continue
        _require_field(fields, field, f"{prefix}.{name}")
        if name == "packing":
            value = "packed" if value else "padded"
        kwargs[field] = tuple(value) if isinstance(value, list) else value
    try:
        config = TrainConfig(**kwargs)
    except TrainConfigError as exc:
        raise _renamed(exc, prefix) from None
    except AdapterHubError as exc:  # the name check raises AdapterValidationError
        raise InvalidRequestError(exc.message, param=_request_param(exc.param, prefix)) from None
    if config.epochs is None:
        # "auto" is resolved now, from the (already validated) file, so that the job reports
        # the number it runs with.
        records = len(read_jsonl(data))
        epochs = auto_epochs(records, config.batch_size, config.grad_accum)
        config = dataclasses.replace(config, epochs=epochs)
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
            max_steps=config.max_steps,
            warmup_ratio=config.warmup_ratio,
            max_seq_len=config.max_seq_len,
            grad_accum=config.grad_accum,
            packing=getattr(config, "batching", None) == "packed",
            extract_rank=None if lora else getattr(config, "extract_rank", None),
        ),
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
    message = exc.message
    if exc.param and message.startswith(f"{exc.param}: "):
        message = f"{param}: {message[len(exc.param) + 2 :]}"
    return InvalidRequestError(message, param=param)
