"""List the models, run one completion and stream one chat reply.

Start a server first (`make serve`, or `adapterhub-server serve`), then:

    python examples/quickstart.py            # ADAPTERHUB_BASE_URL, else http://localhost:8000

Needs only the client: `pip install adapterhub`.
"""

from __future__ import annotations

from client import AdapterHubClient


def main() -> None:
    with AdapterHubClient() as hub:
        models = hub.models.list()
        base = models.data[0].id  # the base model comes first; adapters follow
        print("models:", [m.id for m in models.data])

        completion = hub.completions.create(
            model=base, prompt="The capital of France is", max_tokens=8, temperature=0
        )
        print("completion:", repr(completion.choices[0].text))
        assert completion.usage is not None
        print("usage:", completion.usage.model_dump())

        print("chat: ", end="", flush=True)
        with hub.chat.completions.create(
            model=base,
            messages=[{"role": "user", "content": "Name three primary colors."}],
            max_completion_tokens=24,
            temperature=0,
            stream=True,
        ) as stream:
            for chunk in stream:
                if chunk.choices:
                    print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()


if __name__ == "__main__":
    main()
