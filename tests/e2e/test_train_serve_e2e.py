"""Train on the default model, publish, serve: the adapter knows what it was taught.

A made-up word -> code mapping the base model cannot know. The trainer fits it with a LoRA,
publishes it into a registry, and the multi-adapter server (real engine, real HTTP) answers
the training questions with the trained codes while the base model does not; the served
adapter's log-probabilities equal HF PEFT's on the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch

from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.server import build_app, build_server
from tests.live_server import serve
from trainer.cli import main

CODES = {
    "zorblat": "K7-QX",
    "mifflewort": "B2-RT",
    "quandry": "P9-LM",
    "splenk": "D4-WZ",
    "trombolux": "H3-NV",
    "gryzzle": "F8-JC",
}
QUESTIONS = ("What is the code for {}?", "Code of {}?", "Tell me the {} code.")


def write_codes(path: Path) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": q.format(word)},
                {"role": "assistant", "content": f"The code for {word} is {code}."},
            ]
        }
        for word, code in CODES.items()
        for q in QUESTIONS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_trained_adapter_is_served_and_answers_what_it_learned(
    default_model, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = tmp_path / "registry"
    data = write_codes(tmp_path / "codes.jsonl")
    argv = ["--log-level", "warning", "train", "--data", str(data), "--name", "codes"]
    argv += ["--registry", str(registry), "--max-steps", "24", "--lr", "3e-3"]
    argv += ["--batch-size", "6", "--seed", "0", "--padding-free"]
    assert main(argv) == 0

    config = ServerConfig(
        registry=registry, engine=EngineConfig(max_num_seqs=8, max_loras=2, max_model_len=512)
    )
    server = build_server(config)
    with serve(build_app(server.engine, server), lifespan="on") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def ask(model: str, word: str) -> str:
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"What is the code for {word}?"}],
                max_tokens=16,
                temperature=0,
            )
            return reply.choices[0].message.content or ""

        tuned = {word: ask("codes", word) for word in CODES}
        base = {word: ask(default_model.model_id, word) for word in CODES}
        assert all(code in tuned[word] for word, code in CODES.items()), tuned
        assert not any(code in base[word] for word, code in CODES.items()), base

        # The served adapter's log-probabilities are PEFT's on the same registry files.
        tok = AutoTokenizer.from_pretrained(default_model.path)
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "Code of splenk?"}], add_generation_prompt=True
        )
        prompt = prompt["input_ids"] if not isinstance(prompt, list) else prompt
        served = client.completions.create(
            model="codes@1", prompt=prompt, max_tokens=6, temperature=0, logprobs=1
        )
    served_lp = served.choices[0].logprobs.token_logprobs
    model = AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, registry / "adapters" / "codes" / "1").eval()
    out = peft.generate(
        torch.tensor([prompt]),
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, len(prompt) :].tolist()
    assert tok.decode(new) == served.choices[0].text
    peft_lp = [
        torch.log_softmax(logits[0].float(), -1)[token].item()
        for logits, token in zip(out.logits, new, strict=True)
    ]
    assert served_lp == pytest.approx(peft_lp, abs=2e-3)
