"""The public codes' training configurations as recipes, by name: `<method>/<config file stem>`.

A researcher reproduces a paper's row by naming the config its code ran: `fastprompt train --recipe
maple/vit_b16_c2_ep5_batch4_2ctx --data /data/dtd --subsample base`. Each recipe holds the values of one
config file (Dassl YAML, read from the public repository and written here as data), merged over the defaults
of that code's train.py and over Dassl's (SGD with momentum 0.9 and weight decay 5e-4, test batch size from
the config, a constant warm-up at 1e-5, Dassl's cosine; images 224 px, bicubic, CLIP's mean and std,
random resized crop at scale (0.08, 1) and flip), and names its source. The settings a code's run scripts
pass on the command line are in the recipe only where the recipe is a script (DPT's train_single.sh); the
scripts' shots (16), seeds and class subsampling are the run's (--shots, --seed, --subsample, or a protocol).

Resolution: TrainConfig's defaults, then the recipe, then what is given explicitly (flags): a given `--opt
key=value` replaces that one method option. A recipe's model comes with its weights and image size: given
another model, the recipe's `pretrained` and `image_size` are dropped too (a small test model has neither),
unless given as well.

Precision: every public code here trains in pure fp16 (PREC "fp16": the CLIP and the prompts stored in half
precision, the optimiser stepping fp16 tensors). fastprompt keeps the weights and the optimiser in fp32 and
runs the forward under bf16 autocast on CUDA (`--precision auto`; `--precision fp16` is fp16 autocast with a
gradient scaler), fp32 on the CPU: the same recipe, numerically closer to fp32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .config import AUGMENTATIONS, ConfigError, TrainConfig

COOP_REPO = "KaiyangZhou/CoOp"
MPL_REPO = "muzairkhattak/multimodal-prompt-learning"
CMPA_REPO = "GingL/CMPA"
DPT_REPO = "fanrena/DPT"

FP16_NOTE = ("The public code trains in pure fp16 (PREC fp16); fastprompt trains fp32 weights under bf16 autocast on "
             "CUDA (--precision fp16: fp16 autocast with a gradient scaler), fp32 on the CPU.")

# What every Dassl config of these codes shares (INPUT, OPTIM's name, warm-up type and scheduler)
DASSL = dict(optimizer="sgd", momentum=0.9, weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-5,
             schedule="dassl_cosine", image_size=224, augmentation=list(AUGMENTATIONS), pretrained="openai")


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str
    source: str            # repository and the file the values come from
    description: str
    config: dict           # TrainConfig fields
    options: dict = field(default_factory=dict)  # the method's options

    def values(self) -> dict:
        """The TrainConfig fields of the recipe, its method options as method_config."""
        return {**DASSL, **self.config, "method": self.method, "method_config": dict(self.options),
                "recipe": self.name}


def _coop(stem: str, model: str, epochs: int, ctx_init: Optional[str] = None) -> Recipe:
    init = (f"context from the words of {ctx_init!r} (one vector per word)" if ctx_init
            else "16 context vectors drawn from N(0, 0.02²)")
    return Recipe(
        f"coop/{stem}", "coop", f"{COOP_REPO} configs/trainers/CoOp/{stem}.yaml (train.py defaults for TRAINER.COOP)",
        f"CoOp, {init}, class token at the end, {epochs} epochs at lr 0.002, batch 32. scripts/coop/main.sh "
        "passes N_CTX, CSC and CLASS_TOKEN_POSITION: here --opt n_ctx=..., class_specific=..., "
        f"class_token_position=... {FP16_NOTE}",
        dict(model=model, batch_size=32, eval_batch_size=100, lr=0.002, epochs=epochs),
        dict(n_ctx=16, class_specific=False, class_token_position="end", ctx_init=ctx_init))


def _cocoop(stem: str, n_ctx: int, ctx_init: Optional[str]) -> Recipe:
    init = f"from the words of {ctx_init!r}" if ctx_init else f"{n_ctx} vectors from N(0, 0.02²)"
    return Recipe(
        f"cocoop/{stem}", "cocoop", f"{COOP_REPO} configs/trainers/CoCoOp/{stem}.yaml",
        f"CoCoOp, context {init}, meta-net on the image feature, 10 epochs at lr 0.002, batch 1 (the base-to-new "
        f"and cross-dataset scripts use vit_b16_c4_ep10_batch1_ctxv1). {FP16_NOTE}",
        dict(model="ViT-B-16", batch_size=1, eval_batch_size=100, lr=0.002, epochs=10),
        dict(n_ctx=n_ctx, ctx_init=ctx_init))


RECIPES_LIST = [
    # ---- CoOp (KaiyangZhou/CoOp; the same files in multimodal-prompt-learning) ----
    _coop("vit_b16", "ViT-B-16", 200),
    _coop("vit_b16_ep100", "ViT-B-16", 100),
    _coop("vit_b16_ep50", "ViT-B-16", 50),
    _coop("vit_b16_ctxv1", "ViT-B-16", 200, "a photo of a"),
    _coop("vit_b16_ep100_ctxv1", "ViT-B-16", 100, "a photo of a"),
    _coop("vit_b16_ep50_ctxv1", "ViT-B-16", 50, "a photo of a"),
    _coop("vit_b32", "ViT-B-32", 200),
    _coop("vit_b32_ep50", "ViT-B-32", 50),
    # ---- CoCoOp ----
    _cocoop("vit_b16_c4_ep10_batch1_ctxv1", 4, "a photo of a"),
    _cocoop("vit_b16_c4_ep10_batch1", 4, None),
    _cocoop("vit_b16_c8_ep10_batch1", 8, None),
    _cocoop("vit_b16_c16_ep10_batch1", 16, None),
    # ---- MaPLe, IVLP, VPT-deep (muzairkhattak/multimodal-prompt-learning) ----
    Recipe("maple/vit_b16_c2_ep5_batch4_2ctx", "maple", f"{MPL_REPO} configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml",
           "MaPLe, 2 context tokens from 'a photo of a', prompts in blocks 0-8 of both towers, 5 epochs at lr 0.0035, "
           f"batch 4 (the base-to-new and few-shot scripts). {FP16_NOTE}",
           dict(model="ViT-B-16", batch_size=4, eval_batch_size=100, lr=0.0035, epochs=5),
           dict(n_ctx=2, ctx_init="a photo of a", depth=9)),
    Recipe("maple/vit_b16_c2_ep5_batch4_2ctx_cross_datasets", "maple",
           f"{MPL_REPO} configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml",
           "MaPLe for cross-dataset transfer and domain generalisation (trained on ImageNet, 16 shots): prompts in "
           f"blocks 0-2, 2 epochs at lr 0.0026, batch 4. {FP16_NOTE}",
           dict(model="ViT-B-16", batch_size=4, eval_batch_size=100, lr=0.0026, epochs=2),
           dict(n_ctx=2, ctx_init="a photo of a", depth=3)),
    Recipe("ivlp/vit_b16_c2_ep5_batch4_2+2ctx", "ivlp", f"{MPL_REPO} configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml",
           "Independent V-L prompting: 2 text tokens from 'a photo of a' and 2 visual tokens, deep in all 12 blocks "
           f"of both towers, 5 epochs at lr 0.0035, batch 4. {FP16_NOTE}",
           dict(model="ViT-B-16", batch_size=4, eval_batch_size=100, lr=0.0035, epochs=5),
           dict(n_ctx_text=2, n_ctx_vision=2, depth_text=12, depth_vision=12, ctx_init="a photo of a")),
    Recipe("ivlp/vit_b16_c2_ep5_batch4_4ctx_language_only", "ivlp",
           f"{MPL_REPO} configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml",
           "Deep language prompting alone: 4 text tokens from 'a photo of a' in all 12 text blocks, no visual prompts, "
           f"5 epochs at lr 0.0025, batch 4. {FP16_NOTE}",
           dict(model="ViT-B-16", batch_size=4, eval_batch_size=100, lr=0.0025, epochs=5),
           dict(n_ctx_text=4, n_ctx_vision=0, depth_text=12, depth_vision=0, ctx_init="a photo of a")),
    Recipe("vpt_deep/vit_b16_c2_ep5_batch4_4", "vpt_deep", f"{MPL_REPO} configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml",
           "VPT-deep: 8 visual tokens in all 12 blocks (N_CTX_VISION 8 despite the file's name), the text fixed as 'a "
           f"photo of a {{}}.' as that code does, 5 epochs at lr 0.0025, batch 4. {FP16_NOTE}",
           dict(model="ViT-B-16", batch_size=4, eval_batch_size=100, lr=0.0025, epochs=5),
           dict(n_ctx=8, depth=12, template="a photo of a {}.")),
    # ---- DCP (GingL/CMPA) ----
    Recipe("dcp/vit_b16_c2_ep20_batch4_16ctx", "dcp",
           f"{CMPA_REPO} configs/trainers/CMPA/vit_b16_c2_ep20_batch4_16ctx.yaml with scripts/cmpa/main.sh",
           "DCP as its public code trains it: 16 text and 16 visual prompts (random: 'a photo of a' only initialises "
           "up to 4), one shared CMPA before blocks 1-9 fusing by the mean (main.sh: PROMPT_DEPTH 9, FUSING mean, PS "
           "True), CMPA's text output not written back (couple_text=False, the code's model; --opt couple_text=True "
           f"is the paper's), 20 epochs at lr 0.0035, batch 4, test batch 16. {FP16_NOTE}",
           dict(model="ViT-B-16", batch_size=4, eval_batch_size=16, lr=0.0035, epochs=20),
           dict(n_ctx=16, depth=9, fusing="mean", parameter_sharing=True, couple_text=False, ctx_init="a photo of a")),
    # ---- DPT (fanrena/DPT) ----
    Recipe("dpt/train_single", "dpt",
           f"{DPT_REPO} train_single.sh with its config configs/trainers/VPT/vit_b32_deep.yaml",
           "DPT as train_single.sh runs it: ViT-B/32 (its config; --model ViT-B-16 for B/16), 1 shot, CoOp context of "
           "16 at lr 0.002 warmed up 1 epoch, VPT-deep 10 tokens and CAVPT in block 12 (BOTTOMLIMIT 12, top-10 "
           "classes, 10 tokens) at lr 0.01 warmed up 10 epochs (the public code's separate optimisers; it warms them "
           "1 epoch on ImageNet: --warmup-epochs 1 1), 60 epochs, loss switch at epoch 30 (PRETRAIN.C), aux weight "
           f"0.3 (ALPHA), batch 32, test batch 50, the dataset's template. {FP16_NOTE}",
           dict(model="ViT-B-32", batch_size=32, eval_batch_size=50, lr=0.01, epochs=60, shots=1,
                warmup_epochs=[1, 10]),  # groups: [CoOp context, VPT + CAVPT]
           dict(n_ctx=16, n_visual_tokens=10, bottom_limit=12, top_k=10, n_cavpt_tokens=10, aux_weight=0.3,
                switch_epoch=30, ctx_lr=0.002, lr=0.01)),
    # ---- zero-shot CLIP (CoOp's scripts/coop/zeroshot.sh: ZeroshotCLIP with the CoOp config for the backbone) ----
    Recipe("zeroshot/vit_b16", "zeroshot", f"{COOP_REPO} scripts/coop/zeroshot.sh with configs/trainers/CoOp/vit_b16.yaml",
           "Zero-shot CLIP ViT-B/16 with the dataset's hand-written template: nothing trained, one evaluation.",
           dict(model="ViT-B-16", eval_batch_size=100, epochs=1)),
    Recipe("zeroshot/vit_b32", "zeroshot", f"{COOP_REPO} scripts/coop/zeroshot.sh with configs/trainers/CoOp/vit_b32.yaml",
           "Zero-shot CLIP ViT-B/32 with the dataset's hand-written template: nothing trained, one evaluation.",
           dict(model="ViT-B-32", eval_batch_size=100, epochs=1)),
]
RECIPES = {r.name: r for r in RECIPES_LIST}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; `fastprompt recipes` lists them: {', '.join(RECIPES)}")
    return RECIPES[name]


def resolve(recipe: Optional[str], given: dict) -> TrainConfig:
    """The run configuration: TrainConfig's defaults, then the recipe's values, then `given` (explicitly set
    fields; its method_config holds the given method options, each replacing the recipe's)."""
    given = dict(given)
    if recipe is None:
        return TrainConfig.from_dict(given)
    values = get_recipe(recipe).values()
    if "method" in given and given["method"] != values["method"]:
        raise ConfigError(f"the recipe {recipe} is a {values['method']} recipe, not {given['method']}: leave out "
                          "--method or choose another recipe")
    if "model" in given and given["model"] != values["model"]:  # the recipe's weights and size are its model's
        for key in ("pretrained", "image_size"):
            values.pop(key)
    options = {**values.pop("method_config"), **(given.pop("method_config", None) or {})}
    return TrainConfig.from_dict({**values, **given, "method_config": options})


def describe(config: TrainConfig) -> dict:
    """The resolved run configuration as one JSON-able object (`--print-config`): every training option, and
    under "options" every option the method is built with (its defaults included, the dataset's template
    picked), with the recipe's description and source when there is one."""
    from .. import methods
    from .trainer import method_config

    out = dataclasses.asdict(config)
    given = out.pop("method_config")
    try:
        defaults = {k: v for k, v in methods.options(config.method).items() if k != "backend"}
        options = {**defaults, **method_config(config)}
    except ValueError as exc:  # an unknown method: the trainer refuses it with the same words
        raise ConfigError(str(exc)) from exc
    out["options"] = options
    out["options_given"] = given
    if config.recipe:
        recipe = get_recipe(config.recipe)
        out["recipe_source"], out["recipe_description"] = recipe.source, recipe.description
    return out
