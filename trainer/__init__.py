"""Supervised fine-tuning of a causal LM into LoRA adapters, published to the registry.

`trainer train ...` (also `python -m trainer train ...`): `config` (typed `TrainConfig`),
`data` (JSONL parsing, tokenization, loss masking), `loop` (the PyTorch training loop),
`publish` (save the PEFT directory and push it with lineage), `cli` (argparse).
"""
