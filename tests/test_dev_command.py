"""`sluice dev` (what `make run` runs): a private Redis if none answers; serves; cleans up."""

from __future__ import annotations

import httpx
import psutil

from tests.procs import free_port, sluice, wait_until
from tests.sse import stream


async def test_dev_starts_private_redis_serves_and_stops_its_children() -> None:
    port = free_port()
    dev = sluice(
        "dev",
        "dev",
        {
            "SLUICE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "SLUICE_PORT": str(port),
            "SLUICE_HOST": "127.0.0.1",
            "SLUICE_BACKEND": "synthetic",
        },
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return bool(httpx.get(f"{url}/ready", timeout=1).json()["workers"] >= 1)
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    try:
        wait_until(ready, 60, "sluice dev")
        children = psutil.Process(dev.pid).children(recursive=True)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            result = await stream(client, {"prompt": "hi", "stream": True})
        assert result.events[-1].data == "[DONE]"
        assert any("redis-server" in c.name() for c in children)
    finally:
        code = dev.stop()

    assert code == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
