"""What a gRPC request message costs protobuf's parser, against what counting its fields first costs.

protobuf's parser holds the interpreter lock while it runs; on the event loop, nothing else is served
meanwhile. For messages of many fields (map entries, repeated elements) within `max_request_bytes`, the script
prints, side by side: the message's size, protobuf's parse time (`ModelInferRequest.FromString`, the
best of `--rounds`, one round once one takes 5 s), and the time `service.grpc.messages.count_fields` takes to
refuse it at `max_message_fields` (the default 10,000), best of `--rounds`. Map entries come in two orders:
their keys' (p0, p1, ...), and the order protobuf itself writes a map in, its hash table's, which a parser
that inserts them into a table of the same hash meets at its slowest.

    python bench/bench_messages.py [--entries 100000,300000,1000000,1500000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proto import grpc_predict_v2_pb2 as pb  # noqa: E402
from service.config import Settings  # noqa: E402
from service.errors import RequestTooLarge  # noqa: E402
from service.grpc.messages import count_fields  # noqa: E402


def map_entries(n: int, model: str = "lenet5") -> bytes:
    """A ModelInferRequest for `model` of `n` distinct `parameters` entries in key order, each a bool (13
    bytes or fewer each), written field by field: building it with protobuf would take longer than sending it.
    """
    name = model.encode()
    entries = b"".join(
        # field 4 (parameters): the key (field 1), and an InferParameter holding bool_param = true (field 2)
        b"\x22" + bytes([len(key) + 6]) + b"\x0a" + bytes([len(key)]) + key + b"\x12\x02\x08\x01"
        for key in (b"p%d" % i for i in range(n))
    )
    return b"\x0a" + bytes([len(name)]) + name + entries  # model_name (field 1), then the entries


def map_entries_as_written(n: int) -> bytes:
    """The same map built with protobuf and serialized by it: entries in its hash table's order."""
    request = pb.ModelInferRequest(model_name="lenet5")
    for i in range(n):
        request.parameters[f"p{i}"].bool_param = True
    return request.SerializeToString()


def empty_contents(n: int) -> bytes:
    """A ModelInferRequest of `n` empty `raw_input_contents` (2 bytes each)."""
    return b"\x0a\x06lenet5" + b"\x3a\x00" * n


def best(fn: Callable[[], object], rounds: int) -> float:
    times: list[float] = []
    while len(times) < rounds and sum(times) < 5.0:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def refuse(raw: bytes, limit: int) -> None:
    try:
        count_fields(raw, pb.ModelInferRequest.DESCRIPTOR, limit)
    except RequestTooLarge:
        return
    raise AssertionError("the message was not refused")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--entries", default="100000,300000,1000000,1500000", help="map entries, comma-separated"
    )
    parser.add_argument(
        "--contents", default="1000000,10000000", help="empty raw_input_contents, comma-separated"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    limit = Settings().max_message_fields
    print(f"message | size | protobuf's parse | refused by the field count (max_message_fields {limit})")
    entries = [int(n) for n in args.entries.split(",")]
    cases = [(f"{n:,} map entries in key order", map_entries(n)) for n in entries]
    cases += [(f"{n:,} map entries as protobuf writes them", map_entries_as_written(n)) for n in entries]
    cases += [
        (f"{n:,} empty raw_input_contents", empty_contents(n)) for n in map(int, args.contents.split(","))
    ]
    for name, raw in cases:
        parse = best(lambda raw=raw: pb.ModelInferRequest.FromString(raw), args.rounds)
        counted = best(lambda raw=raw: refuse(raw, limit), args.rounds)
        print(
            f"{name} | {len(raw) / 1e6:.1f} MB | {parse * 1000:,.1f} ms | {counted * 1000:.2f} ms", flush=True
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
