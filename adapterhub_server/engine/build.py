"""Assemble an engine from a resolved base model, an engine config and adapter sources."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from adapterhub_server.base_model import ResolvedBaseModel, weights_fingerprint
from adapterhub_server.config import EngineConfig
from adapterhub_server.engine import kv_sizing
from adapterhub_server.engine.decode_graphs import DecodeGraphs
from adapterhub_server.engine.engine import LLMEngine
from adapterhub_server.engine.kv_blocks import BlockPool
from adapterhub_server.engine.kv_cache_manager import KVCacheManager
from adapterhub_server.engine.structured import GrammarCompiler
from adapterhub_server.errors import BaseModelError
from adapterhub_server.lora.adapter import adaptable_modules
from adapterhub_server.lora.cache import AdapterCache, AdapterSource, StaticAdapterSource
from adapterhub_server.lora.full_module_store import FullModuleStore
from adapterhub_server.lora.full_modules import EmbeddingTargets, embedding_targets
from adapterhub_server.lora.layers import LoRAContext, PackedLoRALinear
from adapterhub_server.lora.pool import LoRAWeightPool, PackedGroup, packed_groups
from adapterhub_server.models import attention_interface
from adapterhub_server.models.attention import KVCache, build_attention_metadata
from adapterhub_server.models.causal_lm import BatchedCausalLM, replace_module

logger = logging.getLogger(__name__)

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
    hf_config = _servable_config(base.path)
    attention_interface.register()
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            base.path,
            config=hf_config,
            dtype=dtype,
            attn_implementation=attention_interface.ATTENTION,
        )
        tokenizer = AutoTokenizer.from_pretrained(base.path)
    except (OSError, ValueError) as exc:
        # Also what transformers raises for a family whose attention does not go through
        # its attention interface (it refuses the custom implementation).
        raise BaseModelError(
            f"cannot load base model {base.model_id} (model type {hf_config.model_type!r}) "
            f"with the engine's attention: {exc}"
        ) from exc
    hf = hf.to(device).eval().requires_grad_(False)
    targets = adaptable_modules(hf)
    embeddings = embedding_targets(hf)  # before any module is swapped
    groups = packed_groups(targets)
    pool = LoRAWeightPool(
        groups,
        max_slots=config.max_loras,
        dtype=dtype,
        weight_dtype=config.torch_lora_dtype(),
        device=device,
    )
    context = LoRAContext()
    _install_lora_layers(hf, groups, pool, context)
    try:
        model = BatchedCausalLM(hf, context)
    except AttributeError as exc:  # no attention heads, layers or vocabulary in the config
        raise BaseModelError(
            f"model type {hf_config.model_type!r} is not servable: it is not a transformer "
            f"decoder with attention layers ({exc})"
        ) from exc

    max_pos = model.shape.max_position_embeddings
    batch_rope_limit = _batch_wide_rope_limit(hf.config)
    default_len = min(max_pos, _DEFAULT_MAX_LEN, batch_rope_limit or max_pos)
    max_model_len = config.max_model_len or default_len
    if max_model_len > max_pos:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's {max_pos}")
    if batch_rope_limit is not None and max_model_len > batch_rope_limit:
        raise BaseModelError(
            f"model type {hf_config.model_type!r}: its RoPE scaling switches factors for a "
            f"whole forward pass once any position reaches {batch_rope_limit}, which in a "
            "batch of many sequences would change every other sequence's positions; serve it "
            f"with --max-model-len {batch_rope_limit} or less"
        )
    windows = _check_attention(model, _kv_cache(model, config, 2), hf_config.model_type)
    # Blocks behind a window can be released only when every layer slides.
    window = None
    if all(w is not None for w in windows.values()):
        window = max(w for w in windows.values() if w is not None)
    num_blocks, budget_note = _num_blocks(model, config, groups, dtype, device, embeddings)
    kv = _kv_cache(model, config, num_blocks)
    blocks = BlockPool(num_blocks, config.block_size, prefix_caching=config.prefix_caching)
    blocks.on_first_use = kv.zero_blocks
    kv_manager = KVCacheManager(blocks, sliding_window=window)
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
        embeddings=embeddings,
        full_modules=FullModuleStore(config.max_full_module_adapters, device=device, dtype=dtype),
    )
    for name in lora_modules or {}:
        adapters.load_now(adapters.locate(name))

    eos = _eos_token_ids(hf, tokenizer)
    grammars = _grammar_compiler(tokenizer, model.shape.vocab_size, eos, config)
    lora_backend = config.lora_backend()
    graphs = None
    if config.use_cuda_graphs():
        graphs = DecodeGraphs(
            model, kv, pool, max_num_seqs=config.max_num_seqs, max_model_len=max_model_len
        )
    logger.info(
        "engine ready: %s on %s/%s, max_model_len=%d, KV cache %s (%s) = %d blocks of %d "
        "= %d tokens, prefix caching %s, LoRA ops %s (%s weights), decode %s, load %.1f s",
        base.model_id,
        device,
        str(dtype).removeprefix("torch."),
        max_model_len,
        kv_sizing.format_bytes(kv.nbytes),
        budget_note,
        blocks.usable_blocks,
        config.block_size,
        blocks.usable_blocks * config.block_size,
        "on" if config.prefix_caching else "off",
        lora_backend,
        str(pool.weight_dtype).removeprefix("torch."),
        "CUDA graphs" if graphs else "eager",
        time.perf_counter() - t0,
    )
    return LLMEngine(
        model=model,
        tokenizer=tokenizer,
        kv_cache=kv,
        kv_manager=kv_manager,
        adapters=adapters,
        base_identity=weights_fingerprint(base.path),
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=max_model_len,
        eos_token_ids=eos,
        device=device,
        lora_backend=lora_backend,
        decode_graphs=graphs,
        grammar_compiler=grammars,
        grammar_compile_timeout=config.grammar_compile_timeout,
    )


def _grammar_compiler(
    tokenizer: object, vocab_size: int, eos: set[int], config: EngineConfig
) -> GrammarCompiler | None:
    """The structured-output compiler for this tokenizer, or None (with a warning) where
    llguidance cannot use it (a slow tokenizer, no EOS): such requests then get a 400."""
    try:
        return GrammarCompiler(
            tokenizer,
            vocab_size=vocab_size,
            eos_token_ids=eos,
            cache_size=config.grammar_cache_size,
        )
    except Exception as exc:  # an optional feature must not stop the server
        logger.warning("structured outputs are unavailable for this tokenizer: %s", exc)
        return None


def _servable_config(path: Path) -> object:
    """The checkpoint's config, if the engine can serve it; else a `BaseModelError` that
    names the model type and what is missing."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot read the base model's config: {exc}") from exc
    model_type = hf_config.model_type
    if getattr(hf_config, "quantization_config", None):
        raise BaseModelError(
            f"model type {model_type!r}: quantized checkpoints (quantization_config) are not "
            "served yet; use the unquantized weights"
        )
    if (
        getattr(hf_config, "text_config", None) is not None
        or getattr(hf_config, "vision_config", None) is not None
    ):
        raise BaseModelError(
            f"model type {model_type!r} is a multimodal wrapper; serve its text model instead "
            "(a checkpoint of the language model alone, e.g. model type "
            f"{getattr(getattr(hf_config, 'text_config', None), 'model_type', 'the text part')!r})"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(
        hf_config, "is_encoder_decoder", False
    ):
        raise BaseModelError(
            f"model type {model_type!r} is not a decoder-only causal LM that transformers "
            "implements"
        )
    return hf_config


def _batch_wide_rope_limit(hf_config: object) -> int | None:
    """The length past which the model's rotary embedding changes for the whole forward
    (Phi-3's longrope, dynamic NTK scaling decide from the largest position in the batch),
    or None when each token's rotation depends on its own position only."""
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return None
    layers = rope.values() if all(isinstance(v, dict) for v in rope.values()) else [rope]
    for params in layers:
        kind = params.get("rope_type", params.get("type"))
        if kind in ("longrope", "dynamic"):
            original = params.get("original_max_position_embeddings") or getattr(
                hf_config, "original_max_position_embeddings", None
            )
            if original:
                return int(original)
    return None


def _install_lora_layers(
    hf: torch.nn.Module, groups: list[PackedGroup], pool: LoRAWeightPool, context: LoRAContext
) -> None:
    """Swap every adaptable linear for its batched-LoRA layer: one module for a single
    projection, one fused GEMM shared by the members of a packed group (q/k/v, gate/up)."""
    for group in groups:
        bases = [hf.get_submodule(path) for path in group.modules]
        packed = PackedLoRALinear(bases, group.key, pool, context)
        if len(group.modules) == 1:
            replace_module(hf, group.modules[0], packed)
            continue
        for path, member in zip(group.modules, packed.members()):
            replace_module(hf, path, member)


def _check_attention(model: BatchedCausalLM, kv: KVCache, model_type: str) -> dict[int, int | None]:
    """Every layer must attend through the engine's attention (and so its KV cache);
    returns each layer's sliding window (None: it sees every key)."""
    meta = build_attention_metadata([[1]], [0], [], kv.block_size, kv.k.device)
    try:
        windows = model.layers_attending(meta, kv)
    except attention_interface.UnsupportedAttentionError as exc:
        raise BaseModelError(f"model type {model_type!r}: {exc}") from exc
    missing = sorted(set(range(model.shape.num_layers)) - set(windows))
    if missing:
        raise BaseModelError(
            f"model type {model_type!r} is not servable: layers {missing} do not use "
            "transformers' attention interface"
        )
    return windows


def _kv_cache(model: BatchedCausalLM, config: EngineConfig, num_blocks: int) -> KVCache:
    return KVCache(
        num_layers=model.shape.num_layers,
        num_blocks=num_blocks,
        block_size=config.block_size,
        num_kv_heads=model.shape.num_kv_heads,
        head_dim=model.shape.head_dim,
        dtype=config.torch_dtype(),
        device=config.torch_device(),
    )


def _num_blocks(
    model: BatchedCausalLM,
    config: EngineConfig,
    groups: list[PackedGroup],
    dtype: torch.dtype,
    device: torch.device,
    embeddings: EmbeddingTargets,
) -> tuple[int, str]:
    """How many KV blocks the budget holds, and where the budget came from (for the log)."""
    per_block = KVCache.bytes_per_block(
        num_layers=model.shape.num_layers,
        block_size=config.block_size,
        num_kv_heads=model.shape.num_kv_heads,
        head_dim=model.shape.head_dim,
        dtype=dtype,
    )
    if config.kv_cache_memory is not None:
        budget, note = config.kv_cache_memory, "--kv-cache-memory"
    elif device.type != "cuda":
        budget, note = kv_sizing.DEFAULT_CPU_KV_CACHE_BYTES, "default on CPU"
    else:
        budget = _gpu_kv_budget(model, config, groups, dtype, device, embeddings)
        note = f"--gpu-memory-utilization {config.gpu_memory_utilization}"
    try:
        return kv_sizing.num_blocks_for(budget, per_block), note
    except ValueError as exc:
        raise BaseModelError(str(exc)) from exc


def _gpu_kv_budget(
    model: BatchedCausalLM,
    config: EngineConfig,
    groups: list[PackedGroup],
    dtype: torch.dtype,
    device: torch.device,
    embeddings: EmbeddingTargets,
) -> int:
    """Run the largest step the scheduler can form (a full token budget of prefill) on a
    cache just big enough for it, and give the KV cache what the utilization target leaves
    after that peak, the adapter slots' full size and the memory outside torch."""
    tokens = config.max_num_batched_tokens
    probe = _kv_cache(model, config, -(-tokens // config.block_size) + 1)
    blocks = list(range(1, probe.num_blocks))
    meta = build_attention_metadata([], [], [(blocks, 0, tokens)], config.block_size, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    last = torch.tensor([tokens - 1], device=device)
    model(ids, torch.arange(tokens, device=device), meta, probe, None, last)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del probe, meta, ids, last
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, (total - free) - torch.cuda.memory_reserved(device))
    reserve = kv_sizing.adapter_pool_bytes(
        ((g.in_features, g.out_features) for g in groups),
        slots=config.max_loras,
        max_rank=config.max_lora_rank,
        element=torch.empty(0, dtype=dtype).element_size(),
    )
    # Full-module copies are allocated when adapters need them; their bound is kept free.
    element = torch.empty(0, dtype=dtype).element_size()
    reserve += config.max_full_module_adapters * embeddings.full_bytes(element)
    try:
        return kv_sizing.gpu_kv_budget(
            total_bytes=total,
            utilization=config.gpu_memory_utilization,
            peak_torch_bytes=peak,
            non_torch_bytes=non_torch,
            adapter_reserve_bytes=reserve,
        )
    except ValueError as exc:
        raise BaseModelError(str(exc)) from exc


def _eos_token_ids(hf: torch.nn.Module, tokenizer: object) -> set[int]:
    ids: set[int] = set()
    gen = getattr(hf, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
