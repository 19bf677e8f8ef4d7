"""`adapterhub-server registry ...`: administer an adapter registry from the shell.

    adapterhub-server registry push PATH --name NAME [--alias A] [--description D]
                                         [--metadata JSON|@FILE] [--lineage JSON|@FILE]
                                         [--sha256 FILE=HEX ...]
    adapterhub-server registry list
    adapterhub-server registry show REF
    adapterhub-server registry pull hf://OWNER/REPO[@REV] [--name NAME] [--alias A]
    adapterhub-server registry merge NAME --from REF --from REF [--weights 0.6,0.4]
                                          [--merge-strategy cat|linear|ties|dare_linear|dare_ties]
                                          [--density D] [--majority-sign-method total|frequency]
                                          [--alias A] [--description D]
    adapterhub-server registry export REF OUT_DIR
    adapterhub-server registry push-hub REF OWNER/REPO [--private] [--revision R]
    adapterhub-server registry alias set NAME ALIAS VERSION
    adapterhub-server registry alias delete NAME ALIAS
    adapterhub-server registry alias list NAME
    adapterhub-server registry delete NAME@VERSION [--force] | NAME --all [--force]
    adapterhub-server registry verify [REF]
    adapterhub-server registry gc [--dry-run]
    adapterhub-server registry copy SRC DST [--src-blobs URL] [--dst-blobs URL]

Every command takes --registry DIR|URL (default $ADAPTERHUB_REGISTRY, else
$XDG_CACHE_HOME/adapterhub/registry or ~/.cache/adapterhub/registry) and --json; with a
postgresql:// URL, --registry-blobs URL (or $ADAPTERHUB_REGISTRY_BLOBS) names the blobs.
push, pull and merge validate against --base-model (default: the embedded SmolLM2-135M-Instruct)
and --max-lora-rank, and record the base model id and weights fingerprint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from adapterhub_server.errors import AdapterHubError, InvalidRequestError
from adapterhub_server.lora.merge import MAJORITY_SIGN_METHODS, MERGE_STRATEGIES, MergeSpec
from adapterhub_server.registry.factory import (
    BLOBS_ENV,
    describe_location,
    open_registry,
    registry_location,
)
from adapterhub_server.registry.records import AdapterInfo, VersionRecord
from adapterhub_server.registry.refs import parse_ref
from adapterhub_server.registry.registry import (
    Registry,
    RegistryLimits,
    default_registry_location,
)

logger = logging.getLogger(__name__)

PROG = "adapterhub-server registry"


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry",
        type=registry_location,
        default=None,
        metavar="DIR|URL",
        help="registry directory or postgresql:// URL (default: $ADAPTERHUB_REGISTRY, else "
        "$XDG_CACHE_HOME/adapterhub/registry or ~/.cache/adapterhub/registry)",
    )
    common.add_argument(
        "--registry-blobs",
        default=None,
        metavar="URL",
        help="blob store of a postgresql:// registry: file:///path or s3://bucket/prefix "
        f"(default: ${BLOBS_ENV})",
    )
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    common.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    return common


def _validation_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--base-model",
        default=None,
        help="base model the adapter must fit: local HF directory, hub id, or omit for the "
        "embedded SmolLM2-135M-Instruct",
    )
    options.add_argument("--base-model-id", default=None, help="id to record for the base model")
    options.add_argument("--max-lora-rank", type=int, default=64, help="default: %(default)s")
    options.add_argument(
        "--max-upload-bytes",
        type=int,
        default=RegistryLimits.max_upload_bytes,
        help="largest adapter accepted, in bytes (default: %(default)s)",
    )
    options.add_argument("--alias", default=None, help="point this alias at the new version")
    options.add_argument("--description", default=None)
    return options


def add_registry_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `registry` command and its sub-commands to a CLI's subparsers."""
    common = _common_options()
    validation = _validation_options()
    parser = subparsers.add_parser(
        "registry",
        help="manage the adapter registry (push, list, show, pull, export, alias, delete, ...)",
        description="Manage a versioned adapter registry.",
    )
    sub = parser.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")

    push = sub.add_parser(
        "push",
        parents=[common, validation],
        help="validate and store a PEFT adapter as a new version",
    )
    push.add_argument("path", type=Path, help="PEFT adapter directory, or a .tar[.gz]/.zip of one")
    push.add_argument("--name", required=True, help="adapter name")
    push.add_argument("--metadata", default=None, help="JSON object, or @FILE")
    push.add_argument("--lineage", default=None, help="JSON object, or @FILE")
    push.add_argument(
        "--sha256",
        action="append",
        default=[],
        metavar="FILE=HEX",
        help="refuse the push unless FILE has this sha256 (repeatable)",
    )

    sub.add_parser("list", parents=[common], help="list adapters with their newest version")

    show = sub.add_parser("show", parents=[common], help="show a version with lineage and files")
    show.add_argument("ref", help="NAME, NAME@VERSION or NAME@ALIAS")

    pull = sub.add_parser(
        "pull", parents=[common, validation], help="store an adapter from the Hugging Face Hub"
    )
    pull.add_argument("source", help="hf://OWNER/REPO[@REVISION]")
    pull.add_argument(
        "--name", default=None, help="adapter name (default: the repo name, lowercased)"
    )
    pull.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN)")

    merge = sub.add_parser(
        "merge",
        parents=[common, validation],
        help="store the merge of several versions (PEFT's add_weighted_adapter) as a new version",
    )
    merge.add_argument("name", help="adapter name the merge is stored under")
    merge.add_argument(
        "--from",
        dest="sources",
        action="append",
        required=True,
        metavar="REF",
        help="a version to merge: NAME, NAME@VERSION or NAME@ALIAS (repeat, in order)",
    )
    merge.add_argument(
        "--weights",
        default=None,
        help="comma-separated weights, one per --from (default: 1 each)",
    )
    merge.add_argument(
        "--merge-strategy",
        default="cat",
        choices=list(MERGE_STRATEGIES),
        help="default: %(default)s",
    )
    merge.add_argument(
        "--density", type=float, default=None, help="fraction kept, for ties and dare_*"
    )
    merge.add_argument(
        "--majority-sign-method",
        default="total",
        choices=list(MAJORITY_SIGN_METHODS),
        help="default: %(default)s",
    )

    export = sub.add_parser(
        "export", parents=[common], help="write a version as a PEFT repo directory"
    )
    export.add_argument("ref")
    export.add_argument("out_dir", type=Path)

    push_hub = sub.add_parser(
        "push-hub", parents=[common], help="upload a version to the Hugging Face Hub"
    )
    push_hub.add_argument("ref")
    push_hub.add_argument("repo_id", help="OWNER/REPO")
    push_hub.add_argument("--private", action="store_true")
    push_hub.add_argument("--revision", default=None, help="branch to commit to")
    push_hub.add_argument("--commit-message", default=None)
    push_hub.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN)")

    alias = sub.add_parser("alias", help="set, delete or list aliases")
    alias_sub = alias.add_subparsers(dest="alias_command", required=True, metavar="ACTION")
    alias_set = alias_sub.add_parser("set", parents=[common], help="point NAME@ALIAS at VERSION")
    alias_set.add_argument("name")
    alias_set.add_argument("alias")
    alias_set.add_argument("version", type=int)
    alias_delete = alias_sub.add_parser("delete", parents=[common], help="remove an alias")
    alias_delete.add_argument("name")
    alias_delete.add_argument("alias")
    alias_list = alias_sub.add_parser("list", parents=[common], help="list an adapter's aliases")
    alias_list.add_argument("name")

    delete = sub.add_parser(
        "delete", parents=[common], help="delete a version (numbers are never reused)"
    )
    delete.add_argument("ref", help="NAME@VERSION, or NAME with --all")
    delete.add_argument("--all", action="store_true", help="delete every version of NAME")
    delete.add_argument("--force", action="store_true", help="also delete aliases pointing at it")

    verify = sub.add_parser(
        "verify", parents=[common], help="re-hash stored files against the index"
    )
    verify.add_argument("ref", nargs="?", default=None, help="only this adapter or version")

    gc = sub.add_parser(
        "gc", parents=[common], help="remove leftovers of dead writers and deletions"
    )
    gc.add_argument("--dry-run", action="store_true", help="only report what would be removed")

    copy = sub.add_parser(
        "copy",
        help="copy every version between registries (directory or postgresql://), keeping "
        "numbers, aliases, hashes and lineage",
    )
    copy.add_argument("src", type=registry_location, help="source: DIR or postgresql:// URL")
    copy.add_argument("dst", type=registry_location, help="destination: DIR or URL")
    copy.add_argument("--src-blobs", default=None, metavar="URL", help="blob store of SRC")
    copy.add_argument("--dst-blobs", default=None, metavar="URL", help="blob store of DST")
    copy.add_argument("--json", action="store_true", help="print machine-readable JSON")
    copy.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser (`python -m adapterhub_server.registry.cli`) for the registry."""
    parser = argparse.ArgumentParser(prog="adapterhub-server")
    add_registry_parser(parser.add_subparsers(dest="command", required=True))
    return parser


# -- helpers ------------------------------------------------------------------------------


def _json_arg(text: str | None, what: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        raw = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
        value = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"--{what}: {exc}", param=what) from exc
    if not isinstance(value, dict):
        raise InvalidRequestError(f"--{what} must be a JSON object", param=what)
    return value


def _sha256_args(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        filename, sep, digest = item.partition("=")
        if not sep:
            raise InvalidRequestError(f"--sha256 expects FILE=HEX, got {item!r}", param="sha256")
        out[filename] = digest
    return out


def _open_registry(args: argparse.Namespace, *, validating: bool = False) -> Registry:
    root = args.registry or default_registry_location()
    blobs = getattr(args, "registry_blobs", None)
    if not validating:
        return Registry.open(root, blobs=blobs)
    from adapterhub_server.base_model import resolve_base_model
    from adapterhub_server.registry.targets import BaseModelSpec

    resolved = resolve_base_model(args.base_model, model_id=args.base_model_id)
    base = BaseModelSpec.from_directory(resolved.path, resolved.model_id)
    limits = RegistryLimits(
        max_lora_rank=args.max_lora_rank, max_upload_bytes=args.max_upload_bytes
    )
    return Registry.open(root, base=base, limits=limits, blobs=blobs)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells
    )


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _version_summary(record: VersionRecord) -> str:
    aliases = f" (aliases: {', '.join(record.aliases)})" if record.aliases else ""
    return f"{record.key}{aliases}: rank {record.rank}, {_size(record.size)}, base {record.base_model_id}"


def _show_text(record: VersionRecord, info: AdapterInfo) -> str:
    lines = [
        f"ref:             {record.key}",
        f"status:          {record.status}",
        f"created:         {_when(record.created)}",
        f"aliases:         {', '.join(record.aliases) or '-'}",
        f"base model:      {record.base_model_id or '-'}",
        f"base weights:    {record.base_fingerprint or '-'}",
        f"kind:            {record.kind or '-'}",
        f"rank / alpha:    {record.rank} / {record.alpha:g}"
        if record.alpha is not None
        else f"rank / alpha:    {record.rank} / -",
        f"target modules:  {', '.join(record.target_modules) or '-'}",
        f"size:            {_size(record.size)}",
        f"description:     {record.description or '-'}",
    ]
    if record.metadata:
        lines.append(f"metadata:        {json.dumps(dict(record.metadata), sort_keys=True)}")
    lines += ["", "files:"]
    lines.append(
        format_table(
            ["  FILE", "SIZE", "SHA256"],
            [[f"  {f}", r.size, r.sha256] for f, r in sorted(record.files.items())],
        )
    )
    lines += ["", "lineage:"]
    if record.lineage is None or not record.lineage.to_dict():
        lines.append("  (unknown)")
    else:
        for key, value in record.lineage.to_dict().items():
            shown = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
            lines.append(f"  {key}: {shown}")
    lines += ["", f"versions of {info.name}:"]
    lines.append(
        format_table(
            ["  VERSION", "CREATED", "RANK", "SIZE", "ALIASES"],
            [
                [f"  {v.version}", _when(v.created), v.rank, _size(v.size), ", ".join(v.aliases)]
                for v in info.versions
            ],
        )
    )
    return "\n".join(lines)


# -- commands -----------------------------------------------------------------------------


def _cmd_push(args: argparse.Namespace) -> int:
    metadata = _json_arg(args.metadata, "metadata")
    lineage = _json_arg(args.lineage, "lineage")
    expected = _sha256_args(args.sha256)
    with _open_registry(args, validating=True) as registry:
        record = registry.push(
            args.path,
            args.name,
            alias=args.alias,
            description=args.description,
            metadata=metadata,
            lineage=lineage,
            expected_sha256=expected,
        )
    if args.json:
        _print_json(record.to_dict())
    else:
        print(f"pushed {_version_summary(record)}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from adapterhub_server.registry.hub import pull

    with _open_registry(args, validating=True) as registry:
        record = pull(
            registry,
            args.source,
            name=args.name,
            alias=args.alias,
            description=args.description,
            token=args.token,
        )
    if args.json:
        _print_json(record.to_dict())
    else:
        print(f"pulled {args.source} as {_version_summary(record)}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from adapterhub_server.registry.merge import publish_merge

    if args.weights is None:
        weights = [1.0] * len(args.sources)
    else:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise InvalidRequestError(
                f"--weights must be comma-separated numbers, got {args.weights!r}",
                param="weights",
            ) from None
    spec = MergeSpec(
        ids=tuple(args.sources),
        weights=tuple(weights),
        strategy=args.merge_strategy,
        density=args.density,
        majority_sign_method=args.majority_sign_method,
    )
    with _open_registry(args, validating=True) as registry:
        record = publish_merge(
            registry, args.name, spec, alias=args.alias, description=args.description
        )
    if args.json:
        _print_json(record.to_dict())
    else:
        print(f"merged {', '.join(args.sources)} ({record.kind}) as {_version_summary(record)}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    with _open_registry(args) as registry:
        adapters = registry.list_adapters()
    if args.json:
        _print_json([info.to_dict() for info in adapters])
        return 0
    if not adapters:
        print(f"no adapters in {describe_location(args.registry or default_registry_location())}")
        return 0
    rows = [
        [
            info.name,
            info.latest.version,
            len(info.versions),
            ", ".join(f"{a}->{v}" for a, v in sorted(info.aliases.items())) or "-",
            info.latest.rank,
            _size(info.latest.size),
            info.latest.base_model_id or "-",
            _when(info.latest.created),
        ]
        for info in adapters
    ]
    print(
        format_table(
            ["NAME", "LATEST", "VERSIONS", "ALIASES", "RANK", "SIZE", "BASE MODEL", "CREATED"], rows
        )
    )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    with _open_registry(args) as registry:
        record = registry.resolve(args.ref)
        info = registry.get(record.name)
    if args.json:
        out = record.to_dict()
        out["versions"] = [v.version for v in info.versions]
        out["all_aliases"] = dict(sorted(info.aliases.items()))
        _print_json(out)
    else:
        print(_show_text(record, info))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from adapterhub_server.registry.hub import export_version

    with _open_registry(args) as registry:
        record = registry.resolve(args.ref)
        out = export_version(registry, record.key, args.out_dir)
    if args.json:
        _print_json({"ref": record.key, "path": str(out)})
    else:
        print(f"exported {record.key} to {out}")
    return 0


def _cmd_push_hub(args: argparse.Namespace) -> int:
    from adapterhub_server.registry.hub import push_to_hub

    with _open_registry(args) as registry:
        record = registry.resolve(args.ref)
        url = push_to_hub(
            registry,
            record.key,
            args.repo_id,
            token=args.token,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    if args.json:
        _print_json({"ref": record.key, "repo_id": args.repo_id, "commit_url": url})
    else:
        print(f"pushed {record.key} to {args.repo_id}: {url}")
    return 0


def _cmd_alias(args: argparse.Namespace) -> int:
    with _open_registry(args) as registry:
        if args.alias_command == "set":
            previous = registry.set_alias(args.name, args.alias, args.version)
            result: dict[str, Any] = {
                "name": args.name,
                "alias": args.alias,
                "version": args.version,
                "previous": previous,
            }
            text = f"{args.name}@{args.alias} -> {args.version}" + (
                f" (was {previous})" if previous is not None and previous != args.version else ""
            )
        elif args.alias_command == "delete":
            version = registry.delete_alias(args.name, args.alias)
            result = {"name": args.name, "alias": args.alias, "deleted": True, "version": version}
            text = f"deleted alias {args.name}@{args.alias} (was -> {version})"
        else:
            registry.get(args.name)  # not-found error for unknown names
            aliases = registry.aliases(args.name)
            result = {"name": args.name, "aliases": aliases}
            text = (
                format_table(["ALIAS", "VERSION"], sorted(aliases.items()))
                if aliases
                else f"{args.name} has no aliases"
            )
    if args.json:
        _print_json(result)
    else:
        print(text)
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    with _open_registry(args) as registry:
        if args.all:
            if ref.version is not None or ref.alias is not None:
                raise InvalidRequestError("--all takes a bare NAME", param="ref")
            deleted = registry.delete_adapter(ref.name, force=args.force)
        elif ref.version is None:
            raise InvalidRequestError(
                f"say which version to delete ({ref.name}@N), or pass --all to delete every version",
                param="ref",
            )
        else:
            deleted = [registry.delete_version(ref.name, ref.version, force=args.force)]
    if args.json:
        _print_json({"deleted": [r.key for r in deleted]})
    else:
        print(f"deleted {', '.join(r.key for r in deleted)}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    with _open_registry(args) as registry:
        report = registry.verify(args.ref)
    if args.json:
        _print_json(report.to_dict())
    elif report.ok:
        print(f"verified {report.checked} version(s): all files match their sha256")
    else:
        print(f"verified {report.checked} version(s): {len(report.problems)} problem(s)")
        print(
            format_table(
                ["VERSION", "FILE", "PROBLEM"],
                [[p.ref, p.filename or "-", p.message] for p in report.problems],
            )
        )
    return 0 if report.ok else 1


def _cmd_gc(args: argparse.Namespace) -> int:
    with _open_registry(args) as registry:
        report = registry.gc(dry_run=args.dry_run)
    if args.json:
        _print_json(report.to_dict())
        return 0
    verb = "would remove" if args.dry_run else "removed"
    if not report.removed and not report.discarded_pending:
        print("nothing to collect")
    for key in report.discarded_pending:
        print(f"{verb} uncommitted version {key} (its writer died)")
    for path in report.removed:
        print(f"{verb} {path}")
    return 0


def _cmd_copy(args: argparse.Namespace) -> int:
    from adapterhub_server.registry.copy import copy_registry

    with (
        open_registry(args.src, args.src_blobs) as src,
        open_registry(args.dst, args.dst_blobs) as dst,
    ):
        report = copy_registry(src, dst)
    if args.json:
        _print_json(
            {
                "copied": list(report.copied),
                "skipped": list(report.skipped),
                "aliases": report.aliases,
            }
        )
        return 0
    print(
        f"copied {len(report.copied)} version(s) from {describe_location(args.src)} to "
        f"{describe_location(args.dst)} ({len(report.skipped)} already there, "
        f"{report.aliases} alias(es) set)"
    )
    return 0


_COMMANDS = {
    "copy": _cmd_copy,
    "push": _cmd_push,
    "pull": _cmd_pull,
    "merge": _cmd_merge,
    "list": _cmd_list,
    "show": _cmd_show,
    "export": _cmd_export,
    "push-hub": _cmd_push_hub,
    "alias": _cmd_alias,
    "delete": _cmd_delete,
    "verify": _cmd_verify,
    "gc": _cmd_gc,
}


def run_registry_command(args: argparse.Namespace) -> int:
    """Run a parsed `registry` sub-command; returns the process exit status.

    0: success; 1: the command ran and found a problem (verify), or an error from the
    registry (printed to stderr, as JSON with --json); 2: usage errors (argparse).
    """
    try:
        return _COMMANDS[args.registry_command](args)
    except AdapterHubError as exc:
        if getattr(args, "json", False):
            _print_json({"error": {"message": exc.message, "code": exc.code, "param": exc.param}})
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return run_registry_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
