"""The official `openai` package against tmod's OpenAI-compatible API (daemon/tests/openai.rs).

Usage: openai_client.py BASE_URL. Prints one JSON object with what it saw; exits non-zero (with
the assertion that failed) when the API does not behave as OpenAI's does.
"""

import json
import sys

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused-on-loopback", max_retries=0, timeout=120)
seen = {}

# The models.
models = [m.id for m in client.models.list()]
assert models == ["tmo", "tmo-local", "tmo-cloud"], models

# A plain completion, with the response headers.
messages = [
    {"role": "system", "content": "You are a kitchen assistant. Answer in one sentence."},
    {"role": "user", "content": "How long should I boil an egg?"},
]
raw = client.chat.completions.with_raw_response.create(
    model="tmo", messages=messages, max_tokens=12, temperature=0, seed=7
)
first = raw.parse()
assert first.object == "chat.completion", first
assert first.choices[0].message.role == "assistant"
answer = first.choices[0].message.content
assert answer, first
assert first.choices[0].finish_reason in ("stop", "length"), first.choices[0].finish_reason
assert first.usage.completion_tokens > 0 and first.usage.total_tokens > first.usage.completion_tokens
tmo = first.tmo
assert tmo["turn"] == 0 and tmo["route"].startswith("local"), tmo
assert raw.headers["x-tmo-dialogue-id"] == tmo["dialogue_id"]
seen["first"] = {"model": first.model, "dialogue_id": tmo["dialogue_id"], "answer": answer}

# The same conversation continued, as a stateless client sends it: one dialogue, turn 1.
messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And a soft one?"}]
second = client.chat.completions.create(model="tmo", messages=messages, max_completion_tokens=12)
assert second.tmo["dialogue_id"] == tmo["dialogue_id"], (second.tmo, tmo)
assert second.tmo["turn"] == 1, second.tmo
seen["second"] = {"dialogue_id": second.tmo["dialogue_id"], "turn": second.tmo["turn"]}

# Streamed, with usage: text in deltas, the outcome on the last chunk, then the usage chunk.
chunks = list(
    client.chat.completions.create(
        model="tmo",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Name a spice for soup."}]}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text, chunks
assert all(c.object == "chat.completion.chunk" for c in chunks)
assert chunks[0].choices[0].delta.role == "assistant"
finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
assert len(finished) == 1 and "latency_secs" in finished[0].tmo, finished
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0, chunks[-1]
seen["stream"] = {"chunks": len(chunks), "text": text, "turn": finished[0].tmo["turn"]}

# Forced routes: tmo-local answers locally whatever the policy prefers, logged as forced; with no
# cloud configured, tmo-cloud is refused as unavailable (503), not answered locally.
forced = client.chat.completions.create(
    model="tmo-local", messages=[{"role": "user", "content": "Is basil a herb?"}], max_tokens=8
)
assert forced.tmo["forced"] is True and forced.tmo["route"] == "local", forced.tmo
assert forced.tmo["propensity"] == 1.0, forced.tmo
seen["forced"] = {"dialogue_id": forced.tmo["dialogue_id"]}
try:
    client.chat.completions.create(model="tmo-cloud", messages=[{"role": "user", "content": "Hi"}])
    raise AssertionError("tmo-cloud was served without a cloud")
except openai.InternalServerError as e:
    assert e.status_code == 503 and e.code == "route_unavailable", e.body

# Errors come as OpenAI's error objects and statuses.
try:
    client.chat.completions.create(model="gpt-4o", messages=messages)
    raise AssertionError("an unknown model was served")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e.body
try:
    client.chat.completions.create(model="tmo", messages=messages, n=2)
    raise AssertionError("n=2 was served")
except openai.BadRequestError as e:
    assert e.body["param"] == "n", e.body
try:
    client.chat.completions.create(model="tmo", messages=[{"role": "assistant", "content": "Hi"}])
    raise AssertionError("a conversation without a question was served")
except openai.BadRequestError as e:
    assert e.body["param"] == "messages", e.body
seen["errors"] = 3

print(json.dumps(seen))
