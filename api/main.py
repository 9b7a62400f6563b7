"""``mesh api``: run the coordinator until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import signal

from aiohttp import web

from api.app import create_app
from mesh import atomicfile, metrics
from mesh.config import ApiConfig, describe
from mesh.errors import ConfigError, JoinError

logger = logging.getLogger(__name__)


async def serve(config: ApiConfig, dht=None) -> None:
    app = create_app(config, dht=dht)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        if err.errno == errno.EADDRINUSE:
            raise JoinError(
                f"port {config.port} on {config.host} is already in use; pick another with --port (0 = any free port)"
            ) from None
        raise JoinError(f"cannot listen on {config.host}:{config.port}: {err.strerror}") from None
    port = runner.addresses[0][1]
    url = f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '::') else config.host}:{port}"
    store = "mongodb" if config.mongo_url else f"embedded store at {config.db_path}"
    logger.info("coordinator listening url=%s store=%s", url, store)
    print(f"coordinator listening on {url} ({store}); status page at {url}/", flush=True)
    if config.address_file is not None:
        atomicfile.write(config.address_file, url + "\n")  # mesh up reads it as soon as it exists
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logger.info("coordinator stopping")
    await runner.cleanup()


def run(config: ApiConfig) -> int:
    logger.info("api config %s", describe(config))
    metrics.init_build_info("api")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        pass
    dht = None
    if config.join:
        try:
            from api import observer
        except ImportError as err:
            raise ConfigError(
                f"--join needs hivemind and torch ({err.name} is not installed): the coordinator image watches no DHT; "
                "run `mesh api --join` from the peer image or a full install, or drop --join"
            ) from None

        dht = observer.join(config.join)  # before the event loop and any thread: hivemind forks
        if not config.bootstrap:
            config = dataclasses.replace(config, bootstrap=config.join)
    try:
        asyncio.run(serve(config, dht))
    finally:
        if dht is not None:
            dht.shutdown()
    return 0
