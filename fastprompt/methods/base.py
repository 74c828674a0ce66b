"""What every prompt-learning method shares: the frozen CLIP, the class names, CLIP-style logits, a
state_dict of trained parameters only, the text-feature cache of evaluation, and the backend."""

from __future__ import annotations

import typing
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import insert_prompts
from ..clip import BlockHooks, ClipBackbone, replace_with_ln
from .small import SMALL_MODEL_CONFIGS


class PromptMethod(nn.Module):
    """Base class of the methods. Subclasses implement `logits_and_extras(images)` and say whether their text
    features depend on the images (`text_depends_on_images`); the rest is shared.

    The contract the training harness relies on (every method has all of it, so the trainer never probes):
      forward(images) -> logits (B, C); loss(images, labels) -> scalar (cross-entropy plus the method's own
        terms); loss_and_logits(images, labels) -> both from one forward;
      trainable_parameters() -> the trained Parameters (a flat list, for every method);
      parameter_groups() -> optimiser parameter groups over the same Parameters (one group, or several where a
        method trains parts at their own learning rates: DPT);
      set_epoch(epoch, epochs) -> None, called before every epoch with the run's length (a no-op unless the
        method's loss changes over the run: DPT);
      describe() -> what the run log records about the method;
      check_options(config) (a classmethod) -> the options' names and types are checked before anything is
        built, by `methods.build` and by the harness (values are checked by the constructor);
      state_dict() -> trained tensors only.
    """

    name = "base"
    text_depends_on_images = False
    text_path = None  # a TextPath where the method runs the text tower (all but vpt_deep)

    def __init__(self, clip_model: nn.Module, classnames: Iterable[str], backend: str = "auto"):
        super().__init__()
        self.clip = clip_model if isinstance(clip_model, ClipBackbone) else ClipBackbone(clip_model)
        self.classnames = list(classnames)
        if not self.classnames:
            raise ValueError(f"{self.name}: no class names given")
        self.backend = backend
        self._text_cache: Optional[Tensor] = None
        self._text_cache_key: Optional[tuple] = None
        self._register_state_dict_hook(PromptMethod._drop_clip_keys)
        self.register_load_state_dict_post_hook(PromptMethod._ignore_missing_clip_keys)

    # ---- the method's forward ----------------------------------------------------------------
    def logits_and_extras(self, images: Tensor) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        return self.logits_and_extras(images)[0]

    def loss_from(self, logits: Tensor, extras: dict, labels: Tensor) -> Tensor:
        """The training loss from one forward: cross-entropy, plus a method's own terms (override)."""
        return F.cross_entropy(logits, labels)

    def loss_and_logits(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """One forward: the loss and the logits (the trainer logs the batch accuracy from them)."""
        logits, extras = self.logits_and_extras(images)
        with torch.profiler.record_function("fastprompt.loss"):
            return self.loss_from(logits, extras, labels), logits

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.loss_and_logits(images, labels)[0]

    def clip_logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """logit_scale · cos(image, text): (B, E) × (C, E) → (B, C), or per image (B, C, E) → (B, C)."""
        img = F.normalize(image_features, dim=-1)
        txt = F.normalize(text_features, dim=-1)
        scale = self.clip.logit_scale
        if txt.dim() == 3:
            return scale * torch.einsum("be,bce->bc", img, txt)
        return scale * img @ txt.t()

    # ---- evaluation computes the text features once ---------------------------------------------
    def cached_text_features(self, compute) -> Tensor:
        """In eval mode, text features that do not depend on the images are computed once and reused until
        the method goes back to training, loads a state_dict (load_public_checkpoint included), or any of its
        tensors changes: the cache is keyed on the version counter (bumped by each in-place write: an optimizer
        step, `with torch.no_grad(): p.copy_(...)`) and storage of every parameter and buffer outside the
        frozen CLIP, so new values always give new logits. (A write through `p.data` bypasses version counters,
        and CLIP's own weights are not watched, since every evaluation batch would walk its hundreds of tensors:
        call `train()` or `clear_text_cache()` after changing either.)"""
        if self.training or self.text_depends_on_images or torch.is_grad_enabled():
            return compute()
        key = self._tensor_versions()
        if self._text_cache is None or self._text_cache_key != key:
            self._text_cache, self._text_cache_key = compute(), key
        return self._text_cache

    def _tensor_versions(self) -> tuple:
        own = [t for t in (*self._parameters.values(), *self._buffers.values()) if t is not None]
        for child in self.children():
            if child is not self.clip:  # what a method trains is never inside it (_drop_clip_keys)
                own += [*child.parameters(), *child.buffers()]
        return tuple((t._version, t.data_ptr()) for t in own)

    def clear_text_cache(self) -> None:
        self._text_cache = self._text_cache_key = None

    def train(self, mode: bool = True):
        self.clear_text_cache()
        return super().train(mode)

    # ---- what the harness calls -------------------------------------------------------------------
    @classmethod
    def check_options(cls, config: dict) -> None:
        """Raise ValueError for an option the method does not have, or a value of the wrong type (a string
        where an int is expected, as `--opt n_ctx=abc` gives), naming the option and what it takes; ranges
        are the constructor's to check. Options are the constructor's keyword arguments after the class
        names, their types its annotations."""
        known = option_defaults(cls)
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"{cls.name} has no option {', '.join(unknown)}; its options are "
                             + ", ".join(f"{k}={v!r}" for k, v in known.items() if k != "backend"))
        hints = typing.get_type_hints(cls.__init__)
        for key, value in config.items():
            expected = hints.get(key)
            if expected is not None and not _is_instance(value, expected):
                raise ValueError(f"{cls.name} option {key} takes {_type_name(expected)}, got {value!r}")

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the trainer before each epoch (0-based) with the run's number of epochs, also on resume.
        Nothing happens by default; a method whose loss changes over the run overrides it."""

    def describe(self) -> dict:
        """What the run log records about the method: its name, the number of trained scalars and the text
        tower's path (packing, prefix reuse, chunking; None for a method without a text prompt)."""
        return dict(name=self.name, trained_parameters=sum(p.numel() for p in self.trainable_parameters()),
                    text_path=self.text_path.describe() if self.text_path is not None else None)

    # ---- parameters and checkpoints ------------------------------------------------------------
    def trainable_parameters(self) -> list:
        """The Parameters to optimise, a flat list (the same kind for every method)."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list:
        """Optimiser parameter groups over trainable_parameters(): one group without a learning rate of its
        own by default (the run's applies); a method training parts at their own rates overrides it, each
        group then carrying its "lr". No group when nothing is trained (the zeroshot baseline)."""
        params = self.trainable_parameters()
        return [{"params": params}] if params else []

    def _untrained_names(self) -> set:
        """Parameter names a checkpoint leaves out: the frozen CLIP and any frozen part of the method (such as
        DCP's text half of CMPA when couple_text=False)."""
        return {n for n, p in self.named_parameters() if not p.requires_grad or n.startswith("clip.")}

    @staticmethod
    def _drop_clip_keys(module, state_dict, prefix, local_metadata):
        """state_dict hook: a method checkpoint holds what the method trains (kilobytes, not the backbone)."""
        for name in module._untrained_names():
            state_dict.pop(prefix + name, None)
        for key in [k for k in state_dict if k.startswith(prefix + "clip.")]:
            del state_dict[key]

    def _ignore_missing_clip_keys(self, incompatible_keys):
        """load_state_dict post-hook: loading a method checkpoint leaves the untrained parameters as they are."""
        untrained = self._untrained_names()
        kept = [k for k in incompatible_keys.missing_keys
                if ".clip.model." not in "." + k and not any(k == u or k.endswith("." + u) for u in untrained)]
        incompatible_keys.missing_keys[:] = kept

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.clear_text_cache()
        clip_keys = [k for k in state_dict if k.startswith("clip.")]
        if clip_keys:
            raise ValueError(f"{self.name}: a method checkpoint holds no CLIP weights, got {clip_keys[:3]}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def set_backend(self, backend: str) -> None:
        """Use `backend` for every fastprompt op of the method (its modules included)."""
        for module in self.modules():
            if hasattr(module, "backend") and module is not self.clip:
                module.backend = backend


def normal_init(shape, std: float = 0.02) -> nn.Parameter:
    """A prompt initialised as the public codes do, N(0, std²)."""
    return nn.Parameter(torch.randn(shape) * std)


class ReplaceRows(BlockHooks):
    """Before the listed blocks, rows [start, start + M) of the stream are replaced by that block's prompts
    (start None: the last M rows), fused with the block's ln_1."""

    def __init__(self, blocks, prompts: dict[int, Tensor], start=None, backend: str = "auto"):
        self.blocks, self.prompts, self.start, self.backend = blocks, prompts, start, backend

    def before(self, layer: int, x: Tensor):
        p = self.prompts.get(layer)
        if p is None:
            return x, None
        return replace_with_ln(x, p, self.start, self.blocks[layer].ln_1, self.backend)


def append_with_ln(x: Tensor, prompts: Tensor, ln: nn.Module, backend: str) -> Tensor:
    """Prompts appended after the last row, fused with a LayerNorm whose output the stream continues from
    (the vision stem: ln_pre applies to the stream itself). An Identity ln_pre leaves the stream as is."""
    if isinstance(ln, nn.LayerNorm):
        return insert_prompts(x, prompts, x.shape[1], ln.weight, ln.bias, ln.eps, "insert", backend=backend)[1]
    return ln(insert_prompts(x, prompts, x.shape[1], mode="insert", backend=backend)[0])


def encode_prompted_image(clip, images: Tensor, shallow: Tensor, deep: dict, backend: str,
                          checkpoint: bool = False) -> Tensor:
    """The image tower with prompts appended after the patch tokens before ln_pre (`shallow`, (M, Dv)) and
    the last M rows replaced before the blocks listed in `deep` ({layer: (M, Dv)}), fused with their ln_1."""
    x = append_with_ln(clip.image_tokens(images), shallow, clip.ln_pre, backend)
    return clip.encode_image_stream(x, ReplaceRows(clip.vision_blocks, deep, None, backend), checkpoint=checkpoint)


def option_defaults(cls) -> dict:
    """A method class's options and their defaults: the constructor's arguments after the CLIP and the class
    names."""
    import inspect

    params = list(inspect.signature(cls.__init__).parameters.values())[3:]
    return {p.name: p.default for p in params}


def _is_instance(value, expected) -> bool:
    """isinstance against an annotation of the methods' options: int, float, bool, str, Optional[...]. An int
    is not taken for a bool (nor a bool for an int), an int is taken for a float."""
    if expected is typing.Any:
        return True
    args = typing.get_args(expected)
    if typing.get_origin(expected) is typing.Union:
        return any(_is_instance(value, a) for a in args)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True  # an annotation these options do not use: the constructor decides


def _type_name(expected) -> str:
    if typing.get_origin(expected) is typing.Union:
        names = [_type_name(a) for a in typing.get_args(expected) if a is not type(None)]
        none = type(None) in typing.get_args(expected)
        return " or ".join(names) + (" or None" if none else "")
    return {bool: "True or False", int: "an int", float: "a number", str: "a string"}.get(
        expected, getattr(expected, "__name__", str(expected)))


def small_model_hint(method: str) -> str:
    """The end of a depth error: the defaults assume 12 blocks, the small built-in CLIPs have 4 to 6."""
    return (f" (the defaults assume 12 blocks; on the small built-in CLIPs fastprompt-tiny / -small use "
            f"fastprompt.methods.SMALL_MODEL_CONFIGS[{method!r}] = {SMALL_MODEL_CONFIGS.get(method, {})})")


def check_depth(method: str, depth: int, layers: int, what: str) -> None:
    if not 0 <= depth <= layers:
        raise ValueError(f"{method}: {what} depth {depth} is out of range: this model's tower has {layers} "
                         f"blocks{small_model_hint(method)}")


def check_tokens(method: str, **counts: int) -> None:
    """Prompt token counts must be at least 1: an empty prompt tensor would be a parameter that never gets a
    gradient (DDP without find_unused_parameters rejects one)."""
    for what, n in counts.items():
        if n < 1:
            raise ValueError(f"{method}: {what} must be at least 1, got {n}")
