"""The fleet's choice of backend when one fails (serve/fleet.py), on backends simulated at the HTTP level
(httpx.MockTransport): what counts as the backend's failure (another is tried), what is the request's own (an
error event in the stream: no retry, nobody marked down), a failure after part of the answer, none left (503), and
a backend tried again after its backoff. tests/test_fleet.py does the same with real llama-server processes."""

from __future__ import annotations

import json
import time

import pytest

httpx = pytest.importorskip("httpx")

from logo_edge.serve.fleet import Backend, Fleet, FleetError, FleetUnavailable  # noqa: E402


def _events(*evs) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in evs)


ANSWER = _events({"content": "Hel", "tokens_predicted": 1}, {"content": "lo", "tokens_predicted": 2},
                 {"content": "", "stop": True, "stop_type": "limit", "tokens_predicted": 2})


class _Cut(httpx.SyncByteStream):
    """A stream that sends `head` and then loses the connection."""

    def __init__(self, head: bytes):
        self.head = head

    def __iter__(self):
        yield self.head
        raise httpx.ReadError("connection reset by peer")


def _fleet(behaviour: dict[str, object]) -> tuple[Fleet, list[str]]:
    """A fleet of backends http://a, http://b, ...; behaviour[url]: bytes to stream, an exception to raise, a
    _Cut stream, or a callable returning one of those."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.host}"
        calls.append(url)
        what = behaviour[url]
        what = what() if callable(what) and not isinstance(what, type) else what
        if isinstance(what, Exception):
            raise what
        if isinstance(what, httpx.SyncByteStream):
            return httpx.Response(200, stream=what)
        return httpx.Response(200, content=what)

    fleet = Fleet([Backend(u, {"x": 0}, cache_prompt=True) for u in behaviour])
    fleet._http.close()
    fleet._http = httpx.Client(transport=httpx.MockTransport(handler))
    return fleet, calls


def _text(fleet: Fleet, mixture=None) -> tuple[str, dict]:
    events = list(fleet.generate([1, 2, 3], mixture or {"x": 1.0}, {"n_predict": 2}))
    return "".join(p for p, _ in events), events[-1][1]


def test_a_refused_backend_is_taken_out_and_the_request_goes_to_the_next():
    fleet, calls = _fleet({"http://a": httpx.ConnectError("connection refused"), "http://b": ANSWER})
    text, final = _text(fleet)
    assert text == "Hello" and final["backend"] == "http://b" and calls == ["http://a", "http://b"]
    a, b = fleet.backends
    assert "ConnectError" in a.down and b.down is None and a.inflight == b.inflight == 0
    _text(fleet)  # a is down (backoff): not even tried
    assert calls == ["http://a", "http://b", "http://b"]


def test_a_stream_that_ends_before_its_first_piece_is_the_backends_failure():
    fleet, calls = _fleet({"http://a": b"", "http://b": ANSWER})
    assert _text(fleet)[0] == "Hello" and calls == ["http://a", "http://b"]
    assert "before its last event" in fleet.backends[0].down


def test_an_error_event_is_the_requests_own_failure_no_retry_nobody_down():
    bad = _events({"error": {"code": 500, "message": "failed to decode the batch", "type": "server_error"}})
    fleet, calls = _fleet({"http://a": bad, "http://b": ANSWER})
    with pytest.raises(FleetError, match="failed to decode the batch") as e:
        _text(fleet)
    assert not isinstance(e.value, FleetUnavailable)
    assert calls == ["http://a"] and all(b.down is None for b in fleet.backends)


def test_a_failure_after_part_of_the_answer_ends_the_request_and_takes_the_backend_out():
    head = _events({"content": "Hel", "tokens_predicted": 1})
    fleet, calls = _fleet({"http://a": lambda: _Cut(head), "http://b": ANSWER})
    got = []
    with pytest.raises(FleetError, match="in the middle of the answer"):
        for piece, _ in fleet.generate([1], {"x": 1.0}, {}):
            got.append(piece)
    assert got == ["Hel"] and calls == ["http://a"]  # never sent twice: the client has part of it
    assert "ReadError" in fleet.backends[0].down and fleet.backends[0].inflight == 0


def test_with_every_backend_down_the_request_gets_503_naming_each():
    fleet, calls = _fleet({"http://a": httpx.ConnectError("refused"), "http://b": httpx.ConnectTimeout("timeout")})
    with pytest.raises(FleetUnavailable) as e:
        _text(fleet)
    assert e.value.status == 503 and "http://a" in str(e.value) and "http://b" in str(e.value)
    with pytest.raises(FleetUnavailable):  # both in their backoff: refused without a connection
        _text(fleet)
    assert calls == ["http://a", "http://b"]
    assert [s["up"] for s in fleet.status()] == [False, False]


def test_a_down_backend_is_tried_again_after_its_backoff_and_back_in_rotation_when_it_answers():
    state = {"a": httpx.ConnectError("refused")}
    fleet, calls = _fleet({"http://a": lambda: state["a"], "http://b": ANSWER})
    _text(fleet, {"x": 0.5})  # a refuses: b answers, and the mixture now sticks to b
    a = fleet.backends[0]
    assert a.down is not None and a.fails == 1 and a.retry_at - time.monotonic() <= 1.0
    state["a"] = ANSWER
    a.retry_at = time.monotonic()  # its backoff has passed
    fleet.backends[1].down = "stopped by hand"  # b goes away: a, on probation, is the one left
    fleet.backends[1].retry_at = time.monotonic() + 60
    text, final = _text(fleet, {"x": 0.5})
    assert text == "Hello" and final["backend"] == "http://a" and a.down is None and a.fails == 0
