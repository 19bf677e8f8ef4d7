"""Parse and validate the parts of a PEFT LoRA adapter that replace embedding rows or tables.

Two PEFT options make an adapter carry more than low-rank factors:

* ``modules_to_save``: a full trained copy of a module. Served for the output head
  (``lm_head``) and the input embedding (``embed_tokens``) only; PEFT saves the copy as
  ``base_model.model.<module path>.weight`` (and ``.bias``), and the adapter's tokens use it
  in place of the base module;
* ``trainable_token_indices``: a few trained rows (a list of token ids for the input
  embedding, or ``{module name: [ids]}``); PEFT saves them as
  ``base_model.model.<module path>.token_adapter.trainable_tokens_delta`` `[k, hidden]`, and
  they *replace* (not add to) the base rows of those token ids.

Tied embeddings follow PEFT 0.21 exactly (each rule below was checked against
``PeftModel.from_pretrained`` on a tied and an untied base):

* a full copy of one of the two tied modules replaces that module only, unless
  ``ensure_weight_tying`` is set: then PEFT saves both copies (equal) and ties them, so both
  use one table;
* trainable token rows of the input embedding also replace the tied head's rows, unless the
  config gives the head rows of its own with other indices (then each keeps its own).

What PEFT refuses or cannot run (a module both fully saved and given token rows, mismatched
tied indices with ``ensure_weight_tying``) is refused here, naming the conflict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterhub_server.errors import AdapterValidationError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_DELTA = "token_adapter.trainable_tokens_delta"


@dataclass(frozen=True)
class EmbeddingTargets:
    """What a base model offers full-module adapters: its input embedding and output head."""

    embed_path: str | None
    """Module path of the input embedding (``get_input_embeddings()``), if an nn.Embedding."""
    embed_shape: tuple[int, int]
    """`[num_embeddings, embedding_dim]` of the input embedding ((0, 0) without one)."""
    head_path: str | None
    """Module path of the output head (``get_output_embeddings()``), if an nn.Linear."""
    head_shape: tuple[int, int]
    """`[out_features, in_features]` of the output head ((0, 0) without one)."""
    head_bias: bool
    """The head has a bias (a full copy then carries one too)."""
    tied: bool
    """``tie_word_embeddings`` and the head's weight is the embedding's."""
    module_names: tuple[str, ...]
    """Every module path of the base model, which PEFT's name matching runs over."""

    def full_bytes(self, element_size: int) -> int:
        """Device bytes of one adapter's largest full-module copies (embedding + head)."""
        embed = self.embed_shape[0] * self.embed_shape[1] if self.embed_path else 0
        head = self.head_shape[0] * (self.head_shape[1] + self.head_bias) if self.head_path else 0
        return (embed + head) * element_size


def embedding_targets(model: nn.Module) -> EmbeddingTargets:
    """The `EmbeddingTargets` of a transformers CausalLM (real or on the meta device).

    Call it on the model as transformers built it, before any module is swapped.
    """
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_ok = isinstance(embed, nn.Embedding) and id(embed) in names
    head_ok = isinstance(head, nn.Linear) and id(head) in names
    config = getattr(model, "config", None)
    tie = bool(getattr(config, "tie_word_embeddings", False))
    return EmbeddingTargets(
        embed_path=names[id(embed)] if embed_ok else None,
        embed_shape=(embed.num_embeddings, embed.embedding_dim) if embed_ok else (0, 0),
        head_path=names[id(head)] if head_ok else None,
        head_shape=(head.out_features, head.in_features) if head_ok else (0, 0),
        head_bias=head_ok and head.bias is not None,
        tied=tie and embed_ok and head_ok and head.weight is embed.weight,
        module_names=tuple(n for n, _ in model.named_modules() if n),
    )


@dataclass(frozen=True, eq=False)
class TokenRows:
    """Trained rows that replace a module's rows for some token ids."""

    indices: torch.Tensor
    """`[k]` int64, distinct token ids in the module's range."""
    rows: torch.Tensor
    """`[k, hidden]` in the serving dtype: row j replaces the base row `indices[j]`."""

    def __post_init__(self) -> None:
        if self.indices.ndim != 1 or self.rows.ndim != 2 or len(self.indices) != len(self.rows):
            raise ValueError(
                f"inconsistent token rows: indices {tuple(self.indices.shape)}, rows "
                f"{tuple(self.rows.shape)}"
            )


