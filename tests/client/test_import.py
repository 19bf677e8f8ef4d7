"""The client needs only httpx and pydantic: `pip install adapterhub` must not pull torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

HEAVY = ("torch", "transformers", "fastapi", "starlette", "uvicorn", "numpy", "adapterhub_server")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_client_loads_no_server_or_ml_package() -> None:
    result = _run(
        f"""
        import sys
        import client
        from client import AdapterHubClient, AsyncAdapterHubClient
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        assert not loaded, loaded
        """
    )
    assert result.returncode == 0, result.stderr


def test_client_works_with_the_heavy_packages_uninstallable() -> None:
    """As if only httpx and pydantic were installed: every heavy import fails, and the
    client still builds requests, parses responses and maps errors."""
    result = _run(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {HEAVY!r}:
                    raise ImportError(f"{{name}} is not installed")
                return None

        sys.meta_path.insert(0, Block())
        import httpx
        from client import AdapterHubClient, NotFoundError, Completion

        def handler(request):
            if request.url.path == "/v1/models":
                return httpx.Response(200, json={{"object": "list", "data": [{{"id": "m", "created": 1}}]}})
            return httpx.Response(404, json={{"error": {{"message": "nope", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}}})

        http = httpx.Client(transport=httpx.MockTransport(handler))
        with AdapterHubClient(base_url="http://hub", http_client=http) as hub:
            assert [m.id for m in hub.models.list().data] == ["m"]
            try:
                hub.completions.create(model="x", prompt="hi")
            except NotFoundError as exc:
                assert exc.code == "model_not_found"
            else:
                raise AssertionError("no error")
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_package_ships_a_py_typed_marker() -> None:
    assert (REPO / "client" / "py.typed").is_file()
