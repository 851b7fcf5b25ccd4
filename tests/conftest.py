"""Shared tiny fixtures: a random VQ tokenizer for 8x8 digits and a tiny LM bundle built around it."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from models.bundle import Bundle
from models.config import LMConfig
from models.objectives import NextTokenPrediction
from models.text_tokenizer import TextTokenizer
from models.transformer import Transformer
from models.vocab import VocabLayout
from train.datamodules import ImageTextDataModule
from train.lm_module import MultimodalLMModule
from train.sources import DIGIT_WORDS, digit_captions
from vision_tokenizers import registry
from vision_tokenizers.vq import VQConfig, VQTokenizer

TINY_VQ = VQConfig(in_channels=1, image_size=8, channels=(8, 16), latent_dim=8, codebook_size=32,
                   mid_attention=False, restart_dead_codes=False)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    convolutions and matmuls on 2 shared cores run faster and steadier, and reductions keep one order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_vq_config():
    return TINY_VQ


@pytest.fixture(scope="session")
def tiny_vq_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vq") / "vq.safetensors"
    registry.save(VQTokenizer(TINY_VQ), path)
    return path


@pytest.fixture(scope="session")
def caption_tokenizer():
    return TextTokenizer.train_bpe([c for d in range(10) for c in digit_captions(d)] + DIGIT_WORDS, 200)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_vq_path, caption_tokenizer):
    torch.manual_seed(0)
    layout = VocabLayout(caption_tokenizer.vocab_size, TINY_VQ.codebook_size)
    lm = Transformer(LMConfig.from_preset("tiny", vocab_size=layout.size, max_len=48)).eval()
    return Bundle(lm, caption_tokenizer, layout, registry.load(tiny_vq_path), 48, NextTokenPrediction())


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "lm"
    tiny_bundle.save(path)
    return path


class LossRecorder(L.Callback):
    def __init__(self, key="train/loss"):
        self.key, self.losses = key, []

    def on_train_batch_end(self, trainer, *args):
        self.losses.append(float(trainer.callback_metrics[self.key]))


def make_trainer(tmp_path, steps, callbacks=(), **kw):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=1, default_root_dir=tmp_path, callbacks=list(callbacks), **kw)


@pytest.fixture(scope="session")
def fitted_lm(tiny_vq_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    dm = ImageTextDataModule(str(tiny_vq_path), source="digits", holdout=200, bpe_vocab_size=200,
                             batch_size=32, max_len=48, cache_dir=str(tmp / "cache"))
    module = MultimodalLMModule(dm.spec, preset="tiny", lr=3e-3, warmup_steps=5)
    rec = LossRecorder()
    trainer = make_trainer(tmp, 200, [rec])
    trainer.fit(module, dm)
    ckpt = tmp / "lm.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, rec.losses, ckpt, dm


# ---- no silent skips -------------------------------------------------------------------------------
# `make test` installs every dependency the tests use (Makefile: data and web-demo packages), so a skipped
# test means a missing dependency or a dead guard. Either fails the run, visibly, in CI as anywhere.
_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter):
    if _SKIPPED:
        terminalreporter.section("skipped tests fail the run")
        for line in _SKIPPED:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    if _SKIPPED and exitstatus == 0:
        session.exitstatus = 1
