"""A Redis script whose calls share round trips under load.

A round trip to Redis cost a process here some 60 us of CPU (the write, waking Redis, the
read) against 11 us a command in a pipeline of ten: at a thousand requests arriving at once,
the API's submit was most of its own work per request. Calls made while a batch is on its way
go together in the next, as one pipeline: one call alone goes at once, as it would unbatched.
Each call gets its own reply or error; the calls of a batch run one after another in Redis,
each atomic as ever, in the order they were made.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Call = tuple[list[Any], list[Any], asyncio.Future[Any]]


class BatchedScript:
    def __init__(self, redis: Redis, script: str) -> None:
        self._redis = redis
        self._script = redis.register_script(script)
        self._pending: list[Call] = []
        self._sender: asyncio.Task[None] | None = None

    def __call__(self, keys: list[Any], args: list[Any]) -> asyncio.Future[Any]:
        """The script's reply to `keys` and `args`, once its batch is back."""
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((keys, args, reply))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return reply

    async def answered(self) -> None:
        """Returns once every call made so far has had its reply (its caller may have left)."""
        while (sender := self._sender) is not None:
            await asyncio.wait({sender})

    async def _send(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._run(batch)
                except BaseException as exc:
                    _fail(batch, exc)
                    if not isinstance(exc, Exception):
                        raise
        finally:
            self._sender = None

    async def _run(self, batch: list[Call]) -> None:
        if len(batch) == 1:
            keys, args, reply = batch[0]
            _settle(reply, await self._script(keys=keys, args=args))
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
        for (keys, args, reply), result in zip(batch, results, strict=True):
            if isinstance(result, NoScriptError):  # Redis lost its scripts (a restart, a flush)
                result = await _outcome(self._script(keys=keys, args=args))
            _settle(reply, result)


async def _outcome(call: Any) -> Any:
    """The call's reply, or the error it raised."""
    try:
        return await call
    except Exception as exc:
        return exc


def _settle(reply: asyncio.Future[Any], result: Any) -> None:
    if reply.done():  # its caller gave up waiting
        return
    if isinstance(result, BaseException):
        reply.set_exception(result)
    else:
        reply.set_result(result)


def _fail(batch: list[Call], exc: BaseException) -> None:
    for _, _, reply in batch:
        if reply.done():
            continue
        if isinstance(exc, Exception):
            reply.set_exception(exc)
        else:  # the sender was cancelled (the process is stopping)
            reply.cancel()
