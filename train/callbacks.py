"""Training callbacks: validation-time samples (a grid of generated images and a few captions, saved and
logged), the numerical guard (a non-finite loss or gradient stops the run, or skips the step) and an
exponential moving average of the weights (EMA)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch

from common.io import write_text_atomic
from mmar.pipeline import Pipeline
from vision_tokenizers.image_io import grid, save_png


class SampleLogger(L.Callback):
    """At each validation: draw `per_prompt` images for up to `n_prompts` prompts and caption `n_captions`
    validation images; write samples/step<N>.png and .txt under the log dir, and to TensorBoard if used."""

    def __init__(self, n_prompts: int = 10, per_prompt: int = 2, n_captions: int = 4, cfg: float = 3.0,
                 top_k: int | None = None, seed: int = 0):
        self.n_prompts, self.per_prompt, self.n_captions = n_prompts, per_prompt, n_captions
        self.cfg, self.top_k, self.seed = cfg, top_k, seed

    def prompts(self, pl_module, datamodule) -> list[str]:
        data = datamodule.train_data
        seen, out = set(), []
        for caps, label in zip(data.captions, data.labels):  # one prompt per class (or per caption)
            key = int(label) if label >= 0 else caps[0]
            if key not in seen:
                seen.add(key)
                out.append(caps[0])
            if len(out) == self.n_prompts:
                break
        return sorted(out)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        # log_dir is a collective under DDP: every rank asks for it before rank 0 alone goes on.
        log_dir = trainer.log_dir or trainer.default_root_dir
        if trainer.sanity_checking or not trainer.is_global_zero or pl_module.lm is None:
            return
        dm = trainer.datamodule
        bundle = pl_module.bundle()
        was_training = pl_module.training
        pl_module.eval()
        g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        prompts = self.prompts(pl_module, dm)
        images = Pipeline(bundle).draw_images(prompts, self.per_prompt, cfg=self.cfg, top_k=self.top_k, generator=g)
        val = dm.val_images
        n = min(self.n_captions, len(val))
        c, s = bundle.image_channels, bundle.image_size
        real = torch.stack([val.image(i, c, s) for i in range(n)]).to(pl_module.device)
        caps = Pipeline(bundle).draw_captions(real, generator=g)
        pl_module.train(was_training)
        out = Path(log_dir) / "samples"
        img = grid(images.cpu(), nrow=self.per_prompt * 5)
        save_png(img, out / f"step{trainer.global_step}.png")
        lines = [f"prompts: {prompts}"] + [f"{val.captions[i][0]!r} -> {caps[i]!r}" for i in range(n)]
        write_text_atomic(out / f"step{trainer.global_step}.txt", "\n".join(lines) + "\n")
        exp = getattr(trainer.logger, "experiment", None)
        if hasattr(exp, "add_image"):
            exp.add_image("samples", (img + 1) / 2, trainer.global_step)
            exp.add_text("captions", "  \n".join(lines), trainer.global_step)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped the run (NumericalGuard with action="stop")."""

    exit_code = 1  # mmar/cli.py: one line and exit code 1


class NumericalGuard(L.Callback):
    """Checks the gradients before every optimiser step. A non-finite one (a NaN/inf loss gives those too)
    either stops the run with a message naming the step (`action="stop"`, the default: nothing is saved
    after the bad step, so the last checkpoint is the last good one) or drops the step (`"skip"`: the
    gradients are cleared, the optimiser leaves the weights and its moments as they were; counted in
    `train/skipped_steps`). Under DDP the gradients are already reduced, so every rank decides the same."""

    def __init__(self, action: Literal["stop", "skip"] = "stop"):
        if action not in ("stop", "skip"):
            raise ValueError(f"NumericalGuard action must be 'stop' or 'skip', got {action!r}")
        self.action, self.skipped = action, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params or torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])):
            return
        if self.action == "stop":
            cb = trainer.checkpoint_callback
            kept = f"; last good checkpoint: {cb.last_model_path}" if cb is not None and cb.last_model_path else ""
            raise NonFiniteError(f"step {trainer.global_step}: non-finite loss or gradient, run stopped{kept}")
        for p in params:
            p.grad = None
        self.skipped += 1
        pl_module.log("train/skipped_steps", float(self.skipped))


