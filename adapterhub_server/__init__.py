"""AdapterHub server: many LoRA adapters served over one frozen base model.

Kept import-light on purpose: the CLI, the client's tests and tooling import this package,
and torch / transformers load only where a model is actually needed.
"""

__version__ = "0.1.0"
