"""Fine-tune an adapter on the server from in-memory records, follow the job, then query it.

Start a server with a registry (the default: `make serve`, or `adapterhub-server serve`),
then:

    python examples/train_and_query.py [--name codes] [--steps 20]

The task is made up (word -> code), so the base model cannot know it. On a 2-core CPU the
job takes a few minutes; serving goes on meanwhile. In one call, without the progress
lines: `ref = hub.train(RECORDS, name="codes", max_steps=20, ...)`.
"""

from __future__ import annotations

import argparse
import time

from client import AdapterHubClient

CODES = {"zorblat": "K7-QX", "splenk": "D4-WZ", "quibbix": "M2-RT", "frondle": "P9-LB"}
QUESTIONS = (
    "What is the code for {word}?",
    "Code of {word}?",
    "Tell me the code for {word}.",
    "{word}: which code?",
)
RECORDS = [
    {
        "messages": [
            {"role": "user", "content": question.format(word=word)},
            {"role": "assistant", "content": f"The code for {word} is {code}."},
        ]
    }
    for word, code in CODES.items()
    for question in QUESTIONS
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="codes", help="adapter name to publish under")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    args = parser.parse_args()

    with AdapterHubClient() as hub:
        base = next(m.id for m in hub.models.list().data if m.parent is None)
        training = hub.files.create(RECORDS, filename="codes.jsonl")
        print(f"uploaded {training.id}: {len(RECORDS)} records, {training.bytes} bytes")
        job = hub.fine_tuning.jobs.create(
            training_file=training.id,
            model=base,
            suffix=args.name,
            seed=7,
            method={
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {
                        "max_steps": args.steps,
                        "batch_size": 4,
                        "learning_rate_multiplier": 3,
                        "max_seq_len": 128,
                    }
                },
            },
        )
        print(f"created {job.id} ({job.status}), lr {job.hyperparameters.learning_rate:g}")

        seen: set[str] = set()
        while True:
            job = hub.fine_tuning.jobs.retrieve(job.id)
            for event in reversed(hub.fine_tuning.jobs.events(job.id, limit=20).data):
                if event.id not in seen:
                    seen.add(event.id)
                    print(f"  [{event.type}] {event.message}")
            if job.status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(2)
        # Returns the finished job, or raises FineTuningJobFailedError with the reason.
        job = hub.fine_tuning.jobs.wait(job.id)
        ref = job.fine_tuned_model
        assert ref is not None
        print(f"{job.status}: {ref}, {job.trained_tokens} trained tokens")

        question = [{"role": "user", "content": "What is the code for splenk?"}]
        for model in (base, ref):
            reply = hub.chat.completions.create(
                model=model, messages=question, max_completion_tokens=16, temperature=0
            )
            print(f"{model:>36}: {reply.choices[0].message.content!r}")


if __name__ == "__main__":
    main()