def ema_update_(average: list[torch.Tensor], params: list[torch.Tensor], decay: float, updates: int) -> None:
    """One EMA update in place: average <- d average + (1 - d) params with d = min(decay, (1 + n) / (10 + n)) at the
    n-th update (diffusers' EMAModel warm-up). The one formula of EMA below and of benchmarks.xar's tracks."""
    d = min(decay, (1 + updates) / (10 + updates))
    with torch.no_grad():
        torch._foreach_lerp_(average, [p.detach() for p in params], 1 - d)


class EMA(L.Callback):
    """Exponential moving average of the trainable weights, updated after every optimiser step with decay
    min(decay, (1 + n) / (10 + n)) at the n-th update (n from 0, diffusers' EMAModel warm-up, so a short run is
    not an average dominated by the initial weights). Frozen weights (a vision tokenizer) are left alone.

    Validation runs on the averaged weights (swapped in and out); when training ends the module keeps them, so
    `bundle()` after fit holds them. Checkpoints carry the averaged weights as `state_dict` (what `mmar export`,
    `load_bundle` and `mmar validate` read) and the raw weights and counters under "ema", from which a resumed
    fit continues both exactly. MultimodalLMModule(ema_decay=...) adds it. Not for sharded strategies (FSDP)."""

    def __init__(self, decay: float = 0.999):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.other: list[torch.Tensor] | None = None  # the weights the module does not hold now
        self.holds_average = False  # True while the module holds the average (self.other: the raw weights)
        self.updates, self.step = 0, 0  # updates made; the trainer's global step at the last one
        self._for_validation = False

    @staticmethod
    def _params(pl_module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]

    def _swap(self, pl_module) -> None:
        with torch.no_grad():
            for o, (_, p) in zip(self.other, self._params(pl_module), strict=True):
                tmp = p.detach().clone()
                p.copy_(o)
                o.copy_(tmp)
        self.holds_average = not self.holds_average

    def _update(self, trainer, pl_module) -> None:
        if self.other is None or self.holds_average or trainer.global_step <= self.step:
            return
        ema_update_(self.other, [p for _, p in self._params(pl_module)], self.decay, self.updates)
        self.updates, self.step = self.updates + 1, trainer.global_step

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.other is None:  # a fresh run (a resume has set it in on_load_checkpoint)
            self.other = [p.detach().clone() for _, p in self._params(pl_module)]
            self.step = trainer.global_step
        elif self.holds_average:  # a second fit of the same module: train the raw weights again
            self._swap(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._update(trainer, pl_module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._for_validation = self.other is not None and not self.holds_average
        if self._for_validation:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._for_validation:
            self._swap(pl_module)
            self._for_validation = False

    def on_train_end(self, trainer, pl_module) -> None:
        if self.other is not None and not self.holds_average:
            self._swap(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.other is None:
            return
        self._update(trainer, pl_module)  # a checkpoint written before this step's update (callback order) has it
        params = self._params(pl_module)
        held = [p.detach() for _, p in params]
        average, raw = (held, self.other) if self.holds_average else (self.other, held)
        index = {id(p): i for i, (_, p) in enumerate(params)}
        state = checkpoint["state_dict"]
        for name, p in pl_module.named_parameters(remove_duplicate=False):  # every name of a tied weight
            if id(p) in index and name in state:
                state[name] = average[index[id(p)]]
        checkpoint["ema"] = {"raw": {n: raw[i] for i, (n, _) in enumerate(params)}, "decay": self.decay,
                             "updates": self.updates, "step": self.step}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Resume (fit only; the module already holds the checkpoint's state_dict, the average)."""
        params = self._params(pl_module)
        self.other = [p.detach().clone() for _, p in params]
        self.holds_average = self._for_validation = False
        st = checkpoint.get("ema")
        if st is None:  # a checkpoint written without EMA: the average starts from its weights
            self.updates, self.step = 0, checkpoint["global_step"]
            return
        with torch.no_grad():
            for n, p in params:
                p.copy_(st["raw"][n])
        self.updates, self.step = st["updates"], st["step"]
