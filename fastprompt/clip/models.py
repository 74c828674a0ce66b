"""Creating the CLIP a method prompts: open_clip's named models, small configurations for tests and for the
built-in default run (random weights, so that everything runs without downloads), and the checkpoint files a
researcher has on disk, read offline.

A checkpoint path may hold
- an OpenAI TorchScript archive (`ViT-B-16.pt` under ~/.cache/clip/, what the public prompt-learning codes
  load): the weights in fp16, beside OpenAI's `input_resolution` / `context_length` / `vocab_size` entries;
- an OpenAI-layout state_dict (`torch.save(model.state_dict())` of OpenAI's or open_clip's CLIP class: the
  two share their key names), bare or under "state_dict", with or without DDP's "module." prefix;
- an open_clip checkpoint (`open_clip_pytorch_model.bin`, `.safetensors`, or a training checkpoint).

The activation is never guessed. OpenAI's CLIPs use QuickGELU (x·σ(1.702x)), most open_clip trainings GELU,
and nothing in a state_dict says which: OpenAI weights in a GELU model give features that are wrong in every
layer without any error. So the activation must be known: an OpenAI archive means QuickGELU, a model name
that states it does (`ViT-B-16-quickgelu`, the fastprompt-* test configurations), `quick_gelu=` says it
explicitly, and a pretrained tag carries it in open_clip's table ("openai" → QuickGELU, also under the plain
"ViT-B-16" name, where open_clip itself would only warn). Anything else is refused with the ways to state it,
as is an explicit activation that contradicts the archive, the tag or the name.

Without a model name the architecture is read from the weights' shapes, as OpenAI's own build-from-state-dict
does (widths, depths, patch size and image size from the tensors; heads from the width at 64 per head), into
an open_clip CLIP. With a name, the weights must fit that model exactly. Floating-point tensors are cast to
the model's dtype (OpenAI's fp16 storage becomes the fp32 the run trains in).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
import zipfile
from typing import Optional

import torch

# Small CLIPs with OpenAI's layout (QuickGELU, class-token pooling, causal text tower pooled at EOT).
# Both towers have the same depth, so that DCP can couple them layer by layer.
SMALL_CONFIGS = {
    "fastprompt-tiny": dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=48, head_width=16, layers=4),
        text_cfg=dict(context_length=77, vocab_size=49408, width=40, heads=5, layers=4),
    ),
    "fastprompt-small": dict(
        embed_dim=128,
        vision_cfg=dict(image_size=64, patch_size=8, width=192, head_width=32, layers=6),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=4, layers=6),
    ),
}

# Entries of an OpenAI archive's state_dict that are not weights (and the causal mask a traced open_clip
# model stores): dropped before loading.
ARCHIVE_EXTRAS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
OPENAI_HEAD_WIDTH = 64  # OpenAI's CLIPs (and open_clip's configs) use 64 channels per attention head

HOW_TO_STATE = ("say which: quick_gelu=True (fastprompt: --quick-gelu) for OpenAI's weights and other QuickGELU "
                "trainings, quick_gelu=False (--no-quick-gelu) for GELU ones (most open_clip / LAION trainings), or "
                "name a -quickgelu model (ViT-B-16-quickgelu, ...)")


class CheckpointError(ValueError):
    """Weights that cannot be loaded as asked; the message says why and what to pass instead."""


def create_clip(name: Optional[str] = "fastprompt-tiny", pretrained: Optional[str] = None, *,
                quick_gelu: Optional[bool] = None, seed: Optional[int] = 0,
                device: Optional[torch.device | str] = None) -> torch.nn.Module:
    """An open_clip CLIP in eval mode.

    name: an open_clip model name ("ViT-B-16", "ViT-B-16-quickgelu", "ViT-L-14", ...) or one of SMALL_CONFIGS;
        None: read the architecture from the weights of `pretrained` (a file).
    pretrained: an open_clip pretrained tag ("openai", "laion2b_s34b_b88k", ...) or a local checkpoint file
        (module docstring); None gives random weights (seeded).
    quick_gelu: the activation, where neither the weights nor the name say it (module docstring).
    The model records where its weights came from in `model.fastprompt_weights` (a dict, for run logs).
    """
    with _seeded(seed):
        if pretrained and os.path.isfile(str(pretrained)):
            model = _from_file(name, str(pretrained), quick_gelu)
        elif name is None:
            raise CheckpointError(f"no model name and no checkpoint file to read the model from (pretrained="
                                  f"{pretrained!r}): name a model, or give the path of a checkpoint")
        else:
            model = _from_name(name, pretrained or None, quick_gelu)
    model.eval()
    return model.to(device) if device is not None else model


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """Random initial weights drawn from `seed`, the caller's generator left as it was."""
    state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        yield
    finally:
        if seed is not None:
            torch.random.set_rng_state(state)


