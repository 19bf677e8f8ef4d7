"""Assemble an engine from a resolved base model, an engine config and adapter sources."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.decode_graphs import DecodeGraphs
from adapterhub_server.engine.engine import LLMEngine
from adapterhub_server.errors import BaseModelError
from adapterhub_server.lora.adapter import adaptable_modules
from adapterhub_server.lora.cache import AdapterCache, AdapterSource, StaticAdapterSource
from adapterhub_server.lora.layers import LoRAContext
from adapterhub_server.lora.pool import LoRAWeightPool, packed_groups
from adapterhub_server.models.attention import KVCache
from adapterhub_server.models.llama import BatchedLlama

logger = logging.getLogger(__name__)

_SUPPORTED = {"llama", "mistral", "qwen2"}
_DEFAULT_MAX_LEN = 2048


def build_engine(
    base: ResolvedBaseModel,
    config: EngineConfig,
    *,
    lora_modules: Mapping[str, Path] | None = None,
    source: AdapterSource | None = None,
) -> LLMEngine:
    """Load the base model once and build the engine around it.

    Adapters come from `source`, or from `lora_modules` (name -> PEFT dir); those given at
    start-up are validated now, so a bad one fails the start rather than a request.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device, dtype = config.torch_device(), config.torch_dtype()
    t0 = time.perf_counter()
    try:
        hf = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(base.path)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load base model from {base.path}: {exc}") from exc
    model_type = getattr(hf.config, "model_type", "")
    if model_type not in _SUPPORTED:
        raise BaseModelError(
            f"model type {model_type!r} is not supported (supported: {sorted(_SUPPORTED)})"
        )
    if getattr(hf.config, "sliding_window", None) and model_type == "mistral":
        logger.warning("sliding-window attention is ignored; keep max_model_len within it")
    hf = hf.to(device).eval().requires_grad_(False)
    targets = adaptable_modules(hf)
    pool = LoRAWeightPool(
        packed_groups(targets), max_slots=config.max_loras, dtype=dtype, device=device
    )
    context = LoRAContext()
    model = BatchedLlama(hf, pool, context)

    max_pos = model.shape.max_position_embeddings
    max_model_len = config.max_model_len or min(max_pos, _DEFAULT_MAX_LEN)
    if max_model_len > max_pos:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's {max_pos}")
    kv = KVCache(
        num_layers=model.shape.num_layers,
        rows=config.max_num_seqs,
        num_kv_heads=model.shape.num_kv_heads,
        max_len=max_model_len,
        head_dim=model.shape.head_dim,
        dtype=dtype,
        device=device,
    )
    if source is None:
        source = StaticAdapterSource(lora_modules or {})
    assert config.max_cpu_loras is not None
    adapters = AdapterCache(
        source,
        pool,
        targets,
        max_loras=config.max_loras,
        max_cpu_loras=config.max_cpu_loras,
        max_lora_rank=config.max_lora_rank,
    )
    for name in lora_modules or {}:
        adapters.load_now(adapters.locate(name))

    eos = _eos_token_ids(hf, tokenizer)
    use_kernels = config.use_lora_kernels()
    graphs = None
    if config.use_cuda_graphs():
        graphs = DecodeGraphs(model, kv, pool, max_num_seqs=config.max_num_seqs)
    logger.info(
        "engine ready: %s on %s/%s, max_model_len=%d, kv cache %.0f MiB, LoRA ops %s, "
        "decode %s, load %.1f s",
        base.model_id,
        device,
        str(dtype).removeprefix("torch."),
        max_model_len,
        kv.nbytes / 2**20,
        "triton" if use_kernels else "torch",
        "CUDA graphs" if graphs else "eager",
        time.perf_counter() - t0,
    )
    return LLMEngine(
        model=model,
        tokenizer=tokenizer,
        kv_cache=kv,
        adapters=adapters,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=max_model_len,
        eos_token_ids=eos,
        device=device,
        use_lora_kernels=use_kernels,
        decode_graphs=graphs,
    )


def _eos_token_ids(hf: torch.nn.Module, tokenizer: object) -> set[int]:
    ids: set[int] = set()
    gen = getattr(hf, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
