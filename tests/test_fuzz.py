"""Fuzz the API: from its own OpenAPI schema (schemathesis: /v1's JSON, /multimodal's form), /multimodal
with random bytes in each file field and random field values, and /v1 bodies at the byte level (valid bodies
cut, repeated, flipped, given wrong types, huge numbers, deep nesting, bad UTF-8, wrong Content-Types).
Whatever arrives: never a 5xx, never a hang, errors in the API's shape, no temporary file left, and a server
that still answers."""

from __future__ import annotations

import base64
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import make_media
import pytest
import schemathesis
from conftest import FakeEngine
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_omni_server.core.settings import Settings
from qwen_omni_server.server import create_app

app = create_app(Settings(_env_file=None, model_path="unused", max_request_mb=2), engine=FakeEngine())
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_server_fail(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"


SEEDS = [make_media.image_bytes("PNG"), make_media.audio_bytes("wav", 0.3), make_media.video_bytes(0.5, audio=False)]
file_bytes = st.one_of(
    st.binary(max_size=3000),
    st.sampled_from(SEEDS).flatmap(lambda seed: st.integers(0, len(seed)).map(lambda cut: seed[:cut])),
    st.sampled_from(SEEDS).flatmap(  # a real file with a few bytes changed
        lambda seed: st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), max_size=8).map(
            lambda edits: bytes(_edit(bytearray(seed), edits))
        )
    ),
)
field_value = st.one_of(st.text(max_size=40), st.sampled_from(["true", "false", "0", "1", "-1", "999999999999", "wav"]))
form_fields = st.dictionaries(
    st.sampled_from(
        ["text", "max_new_tokens", "extract_video_audio", "extract_video_frame", "max_pixels", "response_format"]
    ),
    field_value,
    max_size=4,
)
files = st.lists(
    st.tuples(st.sampled_from(["images", "audios", "videos"]), st.text(max_size=20), file_bytes), max_size=3
)


def _edit(data: bytearray, edits) -> bytearray:
    for index, value in edits:
        data[index] = value
    return data


def test_random_files_and_fields_get_an_answer_and_leave_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where uploads spool to disk
    fuzz_app = create_app(
        Settings(_env_file=None, model_path="unused", decode_timeout_seconds=10, max_new_tokens_limit=64),
        engine=FakeEngine(),
    )

    with TestClient(fuzz_app) as client:

        @given(data=form_fields, uploads=files)
        @settings(max_examples=60, deadline=15_000, suppress_health_check=list(HealthCheck))
        def fuzz(data, uploads):
            parts = [(field, (name, content, "application/octet-stream")) for field, name, content in uploads]
            response = client.post("/multimodal", data=data, files=parts)
            assert response.status_code < 500, response.text[:300]

        fuzz()
        big = client.post("/multimodal", files=[("videos", ("big.bin", os.urandom(3 * 1024 * 1024)))])
        assert big.status_code in (400, 415)  # spooled to disk (over 1 MiB), refused
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- /v1 bodies at the byte level
#
# Valid /v1 bodies, serialized, then broken the ways a careless or hostile client breaks them: cut anywhere,
# a slice repeated, bytes flipped, inserted or deleted, values replaced by wrong types, huge numbers,
# NaN/Infinity, very long strings, nesting far past Python's recursion limit, duplicate keys, invalid UTF-8,
# a BOM, UTF-16, and wrong Content-Types. Whatever arrives: an answer below 500 (an error in OpenAI's shape,
# or a stream that ends), within a client's timeout, and a server that still answers a valid request.

V1 = "/v1/chat/completions"
ANSWER_SECONDS = 10  # a client's timeout: an answer, streamed or whole, that takes longer is a hang
PNG = make_media.image_bytes("PNG", (16, 16))
WAV = make_media.audio_bytes("wav", 0.1, rate=16_000, channels=1)


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


