import orjson
import pytest

from app.proxy.sse import StreamObserver, has_generated_output, usage_counts

FP = "vllm-0.32.0-290a388e"


def chunk(delta=None, finish=None, fingerprint=None, choices=True, usage=None, text=None):
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    if choices:
        choice = {"index": 0}
        if text is not None:
            choice["text"] = text
        else:
            choice["delta"] = delta or {}
        choice["finish_reason"] = finish
        obj["choices"] = [choice]
    else:
        obj["choices"] = []
    if usage:
        obj["usage"] = usage
    if fingerprint:
        obj["system_fingerprint"] = fingerprint
    return b"data: " + orjson.dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"
USAGE = {"prompt_tokens": 18, "total_tokens": 23, "completion_tokens": 5}


def engine_stream(include_usage: bool) -> list[bytes]:
    """What vLLM sends with and without stream_options.include_usage (fingerprint moves)."""
    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({"content": "!"}, finish="length", fingerprint=None if include_usage else FP),
    ]
    if include_usage:
        events.append(chunk(choices=False, usage=USAGE, fingerprint=FP))
    return events + [DONE]


def relay(observer: StreamObserver, pieces: list[bytes]) -> bytes:
    return b"".join(observer.feed(p) for p in pieces) + observer.finish()


def test_stripping_the_injected_usage_chunk_gives_the_bytes_of_a_stream_without_usage():
    observer = StreamObserver(0.0, strip_usage=True)
    out = relay(observer, engine_stream(include_usage=True))
    assert out == b"".join(engine_stream(include_usage=False))
    assert (observer.prompt_tokens, observer.completion_tokens) == (18, 5)


def test_usage_chunk_is_kept_when_the_client_asked_for_it():
    observer = StreamObserver(0.0, strip_usage=False)
    stream = engine_stream(include_usage=True)
    assert relay(observer, stream) == b"".join(stream)
    assert observer.completion_tokens == 5


@pytest.mark.parametrize("size", [1, 3, 7, 64])
def test_events_split_across_reads_are_reassembled(size):
    whole = b"".join(engine_stream(include_usage=True))
    pieces = [whole[i : i + size] for i in range(0, len(whole), size)]
    observer = StreamObserver(0.0, strip_usage=True)
    assert relay(observer, pieces) == b"".join(engine_stream(include_usage=False))
    assert observer.completion_tokens == 5


def test_ttft_is_taken_at_the_first_event_with_generated_text_not_the_role_chunk(monkeypatch):
    clock = iter([10.0, 11.0, 12.0])
    monkeypatch.setattr("app.proxy.sse.time.perf_counter", lambda: next(clock))
    observer = StreamObserver(start=9.0)
    observer.feed(chunk({"role": "assistant", "content": ""}))
    assert observer.ttft_s is None
    observer.feed(chunk({"content": ""}))  # a partial UTF-8 sequence decodes to nothing yet
    assert observer.ttft_s is None
    observer.feed(chunk({"content": "Hi"}))
    assert observer.ttft_s == 1.0


def test_a_stream_cut_mid_event_hands_back_the_partial_bytes():
    observer = StreamObserver(0.0)
    first = chunk({"content": "a"})
    assert observer.feed(first + b'data: {"partial') == first
    assert observer.finish() == b'data: {"partial'


def test_error_event_is_recorded():
    observer = StreamObserver(0.0)
    event = b'data: {"error": {"message": "boom", "type": "InternalServerError"}}\n\n'
    assert relay(observer, [chunk({"content": "x"}), event]) == chunk({"content": "x"}) + event
    assert observer.error == "boom"


@pytest.mark.parametrize("crlf", [False, True])
def test_usage_and_error_are_found_at_the_end_of_a_long_stream_read_in_one_piece(crlf):
    """Both are looked for from the stream's end (a search of every byte cost a tenth of the
    proxy's CPU); a long stream arriving in one read is the case where that matters most."""
    tokens = b"".join(chunk({"content": f"t{i}"}) for i in range(500))
    error = b'data: {"error": {"message": "boom", "type": "InternalServerError"}}\n\n'
    for tail, field, expected in (
        (chunk(choices=False, usage=USAGE) + DONE, "completion_tokens", 5),
        (error + DONE, "error", "boom"),
        (error, "error", "boom"),
        (DONE, "error", None),
    ):
        stream = tokens + tail
        if crlf:
            stream = stream.replace(b"\n\n", b"\r\n\r\n")
        observer = StreamObserver(0.0)
        assert relay(observer, [stream]) == stream
        assert getattr(observer, field) == expected, tail


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("pieces", [1, 2, 3, 7])
def test_an_error_event_counts_only_among_the_last_three_and_usage_in_any_of_the_last_reads(crlf, pieces):
    """Whatever the reads: usage is found in the stream's last reads, an error event only when it
    is one of the stream's last three events (an earlier one is part of the answer's text)."""
    error = b'data: {"error": {"message": "boom", "type": "InternalServerError"}}\n\n'
    filler = [chunk({"content": f"t{i}"}) for i in range(6)]
    for events, usage, expected_error in (
        ([*filler, error, chunk({"content": "x"}), DONE], None, "boom"),  # third last
        ([*filler, error, chunk({"content": "x"}), chunk({"content": "y"}), DONE], None, None),
        ([*filler, chunk(choices=False, usage=USAGE), error, DONE], 5, "boom"),
        ([*filler, chunk(choices=False, usage=USAGE), DONE], 5, None),
    ):
        stream = b"".join(events)
        if crlf:
            stream = stream.replace(b"\n\n", b"\r\n\r\n")
        cut = len(stream) // pieces
        reads = [stream[i * cut : (i + 1) * cut if i < pieces - 1 else None] for i in range(pieces)]
        observer = StreamObserver(0.0)
        assert relay(observer, reads) == stream
        assert observer.error == expected_error, events
        assert observer.completion_tokens == usage, events


