"""`adapterhub-server` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from adapterhub_server import __version__
from adapterhub_server.config import (
    DEFAULT_MAX_PROMPTS_PER_REQUEST,
    DEFAULT_MAX_REQUEST_BYTES,
    TOOL_CALL_PARSERS,
    EngineConfig,
    ServerConfig,
)
from adapterhub_server.engine.kv_sizing import parse_size
from adapterhub_server.errors import AdapterHubError
from adapterhub_server.logs import configure_logging
from adapterhub_server.registry import default_registry_location
from adapterhub_server.registry.cli import add_registry_parser, run_registry_command
from adapterhub_server.registry.factory import registry_location

API_KEY_ENV = "ADAPTERHUB_API_KEY"
ADMIN_KEY_ENV = "ADAPTERHUB_ADMIN_KEY"


def _lora_module(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected name=path, got {text!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterhub-server",
        description="Serve many LoRA adapters over one frozen base model.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    d = EngineConfig()
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    serve.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    serve.add_argument(
        "--base-model",
        default=None,
        help="local HF directory, Hugging Face hub id, or omit for the embedded "
        "SmolLM2-135M-Instruct",
    )
    serve.add_argument("--served-model-name", default=None, help="id clients use for the base")
    serve.add_argument("--model-cache-dir", type=Path, default=None, help="base model cache")
    serve.add_argument(
        "--lora-modules",
        nargs="+",
        type=_lora_module,
        default=[],
        metavar="NAME=PATH",
        help="PEFT adapter directories to serve from start-up",
    )
    serve.add_argument("--max-loras", type=int, default=d.max_loras, help="device adapter slots")
    serve.add_argument(
        "--max-cpu-loras", type=int, default=None, help="parsed adapters kept in host memory"
    )
    serve.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank)
    serve.add_argument(
        "--max-full-module-adapters",
        type=int,
        default=d.max_full_module_adapters,
        help="adapters whose full lm_head / embed_tokens copies (modules_to_save) are on the "
        "device at once; each costs vocab x hidden per module (0: refuse such adapters)",
    )
    serve.add_argument(
        "--max-num-seqs",
        type=int,
        default=d.max_num_seqs,
        help="cap on sequences running at once; free KV blocks decide below it",
    )
    serve.add_argument(
        "--block-size", type=int, default=d.block_size, help="token positions per KV block"
    )
    serve.add_argument(
        "--kv-cache-memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help="KV cache size: bytes, or a number with KiB/MiB/GiB (binary) or KB/MB/GB; "
        "default 2GiB on CPU, and on CUDA what --gpu-memory-utilization leaves",
    )
    serve.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=d.gpu_memory_utilization,
        help="on CUDA without --kv-cache-memory: fraction of the device's memory for "
        "weights, adapters, activations and KV together (default: %(default)s)",
    )
    serve.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="do not reuse cached KV blocks of earlier requests with the same prefix",
    )
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    serve.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    serve.add_argument(
        "--lora-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="dtype adapter weights are kept in: auto = the serving dtype; bfloat16 under "
        "float32 on CPU halves the adapter bytes a decode step reads (activations and sums "
        "stay float32)",
    )
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    serve.add_argument(
        "--lora-kernel",
        default="auto",
        choices=["auto", "triton", "cpu", "torch"],
        help="batched LoRA ops: auto = Triton kernels on CUDA when installed, the fused C "
        "kernel for float32 or bfloat16 on CPU where a C compiler builds it, else torch ops",
    )
    serve.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="run decode steps eagerly on CUDA instead of replaying captured CUDA graphs",
    )
    serve.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    serve.add_argument(
        "--registry",
        type=registry_location,
        default=None,
        help="adapter registry directory or postgresql:// URL (env ADAPTERHUB_REGISTRY; "
        "default ~/.cache/adapterhub/registry)",
    )
    serve.add_argument(
        "--registry-blobs",
        default=None,
        metavar="URL",
        help="blob store of a postgresql:// registry: file:///path or s3://bucket/prefix "
        "(env ADAPTERHUB_REGISTRY_BLOBS)",
    )
    serve.add_argument(
        "--no-registry", action="store_true", help="serve only --lora-modules, no /v1/adapters"
    )
    serve.add_argument(
        "--max-upload-bytes",
        type=int,
        default=2 * 1024**3,
        help="size limit of adapter and training-file uploads",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="size limit of every other request body (JSON; default: %(default)s)",
    )
    serve.add_argument(
        "--max-prompts-per-request",
        type=int,
        default=DEFAULT_MAX_PROMPTS_PER_REQUEST,
        help="most completions one request may ask for, prompts x n (default: %(default)s)",
    )
    serve.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default="auto",
        help="format of the tool calls the model writes: auto detects it from the chat "
        "template (hermes where the template renders no tools) (default: %(default)s)",
    )
    serve.add_argument(
        "--jobs-dir",
        type=Path,
        default=None,
        help="fine-tuning files and jobs (env ADAPTERHUB_JOBS_DIR; default: a 'finetune' "
        "directory next to the registry)",
    )
    serve.add_argument(
        "--max-concurrent-jobs",
        type=int,
        default=1,
        help="fine-tuning jobs that train at once, each in its own process (default: 1)",
    )
    serve.add_argument(
        "--fine-tuning-worker",
        action="store_true",
        help="with a postgresql:// registry: train queued fine-tuning jobs here (every "
        "replica serves the jobs API; only workers train; a directory registry's server "
        "always trains its own jobs)",
    )
    serve.add_argument(
        "--fine-tuning-lease",
        type=float,
        default=ServerConfig.fine_tuning_lease_s,
        metavar="SECONDS",
        help="how long a worker holds a job without renewing its lease: a dead worker's job "
        "resumes on another worker after this (default: %(default)s)",
    )
    serve.add_argument(
        "--max-fine-tuning-tokens",
        type=int,
        default=ServerConfig.max_fine_tuning_tokens,
        metavar="TOKENS",
        help="most tokens one fine-tuning job may train on, examples x epochs x tokens per "
        "example, estimated at creation; bigger jobs are refused (default: %(default)s)",
    )
    serve.add_argument(
        "--no-fine-tuning",
        action="store_true",
        help="no /v1/files and /v1/fine_tuning/jobs routes, run no training jobs",
    )
    serve.add_argument(
        "--max-queued-requests",
        type=int,
        default=d.max_queued_requests,
        help="requests accepted beyond the running batch; more get 429 (default: %(default)s)",
    )
    serve.add_argument(
        "--grammar-compile-timeout",
        type=float,
        default=d.grammar_compile_timeout,
        metavar="SECONDS",
        help="time a structured output's grammar (JSON schema, regex, choice, grammar) may "
        "take to compile; past it the request gets 400 (default: %(default)s)",
    )
    serve.add_argument(
        "--grammar-cache-size",
        type=int,
        default=d.grammar_cache_size,
        metavar="N",
        help="compiled grammars kept for reuse, least recently used dropped (default: %(default)s)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for in-flight requests before aborting them "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=ServerConfig.timeout_keep_alive,
        metavar="SECONDS",
        help="close a keep-alive connection idle this long between requests (default: %(default)s)",
    )
    serve.add_argument(
        "--timeout-request-header",
        type=float,
        default=ServerConfig.timeout_request_header,
        metavar="SECONDS",
        help="time for a request's whole header block, from its first byte (or the "
        "connect); past it: 408 and close (default: %(default)s)",
    )
    serve.add_argument(
        "--timeout-request-body",
        type=float,
        default=ServerConfig.timeout_request_body,
        metavar="SECONDS",
        help="client silence allowed between request body chunks; a slow upload that keeps "
        "moving passes (default: %(default)s)",
    )
    auth = serve.add_argument_group(
        "authentication",
        "Keys are sent as 'Authorization: Bearer <key>'. Without any key, every route is "
        "open, which is only allowed on a loopback address unless --allow-unauthenticated.",
    )
    auth.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"inference key; repeatable (env {API_KEY_ENV}, comma-separated)",
    )
    auth.add_argument(
        "--api-key-file",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="file with inference keys, one per line ('#' starts a comment)",
    )
    auth.add_argument(
        "--admin-key",
        action="append",
        default=[],
        metavar="KEY",
        help="admin key (adapter upload/delete/aliases, files, fine-tuning jobs; also "
        f"inference); repeatable (env {ADMIN_KEY_ENV}, comma-separated)",
    )
    auth.add_argument(
        "--admin-key-file",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="file with admin keys, one per line",
    )
    auth.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="allow binding a non-loopback address without any key",
    )
    auth.add_argument(
        "--metrics-without-key",
        action="store_true",
        help="serve /metrics without a key (Prometheus, the inference gateway's endpoint picker)",
    )
    auth.add_argument(
        "--admin-loopback-without-key",
        action="store_true",
        help="admin routes without a key for requests from 127.0.0.1/::1 only (an adapter "
        "syncer sidecar in the same pod); trusts every process and proxy in the pod, see "
        "docs/kubernetes.md",
    )
    serve.add_argument(
        "--allowed-local-adapter-dirs",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="directories /v1/load_lora_adapter may read lora_path from (repeatable; "
        "default: none, only hf:// and owner/repo)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one object per line, with the request id (default: %(default)s)",
    )
    # Every serve flag, copied from the serve parser (its -h included), plus Ray's own.
    cluster = sub.add_parser(
        "cluster",
        parents=[serve],
        add_help=False,
        help="serve on a Ray Serve cluster: engine replicas with adapter-affinity routing",
    )
    cluster.add_argument(
        "--replicas", type=int, default=1, help="engine replicas (default: %(default)s)"
    )
    cluster.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (e.g. 127.0.0.1:6379 or auto); default: RAY_ADDRESS, else "
        "a local Ray started for this command",
    )
    add_registry_parser(sub)
    return parser


def read_keys(values: Sequence[str], files: Sequence[Path], env_var: str) -> tuple[str, ...]:
    """Keys from flags and key files, or from `env_var` (comma-separated) when neither is
    given. Raises ValueError for an empty key, a key with whitespace, or an empty file."""
    keys = list(values)
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read key file {path}: {exc.strerror}") from exc
        in_file = [k for line in lines if (k := line.split("#", 1)[0].strip())]
        if not in_file:
            raise ValueError(f"key file {path} holds no key")
        keys += in_file
    if not values and not files:
        keys = [k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()]
    for key in keys:
        if not key or any(c.isspace() for c in key):
            raise ValueError("API keys must be non-empty and contain no whitespace")
    return tuple(dict.fromkeys(keys))


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    engine = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=args.max_lora_rank,
        max_full_module_adapters=args.max_full_module_adapters,
        dtype=args.dtype,
        lora_dtype=args.lora_dtype,
        device=args.device,
        num_threads=args.num_threads,
        max_queued_requests=args.max_queued_requests,
        grammar_compile_timeout=args.grammar_compile_timeout,
        grammar_cache_size=args.grammar_cache_size,
        lora_kernel=args.lora_kernel,
        cuda_graphs=args.cuda_graphs,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        prefix_caching=args.prefix_caching,
    )
    modules = dict(args.lora_modules)
    if len(modules) != len(args.lora_modules):
        raise ValueError("--lora-modules names must be unique")
    return ServerConfig(
        host=args.host,
        port=args.port,
        base_model=args.base_model,
        served_model_name=args.served_model_name,
        model_cache_dir=args.model_cache_dir,
        lora_modules=modules,
        registry=None if args.no_registry else (args.registry or default_registry_location()),
        registry_blobs=args.registry_blobs,
        max_upload_bytes=args.max_upload_bytes,
        max_request_bytes=args.max_request_bytes,
        max_prompts_per_request=args.max_prompts_per_request,
        tool_call_parser=args.tool_call_parser,
        fine_tuning=not args.no_fine_tuning,
        jobs_dir=args.jobs_dir,
        max_concurrent_jobs=args.max_concurrent_jobs,
        max_fine_tuning_tokens=args.max_fine_tuning_tokens,
        fine_tuning_worker=args.fine_tuning_worker,
        fine_tuning_lease_s=args.fine_tuning_lease,
        log_level=args.log_level,
        log_format=args.log_format,
        api_keys=read_keys(args.api_key, args.api_key_file, API_KEY_ENV),
        admin_keys=read_keys(args.admin_key, args.admin_key_file, ADMIN_KEY_ENV),
        allow_unauthenticated=args.allow_unauthenticated,
        metrics_without_key=args.metrics_without_key,
        admin_loopback_without_key=args.admin_loopback_without_key,
        allowed_local_adapter_dirs=tuple(args.allowed_local_adapter_dirs),
        shutdown_timeout=args.shutdown_timeout,
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_request_header=args.timeout_request_header,
        timeout_request_body=args.timeout_request_body,
        engine=engine,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, getattr(args, "log_format", "text"))
    if args.command == "serve":
        from adapterhub_server.server import run_server

        try:
            return run_server(config_from_args(args))
        except (AdapterHubError, ValueError) as exc:
            print(f"adapterhub-server: error: {exc}", file=sys.stderr)
            return 2
    elif args.command == "cluster":
        from adapterhub_server.cluster.ray_app import run_cluster

        try:
            config = config_from_args(args)
            return run_cluster(config, replicas=args.replicas, ray_address=args.ray_address)
        except (AdapterHubError, ValueError) as exc:
            print(f"adapterhub-server: error: {exc}", file=sys.stderr)
            return 2
    elif args.command == "registry":
        return run_registry_command(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