V1_SEEDS: dict[str, dict[str, Any]] = {
    "text": {
        "model": "qwen2.5-omni",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 1,
        "stop": ["\n\n"],
    },
    "image": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": data_url("image/png", PNG)}},
                ],
            }
        ],
        "max_tokens": 8,
        "mm_processor_kwargs": {"max_pixels": 50_176},
    },
    "audio": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": base64.b64encode(WAV).decode(), "format": "wav"}},
                    {"type": "text", "text": "What do you hear?"},
                ],
            }
        ],
        "max_tokens": 8,
    },
    "stream": {
        "messages": [{"role": "user", "content": "Count to three."}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 8,
    },
    "speech": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe it aloud."},
                    {"type": "image_url", "image_url": data_url("image/png", PNG)},
                ],
            }
        ],
        "modalities": ["text", "audio"],
        "audio": {"voice": "Alto", "format": "wav"},
        "max_tokens": 8,
    },
    "streamed speech": {
        "messages": [{"role": "user", "content": "Say hi."}],
        "stream": True,
        "modalities": ["text", "audio"],
        "audio": {"voice": "Bass", "format": "pcm16"},
    },
}


class Raw:
    """JSON text put into a body as it is: what json.dumps cannot write (10**400, deep nesting, bad UTF-8)."""

    def __init__(self, text: bytes) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({shown(self.text, 60)})"


class Pairs:
    """An object written with these (key, value) pairs in this order, duplicate keys included."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs

    def __repr__(self) -> str:
        return f"Pairs({self.pairs!r})"


def dump(value: Any) -> bytes:
    """`value` as JSON bytes, with its Raw parts as they are and its Pairs with every pair."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, list):
        return b"[" + b",".join(dump(item) for item in value) + b"]"
    if isinstance(value, dict | Pairs):
        pairs = value.pairs if isinstance(value, Pairs) else list(value.items())
        return b"{" + b",".join(json.dumps(key).encode() + b":" + dump(item) for key, item in pairs) + b"}"
    return json.dumps(value).encode()


def shown(data: bytes, keep: int = 300) -> str:
    """A body as a report shows it: its head and tail, and its length."""
    if len(data) <= 2 * keep:
        return repr(data)
    return f"{data[:keep]!r} ... {data[-keep:]!r} ({len(data):,} bytes)"


def deep(depth: int, kind: str = "[", closed: bool = True) -> Raw:
    """`depth` arrays (or objects) one inside the other, closed or not."""
    if kind == "[":
        return Raw(b"[" * depth + (b"]" * depth if closed else b""))
    return Raw(b'{"a":' * depth + b"1" + (b"}" * depth if closed else b""))


HUGE_NUMBERS = [
    b"1e308",
    b"-1e308",
    b"1e309",
    b"1e-400",
    b"1" + b"0" * 400,  # 10**400 as a literal
    b"-" + b"9" * 400,
    b"1" + b"0" * 5_000,  # past Python's 4,300-digit int limit
    b"18446744073709551616",
    b"-9223372036854775809",
    b"-0",
    b"-0.0",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"0.1e99999",
]
BAD_STRINGS = [
    b'"\xff\xfe"',  # not UTF-8
    b'"caf\xc3"',  # a sequence cut short
    b'"\xc0\xaf"',  # overlong
    b'"\xed\xa0\x80"',  # an encoded surrogate
    b'"\xf4\x90\x80\x80"',  # past U+10FFFF
    rb'"\ud800"',  # a lone surrogate, escaped
    rb'"\udfff\ud800"',
    rb'"\u0000"',
    rb'"\x41"',  # not a JSON escape
    rb'"\u12"',
    b'"tab\there"',  # a raw control character
]
NASTY_URLS = [
    "data:",
    "data:,",
    "data:;base64,",
    "data:;base64,====",
    "data:image/png;base64,@@@@",
    "data:,%ff%fe%00",
    "data:,\ud800",
    "http://[",
    "http://[::1]:99999/a.png",
    "https://127.0.0.1/a.png",
    "file:///etc/passwd",
    "//example.com/a.png",
    "data:image/png;base64," + base64.b64encode(PNG).decode()[:21],  # cut, not a multiple of 4
    "data:image/png;base64," + base64.b64encode(PNG[:40]).decode(),  # valid base64 of a cut file
]
MEDIA_STRINGS = {data_url("image/png", PNG), base64.b64encode(WAV).decode()}
LONG_STRINGS = ["a" * 100_000, "é" * 50_000, "\U0001f600" * 20_000, "\\" * 50_000]
DEPTHS = [10, 500, 990, 1_000, 5_000, 10_000, 100_000]

