"""Checkpoints that survive a failed write, refuse pickled code, and a numerical guard that keeps the last good one."""
from __future__ import annotations

import math
import pickle

import fsspec.implementations.local as fs_local
import lightning as L
import pytest
import torch

from mmar.cli import run
from models.bundle import load_bundle
from train.callbacks import NonFiniteError, NumericalGuard
from train.cli import prepare_trainer

from conftest import make_trainer


def _fail_half_way(monkeypatch):
    """Make every file write put half its bytes on disk and then fail (a crash in the middle of a write)."""
    real = fs_local.LocalFileOpener.write

    def write(self, data):
        real(self, data[: len(data) // 2])
        raise OSError("injected failure in the middle of a write")

    monkeypatch.setattr(fs_local.LocalFileOpener, "write", write)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model = _Blowup(nan_at=-1)
    trainer = make_trainer(tmp_path, 2, [])
    trainer.fit(model)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    good = torch.load(path, weights_only=True)["state_dict"]
    with torch.no_grad():
        model.w.weight.add_(1.0)  # the next save would hold different weights
    _fail_half_way(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    again = torch.load(path, weights_only=True)["state_dict"]
    assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)
    assert sorted(p.name for p in tmp_path.iterdir() if "ckpt" in p.name) == ["last.ckpt"]  # no half file


def test_failed_export_keeps_the_previous_folder(tiny_bundle, tmp_path, monkeypatch):
    folder = tmp_path / "lm"
    tiny_bundle.save(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import safetensors.torch as st

    def broken(*args, **kwargs):
        raise OSError("injected failure while writing weights")

    monkeypatch.setattr("common.weights.save_file", broken)
    with pytest.raises(OSError, match="injected"):
        tiny_bundle.save(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["lm"]  # no temporary folder left beside it
    load_bundle(folder)
    assert st  # the real writer is untouched


class _Payload:
    """Unpickling this runs `open(path, "w")`: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_with_pickled_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "mmar": {}, "payload": _Payload(marker)}, evil)
    assert run("caption", ["--ckpt", str(evil), str(evil)]) == 2
    err = capsys.readouterr().err
    assert "evil.ckpt: cannot read checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    # the training side: Lightning's resume loads with torch's weights_only default (True), refusing it too
    from lightning.fabric.utilities.cloud_io import _load as pl_load

    with pytest.raises(pickle.UnpicklingError):
        pl_load(evil)
    assert not marker.exists()


class _Blowup(L.LightningModule):
    """A linear model whose loss turns NaN at step `nan_at`."""

    def __init__(self, nan_at: int = 3):
        super().__init__()
        self.w, self.nan_at = torch.nn.Linear(2, 1), nan_at

    def training_step(self, batch, batch_idx):
        loss = self.w(batch).pow(2).mean()
        return loss * (math.nan if self.global_step == self.nan_at else 1.0)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=8)


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_numerical_guard(action, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    model = _Blowup()
    ck = ModelCheckpoint(every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[ck, NumericalGuard(action)])
    prepare_trainer(trainer)
    if action == "stop":
        with pytest.raises(NonFiniteError, match="step 3: non-finite loss or gradient.*last.ckpt"):
            trainer.fit(model)
        kept = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        assert kept["global_step"] == 3
        assert all(torch.isfinite(v).all() for v in kept["state_dict"].values())
    else:
        trainer.fit(model)
        assert trainer.global_step == 6 and all(torch.isfinite(p).all() for p in model.parameters())
        assert trainer.callback_metrics["train/skipped_steps"] == 1
