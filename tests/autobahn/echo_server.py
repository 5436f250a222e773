"""The WebSocket echo backend of tests/tests/autobahn.rs.

The Autobahn TestSuite's cases expect an echo server, and its 12.* and 13.* cases a server that
negotiates permessage-deflate (RFC 7692); app is neither, so the test also runs every case
against this server, directly and through lb. It is the `websockets` library's server
(RFC 6455 and 7692 conformant) with no message size limit: each message comes back as
received, and a plain HTTP request (lb's health check) gets 200. Prints
`listening http ADDR` once bound, like the workspace's binaries.

Usage: python3 echo_server.py [HOST]
"""

import asyncio
import http
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def echo(connection):
    try:
        async for message in connection:
            await connection.send(message)
    except ConnectionClosed:
        # Most cases provoke a protocol error on purpose; the close is their verdict.
        pass


def health(connection, request):
    if "upgrade" not in request.headers.get("Connection", "").lower():
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None


async def main(host):
    async with serve(
        echo,
        host,
        0,
        process_request=health,
        max_size=None,
        compression="deflate",
    ) as server:
        address = next(iter(server.sockets)).getsockname()
        print(f"listening http {address[0]}:{address[1]}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"))
