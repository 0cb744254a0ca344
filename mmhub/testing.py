"""Shared component checks, for mmhub's own tests and for plugin authors' test suites.

`check_component(kind, name)` builds a tiny instance from the component's
``example_settings`` and checks what every component must do: its described
width/token count match what it really emits, forward shapes are right, outputs
are finite, and a safetensors save/reload into a fresh instance reproduces the
outputs exactly.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmhub import weights as weight_sources
from mmhub.checkpoint import _dedupe
from mmhub.interfaces import BuildContext, Component, TextContext
from mmhub.registry import Registry, get_registry

PROJ_IN, PROJ_OUT, PROJ_TOKENS = 24, 40, 16


def sample_item(modality: str, seed: int = 0) -> Any:
    """A small raw media item of `modality`, as a user would pass it to `preprocess`.

    image: a 48x40 RGB PIL image; video: 4 such frames; audio: 1 s of 16 kHz mono
    float32 (a tone plus noise); points: 512 xyz points on a noisy sphere.
    """
    rng = np.random.default_rng(seed)
    if modality == "image":
        return Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    if modality == "video":
        return [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(4)]
    if modality == "audio":
        t = np.arange(16000, dtype=np.float32) / 16000
        return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(16000)).astype(np.float32)
    if modality == "points":
        p = rng.standard_normal((512, 3)).astype(np.float32)
        return p / np.linalg.norm(p, axis=1, keepdims=True) + 0.01 * rng.standard_normal((512, 3)).astype(np.float32)
    raise AssertionError(f"no sample item for modality {modality!r}; known: image, video, audio, points")


def sample_text(n: int, width: int, seed: int = 0) -> TextContext:
    """A `TextContext` of random embeddings for `n` items (instruction 5 tokens, target 3, some padding)."""
    g = torch.Generator().manual_seed(seed)
    imask = torch.ones(n, 5, dtype=torch.bool)
    imask[0, 3:] = False
    return TextContext(torch.randn(n, 5, width, generator=g), imask, torch.randn(n, 3, width, generator=g),
                       torch.ones(n, 3, dtype=torch.bool))


def _instance(cls: type[Component], config: Any, ctx: BuildContext, seed: int) -> Component:
    torch.manual_seed(seed)
    return cls(config, ctx).eval()


def _roundtrip(module: Component, make: Any, run: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.safetensors"
        # tied weights share storage: the checkpoint module's dedupe keeps one copy of each
        unique, _ = _dedupe({k: v.detach() for k, v in module.state_dict().items()})
        save_file(unique, str(path))
        fresh = make(seed=1234)
        loaded = load_file(str(path))
        missing, unexpected = fresh.load_state_dict(loaded, strict=False)
        assert not unexpected, unexpected
        own = fresh.state_dict()
        for k in missing:  # only tied aliases may be absent from the file
            assert any(own[k].data_ptr() == own[j].data_ptr() for j in loaded), f"{k} was not saved"
    a, b = run(module), run(fresh)
    assert torch.equal(a, b), "outputs differ after a save/reload round trip"


def check_component(kind: str, name: str, settings: dict[str, Any] | None = None, registry: Registry | None = None) -> None:
    """Run the shared checks on the registered component `name` of `kind` (raises AssertionError)."""
    registry = registry or get_registry()
    info = registry.get(kind, name)  # type: ignore[arg-type]
    cls = info.cls
    assert cls.summary(), f"{name}: the class needs a docstring (its first line is shown by `mmhub plugins`)"
    config = cls.Config.model_validate(settings if settings is not None else cls.example_settings)
    ctx = BuildContext(resolve=lambda uri: weight_sources.resolve(uri, registry), registry=registry)
    if kind == "encoder":
        facts = cls.describe(config, ctx)
        make = lambda seed=0: _instance(cls, config, ctx, seed)
        enc = make()
        assert cls.modalities_in, f"{name}: modalities_in is empty"
        batches = {m: torch.stack([enc.preprocess(sample_item(m, seed=i), m) for i in range(2)]) for m in cls.modalities_in}
        for modality, items in batches.items():
            out = enc(items, modality).detach()
            want = (2, facts.tokens_for(modality), facts.out_dim)
            assert out.shape == want, f"{name} ({modality}): described {want} but emitted {tuple(out.shape)}"
            assert torch.isfinite(out).all(), f"{name} ({modality}): non-finite outputs"
        modality = cls.modalities_in[0]
        run = lambda m: m(batches[modality], modality).detach()
        out = run(enc)
        assert enc.out_dim == facts.out_dim
    elif kind == "projector":
        config = config.model_copy(update={"in_dim": PROJ_IN, "out_dim": PROJ_OUT})
        make = lambda seed=0: _instance(cls, config, ctx, seed)
        proj = make()
        x = torch.randn(2, PROJ_TOKENS, PROJ_IN, generator=torch.Generator().manual_seed(0))
        text = sample_text(2, PROJ_OUT) if cls.uses_text else None
        run = lambda m: m(x, text).detach()
        out = run(proj)
        want = cls.num_tokens(config, PROJ_TOKENS)
        assert out.shape == (2, want, PROJ_OUT), f"{name}: num_tokens says {want}, emitted {tuple(out.shape)}"
    elif kind == "backbone":
        facts = cls.describe(config, ctx)
        make = lambda seed=0: _instance(cls, config, ctx, seed)
        bb = make()
        tok = bb.tokenizer
        ids = torch.tensor([tok("hello world", add_special_tokens=False)["input_ids"][:8]])
        mask = torch.ones_like(ids)
        if facts.is_encoder_decoder:  # the decoder reads the same ids, teacher-forced
            run = lambda m: m.logits(m(m.embed(ids), mask, decoder_input_ids=ids, decoder_attention_mask=mask)).detach()
        else:
            run = lambda m: m.logits(m(m.embed(ids), mask)).detach()
        out = run(bb)
        assert out.shape == (1, ids.shape[1], facts.vocab_size), f"{name}: logits {tuple(out.shape)}"
        assert bb.hidden_size == facts.hidden_size
        gen = bb.generate(bb.embed(ids), mask, max_new_tokens=3, pad_token_id=0)
        assert gen.shape[0] == 1 and 1 <= gen.shape[1] <= 3
    elif kind == "injector":
        make, run, out = _injector_case(cls, config, ctx, registry)
    elif kind == "output_projector":  # k = 3 signal states of width 24 -> a 7 x 40 conditioning
        config = config.model_copy(update={k: v for k, v in (("in_dim", PROJ_IN), ("in_len", 3), ("out_len", 7),
                                                             ("out_dim", PROJ_OUT)) if getattr(config, k) is None})
        facts = cls.describe(config, ctx)
        make = lambda seed=0: _instance(cls, config, ctx, seed)
        x = torch.randn(2, config.in_len, config.in_dim, generator=torch.Generator().manual_seed(0))
        run = lambda m: m(x).detach()
        out = run(make())
        assert out.shape == (2, facts.out_len, facts.out_dim), f"{name}: describe says {facts.out_len} x {facts.out_dim}, " \
                                                               f"emitted {tuple(out.shape[1:])}"
    elif kind == "generator":
        make, run, out = _generator_case(cls, config, ctx)
    else:
        raise AssertionError(f"no shared checks for kind {kind!r} yet")
    assert torch.isfinite(out).all(), f"{name}: non-finite outputs"
    _roundtrip(make(), make, run)


class _InjectorRig(torch.nn.Module):
    """An injector attached to its own tiny backbone; only the injector's tensors are in the state dict."""

    def __init__(self, injector: Component, backbone: Component):
        super().__init__()
        self.inj = injector
        object.__setattr__(self, "backbone", backbone)  # not a submodule: its weights are not the injector's
        injector.attach(backbone)


