"""TMML, Task-Oriented Multi-Modal Mutual Learning (Long et al., ICCV 2023). There is no public code: this is
our reading of the abstract (DESIGN.md, Methods).

The image tower is frozen and unprompted. With t_c the frozen features of the hand-written template (C, E)
("a photo of a {class}.", or the dataset's: methods/templates.py),
P_b the image's patch features and f_b its feature (all L2-normalised before any attention):
  CTP, class-aware text prompts: each class attends to the patches of each image (single head),
      a_{b,c} = softmax((t_c Wq)(P_b Wk)ᵀ / √d) (P_b Wv),   bias_{b,c} = MLP(a_{b,c})   (MLP: E → E/16 → Dt),
      and the context of class c for image b is ctx + bias_{b,c} on each of its M tokens. The text tower
      therefore runs B·C sequences (CoCoOp-like cost; class chunking and checkpointing bound the memory).
  TFT, text-guided feature tuning: the image feature attends to its own prompted text features T_b (C, E),
      f̂_b = f_b + γ · softmax((f_b W'q)(T_b W'k)ᵀ / √d) (T_b W'v).
Logits s·cos(f̂_b, t̂_{b,c}) with s CLIP's logit scale. Loss: cross-entropy on them + λ · a symmetric InfoNCE
between f̂_b and its label's text feature t̂_{b,y_b} over the batch (all ranks' rows under torch.distributed),
where images of the same label are not each other's negatives. Defaults: M = 4 context tokens from
"a photo of a", d = 64, γ = 0.1, λ = 1.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import insert_prompts
from ..clip import Slot, clean_classname, run_blocks
from .base import PromptMethod
from .templates import DEFAULT_TEMPLATE, check_template
from .text import TextPath, TextPrompts, after_context, context_init
from .distributed import gather_rows


class SingleHeadCrossAttention(nn.Module):
    """softmax((q Wq)(c Wk)ᵀ / √d) (c Wv): queries (..., Q, E) attend to a context (..., K, E) → (..., Q, E).
    Leading dimensions broadcast, so C class queries can attend to each of B images' patches at once."""

    def __init__(self, dim: int, attn_dim: int):
        super().__init__()
        self.query = nn.Linear(dim, attn_dim, bias=False)
        self.key = nn.Linear(dim, attn_dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(attn_dim)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        scores = self.query(queries) @ self.key(context).transpose(-1, -2) * self.scale
        return scores.softmax(-1) @ self.value(context)


class TMML(PromptMethod):
    """TMML. Config: n_ctx (4; taken from ctx_init when given), ctx_init ("a photo of a"), attn_dim (64),
    gamma_init (0.1), lam (1.0: weight of the InfoNCE term), template ("a photo of a {}.": the frozen class
    features t_c; the trainer gives the dataset's), and the text path's class_chunk, checkpoint_text,
    pack_text, prefix_reuse (methods/text.py; only SOS is shared here)."""

    name = "tmml"
    template_from_dataset = True  # t_c from the dataset's template unless one is given (methods/templates.py)
    text_depends_on_images = True

    def __init__(self, clip_model, classnames: Iterable[str], *, n_ctx: int = 4,
                 ctx_init: Optional[str] = "a photo of a", attn_dim: int = 64, gamma_init: float = 0.1,
                 lam: float = 1.0, template: str = DEFAULT_TEMPLATE, class_chunk: Optional[int] = None,
                 checkpoint_text: bool = False, pack_text: bool = True, prefix_reuse: bool = True,
                 backend: str = "auto"):
        super().__init__(clip_model, classnames, backend)
        clip = self.clip
        e, dt = clip.embed_dim, clip.text_width
        self.ctx, self.n_ctx, words = context_init(clip, n_ctx, ctx_init)  # one vector per word, as CoCoOp
        self.ctp = SingleHeadCrossAttention(e, attn_dim)
        self.ctp_mlp = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(e, e // 16)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(e // 16, dt)),
        ]))
        self.tft = SingleHeadCrossAttention(e, attn_dim)
        self.gamma = nn.Parameter(torch.tensor(float(gamma_init)))
        self.lam = lam
        self.text_path = TextPath(class_chunk, checkpoint_text, pack_text, prefix_reuse)
        names = [clean_classname(c) for c in self.classnames]
        # the context comes first, so its slot is row 1 of every class: one int offset for all B·C sequences
        # every (image, class) sequence has its own context: only SOS is shared
        self.prompts = TextPrompts(clip, [[Slot("ctx", self.n_ctx), after_context(words, name)]
                                          for name in names], backend, shared_rows=1)
        (template,) = check_template(self.name, template)
        # t_c, frozen: recomputed from the class names, so not in checkpoints
        self.register_buffer("class_features", F.normalize(clip.encode_class_names(template, names), dim=-1),
                             persistent=False)

    def image_side(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The frozen, unprompted image tower without autograd: normalised f_b (B, E) and P_b (B, P, E)."""
        clip = self.clip
        with torch.no_grad():
            x = run_blocks(clip.vision_blocks, clip.ln_pre(clip.image_tokens(images)))
            return F.normalize(clip.image_features(x), dim=-1), F.normalize(clip.patch_features(x), dim=-1)

    def text_features(self, ctx: Tensor) -> Tensor:
        """Per-image contexts ctx (B, C, M, Dt) → text features (B, C, E): B·c sequences per class chunk,
        laid out image-major (sequence b·c + j is class j of the chunk for image b)."""
        b, n_cls = ctx.shape[:2]
        chunk = self.text_path.class_chunk or n_cls
        start = self.prompts.starts("ctx")
        feats = []
        for lo in range(0, n_cls, chunk):
            sl = slice(lo, min(lo + chunk, n_cls))
            emb = self.prompts.embeddings[sl]
            emb = emb.unsqueeze(0).expand(b, *emb.shape).reshape(-1, *emb.shape[1:])  # (B·c, L, Dt)
            rows = ctx[:, sl].reshape(-1, *ctx.shape[2:])  # (B·c, M, Dt)
            x = insert_prompts(emb, rows, start, mode="replace", backend=self.backend)[0]
            f = self.prompts.encode_chunk(self.clip, x, sl, self.text_path, repeat=b)
            feats.append(f.view(b, -1, f.shape[-1]))
        return torch.cat(feats, 1) if len(feats) > 1 else feats[0]

    def logits_and_extras(self, images: Tensor):
        f, patches = self.image_side(images)
        # CTP: class c's query t_c attends to image b's patches → a (B, C, E) → a context shift (B, C, Dt)
        shift = self.ctp_mlp(self.ctp(self.class_features, patches))
        text = F.normalize(self.text_features(self.ctx + shift[:, :, None]), dim=-1)  # T_b: (B, C, E)
        # TFT: f̂_b = f_b + γ · (f_b attending to its prompted class features T_b)
        tuned = f + self.gamma * self.tft(f[:, None], text)[:, 0]
        return self.clip_logits(tuned, text), {"image": tuned, "text": text}

    def loss_from(self, logits: Tensor, extras: dict, labels: Tensor) -> Tensor:
        """Cross-entropy on the logits + λ · the alignment InfoNCE (skipped at λ = 0)."""
        loss = F.cross_entropy(logits, labels)
        if self.lam:
            text = extras["text"][torch.arange(labels.shape[0], device=labels.device), labels]  # t̂_{b, y_b}
            loss = loss + self.lam * self.alignment_loss(extras["image"], text, labels)
        return loss

    def alignment_loss(self, image: Tensor, text: Tensor, labels: Tensor) -> Tensor:
        """Symmetric InfoNCE between f̂_i and t̂_{i, y_i}: S_ij = s·cos(f̂_i, t̂_{j, y_j}), target j = i, in both
        directions (rows: image → text, columns: text → image), averaged. S_ij with i ≠ j and y_i = y_j is
        masked out of the softmax (an image of the same label is no negative). Under torch.distributed the
        rows of every rank take part (gathered with their gradients); each rank's loss covers its own rows
        and columns, so with equal per-rank batches DDP's gradient average equals the single-process loss
        over the global batch."""
        image_all, local = gather_rows(F.normalize(image, dim=-1))
        text_all, _ = gather_rows(F.normalize(text, dim=-1))
        labels_all, _ = gather_rows(labels)
        sim = self.clip.logit_scale * image_all @ text_all.t()  # (G, G)
        same = labels_all[:, None] == labels_all[None, :]
        same.fill_diagonal_(False)
        sim = sim.masked_fill(same, float("-inf"))
        targets = torch.arange(sim.shape[0], device=sim.device)[local]
        return 0.5 * (F.cross_entropy(sim[local], targets) + F.cross_entropy(sim.t()[local], targets))