nasty_values = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1, 2**63, 0.5, 1e308, -1e308, "", "x", [], [None], {}, {"": None}]),
    st.sampled_from(HUGE_NUMBERS).map(Raw),
    st.sampled_from(BAD_STRINGS).map(Raw),
    st.builds(deep, st.sampled_from(DEPTHS), st.sampled_from("[{"), st.booleans()),
    st.sampled_from(LONG_STRINGS),
    st.sampled_from(NASTY_URLS),
    st.text(max_size=20),
    st.integers(),
    st.floats(),
)
CONTENT_TYPES = [
    "application/json; charset=utf-8",
    None,  # no Content-Type at all
    "",
    "text/plain",
    "multipart/form-data; boundary=fuzz",
    "application/x-www-form-urlencoded",
    "application/octet-stream",
    "application/vnd.api+json",
    "application/json; charset=utf-16",
    "application/json; charset=latin-1",
]
content_types = st.one_of(st.just("application/json"), st.sampled_from(CONTENT_TYPES))
INSERTS = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00", b"{", b"[", b"}", b"]", b'"', b"\\", b",", b":"]


def paths(value: Any, here: tuple = ()) -> list[tuple]:
    """Every place in a document (the document itself first); Raw and Pairs are leaves."""
    found = [here]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*here, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*here, index))
    return found


def at(value: Any, path: tuple) -> Any:
    for step in path:
        value = value[step]
    return value


def replaced(value: Any, path: tuple, new: Any) -> Any:
    """A copy of `value` with `new` at `path` (a key it names may be new)."""
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new) if path[1:] else new
    return copy


def dropped(value: Any, path: tuple) -> Any:
    """A copy of `value` without what is at `path`."""
    parent = at(value, path[:-1])
    if isinstance(parent, dict):
        rest: Any = {key: item for key, item in parent.items() if key != path[-1]}
    else:
        rest = [item for index, item in enumerate(parent) if index != path[-1]]
    return replaced(value, path[:-1], rest)


def mutate_value(draw: st.DrawFn, doc: Any) -> tuple[Any, str]:
    """One change of the document's values: replaced, dropped, a key duplicated, wrapped, repeated, or a media
    file inside changed (its base64 still valid)."""
    how = draw(st.sampled_from(["replace", "replace", "drop", "duplicate key", "wrap", "repeat", "media"]))
    media = [path for path in paths(doc) if isinstance(at(doc, path), str) and at(doc, path) in MEDIA_STRINGS]
    path = draw(st.sampled_from(media if how == "media" and media else paths(doc)))
    where = ".".join(map(str, path)) or "the body"
    current = at(doc, path)
    if how == "media" and media:
        header, comma, payload = current.rpartition(",")
        data, step = mutate_bytes(draw, base64.b64decode(payload), whole_body=False)
        return replaced(doc, path, header + comma + base64.b64encode(data).decode()), f"{where}'s file: {step}"
    if how == "drop" and path:
        return dropped(doc, path), f"drop {where}"
    if how == "duplicate key" and isinstance(current, dict) and current:
        key, value = draw(st.sampled_from(list(current))), draw(nasty_values)
        return replaced(doc, path, Pairs([*current.items(), (key, value)])), f"{where}: {key!r} again as {value!r}"
    if how == "wrap":
        wrapped = draw(st.sampled_from([[current], {"value": current}]))
        return replaced(doc, path, wrapped), f"wrap {where} in {type(wrapped).__name__}"
    if how == "repeat" and isinstance(current, list) and current:
        times = draw(st.integers(2, 40))
        return replaced(doc, path, current * times), f"repeat {where}'s items {times} times"
    value = draw(nasty_values)
    return replaced(doc, path, value), f"{where} = {value!r:.120}"


