"""The fuzz families as lists of cases, shared by the fixed-seed tests (tests/fuzz/) and the long run
(``python -m benchmarks.fuzz``): each case is a name and a function whose ending `outcome.run_case` classifies."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from benchmarks.fuzz import api_bodies, folders, specs, uploads
from benchmarks.fuzz.outcome import Outcome, run_case, watch

Case = tuple[str, Callable[[], Any]]


def spec_cases(n: int, seed: int, assemble_every: int = 4) -> Iterator[Case]:
    """`n` mutated presets (every `assemble_every`-th valid one also assembled and saved) then the hostile files."""
    rng = random.Random(seed)
    presets = specs.presets()
    names = sorted(presets)
    for i in range(n):
        name = names[i % len(names)]
        spec = specs.mutate(presets[name], rng, n=rng.choice((1, 1, 2, 3)))
        yield f"{name}#mutant{i}", (lambda s=spec, a=(i % assemble_every == 0): specs.check_dict(s, a))


def hostile_spec_cases(where: Path) -> Iterator[Case]:
    base = specs.presets()["llava-1.5:tiny"]
    for name, content in specs.hostile_files(base).items():
        path = where / f"{name}.yaml"
        path.write_bytes(content)
        yield name, (lambda p=path: specs.check_file(p, assemble=True))


def folder_cases(n: int, seed: int, where: Path) -> Iterator[tuple[str, Callable[[], Any], Callable[[Any], bool]]]:
    """`n` corrupted copies of one saved model, cycling through every damage and malice, with a check that a
    successful load did not silently change the weights."""
    from mmhub.loading import load_folder

    rng = random.Random(seed)
    base = folders.base_folder(where)
    original = folders.weights_of(base)
    outside = where / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("secret\nwords\n")
    w = watch()
    w.canaries |= {str((outside / "secret.txt").resolve()), "/etc/passwd", str((outside / "other.safetensors"))}
    w.marker = outside / "EXECUTED"
    kinds = sorted(folders.DAMAGE) + sorted(folders.MALICE)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        target = folders.corrupt(base, where / f"case{i % 4}", kind, rng, outside)

        def changed(model: Any, t: Path = target) -> bool:
            state = model.state_dict()
            return any(k in state and (state[k].shape != v.shape or not bool((state[k] == v).all()))
                       for k, v in original.items())

        yield f"{kind}#{i}", (lambda t=target: load_folder(t)), changed


def upload_cases(n: int, seed: int, where: Path) -> Iterator[Case]:
    """`n` bad files and prompts through the demo's message check, then the model's tokenization."""
    from apps.chat import prompt_for, user_turn
    from apps.models import load
    from apps.uploads import Limits

    loaded = load("folder:" + str(Path(__file__).resolve().parents[2] / "mmhub" / "demo_model" / "easyvqa-tiny"))
    limits = Limits()
    rng = random.Random(seed)
    kinds = [("file", k) for k in sorted(uploads.FILES)] + [("prompt", k) for k in sorted(uploads.PROMPTS)]
    for i in range(n):
        what, kind = kinds[i % len(kinds)]
        case_rng = random.Random(rng.random())  # one generator per case, drawn in case order

        def message(what: str = what, kind: str = kind, r: random.Random = case_rng) -> Any:
            if what == "file":
                files = [str(uploads.write_file(where, kind, r))]
                turn = user_turn("<image>\nwhat shape is this?", files, loaded, limits)
            else:
                turn = user_turn(uploads.PROMPTS[kind](r), [], loaded, limits)
            messages, media = prompt_for([turn], loaded)
            return loaded.model.batch([messages], [media], add_generation_prompt=True)

        yield f"{what}:{kind}#{i}", message


class APIClient:
    """`mmhub serve`'s app over the shipped easy-VQA tiny model, in process, with a check that it still answers."""

    def __init__(self) -> None:
        from fastapi.testclient import TestClient

        from mmhub.loading import load
        from mmhub.serve.app import ServerSettings, create_app
        from mmhub.serve.content import ContentLimits
        from mmhub.serve.engine import Engine

        model = load(str(Path(__file__).resolve().parents[2] / "mmhub" / "demo_model" / "easyvqa-tiny"))
        self.engine = Engine(model, max_batch=4, max_queue=8).start()
        settings = ServerSettings(model_name="fuzz", timeout=30, default_max_tokens=4,
                                  limits=ContentLimits(max_image_mb=2, max_images=8))
        self.http = TestClient(create_app(self.engine, settings), raise_server_exceptions=False)

    def post(self, raw: bytes) -> Any:
        """One body; a 2xx completion returns, a clean 4xx raises InputError, anything else raises RuntimeError."""
        from mmhub.errors import InputError

        r = self.http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        if r.status_code == 200:
            body = r.text
            if '"choices"' not in body:
                raise RuntimeError(f"200 without choices: {body[:200]}")
            return body
        try:
            err = r.json()["error"]
            message, kind = err["message"], err["type"]
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"{r.status_code} without an OpenAI error body: {r.text[:200]}") from None
        if 400 <= r.status_code < 500 and isinstance(message, str) and message and isinstance(kind, str):
            raise InputError(f"{r.status_code} {kind}: {message}")
        raise RuntimeError(f"{r.status_code} {kind}: {message}")

    def alive(self) -> bool:
        r = self.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 2, "temperature": 0})
        return r.status_code == 200

    def close(self) -> None:
        self.engine.stop()


def api_cases(n: int, seed: int, client: APIClient) -> Iterator[Case]:
    """`n` hostile request bodies, cycling through `api_bodies.KINDS`; every tenth case also checks the server still
    answers a plain request."""
    rng = random.Random(seed)
    kinds = sorted(api_bodies.KINDS)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        raw = api_bodies.body(kind, random.Random(rng.random()))

        def post(raw: bytes = raw, check: bool = i % 10 == 9) -> Any:
            from mmhub.errors import InputError

            try:
                return client.post(raw)
            finally:
                if check and not client.alive():
                    raise RuntimeError("the server stopped answering after this body")  # noqa: B012
            raise InputError("unreachable")

        yield f"{kind}#{i}", post


def run_family(family: str, n: int, seed: int = 0, timeout_s: float = 60.0) -> list[Outcome]:
    """Every case of one family, classified."""
    out: list[Outcome] = []
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        if family == "specs":
            for name, fn in spec_cases(n, seed):
                out.append(run_case(family, name, fn, timeout_s))
        elif family == "hostile_specs":
            for name, fn in hostile_spec_cases(where):
                out.append(run_case(family, name, fn, timeout_s))
        elif family == "folders":
            for name, fn, changed in folder_cases(n, seed, where):
                out.append(run_case(family, name, fn, timeout_s, changed=changed))
        elif family == "uploads":
            for name, fn in upload_cases(n, seed, where):
                out.append(run_case(family, name, fn, timeout_s))
        elif family == "api":
            client = APIClient()
            try:
                for name, fn in api_cases(n, seed, client):
                    out.append(run_case(family, name, fn, timeout_s))
            finally:
                client.close()
        else:
            raise ValueError(f"unknown fuzz family {family!r}; choose specs, hostile_specs, folders, uploads or api")
    return out
