"""The CPU peak-memory measurement (benches/peak_memory.py) on steps whose allocations are known."""

import torch

from .peak_memory import measured

MiB = 1 << 20
CPU = torch.device("cpu")


def test_peak_of_known_allocations_and_frees():
    """1 + 3 MiB held, 1 freed, 2 more: 5 MiB at the peak. A block allocated before the step and freed inside
    it neither adds to the figure nor lowers it."""
    before = torch.empty(8 * MiB, dtype=torch.uint8)
    with measured(CPU) as m:
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(3 * MiB, dtype=torch.uint8)
        del a
        del before
        c = torch.empty(2 * MiB, dtype=torch.uint8)
        del b, c
    assert m.peak_bytes == 5 * MiB
    with measured(CPU) as m:
        pass
    assert m.peak_bytes == 0


def test_peak_of_a_training_step_counts_the_backward():
    """loss = (x @ w).sum() with x (n, 16) and w (16, 1) trained: the forward allocates the (n, 1) product
    (4 MiB, freed once summed), the backward x.grad (n, 16) = 64 MiB, which outlives the step, beside at most
    the (n, 1) gradient of the product if the matmul materialises its stride-0 view. So the peak lies in
    [64, 68] MiB plus a few bytes of scalars, and doubling n doubles it."""
    def step(n):
        x = torch.randn(n, 16, requires_grad=True)
        w = torch.randn(16, 1, requires_grad=True)
        optimizer = torch.optim.SGD([x, w], lr=0.1)
        with measured(CPU) as m:
            (x @ w).sum().backward()
            optimizer.step()
        return m.peak_bytes

    for rows, expected in ((MiB, 64 * MiB), (2 * MiB, 128 * MiB)):  # x.grad: rows x 16 fp32
        peak = step(rows)
        assert expected <= peak <= expected + rows * 4 + 64 * 1024, (rows, peak / MiB)
