"""Publishing a merge of registry versions as a new version, with its recipe in the lineage.

The merge is computed by the same code that serves per-request merges (`lora.merge`), from
the components' verified files, with DARE's masks seeded from the same key (the components'
content identities and the parameters), so a published merge equals the per-request merge
of the same components. The result is written in PEFT's file layout (the adapter
`add_weighted_adapter` makes, zero-padded to its rank) and stored through `Registry.push`,
which validates it like any upload.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from adapterhub_server.lora.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_adapter,
    validate_adapter_name,
)
from adapterhub_server.lora.cache import files_identity, verify_files
from adapterhub_server.lora.merge import (
    MergeError,
    MergeSpec,
    merge_adapters,
    merge_key,
    padded_state_dict,
)
from adapterhub_server.registry.errors import RegistryError
from adapterhub_server.registry.records import MERGE_LINEAGE_KEY, Lineage, VersionRecord
from adapterhub_server.registry.registry import Registry


def publish_merge(
    registry: Registry,
    name: str,
    spec: MergeSpec,
    *,
    alias: str | None = None,
    description: str | None = None,
) -> VersionRecord:
    """Merge the versions `spec.ids` name and push the result as a new version of `name`.

    Raises `AdapterNotFoundError` (or a subclass) for an unknown id, `MergeError` for what
    PEFT refuses or a merged rank above the registry's limit, and whatever `push` raises.
    Nothing is stored unless the whole merge succeeds.
    """
    validate_adapter_name(name)  # before the work of merging, not only at push
    if registry.base is None:
        raise RegistryError("this registry was opened without a base model; cannot merge")
    records = [registry.resolve(ref) for ref in spec.ids]
    adapters = []
    for record in records:
        fingerprint = registry.base.fingerprint
        if record.base_fingerprint and fingerprint and record.base_fingerprint != fingerprint:
            raise MergeError(
                f"{record.key} was validated against other base weights "
                f"({record.base_model_id}) than the registry's base ({registry.base.model_id})",
                param="merged_adapters.ids",
            )
        path = registry.blobs.version_path(record.name, record.version)
        verify_files(path, record.sha256)
        adapters.append(
            load_adapter(
                path,
                name=record.key,
                targets=dict(registry.base.targets),
                max_rank=registry.limits.max_lora_rank,
                max_file_bytes=registry.limits.max_upload_bytes,
                serving_dtype=registry.limits.serving_dtype,
            )
        )
    identity = "merge:" + merge_key(spec, [files_identity(r.sha256) for r in records])
    refs = [r.key for r in records]
    merged = merge_adapters(
        adapters,
        spec,
        name=name,
        seed_key=identity,
        max_rank=registry.limits.max_lora_rank,
        serving_dtype=registry.limits.serving_dtype,
        refs=refs,
    )
    recipe = {**spec.recipe(refs), "requested": list(spec.ids), "content_identity": identity}
    lineage = Lineage(extra={MERGE_LINEAGE_KEY: recipe})
    with tempfile.TemporaryDirectory(prefix="adapterhub-merge-") as tmp:
        out = Path(tmp)
        (out / CONFIG_FILE).write_text(json.dumps(merged.config, indent=2, sort_keys=True))
        save_file(padded_state_dict(merged), str(out / WEIGHTS_FILE))
        return registry.push(out, name, alias=alias, description=description, lineage=lineage)
