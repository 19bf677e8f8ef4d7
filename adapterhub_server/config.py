"""Typed configuration of the engine and the server, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from adapterhub_server.lora.ops import LoRABackend

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024**2
"""Largest JSON request body by default (uploads have their own, larger limit)."""
DEFAULT_MAX_PROMPTS_PER_REQUEST = 64
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json", "mistral")
"""`--tool-call-parser` values (`api/tools/parsers.py` implements the three formats)."""
"""Most completions one request may ask for (prompts x `n`) by default."""
DEFAULT_MAX_FINE_TUNING_TOKENS = 100_000_000
"""Most tokens one fine-tuning job may train on by default (see `ServerConfig`)."""


@dataclass
class EngineConfig:
    """Capacity and numerics of the inference engine."""

    max_num_seqs: int = 256
    """Cap on sequences running at once; below it, free KV blocks decide admission."""
    max_model_len: int | None = None
    """Prompt + generated tokens per sequence; default min(model context, 2048)."""
    max_num_batched_tokens: int = 512
    """Token budget per step; long prompts are prefilled in chunks so decodes keep going."""
    max_loras: int = 32
    """Adapters resident in device slots at once."""
    max_cpu_loras: int | None = None
    """Parsed adapters kept in host memory; default 2 x max_loras."""
    max_lora_rank: int = 64
    """Largest adapter rank accepted."""
    max_full_module_adapters: int = 4
    """Adapters whose full copies of the output head / input embedding (PEFT's
    modules_to_save) are on the device at once, evicted least-recently-used when idle; a
    request whose adapter finds no room waits. Each copy costs vocab x hidden elements per
    module (SmolLM2-135M: 57 MB per module in bfloat16; a 1B Llama-3: 525 MB), reserved
    up front from the KV budget on CUDA. 0 refuses such adapters."""
    dtype: str = "auto"
    """auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16."""
    lora_dtype: str = "auto"
    """The dtype adapter weights are kept in on the device: auto (the serving `dtype`),
    float32 or bfloat16. bfloat16 under a float32 model on CPU halves the bytes a decode
    step reads for its adapters: the CPU kernel widens each weight to float32 as it loads
    it, and activations and sums stay float32, so only the weights are rounded (once, with
    the scale alpha/r folded into B). On CUDA it must be the serving dtype."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    num_threads: int | None = None
    """CPU threads for torch; None keeps torch's default."""
    lora_kernel: str = "auto"
    """`auto`: the Triton kernels on CUDA when Triton is installed, the fused C kernel for
    float32 or bfloat16 on CPU where it builds (a C compiler, Linux), else torch ops; `triton` or `cpu`
    require that kernel; `torch` forces the torch ops."""
    cuda_graphs: bool = True
    """On CUDA with the Triton LoRA kernels, replay decode steps from CUDA graphs captured
    per batch and key-length bucket; False runs every step eagerly (for debugging)."""
    block_size: int = 16
    """Token positions per KV cache block."""
    kv_cache_memory: int | None = None
    """Bytes of KV cache; None: 2 GiB on CPU, and on CUDA what `gpu_memory_utilization`
    leaves after the weights, the adapter slots and one full step."""
    gpu_memory_utilization: float = 0.9
    """On CUDA without `kv_cache_memory`: the fraction of the device's total memory the
    engine may use for weights, adapters, activations and KV together (as vLLM means it)."""
    prefix_caching: bool = True
    """Reuse cached KV blocks of earlier sequences with the same adapter and prefix."""
    max_queued_requests: int = 256
    """Requests accepted beyond the running batch; past it new requests get HTTP 429 with
    Retry-After at once, so memory stays flat under overload."""
    grammar_compile_timeout: float = 10.0
    """Seconds a structured output's grammar (JSON schema, regex, choice list, grammar) may
    take to compile, on a worker thread; past it the request gets HTTP 400. Typical
    schemas compile in about a millisecond."""
    grammar_cache_size: int = 256
    """Compiled grammars kept for reuse, least recently used dropped first; 0 compiles
    every request's grammar anew."""

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        if not 0 < self.grammar_compile_timeout < float("inf"):
            raise ValueError("grammar_compile_timeout must be a positive, finite number of seconds")
        if self.grammar_cache_size < 0:
            raise ValueError("grammar_cache_size must be >= 0")
        if self.max_full_module_adapters < 0:
            raise ValueError("max_full_module_adapters must be >= 0")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = 2 * self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        if self.lora_kernel not in ("auto", "triton", "cpu", "torch"):
            raise ValueError(f"unknown lora_kernel {self.lora_kernel!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.lora_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"unknown lora_dtype {self.lora_dtype!r}")
        self.torch_lora_dtype()  # refuses a combination that cannot serve, at start
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError("kv_cache_memory must be >= 1 byte")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def lora_backend(self) -> LoRABackend:
        """The batched-LoRA backend for this config's device and dtype (`lora_backend`)."""
        from adapterhub_server.lora.ops import lora_backend

        return lora_backend(
            self.lora_kernel, self.torch_device(), self.torch_dtype(), self.torch_lora_dtype()
        )

    def use_cuda_graphs(self) -> bool:
        """Whether decode steps replay CUDA graphs on this config's device."""
        return (
            self.cuda_graphs
            and self.torch_device().type == "cuda"
            and self.lora_backend().supports_cuda_graphs
        )

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def torch_lora_dtype(self) -> torch.dtype:
        """The adapter weights' dtype (`lora_dtype`); ValueError where it cannot serve."""
        serving = self.torch_dtype()
        if self.lora_dtype == "auto":
            return serving
        weights = getattr(torch, self.lora_dtype)
        if weights != serving and self.torch_device().type != "cpu":
            # The Triton kernels and the decode graphs read weights in the serving dtype.
            raise ValueError(
                f"lora_dtype {self.lora_dtype} differs from the serving dtype "
                f"{str(serving).removeprefix('torch.')}: only CPU serving keeps adapter "
                "weights in another dtype"
            )
        return weights


@dataclass
class ServerConfig:
    """How the HTTP server is started."""

    host: str = "127.0.0.1"
    """Interface to bind; loopback by default so nothing is exposed by accident."""
    port: int = 8000
    base_model: str | None = None
    """Local HF directory, hub id, or None for the embedded default (SmolLM2-135M-Instruct)."""
    served_model_name: str | None = None
    """Id clients use for the base model; default the resolved model id."""
    model_cache_dir: Path | None = None
    """Where converted/downloaded base models are cached."""
    lora_modules: dict[str, Path] = field(default_factory=dict)
    """Adapters to serve from start-up, name -> PEFT directory."""
    registry: Path | str | None = None
    """Adapter registry directory or ``postgresql://`` URL (shared by replicas); None serves
    only ``lora_modules`` (no /v1/adapters)."""
    registry_blobs: str | None = None
    """Blob store of a ``postgresql://`` registry (``file:///path``, ``s3://bucket/prefix``);
    None = ``$ADAPTERHUB_REGISTRY_BLOBS``."""
    max_upload_bytes: int = 2 * 1024**3
    """Largest accepted upload, adapter or training file (counted while the body is read)."""
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """Largest accepted body of any other request (JSON), counted the same way."""
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST
    """Most completions one request may ask for (prompts x `n`); more is a 400 at once.
    Capped at `max_num_seqs + max_queued_requests` (see `prompts_per_request_limit`)."""
    tool_call_parser: str = "auto"
    """How chat outputs are read for tool calls: `auto` (from the chat template; `hermes`
    where the template renders no tools), `hermes`, `llama3_json` or `mistral`."""
    fine_tuning: bool = True
    """Serve `/v1/files` and `/v1/fine_tuning/jobs` (only with a registry to publish into)."""
    jobs_dir: Path | None = None
    """Fine-tuning files, jobs and their index; None = `$ADAPTERHUB_JOBS_DIR`, else a
    `finetune` directory next to the registry."""
    max_concurrent_jobs: int = 1
    """Fine-tuning jobs that train at once, each in its own trainer process."""
    fine_tuning_worker: bool = False
    """With a `postgresql://` registry: this replica trains queued jobs (every replica
    serves the fine-tuning API; only workers train). A directory-registry server always
    trains its own jobs."""
    fine_tuning_lease_s: float = 60.0
    """How long a worker holds a job without renewing its lease (it renews every half
    second); a dead worker's job resumes elsewhere this long after it died."""
    max_fine_tuning_tokens: int = DEFAULT_MAX_FINE_TUNING_TOKENS
    """Most tokens one fine-tuning job may train on (examples x epochs x tokens per example,
    estimated from the uploaded file's statistics); a bigger job is a 400 at creation. 100M
    is a few hours for a 1B-class model on one GPU, or about a day for the default 135M model
    on a CPU: room for any fine-tuning run, while a pre-training-sized request is refused
    instead of holding the trainer for weeks."""
    log_level: str = "info"
    log_format: str = "text"
    """`text`, or `json` (one object per line, with the request id) for log shippers."""
    api_keys: tuple[str, ...] = ()
    """Keys for the inference scope (completions, chat, models, metrics). Admin keys hold
    this scope too."""
    admin_keys: tuple[str, ...] = ()
    """Keys for the admin scope: adapter upload/delete/aliases, files, fine-tuning jobs."""
    allow_unauthenticated: bool = False
    """Permit a non-loopback bind without any key (everyone may do everything)."""
    metrics_without_key: bool = False
    """Serve `/metrics` to callers without a key (scrapers, the inference gateway's picker)."""
    admin_loopback_without_key: bool = False
    """Treat keyless requests from 127.0.0.1 / ::1 as admin (an adapter-syncer sidecar in
    the same pod); every process and proxy that can reach loopback is trusted with it."""
    allowed_local_adapter_dirs: tuple[Path, ...] = ()
    """Directories `/v1/load_lora_adapter` may read a local `lora_path` from (nothing else
    on the file system, symlinks out of them refused); empty: local paths are refused."""
    shutdown_timeout: float = 30.0
    """Seconds SIGTERM waits for in-flight requests before aborting them."""
    timeout_keep_alive: float = 5.0
    """Seconds an idle keep-alive connection stays open between requests."""
    timeout_request_header: float = 30.0
    """Seconds allowed for a request's whole header block, from its first byte (on a fresh
    connection, from the connect); past it the client gets 408 and the connection closes."""
    timeout_request_body: float = 60.0
    """Seconds of client silence allowed between body chunks, so an upload that keeps moving
    passes however long it takes; time the server itself holds the body back (the app has
    not read it yet) does not count. Past it: 408 if no response started, and close."""
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be text or json")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")
        for name in ("timeout_keep_alive", "timeout_request_header", "timeout_request_body"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a positive, finite number of seconds")
        if any(not k for k in self.api_keys + self.admin_keys):
            raise ValueError("API keys must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.max_upload_bytes < 1 or self.max_request_bytes < 1:
            raise ValueError("max_upload_bytes and max_request_bytes must be >= 1")
        if self.max_concurrent_jobs < 1:
            raise ValueError("max_concurrent_jobs must be >= 1")
        if self.max_fine_tuning_tokens < 1:
            raise ValueError("max_fine_tuning_tokens must be >= 1")
        if self.fine_tuning_lease_s < 2:
            raise ValueError("fine_tuning_lease_s must be >= 2 (leases are renewed every 0.5 s)")
        if self.max_prompts_per_request < 1:
            raise ValueError("max_prompts_per_request must be >= 1")
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}")

    @property
    def prompts_per_request_limit(self) -> int:
        """`max_prompts_per_request`, capped at what the engine can ever hold at once
        (`max_num_seqs + max_queued_requests`): a request with more prompts could never be
        admitted, so it must be a 400, not a 429 its client retries forever."""
        capacity = self.engine.max_num_seqs + self.engine.max_queued_requests
        return min(self.max_prompts_per_request, capacity)
