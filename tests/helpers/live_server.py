"""A `mmhub serve` app on a free loopback port in a background thread, for tests that drive it with real clients."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from mmhub.serve.app import ServerSettings, create_app
from mmhub.serve.engine import Engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(engine: Engine, settings: ServerSettings | None = None, start_engine: bool = True) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:PORT``) of the app over `engine`, served until the block ends."""
    import uvicorn

    if start_engine:
        engine.start()
    app = create_app(engine, settings or ServerSettings(model_name="tiny"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not start in 30 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()


def data_uri(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
