"""Independent, deliberately plain implementations of the three ops, written for the tests: loops over
heads and sequences, plain matmuls, LayerNorm from its formula, and PyTorch autograd for the gradients.
They share no code with fastprompt. Run them in float64 to get the reference the backends are held to,
or in fp16 / bf16 to get the "eager low precision" error of DESIGN.md's rule."""

import math

import torch


def layer_norm(x, weight, bias, eps=1e-5):
    # Low-precision inputs are normalised in fp32, as CLIP's LayerNorm does.
    dtype = x.dtype
    x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(dtype)


def linear(x, weight, bias=None):
    y = x @ weight.t()
    return y if bias is None else y + bias


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def multi_head_attention(query, key_value, in_w, in_b, out_w, out_b, n_head):
    """query (Mq, D), key_value (Mk, D); one loop iteration per head."""
    d = query.shape[-1]
    dh = d // n_head
    q = linear(query, in_w[:d], in_b[:d])
    k = linear(key_value, in_w[d:2 * d], in_b[d:2 * d])
    v = linear(key_value, in_w[2 * d:], in_b[2 * d:])
    heads = []
    for h in range(n_head):
        cols = slice(h * dh, (h + 1) * dh)
        scores = q[:, cols] @ k[:, cols].t() / math.sqrt(dh)
        weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
        weights = weights / weights.sum(-1, keepdim=True)
        heads.append(weights @ v[:, cols])
    return linear(torch.cat(heads, -1), out_w, out_b)


def _pool(x, fusing):
    if fusing == "mean":
        return x.mean(1)
    if fusing == "first":
        return x[:, 0]
    return x.max(1).values


def cmpa(visual, text, sd, n_head_visual, n_head_text, fusing):
    """DCP's PromptAttention from its state_dict (original key names). visual (M, B, Dv), text (M, C, Dt)."""
    vbar, tbar = _pool(visual, fusing), _pool(text, fusing)

    def side(own, other, proj, s):
        ln1 = (sd[f"ln_pa_1_{s}.weight"], sd[f"ln_pa_1_{s}.bias"])
        query = layer_norm(linear(other, sd[f"{proj}.weight"], sd[f"{proj}.bias"]), *ln1)
        kv = layer_norm(own, *ln1)
        a = f"promt_attention_{s}"
        heads = n_head_visual if s == "visual" else n_head_text
        x1 = own + multi_head_attention(query, kv, sd[f"{a}.in_proj_weight"], sd[f"{a}.in_proj_bias"],
                                        sd[f"{a}.out_proj.weight"], sd[f"{a}.out_proj.bias"], heads)
        c = layer_norm(x1, sd[f"ln_pa_2_{s}.weight"], sd[f"ln_pa_2_{s}.bias"])
        h = quick_gelu(linear(c, sd[f"mlp_pa_{s}.c_fc.weight"], sd[f"mlp_pa_{s}.c_fc.bias"]))
        return x1 + linear(h, sd[f"mlp_pa_{s}.c_proj.weight"], sd[f"mlp_pa_{s}.c_proj.bias"])

    new_v = side(vbar, tbar, "proj_t2v", "visual")
    new_t = side(tbar, vbar, "proj_v2t", "text")
    return new_v.unsqueeze(1).expand_as(visual), new_t.unsqueeze(1).expand_as(text)


def dafe(prev, task, gate, p, eps=1e-5):
    """p: dict of the module's parameters by name (norm.weight, gate_prev.weight, ... or alpha)."""
    if task.dim() == 2:
        task = task.unsqueeze(0).expand_as(prev)
    if gate == "scalar":
        g = torch.sigmoid(p["alpha"])
    else:
        h = layer_norm(prev, p["norm.weight"], p["norm.bias"], eps)
        g = torch.sigmoid(linear(h, p["gate_prev.weight"], p["gate_prev.bias"]) + linear(task, p["gate_task.weight"]))
    return g * prev + (1 - g) * task


def insert(x, prompts, start, ln_weight, ln_bias, eps, mode):
    """One sequence at a time, with torch.cat."""
    m = prompts.shape[-2]
    rows = []
    for n in range(x.shape[0]):
        s = int(start[n]) if isinstance(start, torch.Tensor) else start
        p = prompts if prompts.dim() == 2 else prompts[n]
        tail = x[n, s + m:] if mode == "replace" else x[n, s:]
        rows.append(torch.cat([x[n, :s], p, tail]))
    y = torch.stack(rows)
    if ln_weight is None and ln_bias is None:
        return y, None
    return y, layer_norm(y, ln_weight, ln_bias, eps)


def insert_packed(x, prompts, cu_seqlens, start, ln_weight, ln_bias, eps):
    """Packed sequences (T, D): each one cut out at its bounds, its rows replaced with torch.cat, packed again."""
    m = prompts.shape[-2]
    bounds = [int(c) for c in cu_seqlens]
    pieces = []
    for n in range(len(bounds) - 1):
        seq = x[bounds[n]:bounds[n + 1]]
        s = int(start[n]) if isinstance(start, torch.Tensor) else start
        p = prompts if prompts.dim() == 2 else prompts[n]
        pieces.append(torch.cat([seq[:s], p, seq[s + m:]]))
    y = torch.cat(pieces)
    if ln_weight is None and ln_bias is None:
        return y, None
    return y, layer_norm(y, ln_weight, ln_bias, eps)
