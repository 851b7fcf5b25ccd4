"""The scale-out recipes parse against the real signatures (Lightning refuses FSDP on CPU, so they are not run
here; benchmarks/gpu_check.py runs the FSDP one on a GPU)."""
from __future__ import annotations

import pytest
import yaml

from train.cli import main


@pytest.mark.parametrize("recipe, strategy", [("scale_ddp", "ddp"), ("scale_fsdp", "FSDPStrategy")])
def test_scale_recipes_parse_with_the_lm_recipe(recipe, strategy, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "configs/mnist_lm.yaml", "--config", f"configs/{recipe}.yaml", "--print_config"])
    assert done.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    if recipe == "scale_ddp":
        assert cfg["trainer"]["strategy"] == strategy and cfg["trainer"]["devices"] == 2
    else:
        assert cfg["trainer"]["strategy"]["class_path"].endswith(strategy)
        args = cfg["trainer"]["strategy"]["init_args"]
        assert args["auto_wrap_policy"] == args["activation_checkpointing_policy"] == ["models.transformer.Block"]
        assert cfg["trainer"]["precision"] == "bf16-mixed"


def test_fsdp_strategy_builds_with_our_block_as_the_unit():
    from lightning.pytorch.strategies import FSDPStrategy

    from models.transformer import Block

    s = FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block}, sharding_strategy="FULL_SHARD")
    assert s.kwargs["auto_wrap_policy"] is not None and s.sharding_strategy.name == "FULL_SHARD"
