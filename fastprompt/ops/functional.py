"""The functional form of every op and the autograd Function it runs: the inputs are checked by the op's
declaration (fastprompt/ops/<op>.py), which also describes the problem; `fastprompt.backends.select` picks the
implementation that serves it; the Function receives that implementation and calls its raw forward, then its raw
backward. Exported by fastprompt.ops (and `insert_prompts` by fastprompt)."""

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import backends
from ..declaration import OpImpl
from .cmpa import CMPA, N_SIDE_PARAMS
from .cmpa import check_inputs as check_cmpa_inputs
from .dafe import DAFE
from .dafe import check_inputs as check_dafe_inputs
from .insert_prompts import INSERT_PROMPTS
from .insert_prompts import check_inputs as check_insert_inputs
from .insert_prompts_packed import INSERT_PROMPTS_PACKED
from .insert_prompts_packed import check_inputs as check_packed_inputs

# what fastprompt.ops exports: every op's functional form and its autograd Function
__all__ = ["cross_modal_prompt_attention", "dafe_fusion", "insert_prompts", "CrossModalPromptAttentionFunction",
           "DeepAdaptiveFeatureEnhancementFunction", "InsertPromptsFunction", "InsertPromptsPackedFunction"]


# ---- cmpa ----------------------------------------------------------------------------------------------------

class CrossModalPromptAttentionFunction(torch.autograd.Function):
    """Both sides of CMPA through one backend's raw ops `fastprompt::cmpa_{fwd,bwd}_<backend>` (`impl`).

    Returns the new visual and text prompts broadcast back over B and C as stride-0 `expand` views,
    as the original module does (the text output is None without compute_text); the backward receives the
    gradients at that broadcast shape.
    """

    @staticmethod
    def forward(ctx, visual: Tensor, text: Tensor, impl: OpImpl, n_head_visual: int, n_head_text: int,
                fusing: str, eps: float, compute_text: bool, *params: Tensor):
        vp, tp = list(params[:N_SIDE_PARAMS]), list(params[N_SIDE_PARAMS:])
        out_v, out_t, saved = impl.forward(visual, text, vp, tp, n_head_visual, n_head_text, fusing, eps,
                                           compute_text)
        ctx.save_for_backward(visual, text, *params, *saved)
        ctx.config = (impl, n_head_visual, n_head_text, fusing, eps, compute_text)
        ctx.set_materialize_grads(False)
        m, b, _ = visual.shape
        c = text.shape[1]
        new_v = out_v.unsqueeze(1).expand(m, b, -1)
        return new_v, (out_t.unsqueeze(1).expand(m, c, -1) if compute_text else None)

    @staticmethod
    def backward(ctx, grad_visual: Optional[Tensor], grad_text: Optional[Tensor]):
        impl, n_head_visual, n_head_text, fusing, eps, compute_text = ctx.config
        n_config = 6
        if grad_visual is None and grad_text is None:
            return (None,) * (2 + n_config + 2 * N_SIDE_PARAMS)
        visual, text, *rest = ctx.saved_tensors
        vp, tp, saved = rest[:N_SIDE_PARAMS], rest[N_SIDE_PARAMS:2 * N_SIDE_PARAMS], rest[2 * N_SIDE_PARAMS:]
        dvisual, dtext, dvp, dtp = impl.backward(grad_visual, grad_text, visual, text, vp, tp, saved,
                                                 n_head_visual, n_head_text, fusing, eps, compute_text)
        dtp = tuple(dtp) if compute_text else (None,) * N_SIDE_PARAMS
        return (dvisual, dtext) + (None,) * n_config + tuple(dvp) + dtp


