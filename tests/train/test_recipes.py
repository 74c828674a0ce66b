"""The public codes' training configs as recipes: every one resolves (`--print-config`), the values of the
ones a paper's table is made with are the public files' (written out here from the YAML files and scripts),
flags override them, one runs end to end on the built-in data, and Dassl's schedule is followed."""

import json
import math

import pytest
import torch

from fastprompt import cli
from fastprompt.train import ConfigError, TrainConfig, Trainer, read_metrics
from fastprompt.train.recipes import RECIPES
from fastprompt.train.trainer import learning_rate

DASSL = dict(optimizer="sgd", momentum=0.9, weight_decay=5e-4, warmup_lr=1e-5, schedule="dassl_cosine",
             image_size=224, augmentation=["random_resized_crop", "random_flip", "normalize"])

# name -> (run values, method options), as the public files give them (DATALOADER.TRAIN_X / TEST.BATCH_SIZE,
# OPTIM.LR / MAX_EPOCH / WARMUP_EPOCH, MODEL.BACKBONE.NAME, TRAINER.<method>.*, the scripts' overrides)
PUBLIC = {
    "coop/vit_b16_ep50": (dict(model="ViT-B-16", batch_size=32, eval_batch_size=100, lr=0.002, epochs=50,
                               warmup_epochs=1), dict(n_ctx=16, class_specific=False, class_token_position="end")),
    "coop/vit_b16_ep50_ctxv1": (dict(model="ViT-B-16", batch_size=32, eval_batch_size=100, lr=0.002, epochs=50,
                                     warmup_epochs=1), dict(ctx_init="a photo of a")),
    "cocoop/vit_b16_c4_ep10_batch1_ctxv1": (dict(model="ViT-B-16", batch_size=1, eval_batch_size=100, lr=0.002,
                                                 epochs=10, warmup_epochs=1), dict(n_ctx=4, ctx_init="a photo of a")),
    "cocoop/vit_b16_c16_ep10_batch1": (dict(model="ViT-B-16", batch_size=1, eval_batch_size=100, lr=0.002,
                                            epochs=10, warmup_epochs=1), dict(n_ctx=16, ctx_init=None)),
    "maple/vit_b16_c2_ep5_batch4_2ctx": (dict(model="ViT-B-16", batch_size=4, eval_batch_size=100, lr=0.0035,
                                              epochs=5, warmup_epochs=1),
                                         dict(n_ctx=2, ctx_init="a photo of a", depth=9)),
    "maple/vit_b16_c2_ep5_batch4_2ctx_cross_datasets": (
        dict(model="ViT-B-16", batch_size=4, eval_batch_size=100, lr=0.0026, epochs=2, warmup_epochs=1),
        dict(n_ctx=2, ctx_init="a photo of a", depth=3)),
    "ivlp/vit_b16_c2_ep5_batch4_2+2ctx": (dict(model="ViT-B-16", batch_size=4, eval_batch_size=100, lr=0.0035,
                                               epochs=5, warmup_epochs=1),
                                          dict(n_ctx_text=2, n_ctx_vision=2, depth_text=12, depth_vision=12,
                                               ctx_init="a photo of a")),
    "vpt_deep/vit_b16_c2_ep5_batch4_4": (dict(model="ViT-B-16", batch_size=4, eval_batch_size=100, lr=0.0025,
                                              epochs=5, warmup_epochs=1), dict(n_ctx=8, depth=12)),
    "dcp/vit_b16_c2_ep20_batch4_16ctx": (dict(model="ViT-B-16", batch_size=4, eval_batch_size=16, lr=0.0035,
                                              epochs=20, warmup_epochs=1),
                                         dict(n_ctx=16, depth=9, fusing="mean", parameter_sharing=True,
                                              couple_text=False)),
    # train_single.sh on configs/trainers/VPT/vit_b32_deep.yaml; the CoOp context's optimiser warms 1 epoch at
    # lr 0.002, the VPT and CAVPT ones 10 epochs (the config's WARMUP_EPOCH) at OPTIM.LR 0.01
    "dpt/train_single": (dict(model="ViT-B-32", batch_size=32, eval_batch_size=50, lr=0.01, epochs=60, shots=1,
                              warmup_epochs=[1, 10]),
                         dict(n_ctx=16, n_visual_tokens=10, bottom_limit=12, top_k=10, aux_weight=0.3,
                              switch_epoch=30, ctx_lr=0.002, lr=0.01)),
}


