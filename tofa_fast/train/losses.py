"""The TOFA loss terms (SPEC §7), each per subnet; the trainer sums them over the sandwich set.

For one subnet a with logits on a labelled batch, a strong unlabelled view and a weak unlabelled view:

* L_lab(a) = mean_i CE_ε(f_a(α(x_i)), y_i)                      (label smoothing ε = 0.1)
* L_FM(a)  = mean_j m_j · CE(f_a(𝒜(u_j)), ŷ_j)                  (FixMatch; m_j = [max q_j ≥ τ])
* L_KD(a)  = mean_j KL(q_j ‖ softmax f_a(α(u_j)))               (only for the two random subnets)

with q_j = softmax(f_max(α(u_j))) computed without gradient, ŷ_j = argmax q_j. Note the FixMatch
mean runs over *all* unlabelled samples (masked ones contribute zero), as in FixMatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import LOSS_VARIANTS  # noqa: F401  (the variants' names live in torch-free config)


@dataclass(frozen=True)
class PseudoLabels:
    probs: torch.Tensor  # q, (M, classes)
    labels: torch.Tensor  # ŷ, (M,)
    mask: torch.Tensor  # m, (M,) float 0/1


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses are computed in float32 from bf16/fp16 logits (mixed precision), in the logits' own
    precision otherwise (a float64 network keeps float64 end to end: the exactness tests rely on it)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


def pseudo_labels(teacher_logits: torch.Tensor, threshold: float = 0.95) -> PseudoLabels:
    probs = at_least_fp32(teacher_logits.detach()).softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    return PseudoLabels(probs, labels, (confidence >= threshold).to(probs.dtype))


def fixmatch_loss(strong_logits: torch.Tensor, pseudo: PseudoLabels) -> torch.Tensor:
    per_sample = F.cross_entropy(at_least_fp32(strong_logits), pseudo.labels, reduction="none")
    return (per_sample * pseudo.mask).mean()


def distillation_loss(student_logits: torch.Tensor, pseudo: PseudoLabels) -> torch.Tensor:
    log_p = at_least_fp32(student_logits).log_softmax(dim=1)
    return F.kl_div(log_p, pseudo.probs, reduction="batchmean")


def variant_terms(loss: str) -> tuple[bool, bool]:
    """(use FixMatch, use KD) for a loss variant name."""
    if loss not in LOSS_VARIANTS:
        raise ValueError(f"loss must be one of {list(LOSS_VARIANTS)}, got {loss!r}")
    return "fm" in loss, "kd" in loss
