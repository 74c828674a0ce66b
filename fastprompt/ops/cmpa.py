"""Cross-modal prompt attention (`cmpa`), declared: the raw ops' schemas and fakes, the problem the backends
read, and the checks every input passes before any backend runs. The math is fastprompt/reference/cmpa.py;
the functional form is in fastprompt/ops/functional.py, the module in fastprompt/modules/cmpa.py."""

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .. import _validation as v
from .cmpa_layout import forward_size
from ..declaration import Op

FUSINGS = ("mean", "first", "max")


class CMPASideParams(NamedTuple):
    """The parameters of one side of CMPA, in the order the raw ops take them.

    Visual side: `proj` is proj_t2v (Linear Dt → Dv), the rest are the *_visual layers.
    Text side: `proj` is proj_v2t (Linear Dv → Dt), the rest are the *_text layers.
    """

    proj_weight: Tensor      # (D, D_other)
    proj_bias: Tensor        # (D,)
    ln1_weight: Tensor       # (D,)   ln_pa_1
    ln1_bias: Tensor         # (D,)
    in_proj_weight: Tensor   # (3D, D) rows: query, key, value
    in_proj_bias: Tensor     # (3D,)
    out_proj_weight: Tensor  # (D, D)
    out_proj_bias: Tensor    # (D,)
    ln2_weight: Tensor       # (D,)   ln_pa_2
    ln2_bias: Tensor         # (D,)
    fc_weight: Tensor        # (F, D) mlp c_fc, F = 4D in CLIP
    fc_bias: Tensor          # (F,)
    cproj_weight: Tensor     # (D, F) mlp c_proj
    cproj_bias: Tensor       # (D,)


N_SIDE_PARAMS = len(CMPASideParams._fields)


def _forward_fake(visual, text, visual_params, text_params, n_head_visual, n_head_text, fusing, eps, compute_text):
    """The kernel backends' forward: the new rows of each side, and what they save, each side's fp32 workspace
    (fastprompt/ops/cmpa_layout.py) and the int32 argmax of `max` pooling."""
    m, _, dv = visual.shape
    dt = text.shape[2]
    lv = forward_size(m, dv, n_head_visual, visual_params[10].shape[0])
    lt = forward_size(m, dt, n_head_text, text_params[10].shape[0], compute_text)
    is_max = fusing == "max"
    return (visual.new_empty(m, dv), text.new_empty((m, dt) if compute_text else (0,)),
            [visual.new_empty(lv, dtype=torch.float32), text.new_empty(lt, dtype=torch.float32),
             visual.new_empty((m, dv) if is_max else (0,), dtype=torch.int32),
             text.new_empty((m, dt) if is_max else (0,), dtype=torch.int32)])


def _backward_fake(grad_visual_out, grad_text_out, visual, text, visual_params, text_params, saved, n_head_visual,
                   n_head_text, fusing, eps, compute_text):
    """Gradients shaped like the inputs; without compute_text the text parameters get empty ones."""
    return (torch.empty_like(visual, memory_format=torch.contiguous_format),
            torch.empty_like(text, memory_format=torch.contiguous_format),
            [torch.empty_like(p) for p in visual_params],
            [torch.empty_like(p) if compute_text else p.new_empty(0) for p in text_params])


CMPA = Op(
    "cmpa",
    # new rows (M, Dv) and (M, Dt) (the text ones empty without compute_text), and what the backward needs
    forward="(Tensor visual, Tensor text, Tensor[] visual_params, Tensor[] text_params, SymInt n_head_visual, "
            "SymInt n_head_text, str fusing, float eps, bool compute_text) -> (Tensor, Tensor, Tensor[])",
    # the upstream gradients at the broadcast shapes (M, B, Dv) and (M, C, Dt); returns dvisual, dtext and the
    # gradients of each side's 14 parameters
    backward="(Tensor? grad_visual_out, Tensor? grad_text_out, Tensor visual, Tensor text, Tensor[] visual_params, "
             "Tensor[] text_params, Tensor[] saved, SymInt n_head_visual, SymInt n_head_text, str fusing, float eps, "
             "bool compute_text) -> (Tensor, Tensor, Tensor[], Tensor[])",
    forward_fake=_forward_fake,
    backward_fake=_backward_fake,
    # m prompts, b images, c classes, widths dv / dt, the MLP widths, the heads, the pooling, compute_text
    problem=("dtype", "m", "b", "c", "dv", "dt", "n_head_visual", "n_head_text", "fusing", "mlp_visual", "mlp_text",
             "compute_text"),
)


