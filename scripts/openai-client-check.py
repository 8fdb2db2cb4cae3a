#!/usr/bin/env python3
"""Checks `farsight serve` with the official `openai` Python package (not part of CI).

    python3 -m venv .venv-openai && .venv-openai/bin/pip install openai
    target/release/farsight serve --port 8000 &          # the default model
    .venv-openai/bin/python scripts/openai-client-check.py --base-url http://127.0.0.1:8000/v1

Runs completions and chat completions, whole and streamed, lists the models, and checks that
the client raises its own error types for an unknown model (404) and n=2 (400). Exits non-zero
on the first failed check.
"""
import argparse
import sys

import openai


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")

    models = client.models.list()
    name = models.data[0].id
    print(f"models: {[m.id for m in models.data]}")

    c = client.completions.create(model=name, prompt="The capital of France is", max_tokens=8, temperature=0)
    print(f"completion: {c.choices[0].text!r} ({c.choices[0].finish_reason}, {c.usage})")
    assert "Paris" in c.choices[0].text

    parts = [
        ch.choices[0].text
        for ch in client.completions.create(
            model=name, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
        if ch.choices
    ]
    assert "".join(parts) == c.choices[0].text, parts

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=30, temperature=0, seed=1)
    text = r.choices[0].message.content
    print(f"chat: {text!r} ({r.choices[0].finish_reason}, {r.usage})")
    assert "Paris" in text

    stream = client.chat.completions.create(
        model=name, messages=msgs, max_tokens=30, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    parts, usage = [], None
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
        if ch.usage:
            usage = ch.usage
    assert "".join(parts) == text, parts
    assert usage is not None and usage.completion_tokens > 0
    print(f"chat stream: {len(parts)} chunks, usage {usage}")

    try:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        print(f"unknown model: {e.status_code} {e.body}")
    try:
        client.chat.completions.create(model=name, messages=msgs, max_tokens=1, n=2)
        raise AssertionError("n=2 accepted")
    except openai.BadRequestError as e:
        print(f"n=2: {e.status_code} {e.body}")
    print("openai client check: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
