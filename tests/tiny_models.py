"""Tiny random-weight Llama models and PEFT adapters for fast CPU tests.

Nothing here downloads: the tokenizer is a byte-level BPE trained in-process on a short
text, the weights are random with a fixed seed. Weights use a larger init range than a
real model so that logits are peaked and greedy decoding is not decided by rounding noise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = (
    "the quick brown fox jumps over the lazy dog. hello world, this is a tiny tokenizer "
    "for adapterhub tests. numbers 0 1 2 3 4 5 6 7 8 9 and letters abcdefghijklmnopqrstuvwxyz "
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ. what is the capital of france? paris is the capital. "
)

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE fast tokenizer with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
    init_std: float = 0.2,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a random LlamaForCausalLM plus tokenizer as an HF directory at `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    r: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = ALL_PROJECTIONS,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    b_std: float = 0.3,
    use_dora: bool = False,
) -> Path:
    """Save a PEFT LoRA adapter for the model at `base_dir` with random (non-zero) A and B.

    B is random rather than PEFT's zero init so that the adapter changes the output; with
    `use_dora`, a DoRA adapter whose magnitudes are randomised too (`randomise_dora`).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    if use_dora:
        randomise_dora(model, seed, b_std=b_std)
    else:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
                elif "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * b_std)
    model.save_pretrained(out_dir)
    return out_dir


def randomise_dora(model: torch.nn.Module, seed: int, *, b_std: float = 0.3) -> None:
    """Random A and B (PEFT starts B at zero) and magnitudes 0.5x-1.5x of PEFT's initial
    ones (the base rows' norms), so that g = m / ||W + s B A|| is far from 1 and varies."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "lora_A" in name:
                param.copy_(noise * 0.3)
            elif "lora_B" in name:
                param.copy_(noise * b_std)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.rand(param.shape, generator=gen) * noise.sign())


def read_adapter_config(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text())
