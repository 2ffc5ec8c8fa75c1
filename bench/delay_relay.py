#!/usr/bin/env python3
"""A TCP relay that delays every byte by a fixed time each way: `far.py`'s stand-in for
`tc qdisc ... netem delay` on kernels built without sch_netem.

    python3 bench/delay_relay.py LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_MS

Each chunk read from one side is written to the other DELAY_MS after it was read, in order
(one queue and one writer per direction, so a later chunk never overtakes an earlier one and
chunks in flight overlap: it is a delay line, not a bandwidth limit). Connection setup is not
delayed, only what flows over a connection: the shim keeps its Redis connections pooled, so the
requests and replies are what the delay is about. Standard library only.
"""

import asyncio
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay_s, data))
    except ConnectionError:
        pass
    queue.put_nowait((0.0, None))
    try:
        await delivering
    except ConnectionError:
        pass


def main():
    listen, target, delay_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    (lhost, lport), (thost, tport) = (a.rsplit(":", 1) for a in (listen, target))

    async def relay(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(thost, int(tport))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, server_writer, delay_ms / 1000),
                             pipe(server_reader, client_writer, delay_ms / 1000))

    async def serve():
        server = await asyncio.start_server(relay, lhost, int(lport), backlog=1024)
        print(f"delaying {listen} -> {target} by {delay_ms:g} ms each way", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