def mutate_bytes(draw: st.DrawFn, body: bytes, whole_body: bool = True) -> tuple[bytes, str]:
    """One change of the serialized body (or of a media file in it): cut, a slice repeated, a byte flipped,
    bytes inserted or deleted; for the whole body also another encoding (UTF-8 with a BOM, UTF-16, UTF-32)."""
    size = len(body)
    kinds = ["cut", "cut", "repeat", "flip", "flip", "insert", "insert", "delete"] + (["utf"] if whole_body else [])
    how = draw(st.sampled_from(kinds))
    if how == "cut":
        cut = draw(st.integers(0, size))
        return body[:cut], f"cut at byte {cut}"
    if how == "repeat":
        start = draw(st.integers(0, size))
        end = draw(st.integers(start, min(size, start + 2_000)))
        times = draw(st.integers(2, 20))
        return body[:start] + body[start:end] * times + body[end:], f"bytes {start}:{end} {times} times"
    if how == "flip" and size:
        index, mask = draw(st.integers(0, size - 1)), draw(st.integers(1, 255))
        return body[:index] + bytes([body[index] ^ mask]) + body[index + 1 :], f"byte {index} ^ {mask:#x}"
    if how in ("insert", "flip"):
        index = draw(st.integers(0, size))
        extra = draw(st.one_of(st.sampled_from(INSERTS), st.binary(min_size=1, max_size=8)))
        return body[:index] + extra + body[index:], f"{extra!r} inserted at {index}"
    if how == "delete":
        start = draw(st.integers(0, size))
        end = draw(st.integers(start, size))
        return body[:start] + body[end:], f"bytes {start}:{end} deleted"
    codec = draw(st.sampled_from(["utf-8-sig", "utf-16", "utf-16-le", "utf-32"]))
    try:
        return body.decode().encode(codec, "surrogatepass"), f"in {codec}"
    except UnicodeDecodeError:  # not UTF-8 already
        return b"\xef\xbb\xbf" + body, "a UTF-8 BOM in front"


@dataclass
class Case:
    """A body to send, with how it was made (what a failure report shows)."""

    seed: str
    steps: list[str]
    body: bytes
    content_type: str | None

    def __repr__(self) -> str:
        sent = f"content_type={self.content_type!r}, body={shown(self.body)}"
        return f"Case(seed={self.seed!r}, steps={self.steps!r}, {sent})"


@st.composite
def mutated_bodies(draw: st.DrawFn) -> Case:
    seed = draw(st.sampled_from(sorted(V1_SEEDS)))
    doc: Any = V1_SEEDS[seed]
    steps = []
    for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
        doc, step = mutate_value(draw, doc)
        steps.append(step)
    body = dump(doc)
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        body, step = mutate_bytes(draw, body)
        steps.append(step)
    return Case(seed, steps, body, draw(content_types))


@pytest.fixture(scope="module")
def v1_client():
    """The server around the fake engine, a body limit of 1 MiB, and quick timeouts."""
    options = {"max_request_mb": 1, "decode_timeout_seconds": 5, "request_timeout_seconds": 5}
    v1_app = create_app(Settings(_env_file=None, model_path="unused", **options), engine=FakeEngine())
    with TestClient(v1_app, raise_server_exceptions=False) as client:
        yield client


def post(client: TestClient, body: bytes, content_type: str | None = "application/json") -> httpx.Response:
    """POST /v1/chat/completions, with a client's timeout: the whole answer (a stream to its end) within
    ANSWER_SECONDS, or the test fails."""
    headers = {} if content_type is None else {"content-type": content_type}
    answer: dict[str, Any] = {}

    def call() -> None:
        try:
            answer["response"] = client.post(V1, content=body, headers=headers)
        except BaseException as error:  # noqa: BLE001 - raised again on the test's thread
            answer["error"] = error

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(ANSWER_SECONDS)
    assert not caller.is_alive(), f"no whole answer in {ANSWER_SECONDS} s to {content_type!r} {shown(body)}"
    if "error" in answer:
        raise answer["error"]
    return answer["response"]


def check_answer(response: httpx.Response, body: bytes, content_type: str | None) -> None:
    """Below 500; an error is JSON in OpenAI's shape; a stream ends with [DONE], its events JSON."""
    sent = f"{content_type!r} {shown(body)}"
    status, text = response.status_code, response.text
    assert status < 500, f"{sent}: {status} {text[:500]}"
    if status >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise AssertionError(f"{sent}: {status} answered not in OpenAI's error shape: {text[:500]}") from None
        assert isinstance(error, dict), f"{sent}: {text[:500]}"
        assert isinstance(error.get("message"), str) and error["message"], f"{sent}: {text[:500]}"
        assert isinstance(error.get("type"), str) and error["type"], f"{sent}: {text[:500]}"
        assert {"param", "code"} <= error.keys(), f"{sent}: {text[:500]}"
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert text.endswith("data: [DONE]\n\n"), f"{sent}: a stream that did not end: {text[-500:]}"
        events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
        assert all(isinstance(json.loads(event), dict) for event in events[:-1]), f"{sent}: {text[:500]}"
    else:
        assert response.json()["object"] == "chat.completion", f"{sent}: {text[:500]}"


