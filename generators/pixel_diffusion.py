"""A small pixel-space conditional diffusion model with its own tiny text encoder, trained from scratch.

No diffusion weights can be downloaded here, so this generator is small enough to train on a
CPU (recipe ``python -m mmhub.recipes.easyvqa_draw``, on easy-VQA's images and captions) and to
ship its weights with the repo (``mmhub/demo_model/easyvqa-draw/``).

* a diffusers ``UNet2DConditionModel`` denoises ``image_size`` x ``image_size`` RGB pixels in
  [-1, 1]; the deepest ``attention_levels`` blocks (default all but the first) and the mid block
  cross-attend to the caption, and with ``pooled_text`` (diffusers' ``addition_embed_type="text"``)
  the attention-pooled caption is added to the time embedding, so every resnet block sees it
  (cheap, strong conditioning: on a CPU self-attention at high resolution is what costs);
* its own text encoder: a transformers ``CLIPTextModel`` built from config (``cond_dim`` wide,
  ``text_layers`` deep) over a word-level tokenizer (``vocab``: a word list, one per line),
  captions padded/cut to ``cond_len`` tokens; its last hidden states are the conditioning;
* DDPM noise schedule for training (`loss`; ``prediction_type`` epsilon or v_prediction: with the
  cosine schedule, whose last step keeps almost no signal, v-prediction samples far better in
  few steps), DPM-Solver++ (``sampler: dpm``) or DDIM for sampling with the x0 estimates clipped
  to the pixel range, classifier-free guidance against ``encode_text([""])``;
* images come out as PIL, upscaled to ``output_size`` (``upscale``: nearest or bicubic).

``pretrained`` is a safetensors file (weight-source URI or path) holding the whole state dict
(fp16 storage is fine: tensors are cast to the model's dtype on load). Never unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from mmhub.errors import InputError, WeightsNotFoundError
from mmhub.interfaces import BuildContext, ComponentConfig, Generator, GeneratorConfig, GeneratorFacts
from mmhub.weights import load_into


class PixelDiffusionConfig(GeneratorConfig):
    """Settings of `PixelDiffusionGenerator`."""

    steps: int = Field(20, ge=1)
    guidance_scale: float = 3.0
    image_size: int = Field(32, ge=8)  # the UNet's resolution
    output_size: int = Field(64, ge=8)  # PIL images come out this size
    upscale: Literal["nearest", "bicubic"] = "bicubic"
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(32, ge=1)
    attention_levels: int | None = Field(None, ge=1)  # the deepest N blocks cross-attend (default: all but the first)
    only_cross_attention: bool = False  # drop the transformer blocks' self-attention (much cheaper on a CPU)
    pooled_text: bool = True  # also add the attention-pooled caption to the time embedding (every resnet sees it)
    norm_num_groups: int = Field(32, ge=1)
    cond_len: int = Field(8, ge=2)  # caption tokens (padded / cut)
    cond_dim: int = Field(64, ge=8)  # text-encoder width = the UNet's cross_attention_dim
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(2, ge=1)
    vocab: str = "mmhub:recipes/easyvqa-words.txt"  # word list (weight-source URI or path)
    train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    sampler: Literal["dpm", "ddim"] = "dpm"
    pretrained: str | None = None  # a .safetensors state dict


def outline_band(pixels: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """(N, 3, H, W) pixels in [-1, 1] -> (N, 1, H, W) 1.0 on the figure's outline (a 3-pixel band), else 0.

    The figure is every pixel farther than `threshold` (max over channels) from the image's background colour,
    taken as the median of its four corner pixels; the band is the figure dilated minus the figure eroded."""
    corners = torch.stack([pixels[..., 0, 0], pixels[..., 0, -1], pixels[..., -1, 0], pixels[..., -1, -1]], -1)
    background = corners.median(-1).values[..., None, None]
    figure = ((pixels - background).abs().amax(1, keepdim=True) > threshold).float()
    dilated = F.max_pool2d(figure, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-figure, 3, stride=1, padding=1)
    return dilated - eroded


def _unet(c: PixelDiffusionConfig):
    from diffusers import UNet2DConditionModel

    n = len(c.block_out_channels)
    if n < 2:
        raise InputError("pixel_diffusion needs at least two block_out_channels "
                         "(one plain block, then cross-attention)")
    bad = [ch for ch in c.block_out_channels if ch % c.norm_num_groups]
    if bad:
        raise InputError(f"pixel_diffusion: block_out_channels {bad} are not multiples of "
                         f"norm_num_groups {c.norm_num_groups}")
    if c.image_size % (2 ** (n - 1)):
        raise InputError(f"pixel_diffusion: image_size {c.image_size} must be divisible by {2 ** (n - 1)} "
                         f"({n} blocks halve it {n - 1} times)")
    a = n - 1 if c.attention_levels is None else c.attention_levels
    if a > n:
        raise InputError(f"pixel_diffusion: attention_levels {a} exceeds the {n} blocks of block_out_channels")
    down = ("DownBlock2D",) * (n - a) + ("CrossAttnDownBlock2D",) * a
    up = ("CrossAttnUpBlock2D",) * a + ("UpBlock2D",) * (n - a)
    return UNet2DConditionModel(
        sample_size=c.image_size, in_channels=3, out_channels=3, down_block_types=down, up_block_types=up,
        block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
        cross_attention_dim=c.cond_dim, attention_head_dim=c.attention_head_dim, norm_num_groups=c.norm_num_groups,
        only_cross_attention=c.only_cross_attention, addition_embed_type="text" if c.pooled_text else None,
        addition_embed_type_num_heads=c.text_heads)


def _text_model(c: PixelDiffusionConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    if c.cond_dim % c.text_heads:
        raise InputError(f"pixel_diffusion: cond_dim {c.cond_dim} is not divisible by text_heads {c.text_heads}")
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=c.cond_dim, intermediate_size=4 * c.cond_dim,
                         num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads,
                         max_position_embeddings=c.cond_len, pad_token_id=pad_id, bos_token_id=bos_id,
                         eos_token_id=eos_id, attention_dropout=0.0)
    return CLIPTextModel(cfg)


def _scheduler(c: PixelDiffusionConfig, kind: str):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=c.train_timesteps, beta_schedule=c.beta_schedule,
                  prediction_type=c.prediction_type)
    if kind == "ddpm":
        return DDPMScheduler(clip_sample=False, **common)
    if kind == "ddim":
        return DDIMScheduler(clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
                             timestep_spacing="trailing", **common)
    # the x0 predictions are clipped to the pixel range: at t = T the cosine schedule leaves almost no signal, so
    # an epsilon model's x0 estimate there is divided by ~sqrt(alpha_bar) ~ 1e-4 and would blow up unclipped
    return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, thresholding=True,
                                       dynamic_thresholding_ratio=0.995, sample_max_value=1.0, **common)


class PixelDiffusionGenerator(Generator):
    """Small pixel-space text-to-image diffusion (diffusers UNet + own tiny CLIP text encoder), trainable on a CPU."""

    name: ClassVar[str] = "pixel_diffusion"
    Config: ClassVar[type[ComponentConfig]] = PixelDiffusionConfig
    modalities_out: ClassVar[tuple[str, ...]] = ("image",)
    library: ClassVar[str] = "diffusers"
    out_dim_doc: ClassVar[str] = "cond_dim: the width of its own text encoder (= the UNet's cross_attention_dim)"
    tokens_doc: ClassVar[str] = "cond_len caption tokens (padded or cut)"
    example_settings: ClassVar[dict[str, Any]] = {
        "image_size": 16, "output_size": 16, "block_out_channels": [8, 16], "norm_num_groups": 4,
        "attention_head_dim": 8, "cond_len": 6, "cond_dim": 16, "text_layers": 1, "text_heads": 2, "steps": 2}

    @classmethod
    def describe(cls, config: PixelDiffusionConfig, ctx: BuildContext) -> GeneratorFacts:
        ctx.weights(config.vocab)
        if config.pretrained is not None:
            ctx.weights(config.pretrained)  # a missing file is reported before anything is built
        return GeneratorFacts(modality="image", cond_len=config.cond_len, cond_dim=config.cond_dim)

    def __init__(self, config: PixelDiffusionConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        from mmhub.backbones.word_tokenizer import word_tokenizer

        c = config
        self.tokenizer = word_tokenizer(ctx.weights(c.vocab))
        tok = self.tokenizer
        self.unet = _unet(c)
        self.text = _text_model(c, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
        self.noise_scheduler = _scheduler(c, "ddpm")
        if c.pretrained is not None:
            path = Path(ctx.weights(c.pretrained))
            self.load_weights(path, what=f"pixel_diffusion weights {c.pretrained}")

    def has_weight_source(self) -> bool:
        """`pretrained` restores every tensor, so a saved model need not store them (unless a stage trains them)."""
        return self.config.pretrained is not None or super().has_weight_source()

    def load_weights(self, path: Path, what: str = "pixel_diffusion weights") -> None:
        """Load a safetensors state dict (any float dtype) strictly into this model."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise WeightsNotFoundError(f"{what}: {path} does not exist")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsNotFoundError(f"{what}: {path} is not a readable safetensors file ({exc}); "
                                       f"pixel_diffusion loads only .safetensors state dicts") from None
        own = self.state_dict()
        wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state.items()
                 if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise WeightsNotFoundError(f"{what}: {len(wrong)} tensor(s) of another shape, e.g. {wrong[:2]}; "
                                       f"the file was trained with other settings (block_out_channels, cond_dim, ...)")
        load_into(self, state, "name", what=what)

    # ---- text side -------------------------------------------------------------------------------------
    def token_ids(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (N, cond_len) ids: ``<s> words </s> <pad>...`` (cut to cond_len)."""
        tok, L = self.tokenizer, self.config.cond_len
        out = torch.full((len(captions), L), tok.pad_token_id, dtype=torch.long)
        for i, text in enumerate(captions):
            words = tok(text.lower(), add_special_tokens=False)["input_ids"]
            ids = ([tok.bos_token_id] + words)[:L - 1] + [tok.eos_token_id]
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, cond_len) ids -> (N, cond_len, cond_dim) text-encoder states (differentiable, for training)."""
        return self.text(input_ids=ids.to(self.text.device)).last_hidden_state

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.encode_ids(self.token_ids(list(captions)))

    # ---- training ----------------------------------------------------------------------------------------
    def loss(self, pixels: torch.Tensor, ids: torch.Tensor, generator: torch.Generator | None = None,
             edge_weight: float = 0.0) -> torch.Tensor:
        """Denoising loss of a batch: pixels (N, 3, image_size, image_size) in [-1, 1], caption ids (N, cond_len).

        Noise and timesteps are drawn from `generator` (a CPU generator), so a seeded step is reproducible.
        ``edge_weight`` > 0 makes the loss shape-aware: the squared error of each pixel on the outline of the
        picture's figure (`outline_band`) counts ``1 + edge_weight`` times, so the few pixels that tell a circle
        from a rectangle are not drowned by the flat background and interior."""
        n = pixels.shape[0]
        sched = self.noise_scheduler
        noise = torch.randn(pixels.shape, generator=generator).to(pixels)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=generator).to(pixels.device)
        noisy = sched.add_noise(pixels, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=self.encode_ids(ids)).sample
        target = noise if self.config.prediction_type == "epsilon" else sched.get_velocity(pixels, noise, t)
        if edge_weight <= 0:
            return F.mse_loss(pred, target)
        w = 1.0 + edge_weight * outline_band(pixels)
        return ((pred - target) ** 2 * w).sum() / (w.sum() * pred.shape[1])

    # ---- sampling ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, seed: int | None = None, steps: int | None = None,
               guidance_scale: float | None = None) -> torch.Tensor:
        """(N, cond_len, cond_dim) -> (N, 3, image_size, image_size) pixels in [-1, 1]."""
        c = self.config
        steps = c.steps if steps is None else int(steps)
        g = c.guidance_scale if guidance_scale is None else float(guidance_scale)
        if cond.ndim != 3 or tuple(cond.shape[1:]) != (c.cond_len, c.cond_dim):
            raise InputError(f"pixel_diffusion takes conditioning (N, {c.cond_len}, {c.cond_dim}); "
                             f"got {tuple(cond.shape)}")
        p = next(self.unet.parameters())
        cond = cond.to(device=p.device, dtype=p.dtype)
        n = cond.shape[0]
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        x = torch.randn((n, 3, c.image_size, c.image_size), generator=gen).to(device=p.device, dtype=p.dtype)
        sched = _scheduler(c, c.sampler)
        sched.set_timesteps(steps)
        guided = g != 1.0
        if guided:
            uncond = self.encode_text([""]).to(device=p.device, dtype=p.dtype).expand(n, -1, -1)
            ctx = torch.cat([uncond, cond])
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            if guided:
                inp = sched.scale_model_input(torch.cat([x, x]), t)
                e_u, e_c = self.unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
                eps = e_u + g * (e_c - e_u)
            else:
                eps = self.unet(sched.scale_model_input(x, t), t, encoder_hidden_states=cond).sample
            x = sched.step(eps, t, x).prev_sample
        return x.clamp(-1, 1)

    def to_images(self, x: torch.Tensor) -> list[Image.Image]:
        """(N, 3, H, W) pixels in [-1, 1] -> PIL images at output_size."""
        arr = ((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        size = self.config.output_size
        resample = Image.NEAREST if self.config.upscale == "nearest" else Image.BICUBIC
        out = []
        for a in arr:
            im = Image.fromarray(np.ascontiguousarray(a), "RGB")
            out.append(im if im.size == (size, size) else im.resize((size, size), resample))
        return out

    def generate(self, cond: torch.Tensor, seed: int | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> list[Image.Image]:
        return self.to_images(self.sample(cond, seed, steps, guidance_scale))

    def draw(self, captions: list[str], seed: int | None = 0, steps: int | None = None,
             guidance_scale: float | None = None) -> list[Image.Image]:
        """Captions -> PIL images through its own text encoder (the demo's shortcut)."""
        return self.generate(self.encode_text(captions), seed, steps, guidance_scale)
