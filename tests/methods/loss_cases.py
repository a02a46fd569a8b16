"""Inputs shared by the loss tests: fixed random logits, and the edge cases each formula
must survive (temperature 1, one class dominant by a large margin, two classes)."""

from __future__ import annotations

import torch

# (name, classes, logit scale, temperature, dominant-class gap)
CASES = [
    ("random", 10, 3.0, 4.0, 0.0),
    ("temperature 1", 10, 3.0, 1.0, 0.0),
    ("dominant class", 10, 1.0, 4.0, 40.0),
    ("dominant class, T=1", 10, 1.0, 1.0, 40.0),
    ("two classes", 2, 3.0, 4.0, 0.0),
]


def make_inputs(classes: int, scale: float, gap: float, batch: int = 7, seed: int = 0,
                student_gap: bool = True, teacher_offset: int = 0):
    """Student logits, teacher logits, labels. With ``gap`` the student's label logit and
    the teacher's logit of class ``(y + teacher_offset) % classes`` get ``gap`` added
    (offset 1: the teacher is sure of another class)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, classes, generator=g) * scale
    t = torch.randn(batch, classes, generator=g) * scale
    y = torch.randint(0, classes, (batch,), generator=g)
    if gap:
        rows = torch.arange(batch)
        if student_gap:
            s[rows, y] += gap
        t[rows, (y + teacher_offset) % classes] += gap
    return s, t, y