VALID = dump(V1_SEEDS["text"])


def check_healthy(client: TestClient) -> None:
    """No generation left running or waiting, and a valid request still answered."""
    deadline = time.monotonic() + 2
    while (stats := client.get("/health").json()["generations"])["running"] + stats["waiting"]:
        assert time.monotonic() < deadline, f"generations left behind: {stats}"
        time.sleep(0.01)
    response = post(client, VALID)
    assert response.status_code == 200, f"a valid request after it: {response.status_code} {response.text[:300]}"


def test_the_v1_seeds_are_valid(v1_client):
    for name, doc in V1_SEEDS.items():
        response = post(v1_client, dump(doc))
        assert response.status_code == 200, f"{name}: {response.text[:300]}"
        check_answer(response, dump(doc), "application/json")


@given(case=mutated_bodies())
@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
def test_mutated_v1_bodies_are_answered_in_openai_shape(v1_client, case):
    check_answer(post(v1_client, case.body, case.content_type), case.body, case.content_type)
    check_healthy(v1_client)


URL_PIECES = ["data:", ",", ";base64,", "image/png", "http://", "https://", "[", "]", "::1", ":", "@", "%", "%ff"]
URL_PIECES += ["#", "?", "/", "\ud800", "\udfff", "\x00", " ", "=", "AAAA", "localhost", "127.0.0.1", ":99999", ":0"]
URL_STARTS = ["", "data:", "data:;base64,", "data:image/png;base64,", "data:audio/wav,", "http://", "https://"]
media_urls = st.builds(
    "".join,
    st.lists(st.one_of(st.sampled_from(URL_STARTS), st.sampled_from(URL_PIECES), st.text(max_size=4)), max_size=8),
)


@given(
    kind=st.sampled_from(["image_url", "audio_url", "video_url", "input_audio"]),
    url=st.one_of(st.builds(str.__add__, st.sampled_from(URL_STARTS), media_urls), st.sampled_from(NASTY_URLS)),
    as_string=st.booleans(),
    stream=st.booleans(),
)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_media_url_is_answered_in_openai_shape(v1_client, kind, url, as_string, stream):
    """A media part's URL (or input_audio's base64) made of the pieces URL parsers trip on."""
    if kind == "input_audio":
        part = {"type": kind, kind: {"data": url, "format": "wav"}}
    else:
        part = {"type": kind, kind: url if as_string else {"url": url}}
    body = dump({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}], "stream": stream})
    check_answer(post(v1_client, body), body, "application/json")
    check_healthy(v1_client)


# The nasty ones, every run: (id, body, content type, whether it must be refused with a 4xx)
def _with(seed: str, path: tuple, value: Any) -> bytes:
    return dump(replaced(V1_SEEDS[seed], path, value))