# ---- the activation ------------------------------------------------------------------------------

def name_states_quick_gelu(name: str) -> Optional[bool]:
    """True when the model name itself means QuickGELU (a fastprompt test configuration, an open_clip config
    with quick_gelu set: the -quickgelu names); None when it leaves the activation open (a plain name)."""
    import open_clip

    if name in SMALL_CONFIGS:
        return True
    config = open_clip.get_model_config(name)
    return True if config is not None and config.get("quick_gelu", False) else None


def _resolve_activation(weights: Optional[bool], why: str, explicit: Optional[bool], name: Optional[str]) -> bool:
    """The activation as the weights (`weights`, for the reason `why`; None: they do not say), the model name
    and the caller state it: they must agree, and at least one must state it."""
    named = name_states_quick_gelu(name) if name else None
    stated = [(v, what) for v, what in ((weights, why), (named, f"the model name {name}"),
                                        (explicit, f"quick_gelu={explicit}")) if v is not None]
    if len({v for v, _ in stated}) > 1:
        raise CheckpointError("; ".join(f"{what} means {_act(v)}" for v, what in stated) + ": they must agree")
    if not stated:
        raise CheckpointError(f"{why} does not say which activation its CLIP was trained with, and a wrong one "
                              f"gives wrong features without any error: {HOW_TO_STATE}")
    return stated[0][0]


def _act(quick: bool) -> str:
    return "QuickGELU" if quick else "GELU"


# ---- a model by name -----------------------------------------------------------------------------

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".tar", ".ckpt")


def _from_name(name: str, tag: Optional[str], quick_gelu: Optional[bool]) -> torch.nn.Module:
    import open_clip

    if tag is not None and (os.sep in tag or tag.endswith(CHECKPOINT_SUFFIXES)):
        raise CheckpointError(f"no such checkpoint file: {tag}")
    if name in SMALL_CONFIGS:
        if tag is not None:
            raise CheckpointError(f"{name} is a fastprompt test configuration: it has no pretrained tags, only "
                                  f"random weights or a local checkpoint path (got {tag!r})")
        return open_clip.model.CLIP(**SMALL_CONFIGS[name], quick_gelu=_resolve_activation(None, "", quick_gelu, name))
    tag_config = open_clip.get_pretrained_cfg(name, tag) if tag is not None else None
    if tag_config:  # open_clip's table says how the tag's weights were trained
        quick = _resolve_activation(bool(tag_config.get("quick_gelu", False)), f"the pretrained tag {tag!r}",
                                    quick_gelu, name)
    else:  # random weights (or a tag open_clip does not know, which it refuses below) state no activation:
        # GELU, open_clip's default, unless the name or the caller states one (and they agree)
        stated = quick_gelu is not None or name_states_quick_gelu(name)
        quick = _resolve_activation(None, "random weights", quick_gelu, name) if stated else False
    try:
        return open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick)
    except RuntimeError as exc:
        if tag is None:
            raise
        raise RuntimeError(f"could not load pretrained weights {tag!r} for {name} ({exc}). Without internet, "
                           "download the checkpoint elsewhere and pass its local path as pretrained=/path/to/file "
                           "(an OpenAI archive such as ~/.cache/clip/ViT-B-16.pt, or open_clip_pytorch_model.bin)"
                           ) from exc


# ---- a model from a checkpoint file --------------------------------------------------------------

def _from_file(name: Optional[str], path: str, quick_gelu: Optional[bool]) -> torch.nn.Module:
    import open_clip

    state, archive = read_clip_weights(path)
    if archive:
        quick = _resolve_activation(True, f"{path} (an OpenAI TorchScript archive)", quick_gelu, name)
    else:
        quick = _resolve_activation(None, f"{path} (a state_dict)", quick_gelu, name)
    if name is None:
        config = infer_config(state, path)
        label = matching_name(config)
        model = open_clip.model.CLIP(**config, quick_gelu=quick)
    elif name in SMALL_CONFIGS:
        label, model = name, open_clip.model.CLIP(**SMALL_CONFIGS[name], quick_gelu=quick)
    else:
        if open_clip.get_model_config(name) is None:
            raise CheckpointError(f"unknown model name {name!r}; leave the name out to read the model from {path}")
        label, model = name, open_clip.create_model(name, force_quick_gelu=quick)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):  # CustomTextCLIP names
        state = open_clip.model.convert_to_custom_text_state_dict(state)
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit {name}: {_describe_mismatch(state, path)} "
                              f"({_first_line(exc)})") from exc
    model.fastprompt_weights = dict(path=os.path.abspath(path), format="openai-archive" if archive else "state_dict",
                                    model=label, quick_gelu=quick)
    return model


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300]