def _check_side_params(side: str, p: CMPASideParams, d: int, d_other: int, n_head: int) -> None:
    names = [(f"{side}_params.{f}", t) for f, t in zip(CMPASideParams._fields, p)]
    for name, t in names:
        v.check_tensor(CMPA.name, name, t)
    hidden = p.fc_weight.shape[0] if p.fc_weight.dim() == 2 else -1
    other = "text" if side == "visual" else "visual"
    expected = CMPASideParams(
        (d, d_other), (d,), (d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (hidden, d), (hidden,),
        (d, hidden), (d,))
    for (name, t), shape in zip(names, expected):
        v.check_shape(CMPA.name, name, t, shape,
                      why=f"{side} has width {d} and {other} width {d_other}; MLP width {hidden}")
    if hidden < 1:
        raise ValueError(f"{CMPA.name}: {side}_params.fc_weight has no rows")
    if n_head < 1 or d % n_head:
        raise ValueError(f"{CMPA.name}: the {side} width {d} is not divisible by n_head_{side}={n_head}")


def check_inputs(visual: Tensor, text: Tensor, visual_params: Sequence[Tensor], text_params: Sequence[Tensor],
                 n_head_visual: int, n_head_text: int, fusing: str, compute_text: bool
                 ) -> tuple[list[Tensor], torch.device, dict]:
    """Checks everything the raw ops assume; returns the tensors (visual, text, the 14 visual then the 14 text
    parameters, cast to the autocast dtype under autocast), their device and the problem description."""
    v.check_tensor(CMPA.name, "visual", visual, 3, "(M, B, Dv) in LND layout")
    v.check_tensor(CMPA.name, "text", text, 3, "(M, C, Dt) in LND layout")
    if len(visual_params) != N_SIDE_PARAMS or len(text_params) != N_SIDE_PARAMS:
        raise ValueError(f"{CMPA.name}: visual_params and text_params take {N_SIDE_PARAMS} tensors each "
                         f"({', '.join(CMPASideParams._fields)}), got {len(visual_params)} and {len(text_params)}")
    if fusing not in FUSINGS:
        raise ValueError(f"{CMPA.name}: fusing must be one of {FUSINGS}, got {fusing!r}")
    vp, tp = CMPASideParams(*visual_params), CMPASideParams(*text_params)
    m, _, dv = visual.shape
    dt = text.shape[2]
    if text.shape[0] != m:
        raise ValueError(f"{CMPA.name}: visual and text must have the same number of prompts M (dim 0): the query "
                         f"length of one side is the key length of the other; got {m} and {text.shape[0]}")
    v.check_nonempty(CMPA.name, [("visual", visual), ("text", text)])
    _check_side_params("visual", vp, dv, dt, n_head_visual)
    _check_side_params("text", tp, dt, dv, n_head_text)
    named = [("visual", visual), ("text", text)] + [(f"visual_params.{f}", t) for f, t in zip(vp._fields, vp)] \
        + [(f"text_params.{f}", t) for f, t in zip(tp._fields, tp)]
    device = v.check_same_device(CMPA.name, named)
    tensors = v.cast_floating([t for _, t in named], v.autocast_dtype(device))
    dtype = v.check_dtypes(CMPA.name, [(name, t) for (name, _), t in zip(named, tensors)])
    problem = CMPA.problem_of(dtype=dtype, m=m, b=visual.shape[1], c=text.shape[1], dv=dv, dt=dt,
                              n_head_visual=n_head_visual, n_head_text=n_head_text, fusing=fusing,
                              mlp_visual=vp.fc_weight.shape[0], mlp_text=tp.fc_weight.shape[0],
                              compute_text=bool(compute_text))
    return tensors, device, problem
