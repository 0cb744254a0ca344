"""`mmhub serve MODEL`: load a model, start the engine and run the OpenAI-compatible API under uvicorn."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from mmhub.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="default",
                   help="a saved model folder, spec file, preset, recipe, hf:ORG/NAME, or `default` (the demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-name", default=None, help="the model id clients send and /v1/models lists")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (each choice of n is a row)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest media item, decoded bytes")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queue included (504)")
    p.add_argument("--allow-files", type=Path, default=None,
                   help="let image_url parts name local files inside this folder")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="a folder the loaded model folder may read from besides itself and the weight caches")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--ui", action="store_true",
                   help="also serve the Gradio demo at /ui: the same model in memory, the same queue")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run Python shipped with the weights (auto_map)")


def _check(args: argparse.Namespace) -> None:
    checks = [("--port", args.port, 0 <= args.port <= 65535, "0..65535"),
              ("--max-batch", args.max_batch, args.max_batch >= 1, ">= 1"),
              ("--max-queue", args.max_queue, args.max_queue >= 1, ">= 1"),
              ("--max-image-mb", args.max_image_mb, args.max_image_mb > 0, "> 0"),
              ("--max-images", args.max_images, args.max_images >= 0, ">= 0"),
              ("--max-tokens", args.max_tokens, args.max_tokens >= 1, ">= 1"),
              ("--timeout", args.timeout, args.timeout > 0, "> 0")]
    for flag, value, ok, want in checks:
        if not ok:
            raise InputError(f"{flag} {value}: must be {want}")
    if args.allow_files is not None and not args.allow_files.is_dir():
        raise InputError(f"--allow-files {args.allow_files}: not a folder")
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise InputError(f"--device {args.device!r} is not a device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: torch sees no CUDA GPU here; serve on --device cpu")


def build_server(args: argparse.Namespace) -> tuple[Any, Any]:
    """(app, engine) for the parsed flags; the engine is started."""
    from mmhub.loading import load
    from mmhub.serve.app import ServerSettings, create_app
    from mmhub.serve.content import ContentLimits
    from mmhub.serve.engine import Engine

    _check(args)
    model = load(args.model, trust_remote_code=args.trust_remote_code, allow_paths=args.allow_path or None)
    model = model.to(args.device)
    engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue).start()
    name = args.served_name or getattr(getattr(model, "default_info", None), "name", None) or Path(args.model).name
    settings = ServerSettings(model_name=name, api_key=args.api_key, timeout=args.timeout,
                              default_max_tokens=args.max_tokens,
                              limits=ContentLimits(max_image_mb=args.max_image_mb, max_images=args.max_images,
                                                   allow_files=args.allow_files))
    app = create_app(engine, settings)
    if getattr(args, "ui", False):
        app = mount_ui(app, args.model, name, model, engine)
    return app, engine


def mount_ui(app: Any, ref: str, name: str, model: Any, engine: Any) -> Any:
    """The Gradio demo at /ui, its chat on `engine` (so the page and the API share one model and one queue)."""
    import gradio as gr

    from mmhub.apps.demo import model_key
    from mmhub.apps.models import LoadedModel, ModelPool
    from mmhub.apps.models import load as load_key
    from mmhub.apps.ui import build_app
    from mmhub.apps.uploads import Limits

    key = model_key(ref)
    served = LoadedModel(key, f"served: {name}", f"**{name}**: the model `mmhub serve` serves (its API shares this "
                                                 "queue).", model, _engine=engine)
    pool = ModelPool(loader=lambda k: served if k == key else load_key(k))
    pool.get(key)
    folders = [ref] if key.startswith("folder:") else []
    blocks = build_app(pool, Limits(), folders=folders, initial=key).queue(max_size=64)
    app.state.mmhub_pool = pool
    return gr.mount_gradio_app(app, blocks, path="/ui")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app, engine = build_server(args)
    logging.getLogger(__name__).warning("serving %s (%s batching%s) on http://%s:%d/v1", args.model, engine.mode,
                                        f": {engine.mode_reason}" if engine.mode_reason else "", args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0
