"""Training throughput and peak memory: this trainer vs TRL `SFTTrainer` + PEFT, side by side.

Both implementations fine-tune the same LoRA (rank r on all 7 projections, same alpha,
dropout, learning rate, schedule, batch size, max sequence length, fp32 on CPU, no gradient
checkpointing) on the same synthetic chat JSONL, with the loss on the assistant tokens only,
for `--warmup-steps` + `--steps` optimizer steps:

  ours  ``trainer.cli.run_train(TrainConfig(...))``
  trl   ``trl.SFTTrainer`` with ``peft_config`` and ``assistant_only_loss=True`` (through a
        ChatML training template with ``{% generation %}`` markers that renders the same
        text as the model's own template)

``--batching padded`` (the default) right-pads each batch for both; ``padding_free`` runs
ours with ``batching="padding_free"`` and TRL with ``padding_free=True`` (each batch's
sequences concatenated into one row, no cross-sequence attention).

How it is measured, identically for both:

- each run is a fresh subprocess (``--worker``), so peak RSS (``getrusage``) is that
  implementation's own, model loading included; on CUDA also ``max_memory_allocated``;
- a global ``torch.optim`` step post-hook timestamps the end of every optimizer step, and a
  forward hook on the decoder stack (``LlamaModel``, which both call once per batch) counts
  each step's non-padding tokens and padded positions. Throughput = tokens of steps
  W+1..W+N / (end of step W+N - end of step W): model loading, dataset preprocessing and the
  W warm-up steps are excluded;
- both see the same batches in the same order: TRL's sampler yields our trainer's epoch
  order (``trainer.batching.BatchPlan.order``), and the per-step token counts of the two
  runs are compared (``checks.same_batches``); the TRL worker also checks that its tokenized
  inputs and labels equal ours (``checks.same_tokens_and_labels``);
- implementations alternate (ours, trl, then trl, ours, ...) for ``--repeats`` rounds, the
  seed (hence the batch order) changing each round; medians are reported.

Prints a table and writes JSON to ``bench/results/train_throughput.json``.

    .venv/bin/python -m bench.train_throughput                  # SmolLM2-135M, 2+20 steps, 3 repeats
    .venv/bin/python -m bench.train_throughput --batching padded padding_free
    .venv/bin/python -m bench.train_throughput --smoke          # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.timing import machine_info, peak_rss_mib

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WARMUP_RATIO = 0.1
"""Learning-rate warm-up fraction, as `TrainConfig.warmup_ratio`; TRL gets the same step count."""
LOG_EVERY = 10
"""Loss logging interval of both implementations (their default: `log_every`, `logging_steps`)."""
IMPLEMENTATIONS = ("ours", "trl")
BATCHINGS = ("padded", "padding_free")

SYSTEM_PROMPT = "You are a concise assistant for a customer support team."
# ChatML, as SmolLM2's template renders a conversation that has a system message, with the
# assistant's content and its <|im_end|> inside {% generation %}: the tokens our trainer puts
# the loss on (the role header and the newline after <|im_end|> are not trained).
TRAINING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_VOCABULARY = (
    "the order account refund shipping delivery package customer invoice payment card bank "
    "transfer address update change cancel return item product price discount code coupon "
    "support ticket agent reply email phone number password login reset link verify secure "
    "problem issue error message screen page app version install update restart device "
    "battery charge cable screen size color model warranty repair replace store location "
    "hours today tomorrow week month year date time quickly please thanks sorry help need "
    "want check status track arrive late early missing damaged wrong correct new old first "
    "last next previous small large simple clear short long easy hard free extra total "
    "amount balance fee charge subscription plan monthly annual upgrade downgrade trial "
    "feature setting option menu button click open close save send receive confirm review"
)
_WORDS = tuple(_VOCABULARY.split())


@dataclass(frozen=True)
class RunSpec:
    """One training run in a worker process; both implementations read the same fields."""

    impl: str
    """"ours" or "trl"."""
    batching: str
    """"padded" or "padding_free"."""
    base_model: str
    """Local HF directory of the base model."""
    data: str
    """Chat JSONL file."""
    workdir: str
    """Scratch directory for the run's outputs."""
    steps: int
    """Measured optimizer steps."""
    warmup_steps: int
    """Optimizer steps run first and excluded from the timing (>= 1)."""
    batch_size: int
    """Sequences per optimizer step (gradient accumulation 1)."""
    max_seq_len: int
    """Sequences are truncated to this many tokens."""
    lr: float
    """Peak learning rate (AdamW, linear warm-up then cosine decay)."""
    r: int
    """LoRA rank."""
    alpha: float
    """LoRA alpha."""
    dropout: float
    """LoRA dropout."""
    seed: int
    """Data order, LoRA init and dropout."""
    device: str | None
    """torch device; None = CUDA when available, else CPU."""
    threads: int | None = None
    """torch CPU threads (`torch.set_num_threads`); None = torch's default."""

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps


