"""Runs the OpenAI-compatible API with uvicorn, beside a tritonserver it watches or against one
elsewhere (a container)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from frontend.app import FrontSettings, create_app


def run(
    settings: FrontSettings,
    host: str,
    port: int,
    alive: Callable[[], bool] | None = None,
    access_log: bool = False,
) -> int:
    """Serve until Ctrl-C or SIGTERM, or until `alive()` turns false (Triton stopped): then 1."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level="info" if access_log else "warning",
        access_log=access_log,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    lost = False

    async def main() -> None:
        nonlocal lost

        async def watch() -> None:
            nonlocal lost
            while alive is not None and not server.should_exit:
                if not alive():
                    lost = True
                    server.should_exit = True
                    return
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch())
        try:
            await server.serve()
        finally:
            watcher.cancel()

    asyncio.run(main())
    if not server.started:
        return 1
    return 1 if lost else 0
