"""gRPC request messages counted before they are parsed, and parsed away from the event loop.

protobuf's parser holds the interpreter lock for as long as it runs, and what a message costs it grows with
its count of fields, faster than with its size: within `max_request_bytes`, a message of a million map
entries takes it seconds (`bench/bench_messages.py`), and every HTTP and gRPC connection that shares the loop
would wait as long.

So a message's fields are counted first, from its wire format (`count_fields`): each field's tag and length,
walking into the fields that hold messages (the method's own descriptor says which), building nothing and
stopping at `max_message_fields`. Each repeated element counts, and so does each map entry and the fields
inside it; a packed array of numbers is one field, whatever its length, and so is a string or bytes. What
a serious client sends holds a few hundred fields at most (`ModelInferRequest`: inputs, their shapes and
contents, outputs, parameters); a message over the limit is refused before it is parsed. The count and the
parse of a message of `INLINE_BYTES` or more run in a thread, at the work's priority: the count is Python
that lets the lock go every few milliseconds, and the parse of what passed it takes milliseconds.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from service.errors import InvalidArgument, RequestTooLarge

INLINE_BYTES = 4096  # messages smaller than this are counted and parsed on the loop: microseconds

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # wire types (3 and 4, groups, are not proto3's)


class NotWireFormat(InvalidArgument):
    """Bytes that are no protobuf message."""


def _varint(data: bytes, at: int, end: int) -> tuple[int, int]:
    """The varint at `data[at:]` and the position after it; NotWireFormat past `end` or ten bytes."""
    value = shift = 0
    while at < end and shift < 70:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
    raise NotWireFormat("a varint runs past its message")


def count_fields(data: bytes, descriptor: Descriptor, limit: int) -> int:
    """The fields in `data` (a `descriptor` message in wire format), those of nested messages included;
    RequestTooLarge as soon as there are more than `limit`, NotWireFormat where the bytes break the format."""
    count = 0
    at = 0
    # The messages being walked, innermost last: where each ends, and its descriptor.
    open_messages: list[tuple[int, Descriptor]] = [(len(data), descriptor)]
    while open_messages:
        end, message = open_messages[-1]
        if at >= end:
            if at > end:
                raise NotWireFormat("a field runs past its message")
            open_messages.pop()
            continue
        tag, at = _varint(data, at, end)
        count += 1
        if count > limit:
            raise RequestTooLarge(
                f"the request holds more than {limit} fields (max_message_fields; nested and repeated ones "
                "each counted, a packed array once): send numbers as packed arrays or raw_input_contents"
            )
        wire, number = tag & 7, tag >> 3
        if number == 0:
            raise NotWireFormat("a field has number 0")
        if wire == _VARINT:
            _, at = _varint(data, at, end)
        elif wire == _I64:
            at += 8
        elif wire == _I32:
            at += 4
        elif wire == _LEN:
            length, at = _varint(data, at, end)
            field = message.fields_by_number.get(number)
            if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                if at + length > end:
                    raise NotWireFormat("a field runs past its message")
                open_messages.append((at + length, field.message_type))
            else:
                at += length
        else:
            raise NotWireFormat(f"a field has wire type {wire}, which proto3 messages do not use")
    return count