def _cut_in_base64(seed: str, marker: bytes) -> bytes:
    """The seed's body cut in the middle of its data URL's base64."""
    body = dump(V1_SEEDS[seed])
    start = body.index(marker) + len(marker)
    end = body.index(b'"', start)
    return body[: (start + end) // 2]


JSON = "application/json"
IMAGE_URL = ("messages", 0, "content", 1, "image_url", "url")
IMAGE_B64 = base64.b64encode(PNG).decode()
NASTY_CASES: list[tuple[str, bytes, str | None, bool]] = [
    ("array 10,000 deep", deep(10_000).text, JSON, True),
    ("object 10,000 deep", deep(10_000, "{").text, JSON, True),
    ("array 100,000 deep, unclosed", deep(100_000, closed=False).text, JSON, True),
    ("messages 10,000 deep", _with("text", ("messages",), deep(10_000)), JSON, True),
    ("content 10,000 deep", _with("text", ("messages", 1, "content"), deep(10_000)), JSON, True),
    ("model 10,000 objects deep", _with("text", ("model",), deep(10_000, "{")), JSON, True),
    ("stop 990 deep", _with("text", ("stop",), deep(990)), JSON, True),
    ("mm_processor_kwargs 990 deep", _with("image", ("mm_processor_kwargs",), deep(990, "{")), JSON, True),
    ("image_url 500 deep", _with("image", IMAGE_URL[:-1], deep(500, "{")), JSON, True),
    ("max_tokens 10**400", _with("text", ("max_tokens",), Raw(b"1" + b"0" * 400)), JSON, True),
    ("seed 10**400", _with("text", ("seed",), Raw(b"1" + b"0" * 400)), JSON, True),
    ("seed -10**400", _with("text", ("seed",), Raw(b"-1" + b"0" * 400)), JSON, True),
    ("temperature 10**400", _with("text", ("temperature",), Raw(b"1" + b"0" * 400)), JSON, True),
    ("top_k 10**5000", _with("text", ("top_k",), Raw(b"1" + b"0" * 5_000)), JSON, True),
    ("n 10**400", _with("text", ("n",), Raw(b"1" + b"0" * 400)), JSON, True),
    ("max_pixels 1e308", _with("image", ("mm_processor_kwargs", "max_pixels"), Raw(b"1e308")), JSON, True),
    ("max_tokens -0", _with("text", ("max_tokens",), Raw(b"-0")), JSON, True),
    ("temperature NaN", _with("text", ("temperature",), Raw(b"NaN")), JSON, True),
    ("top_p Infinity", _with("text", ("top_p",), Raw(b"Infinity")), JSON, True),
    ("max_tokens -Infinity", _with("text", ("max_tokens",), Raw(b"-Infinity")), JSON, True),
    ("invalid UTF-8 in the text", _with("text", ("messages", 1, "content"), Raw(b'"h\xff\xfei"')), JSON, False),
    ("invalid UTF-8 in a key", b'{"mess\xc3ages":[]}', JSON, True),
    ("invalid UTF-8 only", b"\xff\xfe\xfd", JSON, True),
    ("an encoded surrogate", _with("text", ("model",), Raw(b'"\xed\xa0\x80"')), JSON, False),
    ("a lone surrogate escaped", _with("text", ("messages", 1, "content"), Raw(rb'"\ud800"')), JSON, False),
    ("a lone surrogate in stop", _with("stream", ("stop",), Raw(rb'"\udfff"')), JSON, False),
    ("a UTF-8 BOM", b"\xef\xbb\xbf" + VALID, JSON, False),
    ("UTF-16", VALID.decode().encode("utf-16"), JSON, False),
    ("cut mid-base64 of an image", _cut_in_base64("image", b"base64,"), JSON, True),
    ("cut mid-base64 of input_audio", _cut_in_base64("audio", b'"data":"'), JSON, True),
    ("closed mid-base64", _with("image", IMAGE_URL, "data:image/png;base64," + IMAGE_B64[:21]), JSON, True),
    ("a cut PNG", _with("image", IMAGE_URL, data_url("image/png", PNG[: len(PNG) // 2])), JSON, True),
    ("image URL http://[", _with("image", IMAGE_URL, "http://["), JSON, True),
    ("image URL data:,\\ud800", _with("image", IMAGE_URL, "data:,\ud800"), JSON, True),
    ("duplicate messages", VALID[:-1] + b',"messages":5}', JSON, False),
    ("duplicate stream", dump(Pairs([*V1_SEEDS["stream"].items(), ("stream", False)])), JSON, False),
    ("a string 1.5 MiB long", _with("text", ("user",), "a" * 1_500_000), JSON, True),
    (
        "messages repeated 10,000 times",
        _with("text", ("messages",), V1_SEEDS["text"]["messages"] * 10_000),
        JSON,
        False,
    ),
    ("no Content-Type", VALID, None, False),
    ("text/plain", VALID, "text/plain", False),
    ("multipart, JSON inside", VALID, "multipart/form-data; boundary=fuzz", False),
    (
        "multipart, a real form",
        b'--fuzz\r\nContent-Disposition: form-data; name="messages"\r\n\r\n[]\r\n--fuzz--\r\n',
        "multipart/form-data; boundary=fuzz",
        True,
    ),
    ("an empty body", b"", JSON, True),
    ("null", b"null", JSON, True),
    ("a bare number", b"1" + b"0" * 400, JSON, True),
]


@pytest.mark.parametrize(
    "body, content_type, refused", [case[1:] for case in NASTY_CASES], ids=[case[0] for case in NASTY_CASES]
)
def test_nasty_v1_bodies_are_answered_in_openai_shape(v1_client, body, content_type, refused):
    response = post(v1_client, body, content_type)
    check_answer(response, body, content_type)
    if refused:
        assert 400 <= response.status_code < 500, f"{content_type!r} {shown(body)}: {response.status_code}"
    check_healthy(v1_client)
