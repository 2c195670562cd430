"""GaLoreAdamW against a hand-written reference of the GaLore update, for both projection sides."""

import math

import pytest
import torch

from callbacks.core.galore import GaLoreAdamW


def reference_galore(w0: torch.Tensor, grads: list[torch.Tensor], lr: float, betas, eps: float, wd: float,
                     rank: int, gap: int, scale: float) -> torch.Tensor:
    """GaLore AdamW written out step by step (arXiv 2403.03507 Alg. 2, GaLore code's bias correction)."""
    w = w0.clone()
    m_rows, n_cols = w.shape
    r = min(rank, m_rows, n_cols)
    exp_avg = exp_avg_sq = None
    for t, g in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            u, s, vh = torch.linalg.svd(g, full_matrices=False)
            right = m_rows >= n_cols
            p = vh[:r, :] if right else u[:, :r]
        low = g @ p.T if right else p.T @ g
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low), torch.zeros_like(low)
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * low
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * low * low
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        n_low = exp_avg / (exp_avg_sq.sqrt() + eps)
        full = scale * (n_low @ p if right else p @ n_low)
        w = w * (1 - lr * wd)
        w = w - step_size * full
    return w


@pytest.mark.parametrize("shape", [(24, 10), (10, 24), (16, 16)], ids=["right", "left", "square"])
def test_update_matches_reference(shape):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(5)]
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, rank=4, update_proj_gap=2, scale=0.5)
    param = torch.nn.Parameter(w0.clone())
    opt = GaLoreAdamW([param], project_all_matrices=True, **kw)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected = reference_galore(w0, grads, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"], kw["rank"],
                                kw["update_proj_gap"], kw["scale"])
    torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6)
    state = opt.state[param]
    low_shape = (shape[0], 4) if shape[0] >= shape[1] else (4, shape[1])
    assert state["exp_avg"].shape == low_shape and state["exp_avg_sq"].shape == low_shape
    assert state["projector"].shape == ((4, shape[1]) if shape[0] >= shape[1] else (shape[0], 4))


def test_rank_is_clamped_and_unprojected_params_are_adamw():
    gen = torch.Generator().manual_seed(1)
    matrix, bias = torch.nn.Parameter(torch.randn(6, 3, generator=gen)), torch.nn.Parameter(torch.randn(6))
    twin_bias = torch.nn.Parameter(bias.detach().clone())
    opt = GaLoreAdamW([matrix, bias], lr=0.01, eps=1e-12, rank=256)
    opt.set_projected([matrix, bias])  # the 1-D bias is never projected
    ref = torch.optim.AdamW([twin_bias], lr=0.01, eps=1e-12, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn(6, generator=gen)
        matrix.grad, bias.grad, twin_bias.grad = torch.randn(6, 3, generator=gen), g.clone(), g.clone()
        opt.step()
        ref.step()
    assert opt.state[matrix]["projector"].shape == (3, 3)  # rank 256 clamped to min(6, 3)
    assert "projector" not in opt.state[bias]
    torch.testing.assert_close(bias.detach(), twin_bias.detach(), rtol=1e-5, atol=1e-6)


def test_projection_saves_optimizer_memory():
    big = torch.nn.Parameter(torch.zeros(64, 32))
    opt = GaLoreAdamW([big], rank=8, project_all_matrices=True)
    big.grad = torch.randn(64, 32)
    opt.step()
    floats = sum(v.numel() for v in opt.state[big].values())
    assert floats == 2 * 64 * 8 + 8 * 32 + 1  # two r-dim moments, the projector, the step


def test_argument_checks():
    with pytest.raises(ValueError, match="rank"):
        GaLoreAdamW([torch.nn.Parameter(torch.zeros(2, 2))], rank=0)
    with pytest.raises(ValueError, match="update_proj_gap"):
        GaLoreAdamW([torch.nn.Parameter(torch.zeros(2, 2))], update_proj_gap=0)


def test_bf16_weights_resume_with_their_float32_projector_and_moments():
    torch.manual_seed(0)
    grads = [torch.randn(6, 4).bfloat16() for _ in range(4)]

    def run(steps, weight, state=None):
        opt = GaLoreAdamW([weight], lr=1e-2, rank=2, update_proj_gap=2, project_all_matrices=True)
        if state is not None:
            opt.load_state_dict(state)
        for g in steps:
            weight.grad = g.clone()
            opt.step()
        return opt

    full = torch.nn.Parameter(torch.ones(6, 4, dtype=torch.bfloat16))
    run(grads, full)
    cut = torch.nn.Parameter(torch.ones(6, 4, dtype=torch.bfloat16))
    saved = run(grads[:2], cut).state_dict()
    resumed = torch.nn.Parameter(cut.detach().clone())
    opt = run(grads[2:], resumed, state=saved)  # before: torch's loader cast them to bf16, and the step failed
    assert {v.dtype for k, v in opt.state[resumed].items() if k != "step"} == {torch.float32}
    assert torch.equal(resumed, full)