@dataclass(frozen=True, eq=False)
class FullModules:
    """An adapter's replacements for the input embedding and the output head.

    For each token of a sequence using the adapter, in PEFT's order:
    embedding = (embed_table or base table)[id], then the row of `embed_tokens` if id is one
    of its indices; logits = x @ (head_weight or base head).T + head_bias, with the logit of
    each id in `head_tokens.indices` computed from its row instead. A module never has both
    a full copy and token rows. Tensors may be shared (tied modules): the same object.
    """

    embed_table: torch.Tensor | None = None
    """`[num_embeddings, embedding_dim]`, serving dtype."""
    head_weight: torch.Tensor | None = None
    """`[out_features, in_features]`, serving dtype."""
    head_bias: torch.Tensor | None = None
    """`[out_features]`, serving dtype; set iff the base head has a bias and `head_weight` is set."""
    embed_tokens: TokenRows | None = None
    head_tokens: TokenRows | None = None

    @property
    def has_tables(self) -> bool:
        """Whether a full copy is held (these take the bounded full-module device room)."""
        return self.embed_table is not None or self.head_weight is not None

    @property
    def num_bytes(self) -> int:
        """Bytes held, counting a shared tensor once."""
        seen: dict[int, int] = {}
        for t in (self.embed_table, self.head_weight, self.head_bias):
            if t is not None:
                seen[id(t)] = t.nbytes
        for rows in (self.embed_tokens, self.head_tokens):
            if rows is not None:
                seen[id(rows.rows)] = rows.rows.nbytes + rows.indices.nbytes
        return sum(seen.values())


CONFIG_KEYS = ("modules_to_save", "trainable_token_indices")
"""The adapter_config.json options this module serves."""


def _error(detail: str) -> AdapterValidationError:
    return AdapterValidationError(detail, param="file")


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _is_set(value: object) -> bool:
    return value is not None and value != [] and value != {}


def _match(entry: object, option: str, spec: EmbeddingTargets) -> str:
    """The served module `entry` names, by PEFT's rule (any module path ending in it)."""
    if not isinstance(entry, str) or not entry:
        raise _error(f"{CONFIG_FILE}: {option} entries must be module names, got {_short(entry)}")
    matched = [n for n in spec.module_names if n.endswith(entry)]
    served = {p for p in (spec.embed_path, spec.head_path) if p is not None}
    others = [n for n in matched if n not in served]
    if others or not matched:
        found = f"it matches {_short(others[:4])}" if others else "it matches no module"
        raise _error(
            f"{CONFIG_FILE}: {option} entry {entry!r} is not servable ({found}): only the "
            f"output head ({spec.head_path!r}) and the input embedding ({spec.embed_path!r}) "
            "can be saved in full or given trainable token rows"
        )
    if len(matched) > 1:
        raise _error(
            f"{CONFIG_FILE}: {option} entry {entry!r} matches both {_short(matched)}; name one"
        )
    return matched[0]


def _indices(value: object, module: str, rows: int) -> list[int]:
    where = f"{CONFIG_FILE}: trainable_token_indices for {module!r}"
    if not isinstance(value, list) or not value:
        raise _error(f"{where} must be a non-empty list of token ids, got {_short(value)}")
    if any(not isinstance(i, int) or isinstance(i, bool) for i in value):
        raise _error(f"{where} must hold integers only, got {_short(value)}")
    bad = [i for i in value if not 0 <= i < rows]
    if bad:
        raise _error(
            f"{where}: token ids {_short(bad[:8])} are out of range: the base model's "
            f"{module!r} has {rows} rows (ids 0..{rows - 1})"
        )
    if len(set(value)) != len(value):
        dup = sorted({i for i in value if value.count(i) > 1})
        raise _error(f"{where}: token ids {_short(dup[:8])} appear more than once")
    return value


