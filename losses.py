"""The losses of the method, as small pure functions of tensors.

    L = L_cls + lambda * L_align + kappa * L_kd + mu * L_cons + beta * L_guide
    (the paper: lambda 1, kappa 0, beta 0)

- classification_loss: multi-label BCE on image labels (both networks).
- platt_scaling: after training, each network's logits fitted to the labels' scale.
- alignment_loss: the cross-architecture knowledge transfer, student map -> frozen teacher map.
- distillation_loss: the frozen teacher's image probabilities as the student's soft labels.
- guidance_loss: the same transfer one level down: the student's inner tokens pulled toward the
  teacher's inner features (locality guidance, Li et al. 2022).
- crop_consistency_loss: locality of the student's maps: a crop's map is that crop of the map
  (the default L_cons).
- consistency_loss: equivariance of the student's maps under flip + rescale (SEAM's ECR idea).
- segmentation_loss: stage 3, per-pixel cross-entropy on pseudo masks with an ignore label.
- LossConfig: lambda, kappa, mu, beta and the alignment's form (`train`'s flags);
  `wsss.student_loss` sums the terms with them.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import setting

ALIGN_KINDS = ("cosine", "l1", "l2")
ALIGN_REDUCES = ("global", "channel", "spatial")

def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label binary cross-entropy, averaged over images and classes.

    L_cls = -mean_{b,k} [ y_bk log s(z_bk) + (1 - y_bk) log(1 - s(z_bk)) ],  s = sigmoid.
    logits, labels: (B, K); labels are 0/1 floats.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

def platt_scaling(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Platt scaling (Platt 1999; per class, as temperature scaling in Guo et al. 2017): the
    scale a > 0 and bias c that minimise L_cls(a * z + c, y) over a split.

    logits z, labels y: (N, K) -> a, c: (K,). A monotone map of each logit: which images score
    higher does not change, only how sure the probabilities say the network is.
    """
    z, y = logits.detach().float(), labels.float()
    log_a = z.new_zeros(z.shape[1], requires_grad=True)  # a = exp(log_a) stays positive
    c = z.new_zeros(z.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([log_a, c], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = classification_loss(z * log_a.exp() + c, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_a.detach().exp(), c.detach()

def alignment_loss(student_map: torch.Tensor, teacher_map: torch.Tensor,
                   kind: str = "cosine", reduce: str = "global") -> torch.Tensor:
    """Knowledge transfer from the frozen teacher's map T to the student's map S.

    T is resized (bilinear) to S's grid and detached: no gradient reaches the teacher.
    S: (B, C, h, w); T: (B, C, H, W). With v(.) the vectors compared:
      cosine: L = mean over vectors of 1 - <v(S), v(T)> / (|v(S)| |v(T)|)  in [0, 2];
        reduce="global":  one vector a image, the flattened C*h*w map (the paper's best);
        reduce="channel": one vector a (image, channel), its h*w map, so a small object's
          channel weighs as much as the background's (an all-zero target channel, a class
          the image lacks, adds a constant 1 and no gradient);
        reduce="spatial": one vector a (image, location), its C channel values.
      l1: L = mean |S - T|;  l2: L = mean (S - T)^2  (over all elements: every reduction
        of an element-wise distance gives this same mean).
    """
    if kind not in ALIGN_KINDS:
        raise ValueError(f"kind must be one of {ALIGN_KINDS}, got {kind!r}")
    if reduce not in ALIGN_REDUCES:
        raise ValueError(f"reduce must be one of {ALIGN_REDUCES}, got {reduce!r}")
    s = student_map.float()
    t = F.interpolate(teacher_map.detach().float(), size=s.shape[-2:], mode="bilinear",
                      align_corners=False)
    if kind != "cosine":
        return F.l1_loss(s, t) if kind == "l1" else F.mse_loss(s, t)
    B, C = s.shape[:2]
    if reduce == "global":
        s, t = s.reshape(B, -1), t.reshape(B, -1)  # (B,C,h,w) -> (B, C*h*w)
    elif reduce == "channel":
        s, t = s.reshape(B, C, -1), t.reshape(B, C, -1)  # (B,C,h,w) -> (B, C, h*w)
    else:  # spatial: compare along the channel dimension
        s, t = s.reshape(B, C, -1).transpose(1, 2), t.reshape(B, C, -1).transpose(1, 2)
    return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()

ALIGN_TARGETS = ("raw", "pair")

def alignment_target(teacher_map: torch.Tensor, labels: torch.Tensor, target: str = "raw",
                     power: float = 1.0) -> torch.Tensor:
    """What the student's map is pulled toward. teacher_map: (B, K, H, W); labels: (B, K).

    target="raw": T itself, (B, K, H, W) raw class maps (the paper's code); the student's
      class channels are compared with it.
    target="pair": (B, 1+K, H, W) = (1 - max_k t_k, t_1..t_K) with t = (n(T) * y)^power,
      n = ReLU + per-map max normalisation, y the image label: a normalised (background,
      foreground) pair, gated by the label, so a smoke-free image asks for all background, and
      its shape is carried by the background channel instead of an all-negative map. A power
      above 1 sharpens it: the teacher's weak responses fall faster than its peak (0.3 -> 0.09
      squared), so where the teacher is unsure it pulls the student less.
    """
    if target not in ALIGN_TARGETS:
        raise ValueError(f"target must be one of {ALIGN_TARGETS}, got {target!r}")
    if target == "raw":
        return teacher_map
    fg = normalize_maps(teacher_map, labels) ** power
    bg = 1 - fg.amax(dim=1, keepdim=True)
    return torch.cat([bg, fg], dim=1)

def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Soft distillation of the teacher's image-level decision (Hinton et al. 2015; DeiT's soft
    variant, for multi-label sigmoids):

    L_kd = mean_{b,k} BCE(s(z^S_bk), s(z^T_bk)),  s = sigmoid; both (B, K), the teacher's
    detached, so the student learns what the frozen teacher believes, not only the label.
    """
    return classification_loss(student_logits, torch.sigmoid(teacher_logits.detach().float()))

def guidance_loss(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]
                  ) -> torch.Tensor:
    """Feature-level locality guidance (Li et al., ECCV 2022): the CNN's features, which see
    only a neighbourhood, guide the ViT's inner tokens, which a small dataset leaves unshaped.

    L_guide = mean_j mean_{b,p} 1 - cos(P_j[b, :, p], F_j[b, :, p])
    P_j: (B, C_j, h, w), a student block's patch tokens through its own 1x1 projection;
    F_j: (B, C_j, H, W), the frozen teacher's stage j, detached and resized (bilinear) to (h, w).
    """
    total = 0.0
    for s, t in zip(student_features, teacher_features, strict=True):
        t = F.interpolate(t.detach().float(), size=s.shape[-2:], mode="bilinear",
                          align_corners=False)
        total = total + (1 - F.cosine_similarity(s.float(), t, dim=1, eps=1e-8)).mean()
    return total / len(student_features)

def flip_and_resize(x: torch.Tensor, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """The augmentation of the consistency loss: bilinear resize to `size`, then an optional
    horizontal flip. x: (B, C, H, W) -> (B, C, *size). Applied to images and to maps alike."""
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.flip(-1) if flip else x

def normalize_maps(maps: torch.Tensor, labels: torch.Tensor | None = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """ReLU, then divide each (image, class) map by its maximum (+ eps): (B,C,h,w) -> [0, 1].
    With labels (B, C) multi-hot, the maps of classes an image lacks are zeroed (label gating:
    the image label is known for training images, as in every WSSS pipeline)."""
    maps = F.relu(maps.float())
    maps = maps / (maps.amax(dim=(2, 3), keepdim=True) + eps)
    return maps if labels is None else maps * labels[:, :, None, None].to(maps)

def consistency_loss(map_of_transformed: torch.Tensor, transformed_map: torch.Tensor
                     ) -> torch.Tensor:
    """Equivariance of the maps under an augmentation A (flip + rescale), SEAM-style:

    L_cons = mean | n(M(A(x))) - n(A(M(x))) |,  n = ReLU + per-map max normalisation.

    map_of_transformed: M(A(x)), (B, C, h, w), the maps of the augmented image;
    transformed_map: A(M(x)), (B, C, h', w'), the maps of the image put through A; it is
    resized to (h, w) when the grids differ. Gradients flow into both (both are the student's).
    """
    target = transformed_map
    if target.shape[-2:] != map_of_transformed.shape[-2:]:
        target = F.interpolate(target, size=map_of_transformed.shape[-2:], mode="bilinear",
                               align_corners=False)
    return F.l1_loss(normalize_maps(map_of_transformed), normalize_maps(target))

def crop_consistency_loss(map_of_crop: torch.Tensor, crop_of_map: torch.Tensor) -> torch.Tensor:
    """Locality of the maps: a crop's map equals that crop of the whole image's map.

    L_cons = mean | s(M(C(x))) - s(C(M(x))) |,  s = sigmoid, C a patch-aligned crop.

    The sigmoid keeps each location's score in the classifier's own units (the logit of a CAM
    classifier pools these maps), so a map lit by evidence outside the crop is penalised; max
    normalisation would hide it. Both (B, C, h, w); gradients flow into both.
    """
    return F.l1_loss(torch.sigmoid(map_of_crop.float()), torch.sigmoid(crop_of_map.float()))

def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore: int) -> torch.Tensor:
    """Stage 3: per-pixel cross-entropy on (pseudo) masks, averaged over labelled pixels.

    L_seg = -1/|V| sum_{p in V} log softmax(z_p)[y_p],  V = pixels with y_p != ignore
    (postprocess.IGNORE). logits: (B, K+1, H, W); target: (B, H, W) class indices. 0 when no
    pixel is labelled (a batch of all-ignore masks), not the NaN of an empty mean.
    """
    total = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore, reduction="sum")
    return total / (target != ignore).sum().clamp(min=1)

@dataclass
class LossConfig:
    align_weight: float = setting(3.0, "lambda, the weight of L_align (1: the paper's; 0 with "
                                  "kappa 0: the student alone)", at_least=0)
    align_kind: str = setting("cosine", "distance of L_align: cosine (the paper), l1 or l2",
                              choices=ALIGN_KINDS)
    align_reduce: str = setting(
        "channel", "cosine over the whole map (global, the paper), each channel's map, or each "
        "location's channels (spatial)", choices=ALIGN_REDUCES)
    align_target: str = setting(
        "pair", "raw: the teacher's raw class map (the paper's code); pair: its normalised, "
        "label-gated (background, smoke) pair", choices=ALIGN_TARGETS)
    align_power: float = setting(1.0, "gamma: the pair target's smoke map is raised to this "
                                 "power, so that the teacher's weak responses pull less (1: the "
                                 "map as it is; 2: the squared preset's)", above=0)
    distill_weight: float = setting(1.0, "kappa, the weight of L_kd, the teacher's image "
                                    "probabilities as soft labels (0: off, the paper; 1 picked "
                                    "on the synthetic validation split)", at_least=0)
    consistency_weight: float = setting(1.0, "mu, the weight of L_cons", at_least=0)
    guide_weight: float = setting(0.0, "beta, the weight of L_guide: evenly spaced blocks of "
                                  "the student (2, 4, 6 of 6) pulled toward the teacher's "
                                  "layer2-4 features (Li et al. 2022; 0: off, the paper)",
                                  at_least=0)
    consistency_scale: float = setting(0.75, "side of L_cons's view, a share of the image's",
                                       above=0)
    consistency_view: str = setting(
        "crop", "L_cons's view: crop (a flipped crop, sigmoids compared: a location's score may "
        "not depend on what lies outside the crop; picked on the synthetic validation split) or "
        "rescale (the whole image flipped and rescaled, maps compared max-normalised)",
        choices=("crop", "rescale"))