@dataclass
class StepRecorder:
    """Per optimizer step: end time, non-padding tokens and padded positions run through the model.

    Installed as a global optimizer step post-hook (fires for whichever optimizer the trainer
    builds) plus a global module forward pre-hook that, on the decoder stack's first call,
    attaches a forward hook to it and removes itself, so that no other module pays for it.
    """

    ends: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    padded: list[int] = field(default_factory=list)
    _tokens: int = 0
    _padded: int = 0
    _handles: list[Any] = field(default_factory=list)
    _finder: Any = None
    _cuda: bool = False

    def install(self) -> None:
        """Start recording (before the trainer builds its model and optimizer)."""
        import torch
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._cuda = torch.cuda.is_available()
        self._handles.append(register_optimizer_step_post_hook(self._on_step))
        self._finder = register_module_forward_pre_hook(self._find_model)

    def remove(self) -> None:
        """Stop recording; the figures stay."""
        for handle in self._handles:
            handle.remove()
        if self._finder is not None:
            self._finder.remove()
            self._finder = None

    def _find_model(self, module: Any, args: tuple) -> None:
        # The decoder stack (`LlamaModel`): both trainers call it once per micro-batch with
        # the batch's input_ids and attention_mask / position_ids as keyword arguments.
        if hasattr(module, "embed_tokens") and hasattr(module, "layers"):
            # A forward hook registered now still runs after this very call's forward.
            self._handles.append(module.register_forward_hook(self._count, with_kwargs=True))
            self._finder.remove()
            self._finder = None

    def _count(self, module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if input_ids is None:
            return
        self._padded += int(input_ids.numel())
        # Padding-free batches carry no mask: every position is a real token.
        self._tokens += int(mask.sum()) if mask is not None else int(input_ids.numel())

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._cuda:
            import torch

            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.tokens.append(self._tokens)
        self.padded.append(self._padded)
        self._tokens = self._padded = 0

    def summary(self, warmup_steps: int) -> dict[str, Any]:
        """Throughput over the steps after `warmup_steps` (timed from the end of the last warm-up step)."""
        if len(self.ends) <= warmup_steps or warmup_steps < 1:
            raise RuntimeError(
                f"recorded {len(self.ends)} optimizer steps; need more than warmup_steps={warmup_steps} >= 1"
            )
        step_s = [b - a for a, b in zip(self.ends[warmup_steps - 1 :], self.ends[warmup_steps:])]
        elapsed = self.ends[-1] - self.ends[warmup_steps - 1]
        tokens = sum(self.tokens[warmup_steps:])
        padded = sum(self.padded[warmup_steps:])
        return {
            "measured_steps": len(step_s),
            "measured_s": elapsed,
            "tokens": tokens,
            "padded_tokens": padded,
            "tokens_per_s": tokens / elapsed,
            "padded_tokens_per_s": padded / elapsed,
            "median_step_ms": statistics.median(step_s) * 1e3,
            "step_ms": [round(s * 1e3, 2) for s in step_s],
            "step_tokens": list(self.tokens),
        }


# --- data -------------------------------------------------------------------------------


def _text(rng: random.Random, words: int, question: bool) -> str:
    """`words` random words in sentences of 4-14 words; a question when asked."""
    out: list[str] = []
    while len(out) < words:
        n = min(rng.randint(4, 14), words - len(out))
        sentence = [rng.choice(_WORDS) for _ in range(n)]
        sentence[0] = sentence[0].capitalize()
        out.extend(sentence[:-1])
        out.append(sentence[-1] + ("?" if question and len(out) + 1 >= words else "."))
    return " ".join(out)


def make_conversations(n: int, seed: int, min_words: int, max_words: int) -> list[dict[str, Any]]:
    """`n` deterministic chat records: a system message, then one or two user/assistant turns.

    Each conversation draws a word budget uniformly from [min_words, max_words] and spends
    20-50% of each turn on the user, the rest on the assistant.
    """
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        budget = rng.randint(min_words, max_words)
        turns = 2 if budget >= 60 and rng.random() < 0.4 else 1
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for _ in range(turns):
            per_turn = budget // turns
            user = max(3, int(per_turn * rng.uniform(0.2, 0.5)))
            messages.append({"role": "user", "content": _text(rng, user, question=True)})
            messages.append(
                {"role": "assistant", "content": _text(rng, max(3, per_turn - user), False)}
            )
        records.append({"messages": messages})
    return records


def write_jsonl(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """One JSON object per line; returns `path`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def data_stats(data: Path, base_model: str, max_seq_len: int) -> dict[str, Any]:
    """Token lengths of the data as our trainer tokenizes it (the TRL worker checks it agrees)."""
    from transformers import AutoTokenizer

    from trainer.data import load_examples

    examples = load_examples(data, AutoTokenizer.from_pretrained(base_model), max_seq_len)
    lengths = sorted(len(e.input_ids) for e in examples)
    trained = sum(e.trained_tokens for e in examples)
    return {
        "examples": len(examples),
        "tokens_min": lengths[0],
        "tokens_median": statistics.median(lengths),
        "tokens_max": lengths[-1],
        "tokens_total": sum(lengths),
        "trained_fraction": trained / sum(lengths),
    }


# --- workers ------------------------------------------------------------------------------


def _device(spec: RunSpec) -> Any:
    """The run's torch device, resolved as both trainers resolve `None`."""
    import torch

    if spec.device:
        return torch.device(spec.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _memory(device: Any) -> dict[str, Any]:
    """This process's peak RSS, plus the CUDA allocator's peak on CUDA."""
    import torch

    out: dict[str, Any] = {"peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / (1 << 20)
    return out


def run_ours(spec: RunSpec) -> dict[str, Any]:
    """This trainer through its Python API (`run_train`), writing the adapter to the workdir."""
    from trainer.cli import run_train
    from trainer.config import TrainConfig

    device = _device(spec)
    # `batching` only when it is not the default, so the padded run needs no newer field.
    extra: dict[str, Any] = {} if spec.batching == "padded" else {"batching": spec.batching}
    config = TrainConfig(
        data=Path(spec.data),
        base_model=spec.base_model,
        r=spec.r,
        alpha=spec.alpha,
        dropout=spec.dropout,
        target_modules=TARGET_MODULES,
        max_steps=spec.total_steps,
        lr=spec.lr,
        warmup_ratio=WARMUP_RATIO,
        scheduler="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        batch_size=spec.batch_size,
        grad_accum=1,
        max_seq_len=spec.max_seq_len,
        seed=spec.seed,
        output_dir=Path(spec.workdir) / "adapter",
        log_every=LOG_EVERY,
        device=str(device),
        **extra,
    )
    recorder = StepRecorder()
    recorder.install()
    t0 = time.perf_counter()
    outcome = run_train(config)
    total_s = time.perf_counter() - t0
    recorder.remove()
    result = outcome.result
    return {
        **recorder.summary(spec.warmup_steps),
        **_memory(device),
        "device": str(device),
        "steps": result.steps,
        "first_window_loss": result.losses[0][1] if result.losses else None,
        "final_loss": result.final_loss,
        # The trainer's own figures, warm-up included (a cross-check of the hooks above).
        "loop_wall_s": result.wall_time_s,
        "loop_seen_tokens": result.seen_tokens,
        "loop_trained_tokens": result.trained_tokens,
        "setup_s": total_s - result.wall_time_s,
    }


class PlanOrder:
    """A torch `Sampler` yielding our trainer's example order, one epoch per iteration.

    `BatchPlan.order(epoch)` is a pure function of (seed, epoch); with grad_accum 1 our
    trainer's batches are consecutive `batch_size` slices of it, as a `DataLoader` makes them.
    """

    def __init__(self, n: int, batch_size: int, max_seq_len: int, seed: int) -> None:
        from trainer.batching import BatchPlan

        self._plan = BatchPlan(
            [1] * n,
            batching="padded",
            batch_size=batch_size,
            grad_accum=1,
            max_seq_len=max_seq_len,
            seed=seed,
        )
        self._n = n
        self._epoch = 0

    def __iter__(self) -> Iterator[int]:
        order = self._plan.order(self._epoch)
        self._epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return self._n


def run_trl(spec: RunSpec) -> dict[str, Any]:
    """TRL `SFTTrainer` with a PEFT `LoraConfig`, configured as our trainer is."""
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    device = _device(spec)
    padding_free = spec.batching == "padding_free"

    class SameOrderSFTTrainer(SFTTrainer):
        """`SFTTrainer` drawing its batches in our trainer's order (the only change)."""

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset = self.train_dataset if train_dataset is None else train_dataset
            return PlanOrder(len(dataset), spec.batch_size, spec.max_seq_len, spec.seed)

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model)
    tokenizer.chat_template = TRAINING_CHAT_TEMPLATE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=dtype)
    records = [json.loads(line) for line in Path(spec.data).read_text().splitlines() if line]
    args = SFTConfig(
        output_dir=str(Path(spec.workdir) / "trl"),
        max_steps=spec.total_steps,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=spec.lr,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(WARMUP_RATIO * spec.total_steps),
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=spec.seed,
        # SFTConfig defaults to gradient checkpointing and bf16: off, as in our trainer.
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=device.type == "cpu",
        # Padding-free without packing leaves truncation to the caller: our data fits.
        max_length=None if padding_free else spec.max_seq_len,
        packing=False,
        padding_free=padding_free,
        assistant_only_loss=True,
        logging_steps=LOG_EVERY,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(TARGET_MODULES),
        bias="none",
    )
    trainer = SameOrderSFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    setup_s = time.perf_counter() - t0
    same = _same_as_ours(trainer.train_dataset, spec)
    recorder = StepRecorder()
    recorder.install()
    t1 = time.perf_counter()
    output = trainer.train()
    loop_s = time.perf_counter() - t1
    recorder.remove()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        **recorder.summary(spec.warmup_steps),
        **_memory(device),
        "device": str(trainer.args.device),
        "steps": output.global_step,
        "first_window_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "loop_wall_s": loop_s,
        "setup_s": setup_s,
        "same_tokens_and_labels": same,
    }


def _same_as_ours(dataset: Any, spec: RunSpec) -> bool:
    """Whether TRL's tokenized dataset has exactly our trainer's input ids and labels."""
    from transformers import AutoTokenizer

    from trainer.data import load_examples

    ours = load_examples(
        Path(spec.data), AutoTokenizer.from_pretrained(spec.base_model), spec.max_seq_len
    )
    if len(ours) != len(dataset):
        return False
    return all(
        e.input_ids == row["input_ids"] and e.labels == row["labels"]
        for e, row in zip(ours, dataset)
    )


def worker_main(spec_path: Path, out_path: Path) -> None:
    """Run one `RunSpec` and write its figures as JSON (the parent reads them)."""
    import torch

    spec = RunSpec(**json.loads(spec_path.read_text()))
    if spec.threads:
        torch.set_num_threads(spec.threads)
    logging.basicConfig(level=logging.WARNING)
    if spec.impl == "ours":
        result = run_ours(spec)
    elif spec.impl == "trl":
        result = run_trl(spec)
    else:
        raise ValueError(f"unknown implementation {spec.impl!r}")
    result["torch_threads"] = torch.get_num_threads()
    out_path.write_text(json.dumps(result))


# --- driver -------------------------------------------------------------------------------


def _worker_env() -> dict[str, str]:
    """The workers' environment: offline hub, the checkout's model cache and imports."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("ADAPTERHUB_MODEL_CACHE", str(REPO / ".cache" / "models"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_worker(spec: RunSpec, timeout: float) -> dict[str, Any]:
    """`spec` in a fresh `python -m bench.train_throughput --worker` process."""
    work = Path(spec.workdir)
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    env = _worker_env()
    if spec.threads:
        env["OMP_NUM_THREADS"] = str(spec.threads)
    load_before = _loadavg()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.train_throughput", "--worker", str(spec_path), str(out_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    (work / "worker.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out_path.exists():
        raise RuntimeError(
            f"{spec.impl} worker failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    result = json.loads(out_path.read_text())
    # Other work on the machine skews a run: keep the 1-minute load around it.
    result["loadavg_1m_before_after"] = [load_before, _loadavg()]
    return result


def _loadavg() -> float | None:
    """The 1-minute load average, where the platform has one."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the figures depend on."""
    out: dict[str, str | None] = {}
    for name in ("adapterhub", "torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


_SUMMARY_KEYS = (
    "tokens_per_s",
    "padded_tokens_per_s",
    "median_step_ms",
    "peak_rss_mib",
    "cuda_max_allocated_mib",
    "setup_s",
    "tokens",
    "padded_tokens",
    "measured_s",
    "first_window_loss",
    "final_loss",
)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats of the figures in `_SUMMARY_KEYS` that every run has."""
    out: dict[str, Any] = {}
    for key in _SUMMARY_KEYS:
        values = [r.get(key) for r in runs]
        if all(isinstance(v, int | float) for v in values):
            out[key] = statistics.median(values)
    out["runs"] = len(runs)
    return out


def run_key(impl: str, batching: str) -> str:
    """Result key: "ours", "trl", "ours-padding_free", "trl-padding_free"."""
    return impl if batching == "padded" else f"{impl}-{batching}"


def print_table(summary: dict[str, Any], ratios: dict[str, Any], checks: dict[str, bool]) -> None:
    print()
    print(
        f"{'implementation':18s} {'tok/s':>9s} {'padded tok/s':>13s} {'step ms':>9s} "
        f"{'peak RSS MiB':>13s} {'loss 1-10':>10s}"
    )
    for name, s in summary.items():
        loss = s.get("first_window_loss")
        print(
            f"{name:18s} {s['tokens_per_s']:9.1f} {s['padded_tokens_per_s']:13.1f} "
            f"{s['median_step_ms']:9.1f} {s['peak_rss_mib']:13.0f} "
            f"{(f'{loss:.4f}' if loss is not None else '-'):>10s}"
        )
    for name, r in ratios.items():
        print(
            f"{name:26s} tokens/s {r['tokens_per_s']:.2f}x (target >= 1.0x)   "
            f"peak RSS {r['peak_rss']:.2f}x"
        )
    for name, ok in checks.items():
        print(f"check {name}: {'yes' if ok else 'NO'}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default=None, help="local HF directory (default: embedded)")
    parser.add_argument("--examples", type=int, default=256, help="synthetic conversations")
    parser.add_argument("--min-words", type=int, default=12, help="per conversation")
    parser.add_argument("--max-words", type=int, default=140, help="per conversation")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument(
        "--batching", nargs="+", choices=BATCHINGS, default=["padded"], help="configurations"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="repeat i uses seed + i")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: CUDA if available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per run (default: torch's, one per core); 1 keeps the "
        "comparison stable on cores other jobs share, where OpenMP threads stall each other",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny sizes")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be >= 1 (the timing starts at the end of a step)")
    for key, value in _worker_env().items():
        os.environ.setdefault(key, value)

    tmp = Path(tempfile.mkdtemp(prefix="adapterhub-train-bench-"))
    if args.smoke:
        from tests.tiny_models import make_tiny_llama

        args.base_model = str(make_tiny_llama(tmp / "tiny"))
        args.examples, args.min_words, args.max_words = 32, 4, 16
        args.steps, args.warmup_steps, args.batch_size, args.max_seq_len = 2, 1, 4, 256
        args.repeats = 1
    if args.base_model and Path(args.base_model).is_dir():
        base_path, model_id = str(Path(args.base_model).resolve()), args.base_model
    else:
        from adapterhub_server.base_model import resolve_base_model

        base = resolve_base_model(args.base_model)
        base_path, model_id = str(base.path), base.model_id
    out_path = args.out or RESULTS / (
        "train_throughput_smoke.json" if args.smoke else "train_throughput.json"
    )

    data = write_jsonl(
        make_conversations(args.examples, 1234, args.min_words, args.max_words),
        tmp / "chat.jsonl",
    )
    stats = data_stats(data, base_path, args.max_seq_len)
    print(
        f"{model_id}: {stats['examples']} conversations of {stats['tokens_min']}-"
        f"{stats['tokens_max']} tokens (median {stats['tokens_median']}), batch "
        f"{args.batch_size}, {args.warmup_steps}+{args.steps} steps, {args.repeats} repeat(s)",
        flush=True,
    )

    pairs = [(impl, batching) for batching in args.batching for impl in IMPLEMENTATIONS]
    runs: dict[str, list[dict[str, Any]]] = {run_key(*pair): [] for pair in pairs}
    for repeat in range(args.repeats):
        # Alternate who goes first, so that drift in machine load hits both alike.
        for impl, batching in pairs if repeat % 2 == 0 else pairs[::-1]:
            key = run_key(impl, batching)
            spec = RunSpec(
                impl=impl,
                batching=batching,
                base_model=base_path,
                data=str(data),
                workdir=str(tmp / f"{key}-{repeat}"),
                steps=args.steps,
                warmup_steps=args.warmup_steps,
                batch_size=args.batch_size,
                max_seq_len=args.max_seq_len,
                lr=args.lr,
                r=args.rank,
                alpha=args.alpha,
                dropout=args.dropout,
                seed=args.seed + repeat,
                device=args.device,
                threads=args.threads,
            )
            result = run_worker(spec, args.timeout)
            result["repeat"], result["seed"] = repeat, spec.seed
            runs[key].append(result)
            print(
                f"  [{repeat}] {key:18s} {result['tokens_per_s']:9.1f} tok/s  step "
                f"{result['median_step_ms']:7.1f} ms  peak RSS {result['peak_rss_mib']:6.0f} MiB  "
                f"load {result['loadavg_1m_before_after']}",
                flush=True,
            )

    summary = {key: summarize(r) for key, r in runs.items()}
    ratios: dict[str, dict[str, float]] = {}
    checks: dict[str, bool] = {}
    for batching in args.batching:
        ours, trl = summary[run_key("ours", batching)], summary[run_key("trl", batching)]
        ratios[f"{run_key('ours', batching)}/{run_key('trl', batching)}"] = {
            "tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
            "peak_rss": ours["peak_rss_mib"] / trl["peak_rss_mib"],
        }
        ours_runs, trl_runs = runs[run_key("ours", batching)], runs[run_key("trl", batching)]
        # Equal per-step token counts: the two trainers ran the same batches.
        checks[f"same_batches_{batching}"] = all(
            o["step_tokens"] == t["step_tokens"] for o, t in zip(ours_runs, trl_runs)
        )
        checks[f"same_tokens_and_labels_{batching}"] = all(
            t["same_tokens_and_labels"] for t in trl_runs
        )
    print_table(summary, ratios, checks)

    first = next(iter(runs.values()))[0]
    meta = {
        "model": model_id,
        "machine": machine_info(),
        "versions": versions(),
        "config": {
            "examples": args.examples,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "batch_size": args.batch_size,
            "grad_accum": 1,
            "max_seq_len": args.max_seq_len,
            "lr": args.lr,
            "warmup_ratio": WARMUP_RATIO,
            "scheduler": "cosine",
            "optimizer": "torch AdamW, weight decay 0, grad-norm clip 1.0",
            "rank": args.rank,
            "alpha": args.alpha,
            "dropout": args.dropout,
            "target_modules": list(TARGET_MODULES),
            "batching": args.batching,
            "repeats": args.repeats,
            "seed": args.seed,
            "device": first["device"],
            "torch_threads": first["torch_threads"],
            "dtype": "float32" if first["device"] == "cpu" else "bfloat16",
            "gradient_checkpointing": False,
            "loss": "assistant tokens only (content + <|im_end|>)",
        },
        "data": stats,
        "method": (
            "fresh subprocess per run; tokens/s = non-padding tokens of the measured steps / "
            "time from the end of the last warm-up optimizer step to the end of the last step "
            "(global optimizer post-hook + decoder forward hook, identical for both); same "
            "batches in the same order for both; peak RSS = getrusage high-water mark of the "
            "run's process, model loading included"
        ),
        "notes": (
            "loss 1-10 = mean loss of steps 1-10 as each trainer logs it; they differ a little "
            "because HF's warm-up starts at lr 0 and ours at lr / warmup_steps (on the same "
            "batch, step 1 gives the same loss in both)"
        ),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        json.dumps(
            {"meta": meta, "summary": summary, "ratios": ratios, "checks": checks, "runs": runs},
            indent=2,
        )
    )
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