def _print_config(capsys, *args) -> dict:
    capsys.readouterr()
    assert cli.main(["train", *args, "--print-config"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0  # one JSON object
    return json.loads(out)


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_resolves(capsys, name):
    config = _print_config(capsys, "--recipe", name)
    for key in ("method", "model", "batch_size", "eval_batch_size", "lr", "epochs", "options"):
        assert key in config, key
    assert config["recipe"] == name and config["method"] == name.split("/")[0]
    assert config["recipe_source"]
    if config["method"] != "zeroshot":  # what fastprompt does instead of the public code's pure fp16, said
        assert "pure fp16" in config["recipe_description"] and "bf16 autocast" in config["recipe_description"]
    TrainConfig.from_dict({k: v for k, v in config.items()
                           if k not in ("options", "options_given", "recipe_source", "recipe_description")})


@pytest.mark.parametrize("name", list(PUBLIC))
def test_recipes_hold_the_public_values(capsys, name):
    config = _print_config(capsys, "--recipe", name)
    run, options = PUBLIC[name]
    for key, value in {**DASSL, **run, "pretrained": "openai"}.items():
        assert config[key] == value, (key, config[key], value)
    for key, value in options.items():
        assert config["options"][key] == value, (key, config["options"][key], value)


def test_flags_override_a_recipe(capsys):
    config = _print_config(capsys, "--recipe", "maple/vit_b16_c2_ep5_batch4_2ctx", "--model", "fastprompt-tiny",
                           "--epochs", "1", "--opt", "depth=3", "--lr", "0.01", "--warmup-epochs", "0")
    assert (config["model"], config["epochs"], config["lr"], config["warmup_epochs"]) == ("fastprompt-tiny", 1, 0.01, 0)
    assert config["options"]["depth"] == 3 and config["options"]["n_ctx"] == 2  # the other options stay
    assert config["pretrained"] is None and config["image_size"] is None  # the recipe's weights go with its model
    assert config["batch_size"] == 4 and config["schedule"] == "dassl_cosine"
    same_model = _print_config(capsys, "--recipe", "maple/vit_b16_c2_ep5_batch4_2ctx", "--model", "ViT-B-16")
    assert same_model["pretrained"] == "openai"


def test_bad_recipes_are_clear_errors(capsys):
    assert cli.main(["train", "--recipe", "maple/nope", "--print-config"]) == 2
    assert "unknown recipe 'maple/nope'" in capsys.readouterr().err
    assert cli.main(["train", "--recipe", "maple/vit_b16_c2_ep5_batch4_2ctx", "--method", "coop",
                     "--print-config"]) == 2
    assert "is a maple recipe, not coop" in capsys.readouterr().err


def test_recipes_are_listed(capsys):
    assert cli.main(["recipes"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in RECIPES)
    assert cli.main(["recipes", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(RECIPES)


def test_a_recipe_runs_on_the_builtin_data_with_overrides(tmp_path):
    out = str(tmp_path / "run")
    assert cli.main(["train", "--recipe", "coop/vit_b16_ep50", "--model", "fastprompt-tiny", "--epochs", "1",
                     "--output", out, "--no-progress"]) == 0
    records = read_metrics(out)
    run = records[0]
    assert run["config"]["recipe"] == "coop/vit_b16_ep50" and run["optimizer"] == "sgd"
    assert run["options"]["n_ctx"] == 16
    steps = [r for r in records if r["kind"] == "step"]
    assert steps and all(r["lr"] == 1e-5 for r in steps)  # one epoch: Dassl's constant warm-up
    assert [r for r in records if r["kind"] == "eval"]


def test_dassl_cosine_is_dassls_schedule():
    """Dassl: ConstantWarmupScheduler at 1e-5 for W epochs over CosineAnnealingLR(T_max=MAX_EPOCH), whose count
    starts after the warm-up (WARMUP_RECOUNT), stepped at the end of each epoch. Driven here with torch's
    scheduler, for MaPLe's 5 epochs and DPT's 60 with 10 warm-up epochs."""
    for epochs, warmup in ((5, 1), (60, 10), (2, 1)):
        config = TrainConfig(epochs=epochs, warmup_epochs=warmup, schedule="dassl_cosine", warmup_lr=1e-5)
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0035)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=float(epochs))
        for epoch in range(epochs):
            want = 1e-5 if epoch < warmup else cosine.get_last_lr()[0]
            assert math.isclose(learning_rate(0.0035, epoch, config), want, rel_tol=1e-12), (epochs, epoch)
            if epoch >= warmup:
                optimizer.step()
                cosine.step()
    plain = TrainConfig(epochs=5, warmup_epochs=1)  # fastprompt's own cosine reaches 0 at the last epoch's end
    assert [round(learning_rate(1.0, e, plain), 6) for e in range(5)] == [1e-5, 1.0, 0.853553, 0.5, 0.146447]


def test_per_group_warmup_reaches_the_parameter_groups(tmp_path):
    config = TrainConfig(method="dpt", epochs=4, warmup_epochs=[1, 3], schedule="dassl_cosine", progress=False,
                         shots=1, synthetic_classes=3, output=str(tmp_path / "run"))
    trainer = Trainer(config)
    assert [g["warmup_epochs"] for g in trainer.optimizer.param_groups] == [1, 3]
    assert [g["base_lr"] for g in trainer.optimizer.param_groups] == [0.002, 0.01]
    with pytest.raises(ConfigError, match="gives 3 values, but dpt trains 2 parameter group"):
        Trainer(TrainConfig(method="dpt", warmup_epochs=[1, 2, 3], output=str(tmp_path / "other"), shots=1,
                            synthetic_classes=3))
