"""Lightning wiring for the multimodal LM: backbone + objective + optimiser. Nothing else.

What is trained is the objective (models/objectives/, chosen in the YAML by class_path); the backbone
is models.transformer.Transformer, built from a preset or initialised from a Hugging Face Llama/Qwen2
folder (`hf_init`). Vocabulary and tokenizer facts arrive through the constructor (`data`, which the CLI
links from the data module's `spec`), never by reaching into the trainer.
"""
from __future__ import annotations

import torch

from models.bundle import Bundle
from models.config import LMConfig
from models.objectives import NextTokenPrediction, Objective
from models.sampling import SamplingConfig
from models.transformer import Transformer
from train.datamodules import DataSpec
from train.resume import ResumableModule
from train.schedule import adamw_cosine


class ObjectiveSteps(ResumableModule):
    """What every LM module shares: the objective and the LM config from the data's spec (`_setup`), training
    and validation steps over `_run(batch)` (the objective's outputs {"loss", "nll", figures...}, all logged;
    val/loss is the plain per-token mean, objective weights aside, so runs with other weights compare), and
    self-describing checkpoints from `bundle()`."""

    def _setup(self, data: DataSpec, objective: Objective | None, preset: str, **overrides: int | None) -> None:
        self.data = data
        self.objective = objective if objective is not None else NextTokenPrediction()
        self.objective.bind(data.tokenizer, data.class_names)
        self.cfg = LMConfig.from_preset(preset, **{k: v for k, v in overrides.items() if v is not None},
                                        vocab_size=data.layout.size, max_len=data.max_len)

    def training_step(self, batch, batch_idx):
        out = self._run(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "loss"})
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        out = self._run(batch)
        self.log_dict({"val/loss": out["nll"], **{f"val/{k}": v for k, v in out.items() if k not in ("loss", "nll")}},
                      prog_bar=True, batch_size=len(batch["ids"]), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Make the .ckpt self-describing: generate/ scripts rebuild everything from it."""
        super().on_save_checkpoint(checkpoint)  # RNG states (exact resume)
        checkpoint["mmar"] = {**self.bundle().meta(), "tokenizer_json": self.data.tokenizer.to_json()}


class MultimodalLMModule(ObjectiveSteps):
    """`preset` picks an LMConfig preset (models/config.py); dim/n_layers/... override it. The vocabulary
    size and maximum length come from `data`. With `hf_init` (a Hugging Face Llama/Qwen2/Mistral folder)
    the backbone starts from those weights instead, its vocabulary extended by our special and image
    tokens (the data module must then use that folder's tokenizer.json as `text_tokenizer`).
    `compile` runs the training step's computation (the objective's loss: backbone, head and loss together)
    through torch.compile; generation and the saved weights are unchanged.

    Args:
        data: the data module's spec (vocabulary, tokenizers, max length); the CLI links it, do not set it.
        objective: what is trained, any models.objectives class (NextTokenPrediction, NextBlockPrediction,
            FlowMatching ...); default NextTokenPrediction.
        preset: LM size, a models/config.py preset: tiny | demo | scenes | vicuna-7b | qwen2.5-1.5b | nbp-700m |
            xar-demo | xar-b | xar-l | xar-h.
        dim: model width (overrides the preset).
        n_layers: transformer blocks (overrides the preset).
        n_heads: attention heads (overrides the preset).
        n_kv_heads: key/value heads for grouped-query attention (overrides the preset).
        mlp_dim: hidden width of the SwiGLU MLP (overrides the preset).
        hf_init: a local Hugging Face Llama / Qwen2 / Mistral folder to start the backbone from.
        lr: peak learning rate (AdamW; linear warm-up, cosine decay to 0.1 lr at `lr_decay_steps`).
        weight_decay: AdamW weight decay (not on 1-d parameters: norms, biases).
        betas: AdamW betas.
        warmup_steps: steps of linear learning-rate warm-up.
        lr_decay_steps: the step at which the cosine reaches its floor (0.1 lr, kept after it); default the
            trainer's estimate of the run's steps (max_steps, or epochs x batches), which a run stopped by
            max_time never reaches: give time-limited runs the steps they will make.
        ema_decay: keep an exponential moving average of the weights with this decay (train.callbacks.EMA):
            validation, the checkpoints' state_dict (what `mmar export` writes) and the module after fit
            (`bundle()`) then hold the averaged weights; None (default): no averaging.
        compile: run the objective's loss (backbone + head + loss) through torch.compile while training.
        sampling: the drawing defaults saved with the model (cfg, temperature, top_k, top_p, steps, sampler), as
            tuned for the recipe; every entry point uses them unless a flag overrides one.
    """

    def __init__(self, data: DataSpec | None = None, objective: Objective | None = None, preset: str = "demo",
                 dim: int | None = None, n_layers: int | None = None, n_heads: int | None = None,
                 n_kv_heads: int | None = None, mlp_dim: int | None = None, hf_init: str | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 100, compile: bool = False, sampling: SamplingConfig | None = None,
                 lr_decay_steps: int | None = None, ema_decay: float | None = None):
        super().__init__()
        if data is None:
            raise ValueError("MultimodalLMModule needs `data` (the data module's spec; the CLI links it)")
        self.hf_init, self.compile_lm = hf_init, compile
        self.sampling = sampling or SamplingConfig()  # saved with the model: the drawing defaults of every entry point
        self._compiled_loss = None
        self._setup(data, objective, preset, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                    mlp_dim=mlp_dim)
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        if lr_decay_steps is not None and lr_decay_steps <= warmup_steps:
            raise ValueError(f"lr_decay_steps ({lr_decay_steps}) must exceed warmup_steps ({warmup_steps})")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        self.lr_decay_steps, self.ema_decay = lr_decay_steps, ema_decay
        self.vision = data.vision.eval().requires_grad_(False)  # frozen; saved in the .ckpt for generation
        self.lm: Transformer | None = None

    # ---- building ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the backbone here (not in __init__) so strategies like FSDP can wrap it as it is made."""
        if self.lm is not None:
            return
        if self.hf_init:
            from models.hf import extend_vocab, load_hf

            lm, _ = load_hf(self.hf_init)
            lm.cfg.max_len = self.data.max_len
            self.lm = extend_vocab(lm, max(lm.cfg.vocab_size, self.data.layout.size)).train()
        else:
            self.lm = Transformer(self.cfg)

    def bundle(self) -> Bundle:
        d = self.data
        return Bundle(self.lm, d.tokenizer, d.layout, self.vision, d.max_len, self.objective, sampling=self.sampling)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()  # the frozen tokenizer stays in inference mode
        return self

    # ---- steps -------------------------------------------------------------------------------
    def _run(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.compile_lm:
            # The whole loss, not only the backbone: Inductor then also fuses the head's softmax / cross-entropy
            # and the objective's weighting (make bench: ~9% more training tokens/s than compiling the backbone).
            if self._compiled_loss is None:  # a plain attribute (not in the state dict), made on first use
                self._compiled_loss = torch.compile(self.objective.loss, dynamic=True)
            return self._compiled_loss(self.lm, batch)
        return self.objective.loss(self.lm, batch)

    def configure_optimizers(self):
        params = torch.nn.ModuleList([self.lm, self.objective])
        horizon = self.lr_decay_steps or self.trainer.estimated_stepping_batches
        opt, sched = adamw_cosine(params, self.lr, self.weight_decay, self.betas, self.warmup_steps, horizon)
        return {"optimizer": opt, "lr_scheduler": sched}

    def configure_callbacks(self):
        if self.ema_decay is None:
            return []
        from train.callbacks import EMA

        return [EMA(self.ema_decay)]
