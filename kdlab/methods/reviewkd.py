"""Knowledge review, ReviewKD (Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge
Review", CVPR 2021, arXiv 2104.09044), as in the authors' CIFAR-100 code:

    F_s = (f_s,1, ..., f_s,n)   student stage outputs, shallow to deep; f_s,n = the penultimate
                                feature as a (C, 1, 1) map; F_t likewise for the teacher
    r_n, g_n = ABF_n(f_s,n)                          (the deepest stage: no fusion)
    r_j, g_j = ABF_j(f_s,j, g_{j+1})  for j = n-1 .. 1   (review: each stage fused with the
                                                          fused result of all deeper ones)
    L = w_ce * CE(s, y) + w * min(1, e / warmup) * sum_j HCL(r_j, f_t,j)

ABF_j (attention-based fusion): x = BN(conv1x1(f)) with m = min(512, C of f_s,n) channels;
with a deeper input g: g is nearest-upsampled to x's size, two attention maps
(a, b) = sigmoid(conv1x1([x, g])) give x = a * x + b * g; x is nearest-resized to the
teacher map's size; r = BN(conv3x3(x)) has the teacher's channels; g = x goes on to the next
shallower stage. HCL (hierarchical context loss) of two (C, H, W) maps:

    HCL(r, f) = [ MSE(r, f) + sum_{l in (4, 2, 1), l < H} w_l MSE(pool_l(r), pool_l(f)) ]
                / (1 + sum w_l),     w_l = 1/2, 1/4, 1/8 in turn,  pool_l = adaptive avg to l x l

e is the training epoch counted from 0 (the first epoch has no review loss, as in the
authors' loop); warmup = 20. w = 5 in the CIFAR-100 code for most pairs (8 for resnet32x4 ->
shufflenetv2, 0.6 for resnet56 -> resnet20, 1 for resnet110 -> resnet32: the CIFAR-100
experiment configs set it). State: ``epoch`` (for the warm-up), the ABF weights and their
output sizes (``out_sizes``). Stages: as in :mod:`kdlab.methods.at` (``auto``: the last stage
at each resolution, the deepest 4, matched to the deepest common count), plus the penultimate
feature. The ABF modules are built in ``setup`` from probed shapes and trained with the
student. Needs (B, C, H, W) stage features: MLPs are refused. One teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.features import PENULTIMATE
from .at import as_paths, check_layer_lists, matched_stages, probe_layers
from .base import Method, Outputs, cross_entropy, linear_warmup, require_teachers


class ABF(nn.Module):
    """Attention-based fusion of one student stage with the fused deeper stages."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                    nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1,
                                              bias=False),
                                    nn.BatchNorm2d(out_channels))
        self.attention = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
                          if fuse else None)
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, int]
                ) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=tuple(x.shape[2:]), mode="nearest")
            weights = self.attention(torch.cat([x, deeper], dim=1))
            x = x * weights[:, 0:1] + deeper * weights[:, 1:2]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.output(x), x


def hcl(student: Tensor, teacher: Tensor) -> Tensor:
    """Hierarchical context loss of one pair of (B, C, H, W) maps (formula in the docstring)."""
    student, teacher = student.float(), teacher.float()
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for level in (4, 2, 1):
        if level >= student.shape[2]:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, level),
                                          F.adaptive_avg_pool2d(teacher, level))
        total += weight
    return loss / total


def as_map(feature: Tensor) -> Tensor:
    """A (B, C) feature as a (B, C, 1, 1) map; maps unchanged; float32."""
    feature = feature.float()
    return feature[:, :, None, None] if feature.dim() == 2 else feature


