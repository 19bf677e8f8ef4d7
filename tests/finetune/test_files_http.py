"""`/v1/files`: upload (validated JSONL), list, get, content, delete; bad input stores nothing."""

from __future__ import annotations

import httpx
import pytest

from adapterhub_server.finetune import FineTuningService
from tests.finetune.conftest import job_body, jsonl, upload

pytestmark = pytest.mark.anyio


def stored_files(service: FineTuningService) -> list[str]:
    return sorted(p.name for p in service.store.files_dir.iterdir())


async def test_upload_list_get_content_delete(
    http: httpx.AsyncClient, service: FineTuningService
) -> None:
    data = jsonl()
    r = await http.post(
        "/v1/files", files={"file": ("dir/train.jsonl", data)}, data={"purpose": "fine-tune"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    file_id = body["id"]
    assert file_id.startswith("file-")
    assert body == {
        "id": file_id,
        "object": "file",
        "bytes": len(data),
        "created_at": body["created_at"],
        "filename": "train.jsonl",  # the base name only: it is metadata, never a path
        "purpose": "fine-tune",
        "status": "processed",
        "status_details": None,
    }

    listed = (await http.get("/v1/files")).json()
    assert listed["object"] == "list"
    assert [f["id"] for f in listed["data"]] == [file_id]
    assert (await http.get(f"/v1/files/{file_id}")).json() == body
    content = await http.get(f"/v1/files/{file_id}/content")
    assert content.status_code == 200
    assert content.content == data

    r = await http.delete(f"/v1/files/{file_id}")
    assert r.json() == {"id": file_id, "object": "file", "deleted": True}
    r = await http.get(f"/v1/files/{file_id}")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    assert (await http.delete(f"/v1/files/{file_id}")).status_code == 404
    assert stored_files(service) == []


async def test_bad_jsonl_names_the_line_and_stores_nothing(
    http: httpx.AsyncClient, service: FineTuningService
) -> None:
    lines = [
        '{"prompt": "a", "completion": "b"}',
        '{"prompt": "a", "completion": "b"}',
        '{"prompt": "a", "completion": ',
    ]
    r = await http.post(
        "/v1/files", files={"file": ("mine.jsonl", jsonl(lines))}, data={"purpose": "fine-tune"}
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "file"
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("mine.jsonl:3: invalid JSON")
    assert str(service.store.root) not in error["message"]  # no server paths leak

    r = await http.post(
        "/v1/files",
        files={"file": ("t.jsonl", jsonl(['{"prompt": "a"}']))},
        data={"purpose": "fine-tune"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == 't.jsonl:1: "completion" must be a non-empty string'
    assert (await http.get("/v1/files")).json()["data"] == []
    assert stored_files(service) == []


@pytest.mark.parametrize("purpose", ["assistants", "batch", ""])
async def test_other_purposes_are_refused(
    http: httpx.AsyncClient, service: FineTuningService, purpose: str
) -> None:
    r = await http.post(
        "/v1/files", files={"file": ("t.jsonl", jsonl())}, data={"purpose": purpose}
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "purpose"
    assert stored_files(service) == []


async def test_missing_parts_and_oversized_uploads(
    http: httpx.AsyncClient, service: FineTuningService
) -> None:
    r = await http.post("/v1/files", data={"purpose": "fine-tune"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "file"
    assert r.json()["error"]["code"] == "missing_required_parameter"
    # The app in these tests accepts 4096 bytes per request body.
    big = jsonl(['{"prompt": "a", "completion": "' + "b" * 5000 + '"}'])
    r = await http.post(
        "/v1/files", files={"file": ("t.jsonl", big)}, data={"purpose": "fine-tune"}
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert r.json()["error"]["param"] == "file"
    assert stored_files(service) == []


async def test_a_file_in_use_by_an_unfinished_job_cannot_be_deleted(
    http: httpx.AsyncClient,
) -> None:
    file_id = await upload(http)
    job = (await http.post("/v1/fine_tuning/jobs", json=job_body(file_id))).json()
    assert job["status"] == "queued"  # the runner is not started in this test
    r = await http.delete(f"/v1/files/{file_id}")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "conflict"
    assert job["id"] in r.json()["error"]["message"]
    await http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert (await http.delete(f"/v1/files/{file_id}")).status_code == 200
