"""`trainer train ...`: fine-tune on a JSONL file and publish the adapter into the registry.

trainer train --data chat.jsonl --name my-adapter [--base-model DIR|owner/name]
torchrun --nproc-per-node 2 -m trainer train --data chat.jsonl --name my-adapter

Every option can also come from `--config FILE` (YAML or JSON, keys = option names);
options given on the command line override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapterhub_server.errors import AdapterHubError
from adapterhub_server.registry import registry_location
from trainer.config import (
    BATCHINGS,
    METHODS,
    SCHEDULERS,
    TrainConfig,
    TrainConfigError,
    load_config_file,
)
from trainer.run import TrainOutcome, run_train

__all__ = ["TrainOutcome", "build_parser", "config_from_args", "main", "run_train"]

logger = logging.getLogger("trainer")

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, the shell's convention for a run stopped by Ctrl-C."""

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _opt(group: Any, flag: str, help_: str = "", *aliases: str, **kwargs: Any) -> None:
    """An option whose absence leaves the field to the config file or the default.

    argparse's default is SUPPRESS, so the namespace holds only what was typed; the help
    shows `TrainConfig`'s default.
    """
    field = flag.lstrip("-").replace("-", "_")
    default = _DEFAULTS.get(field)
    if isinstance(default, tuple):
        default = ",".join(map(str, default)) or None
    shown = "" if default in (None, dataclasses.MISSING) else f" (default: {default})"
    group.add_argument(
        flag, *aliases, dest=field, default=argparse.SUPPRESS, help=help_ + shown, **kwargs
    )


def _flag(group: Any, flag: str, help_: str) -> None:
    group.add_argument(
        flag, default=argparse.SUPPRESS, action=argparse.BooleanOptionalAction, help=help_
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="fine-tune and publish an adapter")
    t.add_argument("--config", type=Path, metavar="FILE", help="YAML or JSON with any option")
    t.add_argument(
        "--events", type=Path, metavar="FILE", help="append JSON-lines progress events here"
    )
    _opt(t, "--data", "training JSONL (chat messages or prompt/completion)", type=Path)
    _opt(t, "--eval-data", "evaluation JSONL, same formats", type=Path)
    _opt(t, "--base-model", "local HF directory or hub id (default: embedded SmolLM2-135M)")
    _opt(t, "--base-model-id", "id recorded for the base in the registry (default: resolved)")
    _opt(t, "--method", "lora, or full (also publishes an SVD-extracted LoRA)", choices=METHODS)
    lora = t.add_argument_group("LoRA")
    # `--lora-r` too: torchrun rejects `--r` as an ambiguous prefix of its own options.
    _opt(lora, "--r", "rank", "--lora-r", type=int)
    _opt(lora, "--alpha", "scale = alpha / r", type=float)
    _opt(lora, "--dropout", "", type=float)
    _opt(
        lora,
        "--target-modules",
        "comma-separated leaf module names, or all-linear: every linear of the decoder layers "
        "(default)",
    )
    _flag(lora, "--rslora", "scale by alpha / sqrt(r)")
    _flag(lora, "--dora", "DoRA: train a magnitude per output feature besides the LoRA factors")
    _opt(
        lora,
        "--modules-to-save",
        "also train and save a full copy of these: lm_head (output head) and/or embed_tokens "
        "(input embeddings), comma-separated",
        metavar="NAMES",
    )
    _opt(
        lora,
        "--trainable-token-indices",
        "train the embedding rows of these token ids (comma-separated), e.g. tokens a chat "
        "template adds",
        metavar="IDS",
    )
    _opt(lora, "--extract-rank", "full SFT: rank of the extracted LoRA", type=int)
    opt = t.add_argument_group("optimisation")
    _opt(opt, "--epochs", "(default: auto: 3, more for small datasets, >= 40 steps)", type=int)
    _opt(opt, "--max-steps", "optimizer steps; overrides --epochs", type=int)
    _opt(opt, "--lr", "peak learning rate (default: 1e-3 LoRA, 2e-5 full)", type=float)
    _opt(opt, "--warmup-ratio", "", type=float)
    _opt(opt, "--scheduler", "", choices=SCHEDULERS)
    _opt(opt, "--weight-decay", "", type=float)
    _opt(opt, "--max-grad-norm", "0 disables clipping", type=float)
    _opt(opt, "--batch-size", "sequences (rows when packing) per micro-batch", type=int)
    _opt(opt, "--grad-accum", "micro-batches per optimizer step", type=int)
    _opt(opt, "--max-seq-len", "", type=int)
    _opt(opt, "--batching", "", choices=BATCHINGS)
    opt.add_argument(
        "--packing",
        dest="batching",
        action="store_const",
        const="packed",
        default=argparse.SUPPRESS,
        help="same as --batching packed",
    )
    opt.add_argument(
        "--padding-free",
        dest="batching",
        action="store_const",
        const="padding_free",
        default=argparse.SUPPRESS,
        help="same as --batching padding_free",
    )
    _flag(opt, "--gradient-checkpointing", "recompute activations: less memory, more time")
    _opt(opt, "--seed", "", type=int)
    _opt(opt, "--device", "cpu, cuda, cuda:1 (default: CUDA when available)")
    run = t.add_argument_group("evaluation and checkpoints")
    _opt(run, "--eval-every", "steps between evaluations (default: 5 per run)", type=int)
    _opt(run, "--save-every", "steps between checkpoints; 0 = only on Ctrl-C", type=int)
    _opt(
        run,
        "--checkpoint-dir",
        "default: <output-dir>/checkpoints or beside the registry",
        type=Path,
    )
    _flag(run, "--resume", "continue from the latest checkpoint in --checkpoint-dir")
    _flag(run, "--keep-checkpoints", "keep checkpoints after a successful run")
    _opt(run, "--log-every", "steps between loss log lines", type=int)
    out = t.add_argument_group("output")
    _opt(out, "--name", "adapter name to publish under")
    _opt(
        out,
        "--registry",
        "registry directory or postgresql:// URL (default: $ADAPTERHUB_REGISTRY or "
        "~/.cache/adapterhub/registry)",
        type=registry_location,
    )
    _opt(
        out,
        "--registry-blobs",
        "blob store of a postgresql:// registry: file:///path or s3://bucket/prefix "
        "(default: $ADAPTERHUB_REGISTRY_BLOBS)",
    )
    _opt(out, "--alias", "alias to point at the new version")
    _opt(out, "--description", "")
    _opt(out, "--output-dir", "also write the PEFT directory (full SFT: the model) here", type=Path)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file's fields, overridden by the options typed on the command line."""
    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    skip = {"command", "config", "events", "log_level"}
    values.update({k: v for k, v in vars(args).items() if k not in skip})
    if "data" not in values:
        raise TrainConfigError("data: give --data FILE (or `data:` in --config)", param="data")
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("trainer").setLevel(args.log_level.upper())
    from trainer.loop import TrainingInterrupted

    try:
        config = config_from_args(args)
        run_train(config, events_path=args.events)
    except TrainingInterrupted as stop:
        where = f"; checkpoint {stop.checkpoint}" if stop.checkpoint else ""
        print(f"trainer: interrupted at step {stop.step}{where}", file=sys.stderr)
        print("trainer: run the same command with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except AdapterHubError as exc:
        print(f"trainer: error: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
