"""LM training options: the EMA of the weights (what it averages, that validation, the checkpoint, `mmar export` and
the module after fit hold it, exact resume) and the learning-rate horizon `lr_decay_steps`."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from models.bundle import load_bundle
from train.callbacks import EMA
from train.datamodules import ImageTextDataModule
from train.lm_module import MultimodalLMModule
from vision_tokenizers import registry

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(vq_path, tmp_path):
    return ImageTextDataModule(str(vq_path), source="digits", holdout=200, bpe_vocab_size=200, batch_size=16,
                               max_len=48, val_size=16, cache_dir=str(tmp_path / "cache"))


def _module(dm, **kw):
    torch.manual_seed(0)
    return MultimodalLMModule(dm.spec, preset="tiny", lr=3e-3, warmup_steps=2, **kw)


def _trainer(root, steps, callbacks=(), **kw):
    kw = {"limit_val_batches": 0, "enable_checkpointing": False, **kw}
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
                     callbacks=list(callbacks), **kw)


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class Trajectory(L.Callback):
    """The raw weights after every optimiser step, and the weights validation ran on."""

    def __init__(self):
        self.steps, self.validated = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append(_trainable(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, *args):
        self.validated.append(_trainable(pl_module))


def _expected_average(start: dict, steps: list[dict], decay: float) -> dict:
    avg = {k: v.clone() for k, v in start.items()}
    for n, w in enumerate(steps):
        d = min(decay, (1 + n) / (10 + n))
        avg = {k: d * avg[k] + (1 - d) * w[k] for k in avg}
    return avg


def _close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)


def test_ema_is_the_average_that_validation_checkpoint_export_and_bundle_hold(tiny_vq_path, tmp_path):
    dm = _data(tiny_vq_path, tmp_path)
    decay = 0.5
    module = _module(dm, ema_decay=decay)
    module.configure_model()
    start = _trainable(module)
    traj = Trajectory()
    trainer = _trainer(tmp_path, 12, [traj], limit_val_batches=1, val_check_interval=6)
    trainer.fit(module, dm)
    assert sum(isinstance(cb, EMA) for cb in trainer.callbacks) == 1  # added by the module's ema_decay
    assert len(traj.steps) == 12 and len(traj.validated) == 2  # validation after steps 6 and 12
    raw = traj.steps[-1]
    average = _expected_average(start, traj.steps, decay)
    assert not _close(average, raw)  # the average is not the raw weights (EMA is no no-op)
    assert _close(traj.validated[0], _expected_average(start, traj.steps[:6], decay))  # validation: the average
    assert _close(traj.validated[1], average)
    assert _close(_trainable(module), average)  # after fit the module holds the average: bundle() is it
    assert _close({f"lm.{k}": v for k, v in module.bundle().lm.state_dict().items() if f"lm.{k}" in average}, average)
    vq = registry.load(tiny_vq_path).state_dict()  # frozen weights are never averaged
    assert all(torch.equal(v, vq[k]) for k, v in module.vision.state_dict().items())

    ckpt = tmp_path / "lm.ckpt"
    trainer.save_checkpoint(ckpt)
    c = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert _close({k: c["state_dict"][k] for k in average}, average)
    assert _close(c["ema"]["raw"], raw) and c["ema"]["updates"] == 12
    bundle = load_bundle(ckpt)  # what `mmar export` writes
    exported = {f"lm.{k}": v for k, v in bundle.lm.state_dict().items()}
    assert _close({k: exported[k] for k in average if k in exported}, average)
    assert not _close({k: exported[k] for k in average if k in exported}, {k: raw[k] for k in average if k in exported})


class SaveAt(L.Callback):
    """Writes a checkpoint at the end of step `step` from a trainer callback, which runs before the module's EMA
    callback has updated for that step (as LastCheckpoint's SIGTERM save does)."""

    def __init__(self, path, step):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_ema_resume_equals_an_uninterrupted_run(tiny_vq_path, tmp_path):
    """8 steps in one run vs 4 steps, a checkpoint, and 4 more in a new trainer and module: the checkpoints at
    step 8 (the average, the raw weights, the counters, the optimiser's moments) are identical."""
    def run(root, steps, resume=None, extra=()):
        dm = _data(tiny_vq_path, tmp_path)
        module = _module(dm, ema_decay=0.7, lr_decay_steps=8)  # one horizon whatever max_steps is
        ck = ModelCheckpoint(dirpath=root, every_n_train_steps=4, save_top_k=-1, filename="{step}")
        _trainer(root, steps, [*extra, ck], enable_checkpointing=True).fit(module, dm, ckpt_path=resume)
        return root

    whole = run(tmp_path / "whole", 8)
    early = tmp_path / "early.ckpt"  # written before the EMA callback's own update of step 4
    run(tmp_path / "part", 6, extra=[SaveAt(early, 4)])
    resumed = run(tmp_path / "resumed", 8, resume=early)
    e = torch.load(early, weights_only=True)
    assert (e["global_step"], e["ema"]["updates"]) == (4, 4)
    a = torch.load(whole / "step=8.ckpt", weights_only=True)
    b = torch.load(resumed / "step=8.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(a["ema"]["raw"][k], b["ema"]["raw"][k]) for k in a["ema"]["raw"])
    assert (a["ema"]["updates"], a["ema"]["step"]) == (b["ema"]["updates"], b["ema"]["step"]) == (8, 8)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert not all(torch.equal(a["state_dict"][k], a["ema"]["raw"][k]) for k in a["ema"]["raw"])


def test_lr_reaches_its_floor_at_lr_decay_steps(tiny_vq_path, tmp_path):
    dm = _data(tiny_vq_path, tmp_path)
    module = _module(dm, lr_decay_steps=20)
    module.configure_model()
    opt_sched = module.configure_optimizers()  # no trainer needed: the horizon is given
    opt, sched = opt_sched["optimizer"], opt_sched["lr_scheduler"]["scheduler"]
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(25):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[2] == pytest.approx(3e-3)  # the end of the warm-up
    assert lrs[20] == pytest.approx(0.1 * 3e-3) and lrs[25] == pytest.approx(0.1 * 3e-3)  # min_lr_ratio * lr
    assert all(x > 0.1 * 3e-3 * 1.001 for x in lrs[2:20])
    with pytest.raises(ValueError, match="lr_decay_steps"):
        _module(dm, lr_decay_steps=2)
    with pytest.raises(ValueError, match="ema_decay"):
        _module(dm, ema_decay=1.0)


def test_lr_decay_steps_in_a_fit_and_the_default_horizon(tiny_vq_path, tmp_path):
    """Through the trainer: lr_decay_steps=6 of a 10-step run reaches the floor at step 6; without it the horizon is
    the trainer's estimate (10 steps), so step 6 is still above it."""
    class LR(L.Callback):
        def __init__(self):
            self.lrs = []

        def on_train_batch_start(self, trainer, *args):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    got = {}
    for horizon in (6, None):
        dm = _data(tiny_vq_path, tmp_path)
        rec = LR()
        _trainer(tmp_path, 10, [rec]).fit(_module(dm, lr_decay_steps=horizon), dm)
        got[horizon] = rec.lrs
    assert got[6][6] == pytest.approx(0.1 * 3e-3) and got[6][9] == pytest.approx(0.1 * 3e-3)
    assert got[None][6] > 0.2 * 3e-3 and got[None][9] > 0.1 * 3e-3