def cross_modal_prompt_attention(visual: Tensor, text: Tensor, visual_params: Sequence[Tensor],
                                 text_params: Sequence[Tensor], *, n_head_visual: int, n_head_text: int,
                                 fusing: str = "mean", eps: float = 1e-5, backend: str = "auto",
                                 compute_text: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Cross-modal prompt attention of DCP (both sides), in the LND layout of the original module.

    Args:
        visual: visual prompts (M, B, Dv). Any strides.
        text: text prompts (M, C, Dt); the same M as `visual`.
        visual_params: the 14 visual-side parameters, a `CMPASideParams` or a sequence in its order
            (proj_t2v, ln_pa_1_visual, promt_attention_visual, ln_pa_2_visual, mlp_pa_visual).
        text_params: the 14 text-side parameters (proj_v2t, the *_text layers).
        n_head_visual, n_head_text: attention heads of each side.
        fusing: pooling over B and C: "mean", "first" or "max".
        eps: LayerNorm epsilon.
        backend: "auto", "reference", "triton" or "cuda" (see fastprompt.backends).
        compute_text: False computes the visual side only (the text input still feeds the visual query and
            gets its gradient through it); new_text is then None and the text parameters get no gradient.

    Returns:
        (new_visual (M, B, Dv), new_text (M, C, Dt)): stride-0 broadcasts of one (M, D) result per side.
    """
    tensors, device, problem = check_cmpa_inputs(visual, text, visual_params, text_params, n_head_visual,
                                                 n_head_text, fusing, compute_text)
    impl = backends.select(CMPA, backend, device, problem)
    return CrossModalPromptAttentionFunction.apply(tensors[0], tensors[1], impl, n_head_visual, n_head_text, fusing,
                                                   eps, bool(compute_text), *tensors[2:])


# ---- dafe ----------------------------------------------------------------------------------------------------

class DeepAdaptiveFeatureEnhancementFunction(torch.autograd.Function):
    """DAFE through one backend's raw ops `fastprompt::dafe_{fwd,bwd}_<backend>` (`impl`)."""

    @staticmethod
    def forward(ctx, prev: Tensor, task: Tensor, impl: OpImpl, gate: str, eps: float, *params: Tensor):
        out, saved = impl.forward(prev, task, list(params), gate, eps)
        ctx.save_for_backward(prev, task, *params, *saved)
        ctx.config = (impl, gate, eps, len(params))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        impl, gate, eps, n_params = ctx.config
        prev, task, *rest = ctx.saved_tensors
        dprev, dtask, dparams = impl.backward(grad_out, prev, task, rest[:n_params], rest[n_params:], gate, eps)
        return (dprev, dtask, None, None, None) + tuple(dparams)


def dafe_fusion(prev: Tensor, task: Tensor, *, gate: str = "channel", ln_weight: Optional[Tensor] = None,
                ln_bias: Optional[Tensor] = None, gate_prev_weight: Optional[Tensor] = None,
                gate_prev_bias: Optional[Tensor] = None, gate_task_weight: Optional[Tensor] = None,
                alpha: Optional[Tensor] = None, eps: float = 1e-5, backend: str = "auto") -> Tensor:
    """Deep Adaptive Feature Enhancement: gate the previous block's prompt rows with the fresh prompt.

    out = gate·prev + (1 − gate)·task, with gate = σ(LN(prev) W_gᵀ + b_g + task U_gᵀ) per channel
    ("channel") or per token ("token"), or σ(α) ("scalar", no LayerNorm).

    Args:
        prev: (N, M, D) the previous block's output at the prompt rows. Any strides.
        task: (M, D) shared by all N, or (N, M, D): this block's learnable prompt.
        gate: "channel", "token" or "scalar".
        ln_weight, ln_bias: (D,) the LayerNorm applied to `prev` (channel and token gates).
        gate_prev_weight (k, D), gate_prev_bias (k,), gate_task_weight (k, D): W_g, b_g, U_g with
            k = D for "channel" and 1 for "token".
        alpha: 0-d tensor, the "scalar" gate's logit.
        backend: "auto", "reference", "triton" or "cuda".

    Returns:
        out (N, M, D).
    """
    tensors, device, problem = check_dafe_inputs(prev, task, gate, ln_weight, ln_bias, gate_prev_weight,
                                                 gate_prev_bias, gate_task_weight, alpha)
    impl = backends.select(DAFE, backend, device, problem)
    return DeepAdaptiveFeatureEnhancementFunction.apply(tensors[0], tensors[1], impl, gate, eps, *tensors[2:])


# ---- insert_prompts and insert_prompts_packed ----------------------------------------------------------------

def affine_grads(dln, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor]):
    """(dw, db) from a raw backward's list, which holds the gradients of the LayerNorm parameters given."""
    dln = list(dln)
    dw = dln.pop(0) if ln_weight is not None else None
    db = dln.pop(0) if ln_bias is not None else None
    return dw, db


class InsertPromptsFunction(torch.autograd.Function):
    """Prompt insertion through one backend's raw ops `fastprompt::insert_prompts_{fwd,bwd}_<backend>` (`impl`)."""

    @staticmethod
    def forward(ctx, x: Tensor, prompts: Tensor, starts: Optional[Tensor], ln_weight: Optional[Tensor],
                ln_bias: Optional[Tensor], impl: OpImpl, start: int, eps: float, mode: str):
        y, y_ln, saved = impl.forward(x, prompts, start, starts, ln_weight, ln_bias, eps, mode)
        ctx.save_for_backward(x, prompts, starts, ln_weight, ln_bias, *saved)
        ctx.config = (impl, start, eps, mode)
        ctx.set_materialize_grads(False)
        if ln_weight is None and ln_bias is None:
            ctx.mark_non_differentiable(y_ln)
        return y, y_ln

    @staticmethod
    def backward(ctx, grad_y: Optional[Tensor], grad_y_ln: Optional[Tensor]):
        impl, start, eps, mode = ctx.config
        x, prompts, starts, ln_weight, ln_bias, *saved = ctx.saved_tensors
        if grad_y is None and grad_y_ln is None:
            return (None,) * 9
        if grad_y_ln is not None and grad_y_ln.numel() == 0:  # the placeholder of a LayerNorm-free call
            grad_y_ln = None
        dx, dprompts, dln = impl.backward(grad_y, grad_y_ln, x, prompts, start, starts, ln_weight, ln_bias, saved,
                                          eps, mode)
        dw, db = affine_grads(dln, ln_weight, ln_bias)
        return dx, dprompts, None, dw, db, None, None, None, None


