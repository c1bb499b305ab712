"""Activation-whitened factorisation (as in SVD-LLM) and carrying optimizer moments into the new factor basis.

A layer ``y = W x`` with input second moment ``C = E[x x^T] = L L^T`` loses ``||(W - W_r) L||_F^2`` of output energy
when ``W`` is replaced by a rank-``r`` ``W_r``. Plain SVD minimises ``||W - W_r||_F`` instead, which treats every input
direction alike; on a pretrained transformer most of the output energy sits in few input directions, and ranking by
the weights alone drops the wrong ones. The optimum is ``W_r = U_r U_r^T W`` with ``U`` the left singular vectors of
``W L``: a projection of the outputs, so nothing is amplified, and no inverse of ``L`` is ever formed.

The factors here, at full rank (they compute ``W`` exactly):

    first = S^{-1/2} U^T W        second = U S^{1/2}        (S: the singular values of W L)

so each hidden component ``h_i = first_i x`` has mean square ``S_i`` and the components are uncorrelated on the
calibration data; a component's share of the output energy is ``S_i^2``, and truncating the smallest is optimal.

The factors held before, ``(first0, second0)``, compute the same ``W``, so ``first = T first0`` and
``second = second0 T^{-1}`` with ``T = S^{-1/2} U^T second0``. Gradients transform with it (``g_first = T^{-T}
g_first0``, ``g_second = g_second0 T^T``), and so do an optimizer's running averages of gradients, exactly; running
averages of squared gradients are carried in the diagonal approximation (``(T^{-T})^2 v``, elementwise squares), which
keeps each element's step size on the scale the optimizer had learnt instead of restarting it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Input directions with less than this share of the strongest direction's energy count as having that much, so that
#: directions the calibration never saw (a rank-deficient or rounding-negative second moment) stay invertible.
DAMPING = 1e-6

#: Optimizer state entries that are running averages of gradients (they transform like a gradient) ...
LINEAR_STATES = frozenset({"exp_avg", "momentum_buffer", "grad_avg"})
#: ... and of squared gradients (carried in the diagonal approximation).
QUADRATIC_STATES = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})


@dataclass(frozen=True)
class Rebased:
    """New full-rank factors (``second @ first`` equals the old product) and what the change of basis needs."""

    first: torch.Tensor  # [rank, n]
    second: torch.Tensor  # [out, rank]
    singular_values: torch.Tensor  # of W L, descending: each component's output RMS on the calibration data
    transform: torch.Tensor  # T: first = T @ first0
    inverse: torch.Tensor  # T^{-1}: second = second0 @ T^{-1}


def whitened_factors(first0: torch.Tensor, second0: torch.Tensor, second_moment: torch.Tensor) -> Rebased:
    """Rebase the factors ``first0`` ``[rank, n]`` and ``second0`` ``[out, rank]`` on the SVD of ``W L`` where
    ``W = second0 @ first0`` and ``L L^T`` is ``second_moment`` (``E[x x^T]``, ``[n, n]``). float64 inside; the
    results have ``first0``'s dtype (``transform`` and ``inverse`` stay float64)."""
    rank, n = first0.shape
    if second0.shape[1] != rank or second_moment.shape != (n, n):
        raise ValueError(
            f"factors [{rank}, {n}] and [{second0.shape[0]}, {second0.shape[1]}] need a [{n}, {n}] second moment;"
            f" got {list(second_moment.shape)}"
        )
    f0, s0 = first0.double(), second0.double()
    weight = s0 @ f0
    moment = second_moment.double()
    eigenvalues, eigenvectors = torch.linalg.eigh((moment + moment.T) / 2)  # any L with L L^T = C gives the same U, S
    floor = DAMPING * max(float(eigenvalues[-1]), 1e-30)
    root_moment = eigenvectors * eigenvalues.clamp_min(floor).sqrt()[None, :]
    u, singular, _ = torch.linalg.svd(weight @ root_moment, full_matrices=False)
    u, singular = u[:, :rank], singular[:rank]  # out x rank: rank = min(out, n) for a factorisation from a dense layer
    floor = float(singular[0]) * 1e-12 if singular.numel() and float(singular[0]) > 0 else 1e-30
    root = singular.clamp_min(floor).sqrt()
    first = (u.T @ weight) / root[:, None]
    second = u * root[None, :]
    mixing = u.T @ s0  # [rank, rank]: T = S^{-1/2} U^T second0
    transform = mixing / root[:, None]
    inverse = torch.linalg.pinv(mixing, rtol=1e-10) * root[None, :]
    return Rebased(first.to(first0.dtype), second.to(second0.dtype), singular.float(), transform, inverse)


def carry_state(key: str, state: torch.Tensor, factor: str, rebased: Rebased) -> torch.Tensor | None:
    """An optimizer state entry ``key`` of factor ``"first"`` or ``"second"``, expressed in the rebased factors' basis;
    None when ``key`` is neither a running average of gradients nor of their squares (the caller decides)."""
    if key in LINEAR_STATES:
        power = 1
    elif key in QUADRATIC_STATES:
        power = 2
    else:
        return None
    flat = state.double().reshape(state.shape[0], -1) if factor == "first" else state.double()
    if factor == "first":  # g_first = T^{-T} g_first0
        matrix = rebased.inverse.T.to(flat.device)
        out = (matrix if power == 1 else matrix.square()) @ flat
    else:  # g_second = g_second0 T^T
        matrix = rebased.transform.T.to(flat.device)
        out = flat @ (matrix if power == 1 else matrix.square())
    return out.reshape(state.shape).to(state.dtype)
