"""`trainer train ...`: fine-tune a LoRA adapter on a JSONL file and publish it.

trainer train --data chat.jsonl --name my-adapter [--base-model DIR|owner/name]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from adapterhub_server.errors import AdapterHubError
from trainer.config import DEFAULT_TARGET_MODULES, METHODS, SCHEDULERS, TrainConfig

logger = logging.getLogger("trainer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser(
        "train",
        help="fine-tune an adapter and publish it into the registry",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("--data", required=True, type=Path, metavar="FILE", help="training JSONL")
    t.add_argument(
        "--base-model",
        default=None,
        help="local HF directory or hub id (default: embedded SmolLM2-135M-Instruct)",
    )
    t.add_argument("--method", default="lora", choices=METHODS)
    lora = t.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, default=16, help="rank")
    lora.add_argument("--alpha", type=float, default=32.0)
    lora.add_argument("--dropout", type=float, default=0.05)
    lora.add_argument(
        "--target-modules", default=",".join(DEFAULT_TARGET_MODULES), help="comma-separated"
    )
    lora.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")
    opt = t.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=3)
    opt.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    opt.add_argument("--lr", type=float, default=2e-4)
    opt.add_argument("--warmup-ratio", type=float, default=0.1)
    opt.add_argument("--scheduler", default="cosine", choices=SCHEDULERS)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    opt.add_argument("--batch-size", type=int, default=4)
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--max-seq-len", type=int, default=512)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    out = t.add_argument_group("output")
    out.add_argument("--name", default=None, help="adapter name to publish under")
    out.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="registry directory (default: $ADAPTERHUB_REGISTRY or ~/.cache/adapterhub/registry)",
    )
    out.add_argument("--alias", default=None, help="alias to point at the new version")
    out.add_argument("--description", default=None)
    out.add_argument(
        "--output-dir", type=Path, default=None, help="also write the PEFT directory here"
    )
    out.add_argument("--log-every", type=int, default=10, help="steps between loss log lines")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=args.data,
        base_model=args.base_model,
        method=args.method,
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=args.target_modules,
        rslora=args.rslora,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        scheduler=args.scheduler,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
        name=args.name,
        registry=args.registry,
        alias=args.alias,
        description=args.description,
        output_dir=args.output_dir,
        log_every=args.log_every,
        device=args.device,
    )


def run_train(config: TrainConfig) -> str | None:
    """Train and publish; returns the pushed reference (`name@version`) or None."""
    from transformers import AutoTokenizer

    from adapterhub_server.base_model import resolve_base_model
    from trainer import loop, publish
    from trainer.data import load_examples, sha256_file

    dataset_sha256 = sha256_file(config.data)
    base = resolve_base_model(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    # Everything about the data is checked before the model loads or anything is written.
    examples = load_examples(config.data, tokenizer, config.max_seq_len)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if pad_id is None:
        pad_id = 0  # padded positions are masked out of attention and loss anyway
    logger.info("base model %s (%s) at %s", base.model_id, base.source, base.path)
    device = loop.pick_device(config.device)
    model = loop.build_model(base.path, config, device)
    result = loop.train(model, examples, config, pad_id)
    lineage = publish.build_lineage(config, result, dataset_sha256, device)
    record = publish.publish(model, config, base, lineage)
    if config.output_dir is not None:
        print(f"saved {config.output_dir}")
    if record is None:
        return None
    ref = record.key
    suffix = f" (alias {config.alias})" if config.alias else ""
    print(f"published {ref}{suffix}")
    return ref


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("trainer").setLevel(args.log_level.upper())
    if args.command == "train":
        try:
            run_train(config_from_args(args))
        except AdapterHubError as exc:
            print(f"trainer: error: {exc.message}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