def _injector_case(cls: type[Component], config: Any, ctx: BuildContext, registry: Registry) -> tuple[Any, Any, torch.Tensor]:
    """Attach the injector to a tiny random Llama and run it with a media context (2 items, 3 tokens each)."""
    from mmhub.interfaces import InjectionContext

    bcls = registry.get("backbone", "hf_causal_lm").cls
    bconfig = bcls.Config.model_validate(bcls.example_settings)
    bfacts = bcls.describe(bconfig, ctx)
    facts = cls.describe(config, ctx, bfacts)
    config = config.model_copy(update={k: v for k, v in (("dim", bfacts.hidden_size), ("num_layers", bfacts.num_layers))
                                       if k in type(config).model_fields})
    torch.manual_seed(0)
    base = bcls(bconfig, ctx).eval()

    def make(seed: int = 0) -> _InjectorRig:
        import copy

        rig = _InjectorRig(_instance(cls, config, ctx, seed), copy.deepcopy(base)).eval()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # move off any identity initialisation (zero gates, copied experts): the checks need effect
            for p in rig.inj.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        return rig

    g = torch.Generator().manual_seed(0)
    H, L = bfacts.hidden_size, 8
    ids = torch.randint(3, 200, (1, L), generator=g)
    index = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1]])
    media = {m: torch.randn(1, 2, 3, H, generator=g) for m in facts.context_modalities}
    context = InjectionContext(media, {m: torch.ones(1, 2, dtype=torch.bool) for m in media},
                               {m: index for m in media}, torch.tensor([[False, True, True, True, False, False, False, False]]))

    def run(rig: _InjectorRig) -> torch.Tensor:
        rig.inj.context = context
        try:
            hidden = rig.backbone(rig.backbone.embed(ids), torch.ones_like(ids))
        finally:
            rig.inj.context = None
        return hidden.detach()

    rig = make()
    out = run(rig)
    assert out.shape == (1, L, H), f"{cls.name}: hidden states {tuple(out.shape)} != {(1, L, H)}"
    assert not torch.allclose(out, base(base.embed(ids), torch.ones_like(ids)).detach()), \
        f"{cls.name}: with a media context, the injector changed nothing"
    plain = rig.backbone(rig.backbone.embed(ids), torch.ones_like(ids)).detach()  # context cleared: hooks are inert
    assert torch.equal(plain, base(base.embed(ids), torch.ones_like(ids)).detach()), \
        f"{cls.name}: with no context set, the backbone must compute exactly what it did without the injector"
    return make, run, out