def _cast(key: str, tensor: torch.Tensor, shape: tuple[int, ...], why: str, dtype: torch.dtype):
    if tuple(tensor.shape) != shape:
        raise _error(
            f"{WEIGHTS_FILE}: tensor {key!r} has shape {list(tensor.shape)}; expected "
            f"{list(shape)} ({why}; adapter made for a different base model or a resized "
            "vocabulary?)"
        )
    if not tensor.is_floating_point():
        raise _error(f"{WEIGHTS_FILE}: tensor {key!r} has dtype {tensor.dtype}; expected floats")
    # Cast first: a value finite in the file may overflow the serving dtype.
    out = tensor.to(dtype).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise _error(
            f"{WEIGHTS_FILE}: tensor {key!r} has non-finite values (NaN or Inf as "
            f"{str(dtype).removeprefix('torch.')}); the adapter's weights are corrupt"
        )
    return out


def _resolve_tokens(
    config: dict[str, Any], spec: EmbeddingTargets
) -> tuple[dict[str, list[int]], bool]:
    """Module -> token ids with rows of its own in the file, and whether the tied head
    takes the embedding's rows (PEFT's trainable-tokens weight tying)."""
    raw = config.get("trainable_token_indices")
    if not _is_set(raw):
        return {}, False
    if isinstance(raw, list):
        if spec.embed_path is None:
            raise _error(
                f"{CONFIG_FILE}: trainable_token_indices needs an input embedding "
                "(nn.Embedding), which this base model does not have"
            )
        named = {spec.embed_path: raw}
    elif isinstance(raw, dict):
        named = {}
        for name, ids in raw.items():
            module = _match(name, "trainable_token_indices", spec)
            if module in named:
                raise _error(
                    f"{CONFIG_FILE}: trainable_token_indices names {module!r} twice "
                    f"({_short(list(raw))})"
                )
            named[module] = ids
    else:
        raise _error(
            f"{CONFIG_FILE}: trainable_token_indices must be a list of token ids or an "
            f"object mapping module names to lists, got {_short(raw)}"
        )
    tokens = {}
    for module, ids in named.items():
        rows = spec.embed_shape[0] if module == spec.embed_path else spec.head_shape[0]
        tokens[module] = _indices(ids, module, rows)
    tied_head = False
    embed, head = spec.embed_path, spec.head_path
    if spec.tied and embed in tokens:
        ewt = bool(config.get("ensure_weight_tying", False))
        if head in tokens:
            head_name = next(n for n in raw if _match(n, "trainable_token_indices", spec) == head)
            if tokens[head] != tokens[embed]:
                if ewt:
                    raise _error(
                        f"{CONFIG_FILE}: trainable_token_indices gives the tied {embed!r} and "
                        f"{head!r} different token ids while ensure_weight_tying is true "
                        "(PEFT refuses this)"
                    )
            elif head_name != head:
                raise _error(
                    f"{CONFIG_FILE}: trainable_token_indices names the tied head as "
                    f"{head_name!r}; PEFT ties it only when named {head!r}"
                )
            else:
                # Same ids: PEFT wraps only the embedding and ties the head to its rows.
                del tokens[head]
                tied_head = True
        else:
            tied_head = True
    return tokens, tied_head