class InsertPromptsPackedFunction(torch.autograd.Function):
    """The packed variant through one backend's raw ops `fastprompt::insert_prompts_packed_{fwd,bwd}_<backend>`
    (`impl`)."""

    @staticmethod
    def forward(ctx, x: Tensor, prompts: Tensor, cu_seqlens: Tensor, starts: Optional[Tensor],
                ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], impl: OpImpl, start: int, eps: float):
        y, y_ln, saved = impl.forward(x, prompts, cu_seqlens, start, starts, ln_weight, ln_bias, eps)
        ctx.save_for_backward(x, prompts, cu_seqlens, starts, ln_weight, ln_bias, *saved)
        ctx.config = (impl, start, eps)
        ctx.set_materialize_grads(False)
        if ln_weight is None and ln_bias is None:
            ctx.mark_non_differentiable(y_ln)
        return y, y_ln

    @staticmethod
    def backward(ctx, grad_y: Optional[Tensor], grad_y_ln: Optional[Tensor]):
        impl, start, eps = ctx.config
        x, prompts, cu_seqlens, starts, ln_weight, ln_bias, *saved = ctx.saved_tensors
        if grad_y is None and grad_y_ln is None:
            return (None,) * 9
        if grad_y_ln is not None and grad_y_ln.numel() == 0:  # the placeholder of a LayerNorm-free call
            grad_y_ln = None
        dx, dprompts, dln = impl.backward(grad_y, grad_y_ln, x, prompts, cu_seqlens, start, starts, ln_weight,
                                          ln_bias, saved, eps)
        dw, db = affine_grads(dln, ln_weight, ln_bias)
        return dx, dprompts, None, None, dw, db, None, None, None


def insert_prompts(x: Tensor, prompts: Tensor, start: Union[int, Tensor], ln_weight: Optional[Tensor] = None,
                   ln_bias: Optional[Tensor] = None, eps: float = 1e-5, mode: str = "replace", *,
                   cu_seqlens: Optional[Tensor] = None, backend: str = "auto",
                   check_start: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Write prompt rows into a batch-first residual stream and apply the block's LayerNorm in one pass.

    Args:
        x: (N, L, D) residual stream, or with `cu_seqlens` (T, D) packed sequences. Any strides.
        prompts: (M, D) shared by all N sequences, or (N, M, D).
        start: first prompt row, an int or an int64 tensor (N,) of per-sequence offsets (packed: counted
            from each sequence's first row).
        ln_weight, ln_bias: (D,) the LayerNorm to apply to y (for example the block's ln_1); with
            neither given, no LayerNorm is computed and y_ln is None.
        eps: LayerNorm epsilon.
        mode: "replace" (rows [start, start+M) are overwritten, L unchanged) or "insert" (the prompts
            are inserted before row `start`, L grows by M). Packed streams take "replace" only.
        cu_seqlens: an int32 or int64 tensor (N+1,) on x's device: sequence n is rows [cu[n], cu[n+1]) of
            a packed x (T, D), cu[0] = 0, cu[N] = T; its rows cu[n] + start_n + [0, M) are replaced (the op
            insert_prompts_packed).
        backend: "auto", "reference", "triton" or "cuda".
        check_start: check the values of a start tensor and of cu_seqlens on the host (a sync on CUDA;
            skipped under torch.compile); pass False for layouts and offsets that were validated once already.

    Returns:
        (y, y_ln): the new stream (N, L or L+M, D), packed (T, D), and its LayerNorm (None without LayerNorm
        parameters).
    """
    if cu_seqlens is not None:
        return _insert_packed(x, prompts, start, ln_weight, ln_bias, eps, mode, cu_seqlens, backend,
                                     check_start)
    (x, prompts, ln_weight, ln_bias), start, starts, device, problem = check_insert_inputs(
        x, prompts, start, ln_weight, ln_bias, mode, check_start)
    impl = backends.select(INSERT_PROMPTS, backend, device, problem)
    y, y_ln = InsertPromptsFunction.apply(x, prompts, starts, ln_weight, ln_bias, impl, start, eps, mode)
    return y, (y_ln if problem["layer_norm"] else None)


def _insert_packed(x: Tensor, prompts: Tensor, start, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                   eps: float, mode: str, cu_seqlens: Tensor, backend: str, check_values: bool
                   ) -> tuple[Tensor, Optional[Tensor]]:
    """insert_prompts with cu_seqlens: the op insert_prompts_packed."""
    (x, prompts, ln_weight, ln_bias), cu_seqlens, start, starts, device, problem = check_packed_inputs(
        x, prompts, start, ln_weight, ln_bias, mode, cu_seqlens, check_values)
    impl = backends.select(INSERT_PROMPTS_PACKED, backend, device, problem)
    y, y_ln = InsertPromptsPackedFunction.apply(x, prompts, cu_seqlens, starts, ln_weight, ln_bias, impl, start, eps)
    return y, (y_ln if problem["layer_norm"] else None)
