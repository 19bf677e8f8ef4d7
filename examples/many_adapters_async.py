"""Many adapters at once with the async client: hot-upload N tenant adapters concurrently,
then query all of them (and the base model) concurrently; the server decodes the requests
for different adapters together, in one batch.

The tenants' adapters are copies of one adapter already on the server (by default the
newest one, e.g. `codes@1` from examples/train_and_query.py), downloaded once with its
sha256 checked and uploaded under N names, so the example needs only the client:

    python examples/many_adapters_async.py [--source codes@1] [--tenants 8] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

from client import AsyncAdapterHubClient

QUESTION = [{"role": "user", "content": "What is the code for frondle?"}]


async def ask(hub: AsyncAdapterHubClient, model: str) -> tuple[str, str, float]:
    start = time.perf_counter()
    reply = await hub.chat.completions.create(
        model=model, messages=QUESTION, max_completion_tokens=16, temperature=0
    )
    return model, reply.choices[0].message.content or "", time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="adapter reference to copy (default: the newest)")
    parser.add_argument("--tenants", type=int, default=8, help="adapters to upload")
    parser.add_argument("--keep", action="store_true", help="keep the tenant adapters")
    args = parser.parse_args()

    async with AsyncAdapterHubClient() as hub:
        models = (await hub.models.list()).data
        base = next(m.id for m in models if m.parent is None)
        source = args.source
        if source is None:
            adapters = (await hub.adapters.list()).data
            if not adapters:
                raise SystemExit("no adapter on the server: run train_and_query.py first")
            newest = max(adapters, key=lambda a: a.latest.created)
            source = newest.latest.ref

        with tempfile.TemporaryDirectory() as tmp:
            files = await hub.adapters.download(source, to=tmp)
            print(f"downloaded {source} ({sorted(p.name for p in files.iterdir())})")
            start = time.perf_counter()
            uploaded = await asyncio.gather(
                *(
                    hub.adapters.upload(
                        files,
                        name=f"tenant-{i:02d}",
                        alias="prod",
                        metadata={"copied_from": source},
                    )
                    for i in range(args.tenants)
                )
            )
        print(f"uploaded {len(uploaded)} adapters in {time.perf_counter() - start:.1f} s")

        refs = [f"{v.name}@prod" for v in uploaded]
        start = time.perf_counter()
        answers = await asyncio.gather(ask(hub, base), *(ask(hub, ref) for ref in refs))
        wall = time.perf_counter() - start
        for model, text, seconds in answers:
            print(f"{model:>36} {seconds:5.1f} s  {text!r}")
        total = sum(seconds for _, _, seconds in answers)
        print(f"{len(answers)} requests in {wall:.1f} s wall ({total:.1f} s summed latency)")

        if not args.keep:
            await asyncio.gather(
                *(hub.adapters.delete(v.name, v.version, force=True) for v in uploaded)
            )
            print(f"deleted {len(uploaded)} tenant adapters")


if __name__ == "__main__":
    asyncio.run(main())