def test_crlf_framed_events_are_relayed_without_waiting_for_the_end():
    observer = StreamObserver(0.0)
    event = b'data: {"choices":[{"delta":{"content":"x"}}]}\r\n\r\n'
    assert observer.feed(event) == event
    assert observer.ttft_s is not None


def test_n_greater_than_one_holds_finished_choices_until_usage_and_restores_fingerprints():
    with_usage = [
        chunk({"content": "a"}),
        chunk({"content": "b"}, finish="stop"),
        chunk({"content": "c"}),
        chunk({"content": "d"}, finish="length"),
        chunk(choices=False, usage=USAGE, fingerprint=FP),
        DONE,
    ]
    without = [
        chunk({"content": "a"}),
        chunk({"content": "b"}, finish="stop", fingerprint=FP),
        chunk({"content": "c"}),
        chunk({"content": "d"}, finish="length", fingerprint=FP),
        DONE,
    ]
    assert relay(StreamObserver(0.0, strip_usage=True), with_usage) == b"".join(without)


def test_responses_api_events_count():
    delta = {"type": "response.output_text.delta", "delta": "hi"}
    done = {"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 7}}}
    assert has_generated_output(delta)
    assert usage_counts(done) == (3, 7)


def test_completions_chunks_count_as_output_even_with_empty_text():
    """vLLM sends a completions chunk only for generated tokens; their text may still be empty."""
    assert has_generated_output(orjson.loads(chunk(text="x")[6:]))
    assert has_generated_output(orjson.loads(chunk(text="")[6:]))
    assert not has_generated_output(orjson.loads(chunk(choices=False, usage=USAGE)[6:]))


@pytest.mark.parametrize(
    "events",
    [
        # completions whose tokens all decode to "" (held-back UTF-8, special tokens)
        [chunk(text=""), chunk(text="", finish="length"), chunk(choices=False, usage=USAGE), DONE],
        # chat: vLLM skips empty deltas, but sends the finishing one
        [chunk({"role": "assistant", "content": ""}), chunk({"content": ""}, finish="length"), DONE],
        # the whole stream in the same read as its end
        [
            b"".join(
                [chunk({"role": "assistant", "content": ""}), chunk({"content": "a"}, finish="stop"), DONE]
            )
        ],
    ],
)
def test_every_stream_with_generated_tokens_has_a_ttft(events):
    """Issue 12: streams logged without ttft_ms although they generated tokens."""
    observer = StreamObserver(0.0)
    for event in events:
        observer.feed(event)
    observer.finish()
    assert observer.ttft_s is not None


def test_a_stream_without_tokens_has_no_ttft():
    observer = StreamObserver(0.0)
    observer.feed(chunk({"role": "assistant", "content": ""}) + b'data: {"error": {"message": "x"}}\n\n')
    observer.finish()
    assert observer.ttft_s is None


def test_the_last_event_of_each_api_is_recognised():
    from app.proxy.sse import is_final

    token = chunk({"content": "a"})
    assert is_final(token + DONE) and not is_final(token) and not is_final(token + token)
    responses = b'event: response.output_text.delta\ndata: {"delta":"a"}\n\n'
    assert not is_final(responses)
    assert is_final(responses + b'event: response.completed\ndata: {"type":"response.completed"}\n\n')
    assert is_final(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert not is_final(b'event: message_delta\ndata: {"type":"message_delta"}\n\n')


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (None, None, "boom"),
        (None, "client disconnected", "boom"),  # set once the stream had ended: the event wins
        ("stream broken: reset", "stream broken: reset", "stream broken: reset"),  # set before it
    ],
)
def test_settle_puts_the_streams_end_on_the_record_as_it_stood_when_the_stream_ended(before, after, expected):
    """The relay leaves reading a stream's end (usage, error event) to the request's accounting,
    once the response is out: what it finds is what reading it at the stream's end found."""
    from app.middleware import RequestRecord

    error = b'data: {"error": {"message": "boom", "type": "InternalServerError"}}\n\n'
    observer = StreamObserver(0.0)
    stream = [chunk({"content": "x"}), chunk(choices=False, usage=USAGE), error, DONE]
    assert b"".join(observer.feed(e) for e in stream) + observer.end() == b"".join(stream)
    rec = RequestRecord(request_id="r", method="POST", path="/v1/chat/completions", client=None)
    rec.error = before
    observer.error_before = rec.error
    rec.error = after
    observer.settle(rec)
    assert (rec.prompt_tokens, rec.completion_tokens) == (18, 5)
    assert rec.error == expected
