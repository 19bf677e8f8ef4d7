"""Training files: split on `\\n` only, each line parsed within the JSON limits, read with
bounded memory, counted at upload; no error a client sees names a server path."""

from __future__ import annotations

import json
import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from adapterhub_server.finetune import FineTuningService
from adapterhub_server.finetune.process import redact_paths
from tests.finetune.conftest import (
    all_events,
    app_client,
    job_body,
    poll_job,
    upload,
)
from trainer import data as trainer_data
from trainer.data import DataError, read_jsonl, scan_jsonl

pytestmark = pytest.mark.anyio

GOOD = '{"prompt": "a", "completion": "b"}'
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/[\w.-]+/")


def stored(service: FineTuningService) -> list[str]:
    return sorted(p.name for p in service.store.files_dir.iterdir())


async def test_unicode_line_separators_inside_strings_are_text(
    http: httpx.AsyncClient, service: FineTuningService
) -> None:
    # str.splitlines() also ends lines at these, which cut such records in two.
    separators = ["\u2028", "\u2029", "\x85", "\u2028\u2029"]
    records = [{"prompt": f"a{sep}b", "completion": f"c{sep}d"} for sep in separators]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records).encode()
    assert b"\xe2\x80\xa8" in body  # raw U+2028, not an escape
    r = await http.post(
        "/v1/files", files={"file": ("u.jsonl", body)}, data={"purpose": "fine-tune"}
    )
    assert r.status_code == 200, r.text
    file_id = r.json()["id"]
    assert service.store.get_file(file_id).records == len(records)
    # The trainer reads the stored file the same way: the characters are kept.
    assert [rec for _, rec in read_jsonl(service.store.file_path(file_id))] == records


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"prompt": "\\ud800", "completion": "b"}', "lone surrogate"),
        (b'{"prompt": "a", "completion": "b", "x": ' + b"[" * 65 + b"]" * 65 + b"}", "nested"),
        (b'{"prompt": "a", "completion": "b", "n": 18446744073709551616}', "64 bits"),
        (b'{"prompt": "a", "completion": "b", "n": 1' + b"0" * 1000 + b"}", "digits"),
        (b'{"prompt": "a", "completion": "b", "n": 1' + b"0" * 400 + b".5}", "out of range"),
        (b'{"prompt": "a", "completion": "b", "n": NaN}', "NaN"),
        (b'{"prompt": "a", "completion": "b", "n": -Infinity}', "Infinity"),
        (b'{"prompt": "\xff", "completion": "b"}', "UTF-8"),
        (b'{"prompt": "a", "completion": ', "invalid JSON"),
    ],
)
async def test_a_line_beyond_the_json_limits_is_a_400_naming_it(
    http: httpx.AsyncClient, service: FineTuningService, line: bytes, reason: str
) -> None:
    body = GOOD.encode() + b"\n" + line + b"\n" + GOOD.encode() + b"\n"
    r = await http.post(
        "/v1/files", files={"file": ("t.jsonl", body)}, data={"purpose": "fine-tune"}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "file")
    assert error["message"].startswith("t.jsonl:2: invalid JSON"), error
    assert reason in error["message"], error
    assert (await http.get("/v1/files")).json()["data"] == []
    assert stored(service) == []


async def test_a_multi_megabyte_upload_is_counted_at_upload(
    service: FineTuningService,
) -> None:
    line = json.dumps({"prompt": "q" * 60, "completion": "a" * 60}) + "\n"
    count = 3 * 1024**2 // len(line)
    body = (line * count).encode()
    async with app_client(service, max_upload_bytes=8 * 1024**2) as http:
        file_id = await upload(http, body)
        assert (await http.get(f"/v1/files/{file_id}")).json()["bytes"] == len(body)
    record = service.store.get_file(file_id)
    assert record.records == count
    assert record.estimated_tokens == count * trainer_data.estimate_tokens(json.loads(line))


def test_the_validator_reads_in_bounded_chunks(tmp_path: Path) -> None:
    data = tmp_path / "big.jsonl"
    line = json.dumps({"prompt": "q" * 5000, "completion": "a" * 5000}) + "\n"
    data.write_text(line * 440)
    size = data.stat().st_size
    assert size > 4 * 1024**2
    tracemalloc.start()
    try:
        stats = scan_jsonl(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.records == 440
    assert peak < size / 20, f"peak {peak} bytes for a {size}-byte file"


def test_an_overlong_line_is_refused_without_reading_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer_data, "MAX_LINE_BYTES", 1024)
    data = tmp_path / "long.jsonl"
    data.write_text(GOOD + "\n" + json.dumps({"prompt": "a" * 5000, "completion": "b"}) + "\n")
    with pytest.raises(DataError) as info:
        scan_jsonl(data, name="long.jsonl")
    assert info.value.message == "long.jsonl:2: line longer than 1024 bytes"
    assert info.value.code == "invalid_value"


async def test_job_creation_errors_name_no_path(
    http: httpx.AsyncClient, service: FineTuningService, tmp_path: Path
) -> None:
    file_id = await upload(http)
    service.store.file_path(file_id).unlink()  # lost from disk behind the index's back
    r = await http.post("/v1/fine_tuning/jobs", json=job_body(file_id))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "training_file"
    assert file_id in error["message"]
    assert str(tmp_path) not in error["message"]
    assert not ABSOLUTE_PATH.search(error["message"]), error


@pytest.mark.parametrize("suffix", ["leakevent-x", "leaklog-x"])
async def test_trainer_failures_reach_clients_without_paths(
    make_service: Callable[..., FineTuningService], tmp_path: Path, suffix: str
) -> None:
    service = make_service()
    async with app_client(service) as http:
        file_id = await upload(http)
        job = (await http.post("/v1/fine_tuning/jobs", json=job_body(file_id, suffix))).json()
        service.start()
        done = await poll_job(http, job["id"], "succeeded", "failed")
        assert done["status"] == "failed"
        message = done["error"]["message"]
        assert "config.json" in message or "fake_trainer.py" in message, message
        texts = [message] + [
            json.dumps([e["message"], e["data"]]) for e in await all_events(http, job["id"])
        ]
    for text in texts:
        assert str(tmp_path) not in text, text
        assert not ABSOLUTE_PATH.search(text), text


def test_redact_paths() -> None:
    assert redact_paths("/srv/jobs/files/file-1.jsonl:3: invalid JSON") == (
        "file-1.jsonl:3: invalid JSON"
    )
    assert redact_paths('File "/usr/lib/python3/x.py", line 2') == 'File "x.py", line 2'
    assert redact_paths("No such file: '/a/b/c'") == "No such file: 'c'"
    for kept in ("https://huggingface.co/org/model", "3 tokens/s, 1/2", "a / b", "/tmp", "x/y"):
        assert redact_paths(kept) == kept
