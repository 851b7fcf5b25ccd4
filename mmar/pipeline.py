"""`Pipeline`: a trained mmar model behind a small Python API (diffusers-like).

    from mmar import Pipeline
    pipe = Pipeline.from_pretrained("results/demo/lm")          # inference folder or Lightning .ckpt
    images = pipe.text_to_image(["a handwritten 7"], n=4, seed=0)  # list[PIL.Image]
    texts = pipe.caption(images)                                 # list[str]
    pipe.save_pretrained("my_model")                             # an inference folder, written atomically

Batched calls equal one-by-one calls: every image is drawn by its own sampler call with its own
generator, seeded `seed + j` for the j-th image of each prompt. So `text_to_image(prompts, n, seed=s)`
returns, for each prompt p in order, exactly `text_to_image([p], n, seed=s)`, and its j-th image is
`text_to_image([p], n=1, seed=s + j)[0]` whatever else is in the batch. Captions are made one image
at a time too: greedy by default (no randomness); at temperature > 0 the i-th image uses seed `seed + i`,
so `caption(images, seed=s)[i] == caption([images[i]], seed=s + i)[0]`.

Below that user level sits the tensor level the training callbacks, the demo's scoring and the
benchmarks call: `draw_images` / `draw_videos` / `draw_captions` take and return tensors and draw a
whole batch with one generator. Prompts come from the model's sequence format (models/sequence.py),
the code that built its training samples; decoding is the model's objective's (models/objectives/).
"""
from __future__ import annotations

import operator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from models.bundle import Bundle, load_bundle
from models.sampling import id_range_mask, left_pad
from vision_tokenizers.image_io import load_image, pil_to_tensor, tensor_to_pil

# progress(done, total): called while drawing, `done` in [0, total] (forward passes of the LM)
Progress = Callable[[int, int], None]


@contextmanager
def forward_progress(lm: torch.nn.Module, total: int, progress: Callable[[int, int], None] | None):
    """Calls progress(done, total) before the first and after each forward pass of `lm` (one per decoding step;
    guided prompts are one batch, so one pass), `done` capped at total. No-op when progress is None."""
    if progress is None:
        yield
        return
    done = [0]

    def hook(*_):
        done[0] = min(done[0] + 1, total)
        progress(done[0], total)

    handle = lm.register_forward_hook(hook)
    try:
        progress(0, total)
        yield
    finally:
        handle.remove()