def parse_full_modules(
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    spec: EmbeddingTargets | None,
    dtype: torch.dtype,
) -> FullModules | None:
    """Validate `config`'s modules_to_save / trainable_token_indices against the base and
    take their tensors out of `tensors` (what is left are the LoRA weights).

    Returns None for a plain LoRA adapter. Raises AdapterValidationError naming the option,
    key or shape at fault; `spec` None (the base's embeddings are unknown to the caller)
    refuses any adapter that uses these options.
    """
    mts_raw = config.get("modules_to_save")
    tokens_raw = config.get("trainable_token_indices")
    uses = [k for k in CONFIG_KEYS if _is_set(config.get(k))]
    if spec is None:
        if uses:
            raise _error(
                f"{CONFIG_FILE}: {uses[0]} cannot be validated here: the base model's "
                "embedding shapes were not given"
            )
        return None
    prefixes = [p for p in (spec.embed_path, spec.head_path) if p is not None]
    saved = {
        k
        for k in tensors
        if any(k.startswith(f"{_PREFIX}{p}.") and ".lora_" not in k for p in prefixes)
    }
    if not uses and not saved:
        return None
    ewt = config.get("ensure_weight_tying", False)
    if ewt is not None and not isinstance(ewt, bool):
        raise _error(f"{CONFIG_FILE}: ensure_weight_tying must be true or false, got {_short(ewt)}")

    full: set[str] = set()
    if _is_set(mts_raw):
        if not isinstance(mts_raw, list):
            raise _error(f"{CONFIG_FILE}: modules_to_save must be a list, got {_short(mts_raw)}")
        full = {_match(entry, "modules_to_save", spec) for entry in mts_raw}
    tokens, tied_head = _resolve_tokens(config, spec)
    embed, head = spec.embed_path, spec.head_path
    shared = spec.tied and bool(ewt) and bool(full)
    if shared:  # PEFT saves both copies and ties them
        full = {embed, head}  # type: ignore[arg-type]
    both = sorted(full & set(tokens)) or ([head] if tied_head and head in full else [])
    if both:
        raise _error(
            f"{CONFIG_FILE}: {both[0]!r} is both saved in full (modules_to_save) and given "
            "trainable token rows (trainable_token_indices"
            f"{', through weight tying' if head in both and head not in tokens else ''}); "
            "PEFT cannot serve both on one module"
        )

    expected: dict[str, str] = {}
    if embed in full:
        expected[f"{_PREFIX}{embed}.weight"] = "embed"
    if head in full:
        expected[f"{_PREFIX}{head}.weight"] = "head"
        if spec.head_bias:
            expected[f"{_PREFIX}{head}.bias"] = "bias"
    for module in tokens:
        expected[f"{_PREFIX}{module}.{_DELTA}"] = module
    for key in sorted(saved - set(expected)):
        module = embed if embed is not None and key.startswith(f"{_PREFIX}{embed}.") else head
        raise _error(
            f"{WEIGHTS_FILE}: unexpected tensor {key!r} for {module!r}: {CONFIG_FILE}'s "
            f"modules_to_save {_short(mts_raw)} / trainable_token_indices {_short(tokens_raw)} "
            "do not call for it (PEFT would not load it)"
        )
    for key in expected:
        if key not in tensors:
            raise _error(
                f"{WEIGHTS_FILE}: missing tensor {key!r}, which {CONFIG_FILE}'s modules_to_save / "
                "trainable_token_indices call for (PEFT would fail to load the adapter)"
            )

    out: dict[str, Any] = {}
    if embed in full:
        key = f"{_PREFIX}{embed}.weight"
        out["embed_table"] = _cast(
            key, tensors.pop(key), spec.embed_shape, "the base's input embedding", dtype
        )
    if head in full:
        key = f"{_PREFIX}{head}.weight"
        weight = _cast(key, tensors.pop(key), spec.head_shape, "the base's output head", dtype)
        if shared:
            if not torch.equal(weight, out["embed_table"]):
                raise _error(
                    f"{WEIGHTS_FILE}: {key!r} differs from {_PREFIX}{embed}.weight, but the "
                    "base ties them and ensure_weight_tying is true: PEFT would serve one "
                    "table for both"
                )
            weight = out["embed_table"]
        out["head_weight"] = weight
        if spec.head_bias:
            key = f"{_PREFIX}{head}.bias"
            bias = tensors.pop(key)
            out["head_bias"] = _cast(
                key, bias, (spec.head_shape[0],), "the base head's bias", dtype
            )
    for module, ids in tokens.items():
        if module == head and spec.head_bias:
            raise _error(
                f"{CONFIG_FILE}: trainable_token_indices for the head {head!r}: this base's "
                "head has a bias, which PEFT drops for such adapters; not served"
            )
        key = f"{_PREFIX}{module}.{_DELTA}"
        dim = spec.embed_shape[1] if module == embed else spec.head_shape[1]
        rows = _cast(key, tensors.pop(key), (len(ids), dim), f"{len(ids)} token ids", dtype)
        field = "embed_tokens" if module == embed else "head_tokens"
        out[field] = TokenRows(indices=torch.tensor(ids, dtype=torch.long), rows=rows)
    if tied_head:
        if spec.head_bias:
            raise _error(
                f"{CONFIG_FILE}: trainable_token_indices on a tied embedding also replace the "
                "head's rows, and this base's head has a bias, which PEFT then drops; not served"
            )
        out["head_tokens"] = out["embed_tokens"]
    return FullModules(**out)
