"""The gateway's HTTP/1.1 client to engines, against real servers: keep-alive, streaming as it
comes, flow control, and every way an engine can let it down."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import uvicorn

from sage_mq import upstream
from sage_mq.engines.fake_server import FakeEngine, build_app
from sage_mq.upstream import Upstream, UpstreamError
from tests.helpers.servers import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "a b c"}]}).encode()


async def _raw_server(handler: Handler) -> tuple[asyncio.Server, str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away first
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return await reader.readexactly(length)


@pytest.fixture
async def engine() -> AsyncIterator[str]:
    """Our fake engine on uvicorn (a real HTTP server), streaming slowly."""
    port = free_port()
    app = build_app(FakeEngine("m", stream_delay_ms=30))
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


async def test_answers_come_whole_over_one_kept_alive_connection(engine: str) -> None:
    upstream = Upstream()
    for _ in range(20):
        response = await upstream.post(f"{engine}/v1/chat/completions", CHAT)
        assert response.status == 200 and response.header("content-type") == "application/json"
        answer = json.loads(await response.read())
        assert answer["choices"][0]["message"]["content"] == "[m] You said: a b c"
    assert [len(pool) for pool in upstream._pools.values()] == [1]
    await upstream.aclose()


async def test_a_stream_arrives_piece_by_piece_as_the_engine_writes_it(engine: str) -> None:
    upstream = Upstream()
    body = json.loads(CHAT) | {"stream": True}
    response = await upstream.post(f"{engine}/v1/chat/completions", json.dumps(body).encode())
    arrivals, text = [], b""
    async for chunk in response.chunks():
        arrivals.append(asyncio.get_running_loop().time())
        text += chunk
    assert text.endswith(b"data: [DONE]\n\n") and text.count(b"data:") == 9
    assert len(arrivals) >= 5 and arrivals[-1] - arrivals[0] >= 0.12  # 30 ms apart, not at once
    await upstream.aclose()


async def test_a_connection_the_engine_closed_while_idle_is_replaced_quietly() -> None:
    async def one_answer_then_close(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}")
        await w.drain()
        await asyncio.sleep(0.05)
        w.close()  # keep-alive promised, then dropped: an idle timeout
        await w.wait_closed()

    server, url = await _raw_server(one_answer_then_close)
    upstream = Upstream()
    for _ in range(3):
        response = await upstream.post(url, b"{}")
        assert await response.read() == b"{}"
        await asyncio.sleep(0.1)
    server.close()
    await server.wait_closed()
    await upstream.aclose()


async def test_an_engine_that_dies_mid_answer_raises_with_answered_set() -> None:
    async def half_then_die(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await w.drain()
        w.close()
        await w.wait_closed()

    server, url = await _raw_server(half_then_die)
    upstream = Upstream()
    response = await upstream.post(url, b"{}")
    with pytest.raises(UpstreamError) as err:
        await response.read()
    assert err.value.answered and "closed by the engine" in str(err.value)
    server.close()
    await server.wait_closed()
    await upstream.aclose()


async def test_no_engine_and_a_silent_engine_raise_without_answered() -> None:
    upstream = Upstream()
    with pytest.raises(UpstreamError) as err:
        await upstream.post(f"http://127.0.0.1:{free_port()}/v1/x", b"{}")
    assert not err.value.answered and "cannot connect" in str(err.value)

    async def read_then_close(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        w.close()  # a process killed before it answered
        await w.wait_closed()

    server, url = await _raw_server(read_then_close)
    with pytest.raises(UpstreamError) as err:
        await upstream.post(url, b"{}")
    assert not err.value.answered
    server.close()
    await server.wait_closed()
    await upstream.aclose()


async def test_a_slow_reader_pauses_the_socket_and_loses_nothing() -> None:
    piece = b"x" * 4096

    async def big_chunked(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(500):
            w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()
        w.close()
        await w.wait_closed()

    server, url = await _raw_server(big_chunked)
    upstream = Upstream()
    response = await upstream.post(url, b"{}")
    received, paused_seen = 0, False
    async for chunk in response.chunks():
        received += len(chunk)
        paused_seen = paused_seen or response._conn.paused
        await asyncio.sleep(0.001)
    assert received == 500 * len(piece) and paused_seen
    server.close()
    await server.wait_closed()
    await upstream.aclose()


async def test_a_kept_alive_connection_dropped_as_a_request_goes_out_is_retried_once() -> None:
    async def answer_once(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()
        await _read_request(reader)  # the next request on this connection: dropped unanswered
        w.close()
        await w.wait_closed()

    server, url = await _raw_server(answer_once)
    upstream = Upstream()
    assert await (await upstream.post(url, b"{}")).read() == b"ok"
    assert await (await upstream.post(url, b"{}")).read() == b"ok"  # on a new connection
    server.close()
    await server.wait_closed()
    await upstream.aclose()


async def test_an_ipv6_engine_is_sent_a_host_header_in_brackets() -> None:
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    try:
        server = await asyncio.start_server(answer, "::1", 0)
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    port = server.sockets[0].getsockname()[1]
    client = Upstream()
    try:
        reply = await client.post(f"http://[::1]:{port}/v1/chat/completions", CHAT)
        assert reply.status == 200 and await reply.read() == b"{}"
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert f"host: [::1]:{port}\r\n".encode() in heads[0]


async def test_requests_beyond_the_cap_wait_for_a_connection_and_none_is_left_taken(
    engine: str,
) -> None:
    client = Upstream(max_connections_per_replica=2)
    url = f"{engine}/v1/chat/completions"
    first, second = await client.post(url, CHAT), await client.post(url, CHAT)
    assert client.in_flight(url) == 2
    third = asyncio.create_task(client.post(url, CHAT))
    await asyncio.sleep(0.3)
    assert not third.done()  # no third connection while two answers are open
    await first.read()
    reply = await third  # the first one's connection serves it
    assert client.in_flight(url) == 2 and client.idle(url) == 0
    await second.read()
    await reply.read()
    dropped = await client.post(url, CHAT)
    del dropped  # an answer nobody reads gives its slot back
    assert client.in_flight(url) == 0 and client.idle(url) == 1  # its connection is closed
    await client.aclose()


async def test_idle_connections_age_out_and_a_replica_gone_is_forgotten(engine: str) -> None:
    client = Upstream()
    url = f"{engine}/v1/chat/completions"
    await (await client.post(url, CHAT)).read()
    assert client.idle(url) == 1

    def age(seconds: float) -> None:  # as if that much time had passed
        client._swept -= seconds
        for pool in client._pools.values():
            for conn in pool:
                conn.idle_since -= seconds

    age(upstream.IDLE_TIMEOUT_S + 1)
    await (await client.post(url, CHAT)).read()  # the sweep closed the old one first
    assert client.idle(url) == 1 and len(client._pools) == 1
    age(upstream.IDLE_TIMEOUT_S + 1)
    client._sweep()
    assert client._pools == {} and client.idle(url) == 0
    await client.aclose()