def _check_number(name: str, value, low: float, *, inclusive: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if v != v or v in (float("inf"), float("-inf")) or (v < low if inclusive else v <= low):
        raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {low}, got {value!r}")
    return v


def _check_int(name: str, value, low: int) -> int:
    """An integer (Python or numpy) >= low; bools and floats are refused."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}") from None
    if v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return v


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i + 1} is empty")
    return [p.strip() for p in prompts]


class Pipeline:
    """A loaded model (`bundle`) with text-to-image, captioning and (for video checkpoints) text-to-video."""

    def __init__(self, bundle: Bundle, device: str | torch.device | None = None, compile: bool = False):
        """`compile=True` decodes through the compiled static-cache step (next-token models only; same images and
        captions as eager): the first call of each batch shape compiles (about 20-60 s on a small CPU), later
        calls of that shape reuse it."""
        self.bundle = bundle
        self.device = bundle.lm.tok_emb.weight.device if device is None else torch.device(device)
        if compile and not bundle.objective.compiles:
            raise ValueError(f"compile=True applies to next-token models; this one decodes with "
                             f"{type(bundle.objective).__name__}")
        if compile:
            from models.quantize import count_int8_linears

            if count_int8_linears(bundle.lm):  # measured on the demo shape: 2.7x slower, and not the eager tokens
                raise ValueError("compile=True does not take an int8 model: torch.compile breaks its graph at every "
                                 "int8 layer (slower than eager int8); use int8 or compile")
        self.compile = compile
        self._compile_kw = {"compile": True} if compile else {}

    # ---- load / save -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", int8: bool = False,
                        compile: bool = False) -> "Pipeline":
        """Load an inference folder or a Lightning `.ckpt` of the LM module (no pickled code is run).
        `int8=True` quantises the LM's linear layers dynamically (CPU inference; see models/quantize.py);
        `compile=True` decodes through the compiled static-cache step (see `Pipeline`)."""
        bundle = load_bundle(path, device)
        if int8:
            from models.quantize import quantize_int8

            bundle = quantize_int8(bundle)
        return cls(bundle, device, compile=compile)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write an inference folder (config.json, model.safetensors, vision_tokenizer.safetensors,
        tokenizer.json) atomically: it appears whole or not at all."""
        self.bundle.save(folder)
        return Path(folder)

    # ---- facts -----------------------------------------------------------------------------------
    @property
    def can_caption(self) -> bool:
        return self.bundle.objective.captions and not self.can_make_video

    @property
    def can_make_video(self) -> bool:
        from vision_tokenizers import registry

        try:
            return registry.kind_of(self.bundle.vision) == "video"
        except ValueError:  # a tokenizer class the registry does not know: not ours to call a video one
            return False

    @property
    def image_size(self) -> int:
        return self.bundle.image_size

    @property
    def image_channels(self) -> int:
        return self.bundle.image_channels

    @property
    def sampling(self):
        """The drawing defaults saved with the model (models.sampling.SamplingConfig)."""
        return self.bundle.sampling

    # ---- tensor level: one batch, one generator ---------------------------------------------------
    @torch.inference_mode()
    def draw_images(self, prompts: list[str], n: int = 1, cfg: float | None = None, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                    steps: int | None = None, sampler: str | None = None,
                    cfg_schedule: str | None = None) -> torch.Tensor:
        """A batch of images [len(prompts) * n, C, H, W] in [-1, 1], prompt-major order.

        Every option left at None takes the model's saved sampling defaults (`self.sampling`). Only image codes are
        sampled inside the image span; with cfg != 1 the batch is doubled with the unconditional prompt (the
        caption-dropped form the model was trained on). A continuous-latent objective (xAR) draws latents with
        `steps` / `sampler` / `cfg_schedule` instead, and refuses temperature, top-k and top-p, which do not apply
        to it.
        """
        b = self.bundle
        s = b.sampling.override(cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p, steps=steps, sampler=sampler,
                                cfg_schedule=cfg_schedule)
        continuous = b.objective.continuous
        if continuous and (temperature, top_k, top_p) != (None, None, None):
            raise ValueError("this model draws by flow matching (xAR): temperature, top-k and top-p do not apply; "
                             "use steps and sampler")
        if not continuous and cfg_schedule is not None:
            raise ValueError("cfg_schedule applies to flow-matching (xAR) models, which guide entity by entity; "
                             "this model draws tokens")
        fmt = b.format
        rows = [fmt.t2i_prompt(p) for p in prompts for _ in range(n)]
        guided = s.cfg != 1.0
        if guided:
            rows = rows + [fmt.t2i_prompt(None)] * len(rows)
        ids, valid = left_pad(rows, b.tokenizer.pad_id)
        n_codes = b.vision.num_tokens
        if ids.shape[1] + n_codes > b.max_len:
            what = "latents" if continuous else "image codes"
            raise ValueError(f"prompt of {ids.shape[1]} tokens + {n_codes} {what} exceeds max_len {b.max_len}")
        dev, cfg_scale = self.device, s.cfg if guided else None
        if continuous:
            latents = b.objective.generate(b.lm, ids.to(dev), valid=valid.to(dev), cfg_scale=cfg_scale, steps=s.steps,
                                           sampler=s.sampler, cfg_schedule=s.cfg_schedule,
                                           generator=generator)  # [B, c, h, w]
            return b.vision.decode(latents)
        lo = b.layout.image_offset
        allowed = id_range_mask(b.lm.cfg.vocab_size, lo, lo + b.layout.image_codes, device=dev)
        codes = b.objective.generate(
            b.lm, ids.to(dev), n_codes, valid=valid.to(dev), temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            allowed=allowed, cfg_scale=cfg_scale, generator=generator, **self._compile_kw,
        ) - lo  # [B, N]
        return b.vision.decode(codes.view(len(codes), *b.vision.code_shape))

    @torch.inference_mode()
    def draw_captions(self, images: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                      top_p: float | None = None, generator: torch.Generator | None = None,
                      tokens: int | None = None) -> list[str]:
        """Captions for a batch of images [B, C, H, W] in [-1, 1] at the trained size: the captioning prompt, then
        text until <eos>.

        A model with continuous image inputs (`bundle.visual`: ETT codebook embeddings, TokenFLEX pooled features) reads
        each image as `tokens` vectors in embedding slots (TokenFLEX: any square count; default: the model's)."""
        b = self.bundle
        if not b.objective.captions:
            raise ValueError(f"a model trained with {type(b.objective).__name__} does not caption images "
                             "(its text is not trained)")
        tok, fmt, dev = b.tokenizer, b.format, self.device
        lm = b.lm
        if b.visual is not None:
            from vision_tokenizers.projectors import WithEmbeds

            embeds = b.visual(images.to(dev), b.vision, tokens)  # [B, N, D]
            ids = torch.tensor([fmt.caption_prompt_slots(embeds.shape[1])] * len(images), device=dev)  # [B, T]
            lm = WithEmbeds(b.lm, embeds.flatten(0, 1), fmt.image_slots(ids))
        elif tokens is not None and tokens != b.vision.num_tokens:
            raise ValueError(f"this model reads images as {b.vision.num_tokens} code ids; it has no token count to choose")
        else:
            codes = b.vision.encode(images.to(dev))  # [B, h, w]
            ids = torch.tensor([fmt.caption_prompt(c) for c in codes], device=dev)  # [B, T] (all the same length)
        max_new_tokens = min(max_new_tokens, b.max_len - ids.shape[1])
        allowed = id_range_mask(b.lm.cfg.vocab_size, 0, b.layout.text_size, device=dev)  # text ids and <eos> only
        allowed[tok.special_ids] = False
        allowed[tok.eos_id] = True
        out = b.objective.generate(lm, ids, max_new_tokens, temperature=temperature, top_p=top_p, allowed=allowed,
                                   stop_id=tok.eos_id, generator=generator, **self._compile_kw)
        return [tok.decode(t for t in row.tolist() if t != tok.eos_id) for row in out]

    @torch.inference_mode()
    def draw_videos(self, prompts: list[str], n: int = 1, cfg: float | None = None, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Videos [len(prompts) * n, C, T, H, W] in [-1, 1], prompt-major order. The same prompt and decoding as
        draw_images (the video codes are the visual span); the model's objective decides token- or block-wise."""
        if len(getattr(self.bundle.vision, "code_shape", ())) != 3:
            raise ValueError("this model's vision tokenizer is not a video tokenizer; use draw_images")
        return self.draw_images(prompts, n, cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator)

    # ---- user level: checked options, PIL images, one seed per image ------------------------------
    def _draw(self, fn, prompts, n, cfg, temperature, top_k, top_p, seed, progress, batch_size=None,
              **kw) -> list[torch.Tensor]:
        prompts = _check_prompts(prompts)
        n = _check_int("n", n, 1)
        seed = _check_int("seed", seed, 0)
        cfg = None if cfg is None else _check_number("cfg", cfg, 0)  # None: the model's saved default
        temperature = None if temperature is None else _check_number("temperature", temperature, 0)
        top_k = None if top_k is None else _check_int("top_k", top_k, 1)
        if top_p is not None and not 0 < _check_number("top_p", top_p, 0, inclusive=False) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        batch_size = None if batch_size is None else _check_int("batch_size", batch_size, 1)
        # (prompt, seed) of every output in order; exact mode: image j of each prompt has its own generator
        items = [(p, seed + j) for p in prompts for j in range(n)]
        if batch_size is None:
            chunks = [([p], s) for p, s in items]
        else:  # fast mode: `batch_size` images per sampler call, one generator per call, seeded seed + call index
            chunks = [([p for p, _ in items[k:k + batch_size]], seed + c)
                      for c, k in enumerate(range(0, len(items), batch_size))]
        steps_each = self.bundle.vision.num_tokens + 1  # prefill + one pass per code (an upper bound)
        total = len(chunks) * steps_each
        out = []
        for c, (rows, s) in enumerate(chunks):
            gen = torch.Generator(device=self.device).manual_seed(s)
            base = c * steps_each
            sub = None if progress is None else (lambda d, _t, b=base: progress(min(b + d, total), total))
            with forward_progress(self.bundle.lm, steps_each, sub):
                x = fn(rows, 1, cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                       generator=gen, **kw)
            out.extend(x.cpu().unbind(0))
        if progress is not None:
            progress(total, total)
        return out

    def text_to_image(self, prompts: str | Sequence[str], n: int = 1, cfg: float | None = None,
                      temperature: float | None = None,
                      seed: int = 0, top_k: int | None = None, top_p: float | None = None,
                      steps: int | None = None, sampler: str | None = None, cfg_schedule: str | None = None,
                      progress: Progress | None = None, batch_size: int | None = None) -> list[Image.Image]:
        """`n` images per prompt, prompt-major (`len(prompts) * n` PIL images). `cfg` is the classifier-free
        guidance scale (1 = off); `steps` / `sampler` / `cfg_schedule` apply to continuous-latent (xAR) checkpoints
        only. Options left at None take the model's saved sampling defaults (`self.sampling`).

        Default (`batch_size=None`): each image is drawn alone with its own seed, so results do not depend on
        what else is asked for (see the module docstring). `batch_size=k` draws k images per sampler call
        (about 9x faster for 40 images on one CPU thread); the images then depend on `batch_size` and on the
        whole list, and are reproducible only for the same call."""
        if self.can_make_video:
            raise ValueError("this checkpoint draws videos; use text_to_video")
        xs = self._draw(self.draw_images, prompts, n, cfg, temperature, top_k, top_p, seed, progress,
                        batch_size, steps=steps, sampler=sampler, cfg_schedule=cfg_schedule)
        return [tensor_to_pil(x) for x in xs]

    def text_to_video(self, prompts: str | Sequence[str], n: int = 1, cfg: float | None = None,
                      temperature: float | None = None,
                      seed: int = 0, top_k: int | None = None, top_p: float | None = None,
                      progress: Progress | None = None, batch_size: int | None = None) -> list[list[Image.Image]]:
        """`n` videos per prompt, each a list of frames (PIL images). Raises ValueError when the checkpoint's
        vision tokenizer is not a video tokenizer."""
        if not self.can_make_video:
            raise ValueError("this checkpoint cannot make videos (its vision tokenizer is an image tokenizer); "
                             "use text_to_image, or load a text-to-video checkpoint (configs/video_lm.yaml)")
        xs = self._draw(self.draw_videos, prompts, n, cfg, temperature, top_k, top_p, seed, progress, batch_size)
        return [[tensor_to_pil(v[:, t]) for t in range(v.shape[1])] for v in xs]  # [C, T, H, W] -> frames

    # ---- captioning ------------------------------------------------------------------------------
    def _image_tensor(self, img, k: int) -> torch.Tensor:
        c, s = self.image_channels, self.image_size
        if isinstance(img, Image.Image):
            return pil_to_tensor(img, c, s)
        if isinstance(img, (str, Path)):
            return load_image(img, c, s)
        raise ValueError(f"image {k + 1}: expected a PIL image or a file path, got {type(img).__name__}")

    def caption(self, images, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float | None = None,
                seed: int = 0, progress: Progress | None = None) -> list[str]:
        """One caption per image (PIL images or file paths of any size; converted and resized as trained).
        Greedy by default."""
        if not self.can_caption:
            raise ValueError("this checkpoint does not caption images (it draws "
                             f"{'videos' if self.can_make_video else 'continuous latents'})")
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("give at least one image")
        max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
        seed = _check_int("seed", seed, 0)
        temperature = _check_number("temperature", temperature, 0)
        xs = [self._image_tensor(img, k) for k, img in enumerate(images)]  # every image checked first
        out = []
        for k, x in enumerate(xs):
            gen = torch.Generator(device=self.device).manual_seed(seed + k)
            out += self.draw_captions(x[None], max_new_tokens, temperature, top_p, gen)
            if progress is not None:
                progress(k + 1, len(xs))
        return out

    def __repr__(self) -> str:
        b = self.bundle
        kind = "text-to-video" if self.can_make_video else "text-to-image" + (" + captioning" if self.can_caption else "")
        from models.quantize import count_int8_linears

        n_int8 = count_int8_linears(b.lm)
        size = (f"int8 LM ({n_int8} linear layers int8; {b.lm.num_params():,} fp32 parameters besides)" if n_int8
                else f"{b.lm.num_params():,} LM parameters")
        return (f"Pipeline({kind}, {size}, {b.vision.num_tokens} tokens per "
                f"{'video' if self.can_make_video else 'image'}, {self.image_channels}x{self.image_size}px, "
                f"device={self.device})")