def _describe_mismatch(state: dict, path: str) -> str:
    try:
        config = infer_config(state, path)
    except CheckpointError as exc:
        return str(exc)
    label = matching_name(config)
    return (f"it holds {describe_config(config)}" + (f" ({label})" if label else "")
            + "; leave out the model name to build the model from the weights")


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive is a zip holding constants.pkl and code/ beside the data (torch.save's zip
    files have neither)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in archive.namelist())


def unwrap_state_dict(state):
    """The weights of a saved object: a training checkpoint's "state_dict" entry, or the dict itself, with the
    "module." prefix of DataParallel / DDP dropped from every key; anything but a dict is returned as it is."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        return state
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def read_clip_weights(path: str) -> tuple[dict, bool]:
    """The CLIP state_dict of a checkpoint file and whether it is an OpenAI TorchScript archive. Read offline,
    on the CPU; pickles are read with weights_only=True (tensors and plain containers only)."""
    if _is_torchscript(path):
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format OpenAI's weights come in
            warnings.filterwarnings("ignore", category=FutureWarning)
            state = dict(torch.jit.load(path, map_location="cpu").state_dict())
        archive = "input_resolution" in state  # OpenAI's archives carry it; another TorchScript CLIP is no proof
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state, archive = load_file(path, device="cpu"), False
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # an unpicklable object beside the weights, a truncated file, not a checkpoint
            raise CheckpointError(f"cannot read {path} as CLIP weights ({_first_line(exc)})") from exc
        archive = False
    state = unwrap_state_dict(state)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors (found {type(state).__name__})")
    return {k: v for k, v in state.items() if k not in ARCHIVE_EXTRAS}, archive


def _block_count(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for m in map(pattern.match, state) if m})


def infer_config(state: dict, path: str = "the checkpoint") -> dict:
    """An open_clip CLIP configuration from the shapes of an OpenAI-layout state_dict (ViT image tower)."""
    needed = ("visual.conv1.weight", "visual.positional_embedding", "text_projection", "positional_embedding",
              "token_embedding.weight", "ln_final.weight")
    if "visual.proj" not in state or any(k not in state for k in needed):
        kind = "a ResNet image tower" if "visual.layer1.0.conv1.weight" in state else "another layout"
        raise CheckpointError(f"{path} is not a CLIP with a ViT image tower in OpenAI's layout ({kind}): fastprompt "
                              "drives ViT image towers; for another layout name its open_clip model")
    v_width, _, _, patch = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    t_width = state["ln_final.weight"].shape[0]
    for what, width in (("image", v_width), ("text", t_width)):
        if width % OPENAI_HEAD_WIDTH:
            raise CheckpointError(f"{path}: the {what} tower's width {width} is not a multiple of 64, so its number "
                                  "of attention heads cannot be read from the weights: name the model")
    vision = dict(image_size=patch * grid, layers=_block_count(state, "visual.transformer.resblocks."),
                  width=v_width, patch_size=patch)
    text = dict(context_length=state["positional_embedding"].shape[0],
                vocab_size=state["token_embedding.weight"].shape[0], width=t_width,
                heads=t_width // OPENAI_HEAD_WIDTH, layers=_block_count(state, "transformer.resblocks."))
    for cfg, prefix in ((vision, "visual.transformer.resblocks.0."), (text, "transformer.resblocks.0.")):
        hidden = state[prefix + "mlp.c_fc.weight"].shape[0]
        if hidden != 4 * cfg["width"]:
            cfg["mlp_ratio"] = hidden / cfg["width"]
    return dict(embed_dim=state["text_projection"].shape[1], vision_cfg=vision, text_cfg=text)


def matching_name(config: dict) -> Optional[str]:
    """The model name whose configuration is `config` (activation aside), None for a custom one."""
    import open_clip

    def plain(c):
        return {k: v for k, v in c.items() if k != "quick_gelu"}

    for name, known in SMALL_CONFIGS.items():
        if plain(known) == plain(config):
            return name
    for name in open_clip.list_models():
        known = open_clip.get_model_config(name)
        if known is not None and not name.endswith("-quickgelu") and plain(known) == plain(config):
            return name
    return None


def describe_config(config: dict) -> str:
    v, t = config["vision_cfg"], config["text_cfg"]
    return (f"a ViT of width {v['width']}, {v['layers']} blocks, patch {v['patch_size']} at {v['image_size']} px "
            f"and a text tower of width {t['width']}, {t['layers']} blocks (embedding {config['embed_dim']})")
