"""The gateway's CoAP request path over DTLS: a small server core in place of aiocoap's Context.

Why not aiocoap's Context on the server side: profiled under `devid bench` (py-spy, one
worker), aiocoap's request machinery (message manager, token manager, pipes, Site routing,
piggyback timers, and a deduplication cache that keeps every exchange for EXCHANGE_LIFETIME =
247 s) took ~20 % of the gateway's CPU per enrollment and most of its memory at 10,000 devices.
The gateway only ever answers requests, on DTLS sessions it already authenticated, with
piggybacked responses; that needs much less. So this module does exactly that and keeps
aiocoap for what it does well and cheaply: the message codec (`Message.decode/encode`), the
resources (`aiocoap.resource.Resource.render`), `.well-known/core`, and the RFC 7959 helpers
(`Block1Spool`, `Block2Cache`). aiocoap's Context stays in use on the client side.

Per request: decode (by the transport), deduplicate per DTLS session (a retransmitted CON gets
the same response again, never a second evaluation; in-flight duplicates are dropped), find the
resource by exact Uri-Path, reassemble Block1, render, cut Block2, answer as ACK (CON) or NON.
Unknown critical options get 4.02, Proxy-Uri/Proxy-Scheme 5.05, an unknown path 4.04, a method
the resource lacks 4.05; an unexpected exception 5.00 with an empty body and a logged traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import OrderedDict

from aiocoap import Message, error
from aiocoap.blockwise import Block1Spool, Block2Cache
from aiocoap.numbers import codes
from aiocoap.numbers.types import Type

log = logging.getLogger("devid.coap")

DEDUP_PER_SESSION = 64          # responses kept per DTLS session for retransmitted requests
# critical options (odd numbers) the gateway understands: Uri-Host, Uri-Port, Uri-Path,
# Uri-Query, Accept, Block2, Block1; Proxy-Uri/Proxy-Scheme are answered 5.05
KNOWN_CRITICAL = frozenset({3, 7, 11, 15, 17, 23, 27})
PROXY_OPTIONS = frozenset({35, 39})


class CoapServer:
    """Serves `site`'s resources to the DTLS server interface, which calls `dispatch_message`
    with each decoded message and `dispatch_error` when a session ends (the two calls aiocoap's
    message manager would get)."""

    def __init__(self, site) -> None:
        self.site = site
        self.interface = None                    # set by the owner once the interface exists
        self._exchanges: dict[object, OrderedDict[int, Message | None]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._mids = itertools.count(int.from_bytes(os.urandom(2), "big"))
        self.requests = 0

    # -- from the transport ------------------------------------------------------------------

    def dispatch_message(self, message: Message) -> None:
        remote = message.remote
        if message.code is codes.EMPTY or message.mtype in (Type.ACK, Type.RST):
            if message.mtype is Type.CON:          # CoAP ping: answered with a Reset
                self._reset(message)
            return                                 # the gateway sends no CON, so expects no ACK/RST
        if not message.code.is_request():
            if message.mtype is Type.CON:
                self._reset(message)
            return
        seen = self._exchanges.get(remote)
        if seen is None:
            seen = self._exchanges[remote] = OrderedDict()
        key = message.mid if message.mtype is Type.CON else None
        if key is not None:
            if key in seen:
                done = seen[key]
                if done is not None:               # a retransmission: the same answer again
                    self._send(done, remote)
                return                             # still being answered: drop the duplicate
            seen[key] = None
            while len(seen) > DEDUP_PER_SESSION:
                seen.popitem(last=False)
        task = asyncio.get_running_loop().create_task(self._answer(message, key, seen))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def dispatch_error(self, exc: Exception, remote) -> None:
        self._exchanges.pop(remote, None)

    # -- answering ---------------------------------------------------------------------------

    async def _answer(self, request: Message, key: int | None, seen: OrderedDict) -> None:
        self.requests += 1
        try:
            response = await self._render(request)
        except error.RenderableError as exc:
            response = exc.to_message()
        except Exception:
            log.exception("unexpected error answering %s %s", request.code, "/".join(request.opt.uri_path))
            response = Message(code=codes.INTERNAL_SERVER_ERROR)
        response.opt.no_response = None
        response.token = request.token
        if request.mtype is Type.CON:
            response.mtype, response.mid = Type.ACK, request.mid
        else:
            response.mtype, response.mid = Type.NON, next(self._mids) & 0xFFFF
        if key is not None and self._exchanges.get(request.remote) is seen:
            seen[key] = response
        self._send(response, request.remote)

    async def _render(self, request: Message) -> Message:
        for option in request.opt.option_list():
            number = int(option.number)
            if number in PROXY_OPTIONS:
                return Message(code=codes.PROXYING_NOT_SUPPORTED)
            if number & 1 and number not in KNOWN_CRITICAL:
                return Message(code=codes.BAD_OPTION)
        resource = self.site._resources.get(request.opt.uri_path)
        if resource is None:
            return Message(code=codes.NOT_FOUND)
        block1 = getattr(resource, "_block1", None)
        if block1 is None:
            block1 = resource._block1 = Block1Spool()
        block2 = getattr(resource, "_block2", None)
        if block2 is None:
            block2 = resource._block2 = Block2Cache()
        request = block1.feed_and_take(request)
        return await block2.extract_or_insert(request, lambda: resource.render(request))

    def _reset(self, message: Message) -> None:
        rst = Message(code=codes.EMPTY)
        rst.mtype, rst.mid = Type.RST, message.mid
        self._send(rst, message.remote)

    def _send(self, message: Message, remote) -> None:
        message.remote = remote
        if self.interface is not None:
            self.interface.send(message)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.interface is not None:
            await self.interface.shutdown()
            self.interface = None
        self._exchanges.clear()
