"""Loss functions: pure functions of tensors (no modules, no state).

Conventions are stated where they differ from the reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaling.model.gather import gather_with_grad, world


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    gather: bool = True,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """NT-Xent (SimCLR eq. 1) over two views, with negatives from all workers.

    z1, z2: NxD projections of view 1 and view 2 of the same N local images.
    Each of the 2N local anchors has its other view as the positive and the
    other 2*N_global - 2 embeddings (both views, all workers) as negatives, plus
    every row of ``negatives`` (KxD, e.g. a memory queue; no gradient needed).
    With ``gather`` the embeddings of all workers are concatenated with
    gradients, so W workers with batch N compute the loss of one worker with
    batch W*N (see tests/test_losses.py).

    Returns the reference's value (tf2/objective.py): the mean over the N local
    anchors of view 1 plus the mean over those of view 2, i.e. 2x the "mean over
    2N anchors" convention. The scale matters: LARS adds weight decay to the
    gradient before its trust ratio, and BN/bias parameters take plain momentum
    steps, so the paper's learning rates and weight decay assume this sum.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be NxD; got {tuple(z1.shape)}, {tuple(z2.shape)}")
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    n = z1.shape[0]
    rank = world()[0] if gather else 0
    z1_all = gather_with_grad(z1) if gather else z1  # (W*N)xD
    z2_all = gather_with_grad(z2) if gather else z2
    targets = torch.arange(n, device=z1.device) + rank * n  # positives' columns
    # An anchor is never its own negative: mask the self-similarity column.
    self_mask = F.one_hot(targets, z1_all.shape[0]).bool()
    extra = None if negatives is None else F.normalize(negatives.detach(), dim=1)

    def direction(a: torch.Tensor, b_all: torch.Tensor, a_all: torch.Tensor) -> torch.Tensor:
        cross = a @ b_all.T / temperature  # Nx(W*N), positive on the diagonal block
        same = (a @ a_all.T / temperature).masked_fill(self_mask, float("-inf"))
        parts = [cross, same]
        if extra is not None:
            parts.append(a @ extra.T / temperature)  # NxK
        return F.cross_entropy(torch.cat(parts, dim=1), targets)

    return direction(z1, z2_all, z1_all) + direction(z2, z1_all, z2_all)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    labelled_logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """SimCLRv2 eq. 2: -sum_y P_T(y|x; tau) log P_S(y|x; tau), mean over x.

    The teacher is fixed (its logits are detached). With ``alpha > 0`` the loss
    is ``alpha * CE(labelled_logits, labels) + (1 - alpha) * distillation``,
    the paper's mix with the label loss on labelled examples (which may be a
    different batch from the unlabelled one).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r}; allowed: 0 <= alpha <= 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r}; allowed: > 0")
    p_teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    loss = -(p_teacher * log_p_student).sum(1).mean()
    if alpha == 0.0:
        return loss
    if labelled_logits is None or labels is None:
        raise ValueError("alpha > 0 needs labelled_logits and labels")
    return alpha * F.cross_entropy(labelled_logits, labels) + (1 - alpha) * loss
