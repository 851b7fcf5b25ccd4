"""Exact resume after SIGKILL, checkpoints that survive a failed write, refusal of pickled code, 2-process DDP
equal to 1 process, and the numerical guard. The recipes run as users run them: `python -m train fit`."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _lm_config(vq_path: Path, root: Path, batch: int = 16) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 24, "default_root_dir": str(root),
                    "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "check_val_every_n_epoch": 1, "gradient_clip_val": 1.0,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"every_n_train_steps": 2, "save_last": True}}]},
        "model": {"class_path": "train.lm_module.MultimodalLMModule",
                  "init_args": {"preset": "tiny", "lr": 3e-3, "warmup_steps": 3}},
        "data": {"class_path": "train.datamodules.ImageTextDataModule",
                 "init_args": {"vision_tokenizer": str(vq_path), "source": "digits", "holdout": 200,
                               "bpe_vocab_size": 200, "batch_size": batch, "max_len": 48, "val_size": 32,
                               "cache_dir": str(root.parent / "cache"), "augment_copies": 1}},
    }


def _vq_config(root: Path) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 24, "default_root_dir": str(root),
                    "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"every_n_train_steps": 2, "save_last": True}}]},
        "model": {"class_path": "train.tokenizer_module.VQTokenizerModule",
                  "init_args": {"tokenizer": {"in_channels": 1, "image_size": 8, "channels": [8, 16], "latent_dim": 8,
                                              "codebook_size": 32, "mid_attention": False,
                                              "restart_dead_codes": True},
                                "lr": 3e-3, "warmup_steps": 3}},
        "data": {"class_path": "train.datamodules.ImageDataModule",
                 "init_args": {"source": "digits", "holdout": 200, "image_size": 8, "batch_size": 32, "val_size": 32}},
    }


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, *extra: str, wait: bool = True, env_extra: dict | None = None):
    cmd = [sys.executable, "-m", "train", "fit", "--config", str(config), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **(env_extra or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    out = dict(c["state_dict"])
    for i, opt in enumerate(c["optimizer_states"]):
        for pid, st in opt["state"].items():
            out.update({f"opt{i}.{pid}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    out.update({f"ema_raw.{k}": v for k, v in c.get("ema", {}).get("raw", {}).items()})  # EMA runs: the raw weights
    out["global_step"] = torch.tensor(c["global_step"])
    return out


def _kill_and_resume(config: Path, root: Path, seed: int) -> str:
    """Start the run, SIGKILL it after a random number of step checkpoints, resume with --ckpt_path last."""
    rng = random.Random(seed)
    proc = _fit(config, wait=False)
    last = root / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not last.is_file():
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 2.0))  # then a random number of steps more
    killed = proc.poll() is None
    proc.kill()
    out = proc.communicate()[0]
    assert killed, f"the run ended before it could be killed:\n{out[-2000:]}"
    step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    res = _fit(config, "--ckpt_path", "last")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return f"killed after step {step}"


def _assert_identical(a: Path, b: Path, what: str) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    diff = {k: (sa[k].float() - sb[k].float()).abs().max().item() for k in sa if not torch.equal(sa[k], sb[k])}
    assert not diff, f"{what}: tensors differ after resume: {sorted(diff.items(), key=lambda kv: -kv[1])[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lm", "lm_ema", "vq"])
def test_sigkill_then_resume_is_bit_identical(recipe, tiny_vq_path, tmp_path):
    def make(root):
        if recipe == "vq":
            return _vq_config(root)
        cfg = _lm_config(tiny_vq_path, root)
        if recipe == "lm_ema":  # the average (state_dict) and the raw weights (ema.raw) both continue exactly
            cfg["model"]["init_args"]["ema_decay"] = 0.9
        return cfg
    ref = _write(make(tmp_path / "ref"), tmp_path / "ref.yaml")
    res = _fit(ref)
    assert res.returncode == 0, res.stderr[-3000:]
    run = _write(make(tmp_path / "run"), tmp_path / "run.yaml")
    how = _kill_and_resume(run, tmp_path / "run", seed=hash(recipe) % 1000)
    a, b = tmp_path / "ref" / "checkpoints" / "last.ckpt", tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _state(a)["global_step"].item() == _state(b)["global_step"].item() == 24
    _assert_identical(a, b, f"{recipe} ({how})")


@pytest.mark.slow
def test_sigterm_writes_last_checkpoint_and_resume_continues(tiny_vq_path, tmp_path):
    cfg = _lm_config(tiny_vq_path, tmp_path / "run")
    cfg["trainer"]["max_steps"] = 4000  # long enough that SIGTERM arrives mid-run
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 50
    config = _write(cfg, tmp_path / "run.yaml")
    proc = _fit(config, wait=False)
    deadline = time.time() + 120  # SIGTERM once training runs (a periodic checkpoint exists), not during start-up
    while proc.poll() is None and time.time() < deadline and not list((tmp_path / "run").rglob("*.ckpt")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-2000:]
    assert "received SIGTERM: saved" in out
    step = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < 4000
    res = _fit(config, "--ckpt_path", "last", "--trainer.max_steps", str(step + 3))
    assert res.returncode == 0, res.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step + 3


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_vq_path, tmp_path):
    one = _lm_config(tiny_vq_path, tmp_path / "one", batch=16)
    two = _lm_config(tiny_vq_path, tmp_path / "two", batch=8)  # 2 x 8 = the same global batch
    two["trainer"].update(devices=2, strategy="ddp")
    for cfg in (one, two):
        cfg["trainer"]["max_steps"] = 12
    r1 = _fit(_write(one, tmp_path / "one.yaml"))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _fit(_write(two, tmp_path / "two.yaml"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    a = _state(tmp_path / "one" / "checkpoints" / "last.ckpt")
    b = _state(tmp_path / "two" / "checkpoints" / "last.ckpt")
    weights = [k for k in a if k.startswith("lm.")]
    worst = max((a[k] - b[k]).abs().max().item() for k in weights)
    scale = max(a[k].abs().max().item() for k in weights)
    print(f"max |w_1proc - w_2proc| after 12 steps: {worst:.3g} (max |w| {scale:.3g})")
    assert worst < 1e-4, worst
    assert a["global_step"].item() == b["global_step"].item() == 12


_RANK_RNG_SCRIPT = r'''
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from train.resume import ResumableModule

def run(rank, path):
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
    torch.manual_seed(100 + rank)  # each rank has its own stream (dropout, noise draws)
    m, ckpt = ResumableModule(), {}
    m.on_save_checkpoint(ckpt)
    if rank == 0:
        torch.save(ckpt, path)
    dist.barrier()
    expected = torch.rand(4)
    torch.manual_seed(0)  # a restarted process
    m2 = ResumableModule()
    m2.on_load_checkpoint(torch.load(path, weights_only=True))
    m2.on_train_batch_start(None, 0)
    got = torch.rand(4)
    print(f"rank {rank} continued={torch.equal(got, expected)}", flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
'''


@pytest.mark.slow
def test_ddp_checkpoint_keeps_every_ranks_rng_stream(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "rank_rng.py"
    script.write_text(_RANK_RNG_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "c.ckpt"), str(port)], cwd=ROOT, timeout=120,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                              "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    import re

    assert sorted(re.findall(r"rank \d continued=(?:True|False)", res.stdout)) == ["rank 0 continued=True",
                                                                       "rank 1 continued=True"], res.stdout
