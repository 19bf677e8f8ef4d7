"""Supervised fine-tuning of a causal LM into LoRA adapters, published to the registry.

`trainer train ...` (also `python -m trainer train ...`): `config` (typed `TrainConfig`),
`data` (JSONL parsing, tokenization, loss masking), `loop` (the PyTorch training loop),
`publish` (save the PEFT directory and push it with lineage), `cli` (argparse).
"""

# What other packages may use: the fine-tuning service runs `trainer train` as a process and
# reads these (the config schema, the data format, the events and checkpoint layout). They
# load on first use, so `import trainer` stays cheap. Everything else here is internal.
_PUBLIC = {
    "ALL_LINEAR": "trainer.config",
    "DEFAULT_LR": "trainer.config",
    "TrainConfig": "trainer.config",
    "TrainConfigError": "trainer.config",
    "auto_epochs": "trainer.config",
    "DataError": "trainer.data",
    "JsonlStats": "trainer.data",
    "scan_jsonl": "trainer.data",
    "EmbeddingFacts": "trainer.kinds",
    "check_against_base": "trainer.kinds",
    "resolve_target_modules": "trainer.modeling",
    "latest_checkpoint": "trainer.checkpoint_paths",
    "read_events": "trainer.events",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> object:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
