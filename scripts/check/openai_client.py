"""The official `openai` Python client against a running `colossal serve`: a streamed chat
completion, a whole one, a streamed text completion, and the client's error classes for bad
requests (the server must answer them OpenAI's way and keep serving).

    python scripts/check/openai_client.py [--base-url http://127.0.0.1:8000/v1]
Prints one JSON object; exits non-zero if a check fails. Needs `pip install openai`.
"""
import argparse
import json
import sys
import time

import openai

ap = argparse.ArgumentParser()
ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
args = ap.parse_args()
client = openai.OpenAI(base_url=args.base_url, api_key="not-needed", max_retries=0)
model = client.models.list().data[0].id
report = {"openai_version": openai.__version__, "model": model}

messages = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me about the sea."}]
t0 = time.time()
pieces, first, usage, finish = [], None, None, None
stream = client.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                        temperature=0.0, stream=True,
                                        stream_options={"include_usage": True})
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    if chunk.choices:
        c = chunk.choices[0]
        if c.delta.content:
            first = first or time.time()
            pieces.append(c.delta.content)
        finish = c.finish_reason or finish
streamed = "".join(pieces)
report["chat_stream"] = {"chunks": len(pieces), "text": streamed, "finish_reason": finish,
                         "usage": usage.model_dump() if usage else None,
                         "first_token_ms": round(1000 * (first - t0), 1) if first else None}
whole = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0.0)
report["chat_whole_equals_stream"] = whole.choices[0].message.content == streamed
report["chat_whole_usage"] = whole.usage.model_dump()

text = "".join(c.choices[0].text for c in client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=16, temperature=0.0, stream=True) if c.choices)
report["completion_stream"] = text

errors = {}
for name, call in {
    "unknown model": lambda: client.chat.completions.create(model="gpt-4o", messages=messages),
    "max_tokens too large": lambda: client.chat.completions.create(model=model, messages=messages, max_tokens=10**7),
    "n=2": lambda: client.chat.completions.create(model=model, messages=messages, n=2, max_tokens=4),
    "tools": lambda: client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                                    tools=[{"type": "function", "function": {"name": "f"}}]),
}.items():
    try:
        call()
        errors[name] = "no error"
    except openai.APIStatusError as e:
        errors[name] = {"status": e.status_code, "class": type(e).__name__,
                        "message": e.body.get("message") if isinstance(e.body, dict) else str(e.body)}
report["errors"] = errors
after = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0.0)
report["serving_after_errors"] = after.choices[0].finish_reason is not None

ok = (len(pieces) > 0 and report["chat_whole_equals_stream"] and usage is not None
      and usage.completion_tokens == 24 and text != "" and report["serving_after_errors"]
      and errors["unknown model"] != "no error" and errors["unknown model"]["status"] == 404
      and all(e != "no error" and 400 <= e["status"] < 500 for e in errors.values()))
report["ok"] = ok
print(json.dumps(report, indent=1, ensure_ascii=False))
sys.exit(0 if ok else 1)
