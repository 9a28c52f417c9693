"""The load tester's SSE parser: events are the same however the body is cut into reads."""

from hypothesis import given
from hypothesis import strategies as st

from app.loadtest.sse import Event, SSEParser

STREAM = (
    b": keep-alive\n\n"
    b'data: {"choices":[{"delta":{"content":"h\xc3\xa9"}}]}\n\n'
    b"event: note\r\ndata: line one\r\ndata:line two\r\n\r\n"
    b"data: cr only\r\rid: 7\nretry: 10\ndata:\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    Event('{"choices":[{"delta":{"content":"hé"}}]}'.encode()),
    Event(b"line one\nline two", "note"),
    Event(b"cr only"),
    Event(b""),
    Event(b"[DONE]"),
]


def parse(reads: list[bytes]) -> list[Event]:
    parser = SSEParser()
    return [event for read in reads for event in parser.feed(read)]


def test_whole_stream_in_one_read():
    assert parse([STREAM]) == EXPECTED


def test_byte_by_byte_including_crlf_and_utf8_split_across_reads():
    assert parse([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_cut_gives_the_same_events(cuts):
    points = sorted({0, len(STREAM), *cuts})
    assert parse([STREAM[a:b] for a, b in zip(points, points[1:], strict=False)]) == EXPECTED


def test_an_event_is_not_dispatched_before_its_blank_line():
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"data: b\n") == []
    assert parser.feed(b"\n") == [Event(b"a\nb")]


def test_a_cr_ending_one_read_and_an_lf_opening_the_next_are_one_line_end():
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n") == []  # the pair of the CR, not a blank line
    assert parser.feed(b"\r\n") == [Event(b"x")]


def test_field_forms():
    parser = SSEParser()
    # a field name alone, no space after the colon, an unknown field, an event name without data
    stream = b"data\n\nevent: x\n\ndata:a\nid: 3\nfoo: bar\n\n"
    assert parser.feed(stream) == [Event(b""), Event(b"a")]
