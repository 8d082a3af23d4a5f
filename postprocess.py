"""From class activation maps to pseudo masks, and the masks' scores.

Functions of tensors (images, CAMs, probabilities) and of trained networks, batched, on any
device:  multiscale_cam -> (coverage_fix) -> [losses.normalize_maps] -> cams_to_probs ->
(dense_crf) -> probs_to_mask;  Scores counts a mask against the ground truth. A run's read-out
settings (CamConfig, RefineConfig) drive them in two calls: batch_cams, then pseudo_mask.
"""

import copy
import functools
import importlib
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import resize
from torchvision.utils import draw_segmentation_masks, make_grid

import losses
import models
from models import SHARE, setting


IGNORE = 255  # mask value for "do not score this pixel" (faint plume edges, ambiguous pixels)

# -----------------------------------------------------------------------------
# CAMs: several input scales and the flipped input, summed

def multiscale_cam(cam_fn, images: torch.Tensor, scales: tuple[float, ...], flip: bool,
                   multiple: int) -> torch.Tensor:
    """Sum of ReLU'd CAMs over input scales (and the flipped input), at the input size.
    Scaled sides are rounded to a multiple of `multiple` (the student's patch size).
    cam_fn: (B,3,h,w) -> (B,K,h',w'); images (B,3,H,W) -> (B,K,H,W)."""
    B, _, H, W = images.shape
    total = None
    for scale in scales:
        size = (max(multiple, round(H * scale / multiple) * multiple),
                max(multiple, round(W * scale / multiple) * multiple))
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            cam = F.relu(cam_fn(x.flip(-1) if flipped else x))
            cam = cam.flip(-1) if flipped else cam
            cam = F.interpolate(cam, size=(H, W), mode="bilinear", align_corners=False)
            total = cam if total is None else total + cam
    return total

def cams_to_probs(cams: torch.Tensor, background: str = "threshold", threshold: float = 0.3,
                  alpha: float = 48.0) -> torch.Tensor:
    """Normalised CAMs (B, K, H, W) -> scores with background first, (B, 1+K, H, W).

    background="threshold": a constant background score `threshold` (the paper's 0.3): a pixel
      is foreground where some class map exceeds it.
    background="power": (1 - max_k cam)^alpha, AffinityNet's CRF background (the paper: 48).
    The scores are renormalised to sum to one per pixel, so they can serve as CRF unaries.
    """
    if background == "threshold":
        bg = torch.full_like(cams[:, :1], threshold)
    elif background == "power":
        bg = (1 - cams.amax(dim=1, keepdim=True)).clamp(min=0) ** alpha
    else:
        raise ValueError(f"background must be 'threshold' or 'power', got {background!r}")
    scores = torch.cat([bg, cams], dim=1)
    return scores / scores.sum(dim=1, keepdim=True).clamp(min=1e-8)

def probs_to_mask(probs: torch.Tensor) -> torch.Tensor:
    """(B, 1+K, H, W) probabilities -> (B, H, W) uint8 class indices (0 = background)."""
    return probs.argmax(dim=1).to(torch.uint8)

# -----------------------------------------------------------------------------
# Dense CRF (Krähenbühl & Koltun, NIPS 2011) with the permutohedral lattice
# (Adams, Baek & Davis, Eurographics 2010), following densecrf's conventions so that pydensecrf
# settings carry over: features x/sxy, y/sxy (and r/srgb, g/srgb, b/srgb for the bilateral
# kernel), symmetric kernel normalisation, Potts compatibility, unary -log(prob).