class ReviewKD(Method):
    name = "reviewkd"
    description = "ReviewKD: CE + w * HCL between attention-fused student stages and teacher stages"

    def __init__(self, student_layers: str | list[str] = "auto",
                 teacher_layers: str | list[str] = "auto", weight: float = 5.0,
                 warmup_epochs: int = 20, ce_weight: float = 1.0, max_stages: int = 4,
                 max_mid_channels: int = 512):
        super().__init__()
        self.fixed = {"student": as_paths(student_layers), "teacher": as_paths(teacher_layers)}
        self.layers: dict[str, list[str]] | None = None  # resolved in setup()
        self.abfs: nn.ModuleList | None = None  # built in setup(), shallow to deep
        # The teacher's map size (H, W) per stage, the ABF output sizes; set with the ABFs.
        self.register_buffer("out_sizes", torch.zeros(0, 2, dtype=torch.long))
        self._sizes: list[tuple[int, int]] | None = None  # out_sizes as Python ints
        # The training epoch counted from 0; module state so a resumed run warms up alike.
        self.register_buffer("epoch", torch.tensor(0, dtype=torch.long))

    @property
    def student_features(self) -> tuple[str, ...]:
        return (*self.layers["student"], PENULTIMATE) if self.layers else ()

    @property
    def teacher_features(self) -> tuple[str, ...]:
        return (*self.layers["teacher"], PENULTIMATE) if self.layers else ()

    def check(self, student, teachers) -> None:
        require_teachers(self.name, len(teachers), exactly=1)
        check_layer_lists(self.name, student, teachers[0], self.fixed)

    def setup(self, ctx) -> None:
        """Resolve the layers and build the ABFs from probed shapes (each once: setup runs for
        every stage, and a checkpoint loaded before it may have brought the ABFs already)."""
        if self.layers is not None and self.abfs is not None:
            return
        self.check(ctx.student, ctx.teachers)
        shape = tuple(ctx.input_shape)
        models = {"student": ctx.student, "teacher": ctx.teachers[0]}
        shapes = {who: probe_layers(m, self.fixed[who], shape, (PENULTIMATE,))
                  for who, m in models.items()}
        self.layers = matched_stages(shapes, models, shape, self.max_stages, self.fixed)
        if self.abfs is not None:
            return
        s_shapes, t_shapes = ([shapes[who][p] for p in paths] for who, paths in
                              (("student", self.student_features),
                               ("teacher", self.teacher_features)))
        s_shapes[-1], t_shapes[-1] = (*s_shapes[-1], 1, 1), (*t_shapes[-1], 1, 1)
        mid = min(self.max_mid_channels, s_shapes[-1][0])
        last = len(s_shapes) - 1
        device = next(ctx.student.parameters()).device
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], fuse=j < last)
                                  for j, (s, t) in enumerate(zip(s_shapes, t_shapes,
                                                                 strict=True))).to(device)
        self.out_sizes = torch.tensor([t[1:] for t in t_shapes], dtype=torch.long,
                                      device=device)
        self._sizes = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A method that has not run setup() yet (e.g. DistillModule.load_from_checkpoint)
        # rebuilds its ABFs from the checkpoint's weight shapes.
        sizes = state_dict.get(prefix + "out_sizes")
        if self.abfs is None and sizes is not None and len(sizes):
            abfs = []
            for j in range(len(sizes)):
                mid, c_in = state_dict[f"{prefix}abfs.{j}.reduce.0.weight"].shape[:2]
                c_out = state_dict[f"{prefix}abfs.{j}.output.0.weight"].shape[0]
                fuse = f"{prefix}abfs.{j}.attention.0.weight" in state_dict
                abfs.append(ABF(c_in, mid, c_out, fuse))
            self.abfs = nn.ModuleList(abfs).to(sizes.device)
            self.out_sizes = torch.zeros_like(sizes, device=self.out_sizes.device)
        self._sizes = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_train_epoch_start(self, ctx) -> None:
        self.epoch.fill_(int(ctx.current_epoch))

    def warmup_factor(self) -> Tensor:
        return linear_warmup(self.epoch, self.warmup_epochs)

    def review(self, student_maps: list[Tensor]) -> list[Tensor]:
        """The ABF outputs r_1..r_n for the student maps f_s,1..f_s,n (shallow to deep)."""
        if self._sizes is None:  # read the buffer once, not every step (a host sync on GPUs)
            self._sizes = [tuple(size) for size in self.out_sizes.tolist()]
        results: list[Tensor] = [None] * len(student_maps)  # type: ignore[list-item]
        deeper = None
        for j in reversed(range(len(student_maps))):
            results[j], deeper = self.abfs[j](student_maps[j], deeper, self._sizes[j])
        return results

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers), exactly=1)
        if self.abfs is None:
            raise RuntimeError("reviewkd fusion modules are not built: setup(ctx) must run first")
        student_maps = [as_map(student.features[p]) for p in self.student_features]
        teacher_maps = [as_map(teachers[0].features[p]) for p in self.teacher_features]
        reviewed = self.review(student_maps)
        loss = sum(hcl(r, f) for r, f in zip(reviewed, teacher_maps, strict=True))
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, batch["target"]),
            "reviewkd": self.weight * self.warmup_factor() * loss,
        }
