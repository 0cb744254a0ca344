"""`mmhub demo [MODEL_DIR | PRESET] [--host H] [--port P]`: serve the Gradio demo.

With no model argument it serves the hub's default model (`mmhub.demo_model`). The
model is loaded before the server starts, so the first page can chat at once. The
server binds to 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mmhub.errors import InputError


def model_key(arg: str | None, registry: Any = None) -> str:
    """The CLI's model argument -> a model key of `mmhub.apps.models`."""
    from mmhub.apps.models import DEFAULT, check_model_folder
    from mmhub.registry import get_registry

    if arg in (None, "", DEFAULT):
        return DEFAULT
    path = Path(arg).expanduser()
    if path.is_dir():
        return f"folder:{check_model_folder(path).resolve()}"
    reg = registry or get_registry()
    key = arg if ":" in arg else f"{arg}:tiny"
    if key in reg.presets:
        return f"preset:{key}"
    raise InputError(f"{arg!r} is neither a model folder nor a preset; give a folder written by save_pretrained, "
                     "a preset such as llava-1.5:tiny (see `mmhub presets`), or nothing for the default model")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a model folder, a preset (tiny size) or 'default' (the default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="a model folder to offer in the Model list (repeatable)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (default 20)")
    p.add_argument("--max-prompt-chars", type=int, default=4000, help="longest message accepted (default 4000)")
    p.add_argument("--runs", default="runs", metavar="DIR",
                   help="where the Train tab writes its run folders and the Runs tab looks (default runs)")


def run(args: argparse.Namespace) -> int:
    from mmhub.apps.models import ModelPool
    from mmhub.apps.ui import build_app
    from mmhub.apps.uploads import Limits

    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port} is not a TCP port; give 1..65535")
    if args.max_upload_mb <= 0 or args.max_prompt_chars <= 0:
        raise InputError("--max-upload-mb and --max-prompt-chars must be positive")
    for folder in args.models:
        model_key(folder)  # every listed folder must be a model folder
    key = model_key(args.model)
    t0 = time.perf_counter()
    pool = ModelPool()
    loaded = pool.get(key)
    print(f"loaded {loaded.label} in {time.perf_counter() - t0:.1f} s", flush=True)
    limits = Limits(max_upload_mb=args.max_upload_mb, max_prompt_chars=args.max_prompt_chars)
    app = build_app(pool, limits, folders=args.models, initial=key, runs_dir=args.runs)
    # Gradio's own cap sits well above ours, so an oversized file still reaches our check and its clear message
    app.queue(max_size=64).launch(server_name=args.host, server_port=args.port, show_error=True,
                                  max_file_size=f"{int(max(4 * args.max_upload_mb, 100))}mb", quiet=False)
    return 0
