"""Distillation from the dense teacher (method.md §2.8).

The teacher is free: the same model with every gate forced open (core.gates.gates_open),
run without gradient on the same batch. With ``trainable: "gates+lora"`` the teacher
includes the current LoRA update and head, so it is "the dense model as adapted so far";
with gates only it is exactly the pretrained model.

The loss is the temperature-scaled KL(teacher || student) of the next-token (or class)
distributions, times T^2 (Hinton et al.) so its gradient scale does not depend on T,
averaged over the positions that carry a label.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.gates import gates_open


@torch.no_grad()
def teacher_logits(model: nn.Module, batch: Mapping[str, Tensor], autocast) -> Tensor:
    """Logits of the dense teacher: gates open, no gradient, no state left behind.

    The model's train/eval mode is kept (dropout, if any, runs as in the student's pass);
    only the gates change, and they are restored on exit whatever happens.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with gates_open(model), autocast():
        return model(**inputs).logits.detach().float()


def kl_loss(student: Tensor, teacher: Tensor, labels: Tensor | None, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) averaged over labelled positions.

    Sequence logits (B, L, V) are compared at the positions that predict a label
    (labels[:, 1:] != -100, the same shift as the LM loss); class logits (B, C) per example.
    """
    s = student.float()
    t = teacher.float()
    if s.dim() == 3:
        s, t = s[:, :-1], t[:, :-1]
        if labels is not None:
            keep = labels[:, 1:] != -100
            s, t = s[keep], t[keep]
        else:
            s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    if s.numel() == 0:
        return student.sum() * 0.0
    T = float(temperature)
    logp_s = F.log_softmax(s / T, dim=-1)
    logp_t = F.log_softmax(t / T, dim=-1)
    kl = F.kl_div(logp_s, logp_t, log_target=True, reduction="batchmean")
    return kl * (T * T)