CAPTIONS = ["a red circle", "two small blue squares"]


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run with `n` torch threads, then restore: tiny diffusion models are bound by per-op overhead, which
    several threads on a busy, few-core CPU multiply (spin-waits) instead of dividing."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _media_array(item: Any, modality: str) -> np.ndarray:
    """One generated item as an array (for equality checks), after checking its type."""
    if modality == "image":
        assert isinstance(item, Image.Image), f"an image generator returned {type(item).__name__}, not a PIL image"
        return np.asarray(item)
    if modality == "video":
        assert isinstance(item, list) and item and all(isinstance(f, Image.Image) for f in item), \
            "a video generator must return each video as a non-empty list of PIL frames"
        assert len({f.size for f in item}) == 1, "video frames differ in size"
        return np.stack([np.asarray(f) for f in item])
    if modality == "audio":
        from mmhub.interfaces import Audio

        assert isinstance(item, Audio), f"an audio generator returned {type(item).__name__}, not mmhub.interfaces.Audio"
        samples = np.asarray(item.samples)
        assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size, \
            f"Audio.samples must be non-empty mono float32; got {samples.dtype} {samples.shape}"
        assert isinstance(item.sample_rate, int) and item.sample_rate > 0, f"bad sample_rate {item.sample_rate!r}"
        return samples
    raise AssertionError(f"no generated-item check for modality {modality!r}; known: image, video, audio")


def _declared_size(gen: Component) -> tuple[int, int] | None:
    """(width, height) a generator says its images/frames have: its ``output_size`` attribute or setting."""
    size = getattr(gen, "output_size", None)
    if size is None:
        size = getattr(gen.config, "output_size", None)
    if isinstance(size, int):
        return (size, size)
    return tuple(size) if size is not None else None


def _generator_case(cls: type[Component], config: Any, ctx: BuildContext) -> tuple[Any, Any, torch.Tensor]:
    """encode_text matches the described conditioning shape; generate (2 steps) on it returns one item of the
    declared modality (and size) per row, the same for the same seed."""
    facts = cls.describe(config, ctx)
    assert facts.modality in cls.modalities_out, \
        f"{cls.name}: describes {facts.modality} but declares modalities_out {cls.modalities_out}"
    make = lambda seed=0: _instance(cls, config, ctx, seed)
    gen = make()
    run = lambda m: m.encode_text(CAPTIONS).detach()
    out = run(gen)
    want = (len(CAPTIONS), facts.cond_len, facts.cond_dim)
    assert tuple(out.shape) == want, f"{cls.name}: described conditioning {want}, encode_text gave {tuple(out.shape)}"
    items = gen.generate(out, seed=0, steps=2)
    assert len(items) == len(CAPTIONS), f"{cls.name}: {len(CAPTIONS)} conditionings gave {len(items)} items"
    arrays = [_media_array(item, facts.modality) for item in items]
    size = _declared_size(gen)
    if facts.modality in ("image", "video") and size is not None:
        got = {(a.shape[-2], a.shape[-3]) for a in arrays}
        assert got == {size}, f"{cls.name}: declared (width, height) {size} but generated {sorted(got)}"
    again = [_media_array(item, facts.modality) for item in gen.generate(out, seed=0, steps=2)]
    assert all(np.array_equal(a, b) for a, b in zip(arrays, again)), f"{cls.name}: the same seed gave different output"
    return make, run, out
