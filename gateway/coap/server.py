"""The gateway's CoAP request path over DTLS: a small server core in place of aiocoap's Context.

Why not aiocoap's Context on the server side: profiled under `devid bench` (py-spy, one
worker), aiocoap's request machinery (message manager, token manager, pipes, Site routing,
piggyback timers, and a deduplication cache that keeps every exchange for EXCHANGE_LIFETIME =
247 s) took ~20 % of the gateway's CPU per enrollment and most of its memory at 10,000 devices.
The gateway only ever answers requests, on DTLS sessions it already authenticated, with
piggybacked responses; that needs much less. So this module does exactly that and keeps
aiocoap for what it does well and cheaply: the message codec (`Message.decode/encode`), the
resources (`aiocoap.resource.Resource.render`), `.well-known/core`, and Block1 reassembly
(`Block1Spool`). aiocoap's Context stays in use on the client side.

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
import time
from collections import OrderedDict

from aiocoap import Message, error
from aiocoap.numbers import codes
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import Type
from aiocoap.optiontypes import BlockOption

from devid.gateway.coap.problems import problem_message
from devid.gateway.system import metrics

log = logging.getLogger("devid.coap")

DEDUP_PER_SESSION = 16          # answers kept per DTLS session for retransmitted requests (a
                                # client retransmits only what is outstanding: NSTART is 1)
BLOCK2_PER_SESSION = 4          # large responses kept per DTLS session for their later blocks
UPLOADS_PER_SESSION = 2         # Block1 uploads in progress per DTLS session
DEFAULT_MAX_BODY = 1024         # request body cap of a resource that sets no `max_body`
MAX_SZX = 6                     # 1024-byte blocks (RFC 7959: the largest over UDP)
MAX_UNBLOCKED = 1124            # a body up to this size goes in one message unless the client asks
                                # for blocks (aiocoap's maximum_payload_size: fits a 1280-byte MTU)
BLOCK_KEY_IGNORE = (OptionNumber.BLOCK1, OptionNumber.BLOCK2, OptionNumber.OBSERVE)
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
        self._blocks: dict[object, OrderedDict[tuple, Message]] = {}
        self._uploads: dict[object, OrderedDict[tuple, Message]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._accepting = True
        self._mids = itertools.count(int.from_bytes(os.urandom(2), "big"))
        self.requests = 0
        # called with the session's identity for every 4.xx answer on an authenticated session
        # (the gateway's anomaly tracker: service/anomalies.py)
        self.on_refused = None

    # -- from the transport ------------------------------------------------------------------

    def dispatch_message(self, message: Message) -> None:
        if not self._accepting:
            return
        remote = message.remote
        if message.code is codes.EMPTY or message.mtype in (Type.ACK, Type.RST):
            if message.mtype is Type.CON:          # CoAP ping: answered with a Reset
                self._reset(message)
            return                                 # the gateway sends no CON, so expects no ACK/RST
        if not message.code.is_request():
            if message.mtype is Type.CON:
                self._reset(message)
            return
        if message.mtype is Type.NON and self._option_problem(message) is codes.BAD_OPTION:
            self._reset(message)                   # RFC 7252 5.4.1: a NON with one is rejected
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
        self._blocks.pop(remote, None)
        self._uploads.pop(remote, None)

    # -- answering ---------------------------------------------------------------------------

    async def _answer(self, request: Message, key: int | None, seen: OrderedDict) -> None:
        self.requests += 1
        started = time.perf_counter()
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
        self._count(request, response, time.perf_counter() - started)

    def _count(self, request: Message, response: Message, seconds: float) -> None:
        path = request.opt.uri_path
        resource = metrics.resource_label(path, path in self.site._resources)
        code = response.code
        metrics.REQUESTS.labels(resource, code.dotted).inc()
        metrics.REQUEST_SECONDS.labels(resource).observe(seconds)
        if code.class_ == 4 and self.on_refused is not None:
            identity = getattr(request.remote, "identity", None)
            serial = getattr(identity, "serial", None)
            if serial is not None:
                self.on_refused(serial)

    @staticmethod
    def _option_problem(message: Message):
        """5.05 for a proxy option, 4.02 for an unknown critical option, else None."""
        for option in message.opt.option_list():
            number = int(option.number)
            if number in PROXY_OPTIONS:
                return codes.PROXYING_NOT_SUPPORTED
            if number & 1 and number not in KNOWN_CRITICAL:
                return codes.BAD_OPTION
        return None

    async def _render(self, request: Message) -> Message:
        problem = self._option_problem(request)
        if problem is not None:
            return Message(code=problem)
        resource = self.site._resources.get(request.opt.uri_path)
        if resource is None:
            return Message(code=codes.NOT_FOUND)
        if not hasattr(resource, f"render_{str(request.code).lower()}"):
            return Message(code=codes.METHOD_NOT_ALLOWED)       # before any upload is kept
        for block in (request.opt.block1, request.opt.block2):
            if block is not None and block.size_exponent > MAX_SZX:
                return problem_message(codes.BAD_REQUEST, "bad block option", "block size 7 (BERT) is for TCP")
        block1 = request.opt.block1
        whole = self._reassemble(request, getattr(resource, "max_body", DEFAULT_MAX_BODY))
        if not whole.code.is_request():          # an answer to send now
            return whole
        response = await self._blockwise(whole, resource)
        if block1 is not None:          # RFC 7959 2.3: the final answer echoes the last Block1
            response.opt.block1 = block1
        return response

    def _reassemble(self, request: Message, limit: int) -> Message:
        """Block1 (RFC 7959): the whole request, or the answer to send now (2.31 Continue, 4.08,
        4.13). The body is capped at `limit` (threat 13), declared (Size1) or actual; parts are
        kept with the session (at most UPLOADS_PER_SESSION uploads) and go when it ends."""
        b1 = request.opt.block1
        end = (b1.start if b1 is not None else 0) + len(request.payload)
        if end > limit or (request.opt.size1 is not None and request.opt.size1 > limit):
            self._uploads.get(request.remote, {}).pop((request.code, request.get_cache_key(BLOCK_KEY_IGNORE)), None)
            return problem_message(codes.REQUEST_ENTITY_TOO_LARGE, "request body too large",
                                   f"at most {limit} bytes", size1=limit)
        if b1 is None:
            return request
        uploads = self._uploads.get(request.remote)
        if uploads is None:
            uploads = self._uploads[request.remote] = OrderedDict()
        key = (request.code, request.get_cache_key(BLOCK_KEY_IGNORE))
        if b1.block_number == 0:
            uploads[key] = request
            uploads.move_to_end(key)
            while len(uploads) > UPLOADS_PER_SESSION:
                uploads.popitem(last=False)
        else:
            assembled = uploads.get(key)
            if assembled is None:
                return Message(code=codes.REQUEST_ENTITY_INCOMPLETE)
            try:
                assembled._append_request_block(request)
            except ValueError:              # a gap or an overlap
                del uploads[key]
                return Message(code=codes.REQUEST_ENTITY_INCOMPLETE)
        if b1.more:
            cont = Message(code=codes.CONTINUE)
            cont.opt.block1 = b1
            return cont
        return uploads.pop(key)

    async def _blockwise(self, request: Message, resource) -> Message:
        """Block2 (RFC 7959): a response larger than one block is rendered once, kept with the
        session (until it ends; at most BLOCK2_PER_SESSION, least recently used first out) and cut
        into blocks on request. aiocoap's Block2Cache keeps every response for MAX_TRANSMIT_WAIT
        (93 s) after its session is gone and deep-copies it for every block."""
        block2 = request.opt.block2
        szx = min(block2.size_exponent, MAX_SZX) if block2 is not None else MAX_SZX
        number = block2.block_number if block2 is not None else 0
        remote = request.remote
        key = (request.code, request.get_cache_key(BLOCK_KEY_IGNORE))
        if number == 0:
            response = await resource.render(request)
        else:
            cache = self._blocks.get(remote)
            response = cache.get(key) if cache is not None else None
            if response is None:
                return Message(code=codes.REQUEST_ENTITY_INCOMPLETE)
            cache.move_to_end(key)
        size = 1 << (szx + 4)
        payload = response.payload
        if number == 0 and len(payload) <= (size if block2 is not None else MAX_UNBLOCKED):
            return response
        if number == 0 and remote in self._exchanges:       # not if the session ended meanwhile
            cache = self._blocks.get(remote)
            if cache is None:
                cache = self._blocks[remote] = OrderedDict()
            cache[key] = response
            cache.move_to_end(key)
            while len(cache) > BLOCK2_PER_SESSION:
                cache.popitem(last=False)
        start = number * size
        if start >= len(payload):
            return Message(code=codes.BAD_OPTION)
        part = Message(code=response.code, payload=payload[start:start + size])
        for option in response.opt.option_list():
            if option.number not in (OptionNumber.BLOCK2, OptionNumber.BLOCK1):
                part.opt.add_option(option)
        more = start + size < len(payload)
        part.opt.block2 = BlockOption.BlockwiseTuple(number, more, szx)
        if number == 0:
            part.opt.size2 = len(payload)
        return part

    def _reset(self, message: Message) -> None:
        rst = Message(code=codes.EMPTY)
        rst.mtype, rst.mid = Type.RST, message.mid
        self._send(rst, message.remote)

    def _send(self, message: Message, remote) -> None:
        message.remote = remote
        if self.interface is not None:
            self.interface.send(message)

    async def shutdown(self) -> None:
        self._accepting = False              # first: no new requests start while we wait
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.interface is not None:
            await self.interface.shutdown()
            self.interface = None
        self._exchanges.clear()
        self._blocks.clear()
        self._uploads.clear()