def _simplices(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points f (P, d) -> the enclosing simplex of each: its remainder-0 vertex rem0 (P, d+1),
    the rank of each coordinate (P, d+1) and the barycentric weights (P, d+1) (Adams et al.
    2010, pp. 5-10, as densecrf computes them)."""
    P, d = f.shape
    device = f.device
    # Elevate onto the hyperplane sum = 0 of R^(d+1) (p.5 of Adams et al.), scaled so the
    # lattice blur has the standard deviation of the Gaussian (p.6).
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    i = torch.arange(1, d + 1, device=device, dtype=torch.float32)
    cf = f * (inv_std / torch.sqrt(i * (i + 1)))  # (P, d)
    elevated = torch.empty(P, d + 1, device=device)
    running = torch.zeros(P, device=device)  # summed from the last feature, as densecrf
    for j in range(d, 0, -1):
        elevated[:, j] = running - j * cf[:, j - 1]
        running = running + cf[:, j - 1]
    elevated[:, 0] = running
    # The nearest remainder-0 lattice point, then the simplex through a sort (the rank).
    v = elevated / (d + 1)
    up, down = torch.ceil(v) * (d + 1), torch.floor(v) * (d + 1)
    rem0 = torch.where(up - elevated < elevated - down, up, down)
    total = torch.round(rem0.sum(1) / (d + 1)).long()  # (P,)
    # rank[a] = place of coordinate a in the descending order of elevated - rem0, ties to
    # the lower index, as densecrf's pairwise comparison counts it:
    # rank[a] = #{b: diff_b > diff_a} + #{b < a: diff_b == diff_a}.
    diff = elevated - rem0
    rank = torch.zeros(P, d + 1, dtype=torch.uint8, device=device)
    for k in range(d + 1):  # d+1 small comparisons beat one (P, d+1, d+1) tensor
        rank += diff[:, k:k + 1] > diff
        rank[:, k + 1:] += diff[:, k:k + 1] == diff[:, k + 1:]
    rank = rank.long() + total[:, None]
    wrap = (rank < 0).long() - (rank > d).long()  # bring the point back onto the plane
    rank = rank + wrap * (d + 1)
    rem0 = rem0.long() + wrap * (d + 1)
    # Barycentric coordinates (p.10).
    b = (elevated - rem0) / (d + 1)
    bary = torch.zeros(P, d + 2, device=device)
    bary.scatter_add_(1, d - rank, b)
    bary.scatter_add_(1, d - rank + 1, -b)
    bary[:, 0] += 1 + bary[:, d + 1]
    return rem0, rank, bary[:, : d + 1]

def _vertex_codes(rem0: torch.Tensor, rank: torch.Tensor, B: int, N: int):
    """The integer key of each simplex vertex (P, d+1), the key's strides, and the index
    dtype. Vertex r has key rem0 + canonical[r, rank] (first d coordinates; the last is
    implied by sum = 0), encoded with its image in one integer, with room for the +-d steps
    of the blur."""
    P, d = rem0.shape[0], rem0.shape[1] - 1
    device = rem0.device
    low = rem0[:, :d].amin(0) - 2 * (d + 1)
    span = rem0[:, :d].amax(0) + 2 * (d + 1) - low + 1
    strides = torch.cumprod(torch.cat([span.new_ones(1), span]), 0)  # (d+1,)
    if float(strides[-1]) * B >= 2 ** 62:
        raise ValueError("features span too wide a lattice; filter fewer images at once")
    # int32 where the codes fit: half the memory traffic, and sorting is twice as fast.
    small = float(strides[-1]) * B < 2 ** 31
    code_type = torch.int32 if small else torch.long
    index_type = torch.int32 if P * (d + 1) < 2 ** 31 else torch.long
    strides = strides.to(code_type)
    image = torch.arange(B, device=device, dtype=code_type).repeat_interleave(N)
    base = ((rem0[:, :d] - low).to(code_type) * strides[:d]).sum(1, dtype=code_type)
    base += image * strides[d]  # (P,)
    # The canonical offset of coordinate k at vertex r is r, minus d+1 where
    # rank_k > d - r; summed with the strides: r * sum(s) - (d+1) * W[d - r], with
    # W[t] = sum of s_k over the stored coordinates k whose rank exceeds t.
    by_rank = torch.zeros(P, d + 1, dtype=code_type, device=device)
    by_rank.scatter_(1, rank[:, :d], strides[:d].expand(P, d))  # W[t] = above[:, t]
    above = by_rank.sum(1, keepdim=True, dtype=code_type) - by_rank.cumsum(1, dtype=code_type)
    r = torch.arange(d + 1, device=device, dtype=code_type)
    codes = base[:, None] + r * strides[:d].sum(dtype=code_type) - (d + 1) * above.flip(1)
    return codes, strides, index_type

class PermutohedralLattice:
    """Approximate Gaussian filtering  out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j  of all points
    of one or more images at once, in O(N d^2) instead of O(N^2).

    Each point is splatted onto the d+1 vertices of its enclosing simplex of the permutohedral
    lattice (barycentric weights), the lattice is blurred with [1/2, 1, 1/2] along each of its
    d+1 axes, and values are sliced back. The three steps are sparse matrices built once per
    feature set, so filtering is a few sparse products on any device.
    features: (B, N, d) float; `filter` maps (B, N, C) values to (B, N, C).
    """

    def __init__(self, features: torch.Tensor):
        B, N, d = features.shape
        self.shape, self.d = (B, N), d
        device = features.device
        P = B * N
        rem0, rank, bary = _simplices(features.reshape(P, d).float())
        codes, strides, index_type = _vertex_codes(rem0, rank, B, N)
        # Unique vertices by one sort; its permutation also orders the splat matrix's rows.
        sorted_codes, order = torch.sort(codes.reshape(-1))
        new = torch.ones_like(sorted_codes, dtype=torch.bool)
        new[1:] = sorted_codes[1:] != sorted_codes[:-1]
        lattice = sorted_codes[new]
        m = lattice.numel()
        vertex = torch.cumsum(new, 0, dtype=index_type) - 1  # lattice index of sorted entries
        order = order.to(index_type)
        index = torch.empty_like(vertex).scatter_(0, order, vertex)
        weights = bary.reshape(-1)
        # Splat (M x P) and slice (P x M) matrices with the barycentric weights.
        point = torch.div(order, d + 1, rounding_mode="floor")
        # Lattice vertex m is an always-zero slot that stands for absent blur neighbours.
        self.splat_matrix = _csr(torch.bincount(vertex, minlength=m + 1), point,
                                 weights[order], (m + 1, P))
        self.slice_matrix = _csr(torch.full((P,), d + 1, device=device), index, weights,
                                 (P, m + 1))
        # Blur along axis j: a vertex and its two neighbours, key -/+ (1, ..., 1, -d, 1, ...)
        # (-d on axis j; axis d is implicit, so there every stored coordinate moves by 1).
        rows = torch.arange(m, device=device, dtype=index_type)
        three = torch.cat([torch.full((m,), 3, device=device), torch.zeros(1, device=device)])
        values = torch.tensor([1.0, 0.5, 0.5], device=device).repeat(m)
        self.blurs = []
        for j in range(d + 1):
            step = -strides[:d].sum() + ((d + 1) * strides[j] if j < d else 0)
            n1 = _find(lattice, lattice + step).to(index_type)
            # The opposite neighbour is the inverse map: n1[a] = b  <=>  n2[b] = a.
            # (absent neighbours all write the extra slot m, which is dropped).
            n2 = torch.full((m + 1,), m, dtype=index_type, device=device)
            n2[n1] = rows
            n2 = n2[:m]
            cols = torch.stack([rows, n1, n2], dim=1).reshape(-1)  # (3M,), m where absent
            self.blurs.append(_csr(three.to(index_type), cols, values, (m + 1, m + 1)))
        self.alpha = 1.0 / (1 + 2.0 ** -d)  # densecrf's scale of the lattice's blur
        self.m = m

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C). A lattice of one image filters a batch on the same grid."""
        B, N, C = values.shape
        if self.shape[0] == 1 and B > 1:  # the images as channels: (B,N,C) -> (N, B*C)
            return self.filter(values.permute(1, 0, 2).reshape(1, N, B * C)).reshape(
                N, B, C).permute(1, 0, 2)
        grid = self.splat_matrix @ values.reshape(B * N, C).float()  # (M, C)
        for blur in self.blurs:
            grid = blur @ grid
        return (self.slice_matrix @ grid).reshape(B, N, C) * self.alpha

    def scaled(self, after: torch.Tensor, before: torch.Tensor | None = None
               ) -> "PermutohedralLattice":
        """The same filter with per-point factors folded in: v -> after * K(before * v).
        after, before: (B, N, 1) for a lattice of B images of N points."""
        out = copy.copy(self)
        splat, slice_ = self.splat_matrix, self.slice_matrix
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.slice_matrix = torch.sparse_csr_tensor(  # rows are points, d+1 entries each
                slice_.crow_indices(), slice_.col_indices(),
                (slice_.values().reshape(-1, self.d + 1) * after.reshape(-1, 1)).reshape(-1),
                slice_.shape)
            if before is not None:  # columns are points: a gather, worth it for cached kernels
                out.splat_matrix = torch.sparse_csr_tensor(
                    splat.crow_indices(), splat.col_indices(),
                    splat.values() * before.reshape(-1)[splat.col_indices()], splat.shape)
        return out

def _find(sorted_codes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Index of each code in the sorted array, or its length where the code is absent."""
    n = sorted_codes.numel()
    pos = torch.searchsorted(sorted_codes, codes).clamp(max=n - 1)
    return torch.where(sorted_codes[pos] == codes, pos, torch.full_like(pos, n))

def _csr(counts: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
         size: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR matrix from row-ordered entries and the number of entries of each row."""
    crow = torch.zeros(size[0] + 1, dtype=cols.dtype, device=cols.device)
    crow[1:] = torch.cumsum(counts, 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is used plainly here
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, size)

def pixel_features(image: torch.Tensor | None, shape: tuple[int, int, int], sxy: float,
                   srgb: float | None = None) -> torch.Tensor:
    """Per-pixel kernel features (x/sxy, y/sxy[, r/srgb, g/srgb, b/srgb]), densecrf's order:
    (B, H*W, 2 or 5) for a (B, H, W) grid; `image` (B, 3, H, W) 0..255 for the bilateral."""
    B, H, W = shape
    device = image.device if image is not None else None
    y, x = torch.meshgrid(torch.arange(H, device=device, dtype=torch.float32),
                          torch.arange(W, device=device, dtype=torch.float32), indexing="ij")
    xy = torch.stack([x, y], dim=-1).reshape(1, H * W, 2).expand(B, -1, -1) / sxy
    if srgb is None:
        return xy
    rgb = image.float().reshape(B, 3, H * W).transpose(1, 2) / srgb  # (B,3,H,W) -> (B,HW,3)
    return torch.cat([xy, rgb], dim=-1)

def _kernel_norm(lattice: PermutohedralLattice) -> torch.Tensor:
    """densecrf's symmetric normalisation n = 1 / sqrt(K 1), (B, N, 1)."""
    B, N = lattice.shape
    ones = torch.ones(B, N, 1, device=lattice.splat_matrix.device)
    return lattice.filter(ones).clamp(min=1e-20).rsqrt()

@functools.lru_cache(maxsize=8)
def _position_kernel(h: int, w: int, sxy: float, weight: float, device: str):
    """The position-only kernel, normalised and weighted, depends on the grid alone: built
    once per size, shared by every image and batch of that size."""
    lattice = PermutohedralLattice(pixel_features(None, (1, h, w), sxy).to(device))
    norm = _kernel_norm(lattice)
    return lattice.scaled(weight * norm, norm)

def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last (short, label) dimension; spelled out because the library kernel
    is several times slower on a dimension of 2 to 21 labels."""
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp_()
    return e / e.sum(dim=-1, keepdim=True)

def dense_crf(image: torch.Tensor, prob: torch.Tensor, *, iters: int = 10,
              sxy_gaussian: float = 3, compat_gaussian: float = 3, sxy_bilateral: float = 80,
              srgb: float = 13, compat_bilateral: float = 10) -> torch.Tensor:
    """Mean-field inference of the fully connected CRF with Potts compatibility.

    Same parameters as pydensecrf's DenseCRF2D: unary -log(prob) (probabilities clipped at
    1e-5, as its unary_from_softmax), addPairwiseGaussian(sxy, compat) and
    addPairwiseBilateral(sxy, srgb, rgbim, compat), symmetric normalisation. The defaults are
    the DeepLab values of WSSS code, for ~500 px photographs; the read-out passes RefineConfig's,
    for 128 px. The update is

        Q <- softmax( log prob + sum_m w_m n_m * K_m (n_m * Q) ),   n_m = 1/sqrt(K_m 1),

    with K_m the Gaussian kernels filtered on the permutohedral lattice, as densecrf does.
    Approximation error: the lattice's raw response differs from the exact Gaussian sum by
    ~16 % (position kernel) and up to ~90 % at isolated colour points, but after
    normalisation and mean field it is small: on 12x12 test scenes one update differs from the
    exact float64 update by < 0.1 in probability and ten updates by < 0.01, with identical
    labels (test_wsss.py); on real photographs our labels equal pydensecrf's (`bench crf`).
    image: (B, 3, H, W) or (3, H, W) uint8; prob: (B, C, H, W) or (C, H, W) float.
    Returns the refined probabilities, same shape, on the inputs' device.
    """
    unbatched = prob.dim() == 3
    if unbatched:
        image, prob = image[None], prob[None]
    B, C, H, W = prob.shape
    if image.shape[0] != B or image.shape[-2:] != prob.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and prob {tuple(prob.shape)} differ")
    unary = torch.log(prob.float().clamp(1e-5, 1.0)).reshape(B, C, H * W).transpose(1, 2)
    unary = unary.contiguous()  # (B, HW, C), labels innermost
    bilateral = PermutohedralLattice(pixel_features(image.to(prob.device), (B, H, W),
                                                    sxy_bilateral, srgb))
    # Normalisation and weights folded into the filters where it is cheap: w n * K(n * q).
    position = _position_kernel(H, W, float(sxy_gaussian), float(compat_gaussian),
                                str(prob.device))
    norm = _kernel_norm(bilateral)
    bilateral = bilateral.scaled(compat_bilateral * norm)
    q = _softmax(unary)  # (B, HW, C)
    for _ in range(iters):
        logits = unary + position.filter(q)
        logits += bilateral.filter(norm * q)
        q = _softmax(logits)
    q = q.transpose(1, 2).reshape(B, C, H, W)  # (B,HW,C) -> (B,C,H,W)
    return q[0] if unbatched else q

# -----------------------------------------------------------------------------
# Coverage: expand partial CAMs along affinities (a SAM-free fix for incomplete masks)

def attention_affinity(attentions: list[torch.Tensor], beta: float = 2.0) -> torch.Tensor:
    """Patch-to-patch transition matrix from a ViT's attention maps (TransCAM, AFA):
    average heads and blocks, drop the class token, symmetrise, sharpen by the power beta,
    and normalise rows to sum to one.  attentions: list of (B, heads, 1+N, 1+N) -> (B, N, N)."""
    a = torch.stack([x[:, :, 1:, 1:].float().mean(1) for x in attentions]).mean(0)  # (B,N,N)
    a = (a + a.transpose(1, 2)) / 2
    # Each row scaled to a maximum of 1 first (the normalised result is the same): attention
    # weights near 1/N would underflow to 0 under a large beta.
    a = (a / a.amax(dim=2, keepdim=True).clamp(min=1e-30)) ** beta
    return a / a.sum(dim=2, keepdim=True)

def random_walk(cams: torch.Tensor, transition: torch.Tensor, steps: int = 2) -> torch.Tensor:
    """Propagate CAMs along a transition matrix (AffinityNet's random walk, Ahn & Kwak 2018):
    cam <- cam T^steps on the patch grid.  cams: (B, K, h, w); transition: (B, h*w, h*w)."""
    B, K, h, w = cams.shape
    flat = cams.reshape(B, K, h * w)  # (B,K,h,w) -> (B,K,N)
    for _ in range(steps):
        flat = flat @ transition.transpose(1, 2)  # each patch gathers from its neighbours
    return flat.reshape(B, K, h, w)

def coverage_fix(student, images: torch.Tensor, cams: torch.Tensor, steps: int = 2,
                 beta: float = 2.0) -> torch.Tensor:
    """The coverage fix: CAMs (B,K,H,W) pooled to the student's patch grid, walked `steps`
    times over its attention affinities (sharpened by `beta`), and brought back to (H, W)."""
    p = student.backbone.patch_size
    h, w = images.shape[2] // p, images.shape[3] // p
    with torch.no_grad():
        _, attentions = student.backbone.forward_features(images, return_attn=True)
    transition = attention_affinity(attentions, beta)
    grid = F.adaptive_avg_pool2d(F.relu(cams.float()), (h, w))
    walked = random_walk(grid, transition, steps)
    return F.interpolate(walked, size=cams.shape[-2:], mode="bilinear", align_corners=False)

# -----------------------------------------------------------------------------
# The read-out of a run (its --flags): batch_cams -> pseudo_mask

@dataclass
class CamConfig:
    cam_network: str = setting("student", "whose CAMs become pseudo masks",
                               choices=("student", "teacher"))
    cam_method: str = setting("proj", "the student's CAM: gradcam (Grad-CAM of its last block, "
                              "the paper) or proj (its projected class map, the map L_align "
                              "trains)", choices=("proj", "gradcam"))
    cam_scales: tuple[float, ...] = setting((1.0,), "input scales summed (the paper: 0.5 1 1.5 "
                                            "2)", above=0)
    cam_flip: bool = setting(True, "also sum the mirrored input's CAM")
    threshold: float = setting(0.4, "a pixel is smoke where its max-normalised CAM exceeds this "
                               "(picked on the synthetic validation split; the paper: 0.3)",
                               **SHARE)
    cam_batch_size: int = setting(32, "images a batch for CAMs", at_least=1)

@dataclass
class RefineConfig:
    background: str = setting("threshold", "background score: threshold (--threshold) or power "
                              "((1 - max CAM)^alpha)", choices=("threshold", "power"))
    alpha: float = setting(8.0, "exponent of the power background", above=0)
    # The CRF's defaults are the paper's (5 iterations; Gaussian 3 px, weight 5; colour kernel
    # 60 px, colour width 5, weight 15), the colour kernel's width scaled from its 512 px
    # images to our 128 px (60 -> 15): pydensecrf's DeepLab widths (80 px, 13) erase our masks.
    crf: bool = setting(False, "refine with the dense CRF")
    crf_iters: int = setting(5, "mean-field iterations", at_least=1)
    crf_sxy_gaussian: float = setting(3.0, "position kernel width, px", above=0)
    crf_compat_gaussian: float = setting(5.0, "position kernel weight", at_least=0)
    crf_sxy_bilateral: float = setting(15.0, "colour kernel's position width, px; scale it with "
                                       "--image-size", above=0)
    crf_srgb: float = setting(5.0, "colour kernel's colour width", above=0)
    crf_compat_bilateral: float = setting(15.0, "colour kernel weight", at_least=0)
    coverage_fix: bool = setting(False, "the coverage fix: spread the CAM over the student's "
                                 "attention affinities")
    coverage_steps: int = setting(2, "random-walk steps of the fix", at_least=1)
    coverage_beta: float = setting(2.0, "power that sharpens the attention affinities", above=0)

def batch_cams(batch: dict, cam: CamConfig, refine_config: RefineConfig, teacher, student,
               device: torch.device, amp: str = "off") -> torch.Tensor:
    """A batch's CAMs (B,K,H,W) at its input size: the teacher's CAM, the student's projected
    map (the map L_align trains) or its Grad-CAM (the paper); summed over scales and mirror
    images, spread by the coverage fix when asked, max-normalised to [0, 1], zero for the
    classes an image's label lacks."""
    if cam.cam_network == "teacher":
        fn, multiple = (lambda x: teacher(x)[1].float()), 1
    elif cam.cam_method == "gradcam":
        fn, multiple = student.gradcam, student.backbone.patch_size
    else:  # the foreground channels of the projected map
        fn, multiple = (lambda x: student(x)[1][:, 1:].float()), student.backbone.patch_size
    images = batch["image"].to(device)
    with torch.no_grad(), models.autocast(amp, device):
        cams = multiscale_cam(fn, images, cam.cam_scales, cam.cam_flip, multiple)
    if refine_config.coverage_fix:
        cams = coverage_fix(student, images, cams, refine_config.coverage_steps,
                            refine_config.coverage_beta)
    return losses.normalize_maps(cams, batch["label"].to(device))

def pseudo_mask(rgb: torch.Tensor, cams: torch.Tensor, cam: CamConfig,
                config: RefineConfig) -> torch.Tensor:
    """Normalised CAMs (B,K,H,W) -> masks (B,H,W) uint8: a background score, the dense CRF
    when asked, the best score a pixel."""
    probs = cams_to_probs(cams, config.background, cam.threshold, config.alpha)
    if config.crf:
        probs = dense_crf(
            rgb.to(probs.device), probs, iters=config.crf_iters,
            sxy_gaussian=config.crf_sxy_gaussian, compat_gaussian=config.crf_compat_gaussian,
            sxy_bilateral=config.crf_sxy_bilateral, srgb=config.crf_srgb,
            compat_bilateral=config.crf_compat_bilateral)
    return probs_to_mask(probs)

# -----------------------------------------------------------------------------
# Scores: masks against ground truth (255 ignored)

def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (H, W) class mask at another size, nearest neighbour (the file's own size)."""
    if tuple(mask.shape) == size:
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].to(mask.dtype)

def boundary(fg: torch.Tensor) -> torch.Tensor:
    """Inner boundary of a (H, W) bool region: its pixels with a 4-neighbour outside it."""
    x = fg[None, None].float()
    eroded = -F.max_pool2d(-F.pad(x, (1, 1, 1, 1), value=1.0), 3, stride=1)
    return fg & (eroded[0, 0] < 0.5)

def near(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels within `radius` (Chebyshev) of a True pixel of the (H, W) bool mask."""
    x = mask[None, None].float()
    return F.max_pool2d(x, 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0.5

class Scores:
    """Accumulates a confusion matrix, per-image smoke IoU, boundary matches (2-pixel
    tolerance) and context false positives, over a whole split."""

    def __init__(self, num_classes: int, tolerance: int = 2):
        self.n = num_classes + 1  # background first
        self.tolerance = tolerance
        self.confusion = torch.zeros(self.n, self.n, dtype=torch.int64)  # [truth, prediction]
        self.image_ious: list[float] = []
        self.context_pixels = 0
        self.context_called_fg = 0
        self.boundary = [0, 0, 0, 0]  # predicted, predicted matched, true, true matched

    def add(self, pred: torch.Tensor, truth: torch.Tensor, context: torch.Tensor | None = None):
        """pred, truth: (H, W) class indices (truth 255 = ignore); context: (H, W) bool."""
        valid = truth != IGNORE
        pred = torch.where(pred == IGNORE, torch.zeros_like(pred), pred)  # abstained: background
        p, t = pred[valid].long(), truth[valid].long()
        self.confusion += torch.bincount(t * self.n + p.clamp(max=self.n - 1),
                                         minlength=self.n ** 2).reshape(self.n, self.n)
        fg_t, fg_p = t > 0, p > 0
        if fg_t.any():  # the paper's figure: IoU averaged over images that show smoke
            self.image_ious.append(((fg_t & fg_p).sum() / (fg_t | fg_p).sum()).item())
        if context is not None and fg_t.any():  # chimneys of images that show smoke: label
            self.context_pixels += int(context.sum())  # gating zeroes smoke-free images anyway
            self.context_called_fg += int((context & (pred > 0)).sum())
        # Boundary F1 of foreground vs the rest. Predicted edges inside ignore are not scored
        # for precision but may still match a true edge (the true edge lies in that band).
        pred_edge = boundary(pred > 0)
        true_edge = boundary((truth > 0) & valid)
        scored = pred_edge & valid
        self.boundary[0] += int(scored.sum())
        self.boundary[1] += int((scored & near(true_edge, self.tolerance)).sum())
        self.boundary[2] += int(true_edge.sum())
        self.boundary[3] += int((true_edge & near(pred_edge, self.tolerance)).sum())

    def add_batch(self, masks: torch.Tensor, batch: dict, truth_of) -> None:
        """A batch's masks (B, H, W) at the network's size, scored at each ground truth's own
        size (so that `train`, `pseudo` and `eval` agree); truth_of(stem) reads a truth that
        the batch holds only resized."""
        for i, mask in enumerate(masks):
            size = tuple(batch["size"][i].tolist())
            if tuple(mask.shape) == size:  # the batch holds the truth at its own size
                self.add(mask, batch["mask"][i], batch["context"][i] if "context" in batch
                         else None)
            else:
                truth = truth_of(batch["stem"][i])
                self.add(resize_mask(mask, size), truth["mask"], truth.get("context"))

    def merge(self, other: "Scores") -> None:
        """Add the counts of another split's share (distributed pseudo-mask generation)."""
        self.confusion += other.confusion
        self.image_ious += other.image_ious
        self.context_pixels += other.context_pixels
        self.context_called_fg += other.context_called_fg
        self.boundary = [a + b for a, b in zip(self.boundary, other.boundary)]

    def result(self) -> dict:
        c = self.confusion.double()
        tp = c.diag()
        iou = tp / (c.sum(0) + c.sum(1) - tp).clamp(min=1)
        fg_tp = c[1:, 1:].sum()
        bp = self.boundary[1] / max(1, self.boundary[0])
        br = self.boundary[3] / max(1, self.boundary[2])
        return {
            "smoke_iou": 100 * iou[1].item() if self.n == 2 else 100 * iou[1:].mean().item(),
            "miou": 100 * iou.mean().item(),
            "per_class_iou": [100 * v for v in iou.tolist()],
            "precision": 100 * (fg_tp / c[:, 1:].sum().clamp(min=1)).item(),
            "recall": 100 * (fg_tp / c[1:, :].sum().clamp(min=1)).item(),
            "image_iou": 100 * float(np.mean(self.image_ious)) if self.image_ious else float("nan"),
            "boundary_f1": 100 * 2 * bp * br / (bp + br) if bp + br > 0 else 0.0,
            "context_fp": (100 * self.context_called_fg / self.context_pixels
                           if self.context_pixels else float("nan")),
        }

def format_scores(name: str, r: dict) -> str:
    """One line of a Scores.result(); a figure without pixels to count is n/a."""
    def f(key: str) -> str:
        return "n/a" if math.isnan(r[key]) else f"{r[key]:.1f}"
    return (f"{name}: smoke IoU {f('smoke_iou')}  mIoU {f('miou')}  "
            f"precision {f('precision')}  recall {f('recall')}  "
            f"boundary F1 {f('boundary_f1')}  per-image IoU {f('image_iou')}  "
            f"chimney called smoke {f('context_fp')} %"
            + (f"  BCE {r['bce']:.3f}" if "bce" in r else ""))

# -----------------------------------------------------------------------------
# Masks a person can look at: (3, H, W) uint8 pictures

def paint(rgb: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The photo (3,H,W) uint8 with its class mask (H,W) over it: red, yellow, blue, ..."""
    colors = ["red", "yellow", "blue", "lime", "cyan", "magenta"]
    masks = torch.stack([mask == k for k in range(1, num_classes + 1)])  # (K, H, W) bool
    return draw_segmentation_masks(rgb, masks, alpha=0.55,
                                   colors=(colors * num_classes)[:num_classes])

def mask_grid(rgbs: list[torch.Tensor], masks: list[torch.Tensor], num_classes: int
              ) -> torch.Tensor:
    """Photos beside their painted masks, four pairs a row."""
    tiles = [t for rgb, mask in zip(rgbs, masks) for t in (rgb, paint(rgb, mask, num_classes))]
    return make_grid(torch.stack(tiles), nrow=8, padding=2, pad_value=255)

def overlay(rgb: torch.Tensor, mask: torch.Tensor, num_classes: int, side: int = 768
            ) -> torch.Tensor:
    """The photo with its mask painted over it, at most `side` pixels on its long side."""
    scale = min(1.0, side / max(mask.shape))
    size = [max(1, round(n * scale)) for n in mask.shape]
    rgb = resize(rgb, size, antialias=True)
    return paint(rgb, resize_mask(mask, tuple(size)), num_classes)

# -----------------------------------------------------------------------------
# The dense CRF's benchmark: ours against pydensecrf, side by side in one run

CRF_SETTINGS = {
    "common WSSS (AffinityNet, SEAM, IRN): 3/3, 80/13/10": dict(
        sxy_gaussian=3, compat_gaussian=3, sxy_bilateral=80, srgb=13, compat_bilateral=10),
    "the paper: 3/5, 60/5/15": dict(
        sxy_gaussian=3, compat_gaussian=5, sxy_bilateral=60, srgb=5, compat_bilateral=15),
}

def cam_like(truth: torch.Tensor, seed: int) -> torch.Tensor:
    """A CAM-like smoke probability from a ground-truth mask (H, W): pooled to stride 16 and
    upsampled (CAMs are coarse), with noise on the coarse grid (CAMs are uneven)."""
    g = torch.Generator().manual_seed(seed)
    h, w = truth.shape
    coarse = F.avg_pool2d(truth[None, None].float(), 16, ceil_mode=True)
    coarse = coarse + 0.25 * torch.randn(coarse.shape, generator=g)
    cam = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return cam.clamp(0.05, 0.95)

def crf_reference(image: np.ndarray, prob: np.ndarray, iters: int, settings: dict):
    """pydensecrf's result when it is installed: a comparison only, never needed to run."""
    try:
        dcrf = importlib.import_module("pydensecrf.densecrf")
    except ImportError:
        return None
    c, h, w = prob.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(prob, 1e-5, 1)).reshape(c, -1)))
    crf.addPairwiseGaussian(sxy=settings["sxy_gaussian"], compat=settings["compat_gaussian"])
    crf.addPairwiseBilateral(sxy=settings["sxy_bilateral"], srgb=settings["srgb"],
                             rgbim=np.ascontiguousarray(image),
                             compat=settings["compat_bilateral"])
    return np.array(crf.inference(iters)).reshape(c, h, w)

def bench_dense_crf(images: list[torch.Tensor], truths: list[torch.Tensor], iters: int,
                    batch: int) -> list[dict]:
    """Per setting: ours and pydensecrf one image at a time (one thread each, median ms), ours
    batched (images/s), their label agreement, and smoke IoU before and after each CRF.
    images: (3, H, W) uint8; truths: (H, W) {0, 1}; the CRF's input is cam_like(truth)."""
    probs = [torch.stack([1 - cam, cam]) for cam in (cam_like(t, k) for k, t in enumerate(truths))]
    threads, nan, rows = torch.get_num_threads(), float("nan"), []
    for name, settings in CRF_SETTINGS.items():
        torch.set_num_threads(1)
        dense_crf(images[0], probs[0], iters=iters, **settings)  # warm-up
        ms = {"ours": [], "pydensecrf": []}
        agree, scores = [], {k: Scores(1) for k in ("before", "pydensecrf", "ours")}
        for image, prob, truth in zip(images, probs, truths):
            start = time.perf_counter()
            ours = dense_crf(image, prob, iters=iters, **settings).argmax(0)
            ms["ours"].append(1000 * (time.perf_counter() - start))
            scores["before"].add(prob.argmax(0), truth)
            scores["ours"].add(ours, truth)
            start = time.perf_counter()
            ref = crf_reference(image.permute(1, 2, 0).numpy(), prob.numpy(), iters, settings)
            if ref is not None:
                ms["pydensecrf"].append(1000 * (time.perf_counter() - start))
                ref = torch.from_numpy(ref.argmax(0))
                agree.append((ref == ours).float().mean().item())
                scores["pydensecrf"].add(ref, truth)
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            dense_crf(torch.stack(images[i:i + batch]), torch.stack(probs[i:i + batch]),
                      iters=iters, **settings)
        rows.append({"settings": name, "batched_ips": len(images) / (time.perf_counter() - start),
                     **{f"{k}_ms": float(np.median(v)) if v else nan for k, v in ms.items()},
                     "agreement": 100 * float(np.mean(agree)) if agree else nan,
                     **{f"iou_{k}": s.result()["smoke_iou"] if s.image_ious else nan
                        for k, s in scores.items()}})
    return rows
