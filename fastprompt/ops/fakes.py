"""Fake (meta) implementations of the kernel backends' raw ops. The Triton and CUDA backends save the same
tensors for their backward (fastprompt/ops/cmpa_layout.py for CMPA), so one forward fake serves both; every
backend's backward returns gradients shaped like its inputs, so the reference's backward fakes serve all."""

import torch

from ..reference.cmpa import cmpa_bwd_fake as cmpa_bwd  # noqa: F401
from ..reference.dafe import dafe_bwd_fake as dafe_bwd  # noqa: F401
from ..reference.insert import insert_prompts_bwd_fake as insert_prompts_bwd  # noqa: F401
from ..reference.insert import insert_prompts_packed_bwd_fake as insert_prompts_packed_bwd  # noqa: F401
from ..reference.insert import out_len
from .cmpa_layout import forward_size


def insert_prompts_fwd(x, prompts, start, starts, ln_weight, ln_bias, eps, mode):
    n, length, d = x.shape
    l_out = out_len(length, prompts.shape[-2], mode)
    if ln_weight is None and ln_bias is None:
        return x.new_empty(n, l_out, d), x.new_empty(0), []
    stats = [x.new_empty(n, l_out, dtype=torch.float32) for _ in range(2)]
    return x.new_empty(n, l_out, d), x.new_empty(n, l_out, d), stats


def insert_prompts_packed_fwd(x, prompts, cu_seqlens, start, starts, ln_weight, ln_bias, eps):
    if ln_weight is None and ln_bias is None:
        return x.new_empty(x.shape), x.new_empty(0), []
    stats = [x.new_empty(x.shape[0], dtype=torch.float32) for _ in range(2)]
    return x.new_empty(x.shape), x.new_empty(x.shape), stats


def dafe_fwd(prev, task, params, gate, eps):
    n, m, d = prev.shape
    out = prev.new_empty(n, m, d)
    if gate == "scalar":
        return out, []
    k = params[2].shape[0]
    return out, [prev.new_empty(n, m, k, dtype=torch.float32), prev.new_empty(n * m, dtype=torch.float32),
                 prev.new_empty(n * m, dtype=torch.float32)]


def cmpa_fwd(visual, text, visual_params, text_params, n_head_visual, n_head_text, fusing, eps, compute_text):
    m, _, dv = visual.shape
    dt = text.shape[2]
    lv = forward_size(m, dv, n_head_visual, visual_params[10].shape[0])
    lt = forward_size(m, dt, n_head_text, text_params[10].shape[0], compute_text)
    is_max = fusing == "max"
    return (visual.new_empty(m, dv), text.new_empty((m, dt) if compute_text else (0,)),
            [visual.new_empty(lv, dtype=torch.float32), text.new_empty(lt, dtype=torch.float32),
             visual.new_empty((m, dv) if is_max else (0,), dtype=torch.int32),
             text.new_empty((m, dt) if is_max else (0,), dtype=torch.int32)])
