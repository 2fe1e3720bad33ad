"""What HTTP/2's bandwidth-delay probe (`grpc_bdp_probe`, off by default) is worth to a large gRPC message.

With the probe off, grpc's core keeps a stream's window at HTTP/2's 64 KiB until a handler asks for the
message, so that a call waiting for room in the receive budget holds no more of it (docs/SERVING.md, "Requests
in transit"); once asked, the window opens to the message's size, but the connection's grows no further than
its streams need. With the probe on, windows follow the measured bandwidth and delay. This starts the service
twice, probe off and on, each behind a TCP proxy that delays every chunk by `--delay-ms` each way (a round
trip of twice that), sends `ModelInfer` messages of each size through both in turn, on one channel each
(bytes the server refuses once they are in: the time is the transfer's), and prints the median seconds of
each and their ratio.

    python bench/bench_window.py [--sizes-mib 1,4,20] [--delay-ms 0,1,5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_hostile import Server  # noqa: E402
from bench.ports import free_port  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"


class DelayProxy:
    """A TCP proxy on loopback whose every chunk, each way, is passed on `delay_s` after it arrived."""

    def __init__(self, target: int) -> None:
        self.target, self.port, self.delay_s = target, free_port(), 0.0
        ready = threading.Event()
        threading.Thread(target=asyncio.run, args=(self._serve(ready),), daemon=True).start()
        ready.wait(10)

    async def _serve(self, ready: threading.Event) -> None:
        server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        ready.set()
        await server.serve_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(
            self._pump(reader, upstream_writer), self._pump(upstream_reader, writer), return_exceptions=True
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(forward())
        while True:
            data = await reader.read(1 << 16)
            await queue.put((loop.time() + self.delay_s, data))
            if not data:
                break
        await sender


def seconds_to_send(channel: grpc.Channel, size: int) -> float:
    """One message of `size` bytes, to the server's refusal once it is in."""
    call = channel.unary_unary(INFER)
    start = time.perf_counter()
    try:
        call(b"\0" * size, timeout=120)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="1,4,20")
    parser.add_argument("--delay-ms", default="0,1,5")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repository", default=str(ROOT / "models"))
    parser.add_argument("--work", default=str(ROOT / "bench" / "out" / "window"))
    args = parser.parse_args()
    sizes = [int(float(x) * (1 << 20)) for x in args.sizes_mib.split(",")]
    delays = [float(x) / 1000 for x in args.delay_ms.split(",")]
    work = Path(args.work)
    servers = {
        "off": Server(args.repository, "lenet5", work, []),
        "on": Server(args.repository, "lenet5", work, ["--grpc-bdp-probe"]),
    }
    try:
        proxies = {name: DelayProxy(server.grpc_port) for name, server in servers.items()}
        options = [("grpc.max_send_message_length", 1 << 30), ("grpc.use_local_subchannel_pool", 1)]
        channels = {
            n: grpc.insecure_channel(f"127.0.0.1:{p.port}", options=options) for n, p in proxies.items()
        }
        print(f"gRPC ModelInfer messages through a delaying proxy, one channel each, median of {args.rounds}")
        for delay in delays:
            for size in sizes:
                times: dict[str, list[float]] = {"off": [], "on": []}
                for name, proxy in proxies.items():
                    proxy.delay_s = delay
                    seconds_to_send(channels[name], size)  # the windows settle to the link and size first
                for _ in range(args.rounds):
                    for name in proxies:
                        times[name].append(seconds_to_send(channels[name], size))
                off, on = (statistics.median(times[n]) for n in ("off", "on"))
                mib, ms = size / (1 << 20), delay * 1000
                print(
                    f"  {mib:g} MiB, {ms:g} ms each way: grpc_bdp_probe off {off:.3f} s, on {on:.3f} s, "
                    f"off / on {off / on:.2f}x"
                )
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
