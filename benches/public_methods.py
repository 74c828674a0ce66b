"""Each method's training loss computed the way its public code computes it, over a fastprompt method's own
parameters and frozen token embeddings: same weights, same prompt values, so the loss equals the method's
own `loss` up to float rounding, and a training step on either path trains the same tensors.

  coop    KaiyangZhou/CoOp, trainers/coop.py: prompts = cat([SOS, ctx expanded over the C classes, the class
          tokens]) (C, 77, D); the TextEncoder over all C·77 tokens; the frozen image encoder; CLIP logits
  cocoop  trainers/cocoop.py: ctx + meta_net(normalised image feature) per image; the prompts of every
          image built and stacked, then the TextEncoder over C·77 tokens once per image (B·C·77 per step)
  maple   muzairkhattak/multimodal-prompt-learning, trainers/maple.py + clip/model.py: the text context at
          layer 0, the deeper text prompts cat'd over rows 1..n before text blocks 1..depth−1; the visual
          prompts (Linear projections of the text ones) cat'd after the positional embedding, then over the
          last n rows before vision blocks 1..depth−1
  dcp     GingL/CMPA, trainers/cmpa.py + clip/model.py: both towers stepped together block by block; before
          blocks 1..depth the original PromptAttention runs (both halves, as the original does) on the rows
          x_v[-M:] and x_t[1:1+M] and its visual output is cat'd back. The text output is cat'd into a tensor
          the public code never reads (couple_text=False, its model); couple_text=True (the paper's design)
          writes that tensor back into the text stream
  dpt     fanrena/DPT, trainers/DPT.py: the zero-shot image encoder run apart without autograd, top-K by
          torch.sort, the TextEncoder over C·77 tokens, VPT-deep tokens cat'd and sliced off around blocks
          below bottom_limit, then CAVPT as its Attention / CAVPT modules compute it (the query Linear per
          selected row, bmm, softmax, Wo after the weighted sum), the loss with the aux rows picked by a
          boolean mask
  tmml    no public code: its text tower runs the public way (B·C·77 tokens, the per-(image, class)
          contexts cat'd into the token embeddings); its small attention layers and its loss are the
          method's own modules and `loss_from`
The public codes' own fp16 casts (`.half()`, `.type(dtype)`) are set aside, as in the method tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

import public_towers as towers


def cat_prompts(method, ctx: Tensor) -> Tensor:
    """construct_prompts of the public codes: cat([SOS row, ctx, the rest of the frozen token embeddings]);
    ctx (n, D) shared by all sequences or (N, n, D) one per sequence → (N, 77, D)."""
    start = method.prompts.starts("ctx")
    if start != 1:
        raise ValueError(f"{method.name}: the public codes' way writes the context right after SOS (row 1); "
                         f"this configuration puts it at {start}")
    frozen = method.prompts.embeddings
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(frozen.shape[0], -1, -1)
    return torch.cat([frozen[:, :1], ctx, frozen[:, 1 + ctx.shape[1]:]], dim=1)


def coop(method, images: Tensor, labels: Tensor) -> Tensor:
    if method.position != "end" or method.ctx.dim() != 2:
        raise ValueError("coop: the public way is written for one shared context, class token at the end")
    model = method.clip.model
    image_features = towers.encode_image(model, images)  # frozen: nothing in it requires grad
    text = towers.encode_text(model, cat_prompts(method, method.ctx), method.prompts.ids)
    return F.cross_entropy(towers.clip_logits(model, image_features, text), labels)


def cocoop(method, images: Tensor, labels: Tensor) -> Tensor:
    model = method.clip.model
    image_features = towers.encode_image(model, images)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    n_cls = method.prompts.ids.shape[0]
    ctx_shifted = method.ctx.unsqueeze(0) + method.meta_net(image_features).unsqueeze(1)  # (B, n_ctx, D)
    prompts = torch.stack([cat_prompts(method, ctx_i.unsqueeze(0).expand(n_cls, -1, -1)) for ctx_i in ctx_shifted])
    logits = []
    for prompts_i, image_i in zip(prompts, image_features):
        text = towers.encode_text(model, prompts_i, method.prompts.ids)
        text = text / text.norm(dim=-1, keepdim=True)
        logits.append(model.logit_scale.exp() * image_i @ text.t())
    return F.cross_entropy(torch.stack(logits), labels)


def maple(method, images: Tensor, labels: Tensor) -> Tensor:
    model, n = method.clip.model, method.n_ctx
    deep_text = list(method.compound_prompts_text)
    deep_visual = [layer(p) for layer, p in zip(method.compound_prompt_projections, deep_text)]

    def text_before(layer, x):  # ResidualAttentionBlock_MaPLe: rows 1..n replaced in blocks 1..depth-1
        if not 1 <= layer <= len(deep_text):
            return x
        context = deep_text[layer - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2)
        return torch.cat([x[:1], context, x[1 + n:]], dim=0)

    def visual_before(layer, x):  # the last n rows replaced
        if not 1 <= layer <= len(deep_visual):
            return x
        context = deep_visual[layer - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2)
        return torch.cat([x[:x.shape[0] - n], context], dim=0)

    text = towers.encode_text(model, cat_prompts(method, method.ctx), method.prompts.ids, text_before)
    x = towers.image_stem(model, images)
    x = torch.cat([x, method.proj(method.ctx).expand(x.shape[0], -1, -1)], dim=1)
    x = model.visual.ln_pre(x).permute(1, 0, 2)
    image_features = towers.image_features(model, towers.image_blocks(model, x, visual_before))
    return F.cross_entropy(towers.clip_logits(model, image_features, text), labels)


def prompt_attention(cmpa, visual_context: Tensor, textual_context: Tensor) -> tuple[Tensor, Tensor]:
    """The original PromptAttention.forward (GingL/CMPA clip/model.py) over the drop-in's submodules, which
    are the original's kinds (nn.MultiheadAttention, LayerNorm, the QuickGELU MLP): LND (M, B, Dv) and
    (M, C, Dt) in, both outputs broadcast back over B and C."""
    visual_batch, textual_batch = visual_context.shape[1], textual_context.shape[1]
    if cmpa.fusing == "first":
        visual_context, textual_context = visual_context[:, :1], textual_context[:, :1]
    elif cmpa.fusing == "mean":
        visual_context = visual_context.mean(1).unsqueeze(1)
        textual_context = textual_context.mean(1).unsqueeze(1)
    else:
        visual_context = visual_context.max(1)[0].unsqueeze(1)
        textual_context = textual_context.max(1)[0].unsqueeze(1)
    ln_v = cmpa.ln_pa_1_visual
    new_visual = visual_context + cmpa.promt_attention_visual(
        ln_v(cmpa.proj_t2v(textual_context)), ln_v(visual_context), ln_v(visual_context), need_weights=False)[0]
    new_visual = new_visual + cmpa.mlp_pa_visual(cmpa.ln_pa_2_visual(new_visual))
    ln_t = cmpa.ln_pa_1_text
    new_text = textual_context + cmpa.promt_attention_text(
        ln_t(cmpa.proj_v2t(visual_context)), ln_t(textual_context), ln_t(textual_context), need_weights=False)[0]
    new_text = new_text + cmpa.mlp_pa_text(cmpa.ln_pa_2_text(new_text))
    return new_visual.expand(-1, visual_batch, -1), new_text.expand(-1, textual_batch, -1)


def dcp(method, images: Tensor, labels: Tensor) -> Tensor:
    model, m = method.clip.model, method.n_ctx
    ids = method.prompts.ids
    x_text = towers.text_stream(model, cat_prompts(method, method.prompts_text))
    x_visual = towers.image_stem(model, images)
    x_visual = torch.cat([x_visual, method.prompts_visual.expand(x_visual.shape[0], -1, -1)], dim=1)
    x_visual = model.visual.ln_pre(x_visual).permute(1, 0, 2)
    mask = towers.causal_mask(x_text.shape[0], x_text.device)
    blocks = zip(model.visual.transformer.resblocks, model.transformer.resblocks)
    for layer, (visual_block, text_block) in enumerate(blocks):  # ResidualAttentionBlock_CMPA
        if 1 <= layer <= method.depth:
            visual_context, textual_context = prompt_attention(method.cmpa_at(layer), x_visual[-m:], x_text[1:1 + m])
            x_visual = torch.cat([x_visual[:x_visual.shape[0] - m], visual_context], dim=0)
            textual_context = torch.cat([x_text[:1], textual_context, x_text[1 + m:]], dim=0)
            if method.couple_text:  # the paper's design; the public code leaves textual_context unread
                x_text = textual_context
        with torch.profiler.record_function(towers.IMAGE_SCOPE):
            x_visual = towers.residual_block(visual_block, x_visual)
        with torch.profiler.record_function(towers.TEXT_SCOPE):
            x_text = towers.residual_block(text_block, x_text, mask)
    image_features = towers.image_features(model, x_visual)
    text = towers.text_features(model, x_text, ids)
    return F.cross_entropy(towers.clip_logits(model, image_features, text), labels)


def cavpt(module, x: Tensor, selected_text: Tensor) -> tuple[Tensor, Tensor]:
    """DPT's CAVPT.forward + Attention.forward over a fastprompt CAVPT module's parameters (query = meta_net,
    tokens = ctx[i], q_proj / k_proj / out_proj = qmlp / kmlp / vmlp, ln_aux = lns[i], ln_out = lns2[i],
    classifier = classfiers[i]): x (L, B, Dv) the block's input, selected_text (B, K, E) → (prompts (K, B, Dv),
    aux logits (K, B, C))."""
    class_token = x.detach()
    class_prompt = module.query(selected_text).permute(1, 0, 2)
    class_token = torch.cat([class_token, module.tokens.unsqueeze(1).expand(-1, class_token.shape[1], -1)])
    residual = class_prompt
    q, k, v = class_prompt.permute(1, 0, 2), class_token.permute(1, 0, 2), class_token.permute(1, 0, 2)
    q, k = module.q_proj(q), module.k_proj(k)
    u = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    out = module.out_proj(torch.bmm(F.softmax(u, dim=-1), v)).permute(1, 0, 2)
    return module.ln_out(out + residual), module.classifier(module.ln_aux(out))


def dpt(method, images: Tensor, labels: Tensor) -> Tensor:
    model = method.clip.model
    scale = model.logit_scale.exp()
    fixed = method.fixed_text_features / method.fixed_text_features.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        zero_shot = towers.encode_image(model, images)
        zero_shot = zero_shot / zero_shot.norm(dim=-1, keepdim=True)
        _, indices = torch.sort(scale * zero_shot @ fixed.t(), descending=True)
        indices = indices[:, :method.top_k]
    text = towers.encode_text(model, cat_prompts(method, method.ctx), method.prompts.ids)
    text_norm = text / text.norm(dim=-1, keepdim=True)

    bottom, vpt = method.bottom_limit - 1, method.visual_prompts
    n_vpt = vpt.shape[1] if vpt is not None else 0
    layer_logits = []

    def before(layer, x):  # Transformer_VPTD: VPT tokens below bottom_limit, CAVPT prompts from it on
        if layer < bottom:
            if not n_vpt:
                return x
            return torch.cat([x, vpt[layer].unsqueeze(1).expand(-1, x.shape[1], -1)], dim=0)
        prompts, logits = cavpt(method.cavpt[layer - bottom], x, text[indices])
        layer_logits.append(logits.unsqueeze(0))
        return torch.cat([x, prompts], dim=0)

    def after(layer, x):
        added = (n_vpt if layer < bottom else indices.shape[1])
        return x[:-added] if added else x

    x = model.visual.ln_pre(towers.image_stem(model, images)).permute(1, 0, 2)
    image = towers.image_features(model, towers.image_blocks(model, x, before, after))
    image = image / image.norm(dim=-1, keepdim=True)
    logits = scale * image @ text_norm.t()
    if method.in_first_phase():
        loss = (F.cross_entropy(scale * zero_shot @ text_norm.t(), labels)
                + F.cross_entropy(scale * image @ fixed.t(), labels) + 0.1 * F.cross_entropy(logits, labels))
    else:
        loss = F.cross_entropy(logits, labels)
    if layer_logits:  # DPT.forward_backward: the rows of the slots whose class is the label
        n_cls, layers, k = text.shape[0], len(layer_logits), indices.shape[1]
        rows = torch.cat(layer_logits, dim=0).permute(2, 0, 1, 3).reshape(-1, n_cls)  # (B·layers·K, C)
        matched = (labels[:, None].expand(-1, k) == indices).unsqueeze(1).expand(-1, layers, -1).reshape(-1)
        target = F.one_hot(labels[:, None, None].expand(-1, layers, k).reshape(-1), n_cls).to(rows.dtype)
        if bool(matched.any()):
            loss = loss + method.aux_weight * F.cross_entropy(rows[matched], target[matched])
    return loss


def tmml(method, images: Tensor, labels: Tensor) -> Tensor:
    model = method.clip.model
    x = towers.image_blocks(model, model.visual.ln_pre(towers.image_stem(model, images)).permute(1, 0, 2))
    x = x.permute(1, 0, 2)
    tokens = model.visual.ln_post(x) @ model.visual.proj  # (B, 1 + P, E): class token and patches
    image, patches = F.normalize(tokens[:, 0], dim=-1), F.normalize(tokens[:, 1:], dim=-1)
    shift = method.ctp_mlp(method.ctp(method.class_features, patches))  # (B, C, Dt)
    b, n_cls = shift.shape[:2]
    ctx = (method.ctx + shift[:, :, None]).reshape(b * n_cls, *method.ctx.shape)  # one context per (image, class)
    frozen = method.prompts.embeddings.repeat(b, 1, 1)
    n = method.ctx.shape[0]
    prompts = torch.cat([frozen[:, :1], ctx, frozen[:, 1 + n:]], dim=1)  # (B·C, 77, D)
    text = towers.encode_text(model, prompts, method.prompts.ids.repeat(b, 1)).view(b, n_cls, -1)
    text = F.normalize(text, dim=-1)
    tuned = image + method.gamma * method.tft(image[:, None], text)[:, 0]
    return method.loss_from(method.clip_logits(tuned, text), {"image": tuned, "text": text}, labels)


LOSSES = {"coop": coop, "cocoop": cocoop, "maple": maple, "dcp": dcp, "dpt": dpt, "tmml": tmml}


class PublicWay:
    """A fastprompt method's training loss computed the public codes' way (above), over its parameters."""

    def __init__(self, method):
        if method.name not in LOSSES:
            raise ValueError(f"no public-way baseline for {method.name!r}; there are: {', '.join(LOSSES)}")
        self.method = method
        self._loss = LOSSES[method.name]

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        return self._loss(self.method, images, labels)

    def trainable_parameters(self):
        return self.method.trainable_parameters()
