"""Weakly supervised smoke segmentation with cross-architecture consistency regularization.

In: a dataset folder of images with image-level labels ("this frame shows smoke"); masks, when
present, are used only to score. Out: a run folder with the trained teacher (ResNet) and student
(ViT), pseudo masks for every training image, overlays, and the masks' scores.

    python wsss.py train                       # the whole method, on generated scenes
    python wsss.py train --preset quick        # the same in a few minutes, to try it
    python wsss.py pseudo --run RUN --crf      # pseudo masks from a trained run
    python wsss.py segment --run RUN           # stage 3: a segmentation network on them
    python wsss.py predict --run RUN --input D # masks and overlays for any images
    python wsss.py eval --data DIR --pred DIR  # scores against ground truth
    python wsss.py ablate                      # the paper's comparisons over seeds
    python wsss.py synth | prepare | bench crf # data generation, SMOKE5K import, CRF benchmark
    torchrun --nproc_per_node N wsss.py train  # the same on N processes

RUN may be `latest` (the newest folder under runs/).
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import operator
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

import losses
import models
import postprocess
from models import SHARE, setting
from postprocess import IGNORE

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_DATA = Path("data/synth")  # where `train` generates the default dataset on first use
RUNS = Path("runs")  # where `train` puts a run folder unless --out names one

class UserError(Exception):
    """Bad input or settings a user can fix: printed as one line, exit code 2."""

# =============================================================================================
# The method, in the paper's order: settings -> data -> teacher -> student -> CAM -> mask
# =============================================================================================

@dataclass
class TrainConfig:
    teacher_epochs: int = setting(8, "epochs of stage 1, the teacher", at_least=1)
    student_epochs: int = setting(10, "epochs of stage 2, the student", at_least=1)
    batch_size: int = setting(16, "images a step", at_least=1)
    lr: float = setting(5e-4, "AdamW peak learning rate of the students: warm-up over the "
                        "first epoch, then cosine decay", above=0)
    teacher_lr: float = setting(5e-4, "the same for the teacher (picked on the synthetic "
                                "validation split)", above=0)
    weight_decay: float = setting(0.05, "AdamW weight decay", at_least=0)
    clip_grad: float = setting(1.0, "clip the students' gradient to this global norm, as ViT "
                               "recipes do (0: off, the paper)", at_least=0)
    flip: bool = setting(True, "random horizontal flips (the paper: none)")
    crop: float = setting(0.7, "random resized crops keep at least this share of the image "
                          "(1: none, the paper)", above=0, at_most=1)
    baseline: bool = setting(True, "also train the student alone (no teacher) to compare")
    seed: int = setting(0, "seed of initialisation and data order")
    amp: str = setting("auto", "bfloat16 mixed precision; auto: where the device runs it fast",
                       choices=("auto", "bf16", "off"))
    device: str = setting("auto", "auto: cuda, then mps, then cpu",
                          choices=("auto", "cpu", "cuda", "mps"))
    workers: int = setting(0, "data loader worker processes", at_least=0)
    channels_last: bool = setting(False, "channels-last ResNets: faster convolutions on CUDA")
    compile: bool = setting(False, "torch.compile the trained networks")
    log_every: int = setting(20, "steps between progress lines", at_least=1)

@dataclass
class SegmentConfig:
    seg_targets: str = setting("pseudo", "pseudo: the pseudo masks in --seg-masks; truth: the "
                               "ground truth (the upper bound)", choices=("pseudo", "truth"))
    seg_masks: str = setting("", "folder of pseudo masks <stem>.png, 255 = ignore (empty: "
                             "RUN/pseudo_train)")
    seg_init: str = setting("run", "run: start from the teacher's trained ResNet; scratch: "
                            "random initialisation", choices=("run", "scratch"))
    seg_epochs: int = setting(12, "epochs of stage 3", at_least=1)
    seg_batch_size: int = setting(16, "images a step in stage 3", at_least=1)
    seg_lr: float = setting(5e-4, "AdamW peak learning rate of stage 3", above=0)

# The parts of a run's settings; each part's fields are --flags (the network, loss and read-out
# settings live beside their code: models.ModelConfig, losses.LossConfig, postprocess.*Config).
CONFIGS = {"model": models.ModelConfig, "train": TrainConfig, "loss": losses.LossConfig,
           "cam": postprocess.CamConfig, "refine": postprocess.RefineConfig,
           "segment": SegmentConfig}
FIELDS = {f.name: (part, f) for part, cls in CONFIGS.items() for f in dataclasses.fields(cls)}

@dataclass
class RunConfig:
    """Every setting of a run: RUN/config.json, and a copy in each checkpoint."""
    data: str
    model: models.ModelConfig = field(default_factory=models.ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: losses.LossConfig = field(default_factory=losses.LossConfig)
    cam: postprocess.CamConfig = field(default_factory=postprocess.CamConfig)
    refine: postprocess.RefineConfig = field(default_factory=postprocess.RefineConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        parts = {}
        for name, part in CONFIGS.items():
            values = dict(d.get(name, {}))
            if name == "model":  # a run from before the small start resumes as it began
                values.setdefault("proj_std", 0.0)
            for f in dataclasses.fields(part):
                if f.name in values and getattr(f.type, "__origin__", None) is tuple:
                    values[f.name] = tuple(values[f.name])  # JSON gives lists
            parts[name] = part(**values)
        return cls(data=d["data"], **parts)

def with_overrides(base: RunConfig, overrides: dict) -> RunConfig:
    """`base` with some fields (named without their part) replaced."""
    parts = {name: getattr(base, name) for name in CONFIGS}
    for key, value in overrides.items():
        name = FIELDS[key][0]
        parts[name] = dataclasses.replace(parts[name], **{key: value})
    return RunConfig(data=base.data, **parts)

# Presets: overrides of the defaults above. "cpu" (the defaults) trains on a 2-core laptop in
# minutes. "faithful" is the paper's recipe on the same small networks: no augmentation, a
# class-token student with a patchify stem, raw-map cosine alignment, no consistency loss,
# Grad-CAM over four scales, threshold 0.3. "paper" is that recipe at the paper's size
# (ResNet-50 OS16 + PCM teacher, ViT-B/16 at 512 px, AdamW 1e-4, batch 8, 3 epochs; with
# --crf, its CRF's 60 px colour kernel).
# "quick" is the default recipe cut to run in a few minutes (to try the tool, not to score).
# "squared" trains the teacher from the standard initialisation at 2e-4, squares the target
# (gamma = 2) and starts the student's projection as PyTorch does: the highest mean in
# bfloat16, a far wider spread over seeds (README).
FAITHFUL = dict(student_stem="patch", student_head="token", pool=1.0, teacher_pool=1.0,
                flip=False, crop=1.0, align_target="raw", align_power=1.0, align_reduce="global",
                consistency_weight=0.0, cam_method="gradcam", cam_scales=(0.5, 1.0, 1.5, 2.0),
                threshold=0.3, teacher_lr=5e-4, align_weight=1.0, distill_weight=0.0,
                clip_grad=0.0,  # one learning rate, no clipping: the paper
                zero_init_residual=False, proj_std=0.0)  # PyTorch's initialisations
PRESETS = {
    "cpu": {},
    "quick": dict(image_size=64, teacher_epochs=2, student_epochs=2),
    "squared": dict(zero_init_residual=False, teacher_lr=2e-4, align_power=2.0, proj_std=0.0),
    "faithful": FAITHFUL,
    "paper": dict(FAITHFUL, teacher="resnet50", teacher_width=64, output_stride=16, pcm=True,
                  student="vit_base", student_depth=12, patch_size=16, image_size=512,
                  teacher_epochs=3, student_epochs=3, batch_size=8, lr=1e-4, teacher_lr=1e-4,
                  channels_last=True, cam_batch_size=8, crf_sxy_bilateral=60.0),
}

def preset_config(name: str, data: str = "") -> RunConfig:
    """The settings of a preset: the defaults with its overrides."""
    return with_overrides(RunConfig(data=data), PRESETS[name])

# --- data: a folder of images, image-level labels, and (for scoring only) masks --------------
#   DIR/classes.txt            foreground class names, one a line (background is index 0)
#   DIR/train.txt, DIR/val.txt "<stem> [class ...]" a line (no class = background only)
#   DIR/images/<stem>.png|jpg  RGB (other modes are converted; any size)
#   DIR/masks/<stem>.png       optional: 0 background, k = k-th class, 255 ignore
#   DIR/context/<stem>.png     optional: nonzero where co-occurring context stands (chimneys)

@dataclass
class Sample:
    stem: str
    image: Path
    labels: tuple[int, ...]  # class indices, 1-based (0 is background)
    mask: Path | None
    context: Path | None

def read_classes(root: Path) -> list[str]:
    path = root / "classes.txt"
    if not path.is_file():
        raise UserError(f"{path}: file not found (a dataset folder has one foreground class "
                        f"name a line)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names or len(set(names)) != len(names):
        raise UserError(f"{path}: no class names, or one named twice")
    return names

def read_split(root: Path, split: str) -> tuple[list[str], list[Sample]]:
    """Parse DIR/<split>.txt; every named file must exist and every class must be known."""
    classes = read_classes(root)
    index = {name: k + 1 for k, name in enumerate(classes)}
    path = root / f"{split}.txt"
    if not path.is_file():
        raise UserError(f"{path}: split file not found")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        words = line.split()
        if not words:
            continue
        stem, *names = words
        unknown = [n for n in names if n not in index]
        if unknown:
            raise UserError(f"{path}:{number}: unknown class '{unknown[0]}' (classes.txt has "
                            f"{', '.join(classes)})")
        images = [root / "images" / (stem + ext) for ext in IMAGE_EXTENSIONS]
        image = next((p for p in images if p.is_file()), None)
        if image is None:
            raise UserError(f"{path}:{number}: no image images/{stem}.png or .jpg")
        mask, context = root / "masks" / f"{stem}.png", root / "context" / f"{stem}.png"
        samples.append(Sample(stem, image, tuple(sorted({index[n] for n in names})),
                              mask if mask.is_file() else None,
                              context if context.is_file() else None))
    if not samples:
        raise UserError(f"{path}: empty split (no image listed)")
    return classes, samples

def load_image(path: Path) -> Image.Image:
    """An RGB PIL image; a file that does not decode (truncated, empty, a link loop) is a
    UserError naming it. 16-bit grey is scaled to 8 bits (PIL would clip it to white)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit grey
                grey = (np.asarray(im, dtype=np.float64) / 257).clip(0, 255).round()
                return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot decode image ({e.__class__.__name__}: {e})") from None

def load_mask(path: Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """A (H, W) uint8 class-index mask, checked against its image size and the class count."""
    try:
        with Image.open(path) as im:
            mask = np.array(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot decode mask ({e.__class__.__name__}: {e})") from None
    if mask.ndim != 2:
        raise UserError(f"{path}: mask must have one channel, found shape {mask.shape}")
    if (mask.shape[1], mask.shape[0]) != size:
        raise UserError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                        f"{size[0]}x{size[1]}")
    bad = np.setdiff1d(np.unique(mask), [*range(num_classes + 1), IGNORE])
    if bad.size:
        raise UserError(f"{path}: mask value {int(bad[0])} is neither a class (0..{num_classes}) "
                        f"nor {IGNORE} (ignore)")
    return mask.astype(np.uint8)

class SmokeDataset(Dataset):
    """One split of a dataset folder.

    Item: {"stem", "size" (2,) the file's (H, W), "image" (3,S,S) normalised float, "rgb"
    (3,S,S) uint8, "label" (K,) multi-hot float, and when the folder has them "mask" (S,S) int64
    with 255 = ignore (all-ignore for an image without a mask file), "context" (S,S) bool}.
    `masks`: a folder of <stem>.png masks to use instead (stage 3 trains on pseudo masks).
    """

    def __init__(self, root: str | Path, split: str, size: int | None = 128, flip: bool = False,
                 masks: Path | None = None, crop: float = 1.0):
        self.root = Path(root)
        self.classes, self.samples = read_split(self.root, split)
        if masks is not None:
            missing = [s.stem for s in self.samples if not (masks / f"{s.stem}.png").is_file()]
            if missing:
                raise UserError(f"{masks / missing[0]}.png: mask missing ({len(missing)} of "
                                f"{len(self.samples)} {split} images have none)")
            self.samples = [dataclasses.replace(s, mask=masks / f"{s.stem}.png")
                            for s in self.samples]
        self.index = {s.stem: i for i, s in enumerate(self.samples)}
        self.has_masks = any(s.mask is not None for s in self.samples)
        self.has_context = any(s.context is not None for s in self.samples)
        steps = [v2.Resize((size, size), antialias=True)] if size else [v2.Identity()]
        if size and crop < 1:
            steps = [v2.RandomResizedCrop((size, size), scale=(crop, 1.0), antialias=True)]
        self.transform = v2.Compose(steps + ([v2.RandomHorizontalFlip()] if flip else []))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        pil = load_image(s.image)
        rgb = torch.from_numpy(np.array(pil)).permute(2, 0, 1)  # (H,W,3) -> (3,H,W)
        truth = {k: tv_tensors.Mask(v) for k, v in self.truth(s, pil.height, pil.width).items()}
        image, truth = self.transform(tv_tensors.Image(rgb), truth)
        image = image.as_subclass(torch.Tensor)
        label = torch.zeros(len(self.classes))
        label[[k - 1 for k in s.labels]] = 1.0
        return {"stem": s.stem, "size": torch.tensor([pil.height, pil.width]), "rgb": image,
                "image": models.network_input(image), "label": label,
                **{k: t.as_subclass(torch.Tensor) for k, t in truth.items()}}

    def truth(self, s: Sample | str, h: int = 0, w: int = 0) -> dict[str, torch.Tensor]:
        """{"mask": (h, w) int64, "context": (h, w) bool}, as far as the folder has them, at
        the image file's own size (h, w) (read from the file when not given)."""
        if isinstance(s, str):
            s = self.samples[self.index[s]]
            with Image.open(s.image) as im:
                w, h = im.size
        truth = {}
        if self.has_masks:
            mask = (load_mask(s.mask, (w, h), len(self.classes)) if s.mask is not None
                    else np.full((h, w), IGNORE, np.uint8))
            truth["mask"] = torch.from_numpy(mask).long()
        if self.has_context:
            context = (np.array(Image.open(s.context).convert("L")) > 0 if s.context is not None
                       else np.zeros((h, w), bool))
            if context.shape != (h, w):
                raise UserError(f"{s.context}: context is {context.shape[1]}x{context.shape[0]} "
                                f"but its image is {w}x{h}")
            truth["context"] = torch.from_numpy(context)
        return truth

    def verify(self) -> None:
        """Decode every file once, so that bad input stops a run before training, not during."""
        for i in range(len(self)):
            self[i]

# --- stage 1: the teacher learns to classify -----------------------------------------------

def teacher_loss(batch: dict, teacher: models.Teacher) -> dict:
    """L_cls = BCE(pool(teacher CAM), y): the teacher is a CAM classifier."""
    logits, _ = teacher(batch["image"])  # (B, K); the maps (B, K, h, w) unused
    loss = losses.classification_loss(logits, batch["label"])
    return {"loss": loss, "cls": loss}

# --- stage 2: the student learns to classify, aligned to the frozen teacher ------------------

def student_loss(student: torch.nn.Module, teacher: models.Teacher | None,
                 images: torch.Tensor, labels: torch.Tensor, config: losses.LossConfig) -> dict:
    """L = L_cls + lambda * L_align + kappa * L_kd + mu * L_cons + beta * L_guide for one
    batch: the paper's objective with its consistency regularization, the teacher's image
    probabilities as soft labels and its inner features as guides (kappa = beta = 0: the
    paper). `teacher`: frozen, or None for the student alone."""
    # logits (B, K), maps (B, 1+K, h, w) with the background channel first; guided, also the
    # guided blocks' projected tokens [(B, C_j, h, w)]
    guided = teacher is not None and config.guide_weight > 0
    if guided:
        logits, maps, features = student(images, guided=True)
    else:
        logits, maps = student(images)
    terms = {"cls": losses.classification_loss(logits, labels)}
    weights = config.align_weight + config.distill_weight + config.guide_weight
    if teacher is not None and weights > 0:
        with torch.no_grad():  # the frozen teacher only gives the targets
            # (B, K), (B, K, h, w), the outputs of layer1..layer4
            teacher_logits, teacher_maps, stages = teacher(images, return_stages=True)
        if config.align_weight > 0:
            target = losses.alignment_target(teacher_maps, labels, config.align_target,
                                              config.align_power)
            aligned = maps if config.align_target == "pair" else maps[:, 1:]  # (bg, fg) or fg
            terms["align"] = losses.alignment_loss(aligned, target, config.align_kind,
                                                   config.align_reduce)
        if config.distill_weight > 0:
            terms["kd"] = losses.distillation_loss(logits, teacher_logits)
        if guided:  # the teacher's last stages guide the guided blocks, last with last
            terms["guide"] = losses.guidance_loss(features, stages[-len(features):])
    if config.consistency_weight > 0:  # the map of an augmented view = that view of the map
        terms["cons"] = consistency_term(student, images, maps[:, 1:], config)
    terms["loss"] = (terms["cls"] + config.align_weight * terms.get("align", 0.0)
                     + config.distill_weight * terms.get("kd", 0.0)
                     + config.consistency_weight * terms.get("cons", 0.0)
                     + config.guide_weight * terms.get("guide", 0.0))
    return terms

def consistency_term(student: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor,
                     config: losses.LossConfig) -> torch.Tensor:
    """L_cons for one batch: the student's class maps (B, K, h, w) of `images` against its maps
    of a flipped view, a crop of the image or the whole image rescaled (--consistency-view)."""
    patch = getattr(student, "module", student).backbone.patch_size
    flip = bool(torch.rand(()) < 0.5)
    if config.consistency_view == "crop":
        h, w = maps.shape[-2:]  # the token grid; a crop of whole patches keeps tokens aligned
        ch, cw = (max(1, round(n * config.consistency_scale)) for n in (h, w))
        y, x = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
        crop = images[..., y * patch:(y + ch) * patch, x * patch:(x + cw) * patch]
        target = maps[..., y:y + ch, x:x + cw]
        if flip:
            crop, target = crop.flip(-1), target.flip(-1)
        _, maps_aug = student(crop)
        return losses.crop_consistency_loss(maps_aug[:, 1:], target)
    side = max(patch, round(images.shape[-1] * config.consistency_scale / patch) * patch)
    _, maps_aug = student(losses.flip_and_resize(images, (side, side), flip))
    return losses.consistency_loss(maps_aug[:, 1:], losses.flip_and_resize(
        maps, maps_aug.shape[-2:], flip))

def initial_networks(config: RunConfig, num_classes: int) -> tuple[models.Teacher, models.Student]:
    """The teacher and the student at their initial weights (on the CPU), drawn in this order
    from the run's seed: the student alone starts where the aligned student starts."""
    torch.manual_seed(config.train.seed)
    teacher = models.build_teacher(config.model, num_classes)
    guided_by = teacher if config.loss.guide_weight > 0 else None
    return teacher, models.build_student(config.model, num_classes, guided_by)

def train_networks(run: Path, config: RunConfig, dataset: "SmokeDataset", device: torch.device,
                   log: "Log") -> tuple[models.Teacher, models.Student]:
    """Stage 1, the teacher; freeze it; stage 2, the student aligned to it."""
    teacher, student = initial_networks(config, len(dataset.classes))
    teacher, student = teacher.to(device), student.to(device)
    log(f"teacher {config.model.teacher}: {models.count_parameters(teacher) / 1e6:.2f} M "
        f"parameters; student {config.model.student}: "
        f"{models.count_parameters(student) / 1e6:.2f} M parameters")
    # --lr and --clip-grad are the students' (stage 2); the teacher has its own rate, unclipped
    stage1 = with_overrides(config, {"lr": config.train.teacher_lr, "clip_grad": 0.0})
    train_stage("teacher", teacher, teacher_loss, dataset, run, stage1,
                config.train.teacher_epochs, device, log)
    models.freeze(teacher)
    teacher.calibration.reset()  # L_kd reads raw logits, also where a calibrated run resumes

    def step(batch, net):
        return student_loss(net, teacher, batch["image"], batch["label"], config.loss)

    train_stage("student", student, step, dataset, run, config, config.train.student_epochs,
                device, log)
    return teacher, models.freeze(student)

ALONE = {"align_weight": 0.0, "distill_weight": 0.0, "guide_weight": 0.0}  # no teacher's term

def train_alone(run: Path, config: RunConfig, dataset: "SmokeDataset", device: torch.device,
                log: "Log") -> models.Student:
    """The baseline: the same student, from the same initial weights, and the same recipe
    without the teacher (lambda = kappa = beta = 0), so that the teacher's effect is the
    difference of two students (RUN/alone.pt)."""
    # The teacher is drawn only so that the student's draw follows it: no weights file read.
    _, alone = initial_networks(with_overrides(config, {"teacher_weights": "", **ALONE}),
                                len(dataset.classes))
    alone = alone.to(device)

    def step(batch, net):
        return student_loss(net, None, batch["image"], batch["label"], config.loss)

    train_stage("alone", alone, step, dataset, run, config, config.train.student_epochs, device,
                log)
    return models.freeze(alone)

def write_pseudo_masks(dataset: "SmokeDataset", out: Path | None, cam: postprocess.CamConfig,
                       refine_config: postprocess.RefineConfig, teacher, student,
                       device: torch.device, amp: str, overlays: Path | None = None
                       ) -> dict | None:
    """The split's pseudo masks into `out` (None: nowhere) at each file's own size, an overlay
    grid, and the masks' scores when the dataset has ground truth (under torchrun each
    process labels its share)."""
    scores = postprocess.Scores(len(dataset.classes)) if dataset.has_masks else None
    shown_rgb, shown_mask = [], []
    rank, size = rank_and_count()
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), size))
    for batch in torch.utils.data.DataLoader(share, batch_size=cam.cam_batch_size):
        cams = postprocess.batch_cams(batch, cam, refine_config, teacher, student, device, amp)
        masks = postprocess.pseudo_mask(batch["rgb"], cams, cam, refine_config).cpu()
        for i, (stem, mask) in enumerate(zip(batch["stem"], masks)):
            if out is not None:
                file_size = tuple(batch["size"][i].tolist())
                save_mask(postprocess.resize_mask(mask, file_size), out / f"{stem}.png")
            if len(shown_rgb) < 16 and batch["label"][i].any():
                shown_rgb.append(batch["rgb"][i])
                shown_mask.append(mask)
        if scores is not None:
            scores.add_batch(masks, batch, dataset.truth)
    if overlays is not None and shown_rgb and rank == 0:
        save_picture(postprocess.mask_grid(shown_rgb, shown_mask, len(dataset.classes)), overlays)
    return None if scores is None else gather_scores(scores).result()

def split_logits(net: torch.nn.Module, dataset: "SmokeDataset", device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's logits over a split (float32) and the image labels, both (N, K)."""
    logits, labels = [], []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(dataset, batch_size=64):
            logits.append(net(batch["image"].to(device))[0].float().cpu())
            labels.append(batch["label"])
    return torch.cat(logits), torch.cat(labels)

def classification_bce(net: torch.nn.Module, dataset: "SmokeDataset", device: torch.device
                       ) -> float:
    """The network's L_cls over a split: how well it has learned the labels."""
    return losses.classification_loss(*split_logits(net, dataset, device)).item()

def calibrate(run: Path, nets: dict[str, torch.nn.Module], dataset: "SmokeDataset",
              device: torch.device, log: "Log") -> None:
    """The last step of training: each network's logits fitted to the training labels
    (Platt scaling). A CAM classifier's logit is its pooled map, whose scale the cosine
    alignment leaves free and weight decay shrinks: its probabilities come out too timid.
    Maps, and so masks, do not change; RUN/<name>.pt keeps the fit."""
    fits = []
    for name, net in nets.items():
        net.calibration.reset()  # fit the raw logits: a rerun fits the same
        scale, bias = losses.platt_scaling(*split_logits(net, dataset, device))
        net.calibration.scale.copy_(scale)
        net.calibration.bias.copy_(bias)
        path = run / f"{name}.pt"
        write_checkpoint(path, {**load_checkpoint(path), "model": net.state_dict()})
        fits.append(f"{name} x{scale[0]:.2f} {bias[0]:+.2f}")
    log(f"logits calibrated on the training labels (scale, bias): {', '.join(fits)}")

def compare(run: Path, config: RunConfig, teacher, student, alone, device: torch.device,
            log: "Log") -> None:
    """The teacher's CAM, the student alone and the aligned student, one read-out for all,
    scored on the validation split (RUN/scores.json)."""
    split = "val" if (Path(config.data) / "val.txt").is_file() else "train"
    dataset = SmokeDataset(config.data, split, size=config.model.image_size)
    if not dataset.has_masks:
        return
    # name -> (CAM settings, the network whose labels are scored, the student the CAM path
    # gets: its map, or for the teacher's CAM the attention the coverage fix walks)
    teacher_cam = dataclasses.replace(config.cam, cam_network="teacher")
    rows = {"teacher CAM (ResNet)": (teacher_cam, teacher, student),
            "student alone (ViT)": (config.cam, alone, alone),
            "aligned student (ViT)": (config.cam, student, student)}
    scores = {}
    for name, (cam, classifier, cam_student) in rows.items():
        if classifier is not None:
            scores[name] = write_pseudo_masks(dataset, None, cam, config.refine, teacher,
                                              cam_student, device, config.train.amp)
            scores[name]["bce"] = classification_bce(classifier, dataset, device)
    log(f"pseudo masks of the {split} split ({len(dataset)} images) vs ground truth, one "
        f"read-out for all (threshold {config.cam.threshold}, scales "
        f"{list(config.cam.cam_scales)}; students' map: {config.cam.cam_method}):")
    for name, r in scores.items():
        log(postprocess.format_scores(f"  {name:22s}", r))
    if rank_and_count()[0] == 0:
        (run / "scores.json").write_text(json.dumps({"split": split, **scores}, indent=2) + "\n")

def cmd_train(args: argparse.Namespace) -> None:
    """The whole method: teacher, student (and the student alone), their logits calibrated,
    pseudo masks, scores."""
    began = time.perf_counter()
    run, config = start_run(args)
    log = Log(run / "log.txt")
    log(f"run {run}")
    log(describe(config))
    dataset = SmokeDataset(config.data, "train", size=config.model.image_size,
                           flip=config.train.flip, crop=config.train.crop)
    device = pick_device(config.train.device)
    log(f"{config.data}: {len(dataset)} training images, classes {dataset.classes}; device "
        f"{device}, autocast {models.autocast_dtype(config.train.amp, device)}")
    teacher, student = train_networks(run, config, dataset, device, log)
    alone = train_alone(run, config, dataset, device, log) if config.train.baseline else None
    plain = SmokeDataset(config.data, "train", size=config.model.image_size)
    nets = {"teacher": teacher, "student": student, "alone": alone}
    calibrate(run, {k: v for k, v in nets.items() if v is not None}, plain, device, log)
    (run / "pseudo_train").mkdir(exist_ok=True)
    write_pseudo_masks(plain, run / "pseudo_train", config.cam, config.refine, teacher, student,
                       device, config.train.amp, run / "overlays.png")
    log(f"pseudo masks: {run / 'pseudo_train'} ({len(plain)} PNGs), overlays: "
        f"{run / 'overlays.png'}")
    compare(run, config, teacher, student, alone, device, log)
    log(f"wall time {time.perf_counter() - began:.0f} s, peak memory {peak_memory_mb():.0f} MB;"
        f" next: `python wsss.py segment --run {run}`")

# =============================================================================================
# Machinery: settings checks, runs, processes, the training loop, files, data generation and
# import, stage 3, prediction, the ablation, the CRF benchmark, the command line
# =============================================================================================

# --- settings: every value checked against what its field allows ------------------------------

BOUNDS = {"at_least": operator.ge, "above": operator.gt, "at_most": operator.le}

def check_value(f: dataclasses.Field, value) -> None:
    """UserError naming the flag, the value and what is allowed, when `value` is not allowed."""
    m = f.metadata
    values = value if isinstance(value, tuple) else (value,)
    bounds = {key: m[key] for key in BOUNDS if m[key] is not None}
    if m["choices"]:
        bad, allowed = value not in m["choices"], "one of " + ", ".join(map(str, m["choices"]))
    else:  # an empty list of scales is bad too
        bad = not values or any(not BOUNDS[key](v, b) for v in values
                                for key, b in bounds.items())
        allowed = " and ".join(f"{key.replace('_', ' ')} {b}" for key, b in bounds.items())
    if bad:
        shown = " ".join(map(str, values))
        raise UserError(f"--{f.name.replace('_', '-')} {shown}: must be {allowed}")

def check_settings(*configs) -> None:
    """Every field of the given config dataclasses (or of a RunConfig's parts) is allowed."""
    for config in configs:
        parts = [getattr(config, n) for n in CONFIGS] if isinstance(config, RunConfig) else [config]
        for part in parts:
            for f in dataclasses.fields(part):
                check_value(f, getattr(part, f.name))

def check_run_config(config: RunConfig) -> None:
    """Every setting allowed, the settings that depend on each other consistent, the device
    present: before a folder is made or a network trained."""
    check_settings(config)
    m = config.model
    if m.image_size % m.patch_size:
        raise UserError(f"--image-size {m.image_size}: must be a multiple of --patch-size "
                        f"{m.patch_size}")
    if m.student_stem == "conv" and m.patch_size & (m.patch_size - 1):
        raise UserError(f"--patch-size {m.patch_size}: a conv stem needs a power of two "
                        f"(or --student-stem patch)")
    if config.loss.consistency_view == "crop" and config.loss.consistency_scale > 1:
        raise UserError(f"--consistency-scale {config.loss.consistency_scale}: a crop is at most "
                        f"the whole image (at most 1 with --consistency-view crop)")
    pick_device(config.train.device)  # the device is present

def describe(config: RunConfig) -> str:
    """The settings, one line a part, for the log."""
    return "\n".join([f"  data: {config.data}"] + [
        f"  {name}: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(
            getattr(config, name)).items()) for name in CONFIGS])

# --- runs ------------------------------------------------------------------------------------

def run_path(text: str) -> Path:
    """A run folder named on the command line; `latest` is the newest under runs/."""
    if text != "latest":
        return Path(text)
    runs = [p for p in RUNS.glob("*") if (p / "config.json").is_file()] if RUNS.is_dir() else []
    if not runs:
        raise UserError(f"latest: no run folder under {RUNS}/; `python wsss.py train` makes one")
    return max(runs, key=lambda p: (p / "config.json").stat().st_mtime)

def start_run(args: argparse.Namespace) -> tuple[Path, RunConfig]:
    """The run folder and settings of `train`: a resumed run's own, or the preset's with the
    flags over it, checked before the folder is made."""
    if args.resume:
        run = run_path(args.resume)
        config = read_run_config(run)
        flags = given_flags(args) + (["--data"] if args.data else [])
        if flags:
            raise UserError(f"--resume continues {run} with the settings it began with; "
                            f"{', '.join(flags)} cannot change them (start a new run instead)")
        check_run_config(config)
        return run, config
    config = config_from_flags(args)

    def make_run_folder() -> Path:
        run = Path(args.out or RUNS / time.strftime("%Y%m%d-%H%M%S"))
        if not args.data:
            ensure_default_data(DEFAULT_DATA)
        verify_splits(Path(config.data))  # bad data stops here, before a run folder is made
        fresh_output_dir(run, args.force, folders=(config.data,))
        (run / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        return run

    return on_first_process(make_run_folder), config

def read_run_config(run: Path) -> RunConfig:
    path = run / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: not found; `python wsss.py train` makes a run folder")
    try:
        config = RunConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # truncated, foreign, edited
        raise UserError(f"{path}: not a run's config ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'malformed'})") from None
    check_settings(config)  # an edited file is held to the same table as the flags
    return config

def run_files(run: Path) -> tuple[Path, ...]:
    """What a run folder holds that commands read: its config, checkpoints and log."""
    return tuple(p for p in run.iterdir() if p.is_file()) if run.is_dir() else ()

def load_run(run: Path, device: torch.device) -> tuple[RunConfig, models.Teacher, models.Student]:
    """A run's config and its trained, frozen teacher and student."""
    config = read_run_config(run)
    num_classes = len(read_classes(Path(config.data)))
    teacher = models.build_teacher(config.model.without_weights(), num_classes)
    student = models.build_student(config.model.without_weights(), num_classes,
                                   teacher if config.loss.guide_weight > 0 else None)
    for name, net in (("teacher", teacher), ("student", student)):
        path = checkpoint_path(run, name)
        restore(net, load_checkpoint(path), path)
        models.freeze(net.to(device))
    return config, teacher, student

def checkpoint_path(run: Path, name: str) -> Path:
    path = run / f"{name}.pt"
    if not path.is_file():
        raise UserError(f"{path}: not found; `python wsss.py train --resume {run}` finishes "
                        f"the run")
    return path

# --- processes: one, or several started by torchrun -----------------------------------------

def rank_and_count() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless torchrun started it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

def gpu_each() -> bool:
    """Whether each of this machine's torchrun processes can have a GPU of its own: NCCL
    refuses two processes on one GPU, so with fewer GPUs than processes they run on the CPU."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return torch.cuda.is_available() and processes <= torch.cuda.device_count()

def init_distributed() -> bool:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR): NCCL between GPUs, one each; gloo between CPU processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    nccl = gpu_each()
    if nccl:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if nccl else "gloo")
    return True

def on_first_process(fn):
    """fn() on the first process only (the one that writes files); every process gets its
    result, or its UserError, so that no process waits for one that has failed."""
    result, error = None, None
    if rank_and_count()[0] == 0:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    if rank_and_count()[1] > 1:
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise UserError(error)
    return result

def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over processes of a tensor each process holds (itself with one process)."""
    if rank_and_count()[1] > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= rank_and_count()[1]
    return values

def gather_scores(scores: postprocess.Scores) -> postprocess.Scores:
    """Under torchrun every process scored its share of a split; add them up."""
    if rank_and_count()[1] == 1:
        return scores
    shares = [None] * rank_and_count()[1]
    dist.all_gather_object(shares, scores)
    for other in shares[1:]:
        shares[0].merge(other)
    return shares[0]

def training_module(net: torch.nn.Module, device: torch.device, t: TrainConfig
                    ) -> torch.nn.Module:
    """The module to call in training (channels-last and compiled when asked): under torchrun,
    wrapped in DistributedDataParallel (gradients averaged across processes during backward;
    BatchNorm synchronised on CUDA, per process on CPU, where SyncBatchNorm does not run)."""
    if t.channels_last:
        net.to(memory_format=torch.channels_last)
    if rank_and_count()[1] > 1:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net) if t.compile else net

# --- device and precision --------------------------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda (this process's GPU under torchrun), then mps, then cpu. torchrun
    processes that cannot have a GPU each (gloo) all run on the CPU."""
    gloo = rank_and_count()[1] > 1 and not gpu_each()
    available = {"cuda": torch.cuda.is_available() and not gloo,
                 "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
                        and not gloo}
    if not available.get(name, True):
        why = "torchrun's processes outnumber the GPUs here" if gloo else "none is available here"
        raise UserError(f"--device {name}: no {name.upper()} device for this process, {why} "
                        f"(use auto or cpu)")
    if name != "auto":
        return torch.device(name)
    if available["cuda"]:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("mps" if available["mps"] else "cpu")

# --- the training loop: a checkpoint after every epoch, exact resume from it -----------------

class Interrupted(Exception):
    """Ctrl-C during training; the last epoch's checkpoint is intact: exit code 130."""

class TrainingError(Exception):
    """Training cannot go on (a NaN loss, an incompatible checkpoint): one line, exit code 1."""

class Log:
    """Prints a line and appends it to RUN/log.txt (the first process only)."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, line: str) -> None:
        if rank_and_count()[0] != 0:
            return
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")

CHECKPOINT_FORMAT = 1

def save_checkpoint(path: Path, config: RunConfig, net: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, epoch: int, done: bool) -> None:
    """`epoch` epochs done."""
    state = optimizer.state_dict() if optimizer is not None else None
    write_checkpoint(path, {"format": CHECKPOINT_FORMAT, "config": config.to_dict(),
                            "model": net.state_dict(), "optimizer": state, "epoch": epoch,
                            "done": done})

def write_checkpoint(path: Path, ckpt: dict) -> None:
    """Written to a temporary file, then renamed: a crash or Ctrl-C never leaves half a
    checkpoint, so a stopped run resumes from its last whole epoch."""
    if rank_and_count()[0] != 0:  # one writer; every process holds the same weights
        return
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)

def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message runs to many lines: its first says what failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{path}: cannot read checkpoint ({e.__class__.__name__}: {first})"
                        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of format {CHECKPOINT_FORMAT}")
    return ckpt

def check_compatible(ckpt: dict, config: RunConfig, path: Path) -> None:
    """A checkpoint resumes only the networks it was written for (the ablation shares one
    teacher checkpoint among runs of other loss settings, so those may differ)."""
    saved = RunConfig.from_dict(ckpt["config"])
    for part in ("model", "segment"):
        a, b = dataclasses.asdict(getattr(saved, part)), dataclasses.asdict(getattr(config, part))
        changed = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]
        if changed:
            raise TrainingError(f"{path}: written with other {part} settings "
                                f"({'; '.join(changed)}); "
                                f"resume with the settings it began with, or start a new run")

def restore(net: torch.nn.Module, ckpt: dict, path: Path) -> None:
    # Networks trained before the calibration existed load uncalibrated: the identity.
    identity = {k: v for k, v in net.state_dict().items() if k.startswith("calibration.")}
    try:
        net.load_state_dict({**identity, **ckpt["model"]})
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise TrainingError(f"{path}: does not fit the configured network ({detail})") from None

def make_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, workers: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    """One epoch's batches of `batch_size` (the global batch) in an order that depends only on
    (seed, epoch), so that a resumed run sees the same batches. Under torchrun process r takes
    images r, r + N, ... of the same order (padded to a multiple of N, as DistributedSampler
    pads): together the N processes' batches are the single process's batches."""
    rank, size = rank_and_count()
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    order += order[: -len(order) % size]
    # Its own generator: the loader draws its workers' seed from it, not from the global state.
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, order[rank::size]), batch_size=batch_size // size,
        shuffle=False, generator=generator, num_workers=workers,
        pin_memory=device.type == "cuda")

def learning_rate(peak: float, step: int, warmup: int, total: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to zero: ViTs trained
    from scratch diverge or stall without the warm-up. A function of the step alone, so a
    resumed run follows the same schedule."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))

def resume(stage: str, net: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path,
           config: RunConfig, log: Log) -> int:
    """The epochs a stage's checkpoint holds (0 without one), its weights and optimizer loaded."""
    if not path.is_file():
        return 0
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, config, path)
    restore(net, ckpt, path)
    if ckpt["optimizer"] is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    log(f"{stage}: resuming after epoch {ckpt['epoch']}")
    return ckpt["epoch"]

def optimizer_step(step, batch: dict, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   lr: float, device: torch.device, t: TrainConfig) -> dict[str, float]:
    """One step of a stage; returns the global batch's terms (the mean over processes, so
    that every process sees the same and stops together); nothing is updated on a NaN."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()
             if isinstance(v, torch.Tensor)}
    if t.channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    with models.autocast(t.amp, device):
        terms = step(batch, net)
    values = global_mean(torch.stack([v.detach().float() for v in terms.values()]))
    means = dict(zip(terms, values.tolist()))
    if math.isfinite(means["loss"]):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if t.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), t.clip_grad)
        optimizer.step()
    return means

def train_stage(stage: str, net: torch.nn.Module, step, dataset: Dataset, run: Path,
                config: RunConfig, epochs: int, device: torch.device, log: Log) -> None:
    """The epoch loop of a stage: `step(batch, net) -> {"loss": ..., other terms}`, AdamW;
    RUN/<stage>.pt written after every epoch; Ctrl-C or a NaN loss stops with the last
    epoch's checkpoint intact, and a resumed run repeats the interrupted epoch exactly."""
    t, size = config.train, rank_and_count()[1]
    if t.batch_size % size:
        raise UserError(f"--batch-size {t.batch_size} is the global batch; it must divide "
                        f"evenly among {size} processes")
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=t.lr,
                                  weight_decay=t.weight_decay)
    path = run / f"{stage}.pt"
    start = resume(stage, net, optimizer, path, config, log)
    if start >= epochs:
        return log(f"{stage}: done in an earlier run ({start} epochs)")
    wrapped = training_module(net, device, t)
    per_epoch = -(-len(dataset) // t.batch_size)
    total, seen, began = (epochs - start) * len(dataset), 0, time.perf_counter()
    for epoch in range(start, epochs):
        torch.manual_seed(t.seed * 100_003 + epoch)  # augmentation draws: a function of the epoch
        net.train()
        sums: dict[str, float] = {}
        loader = make_loader(dataset, t.batch_size, t.seed, epoch, t.workers, device)
        try:
            for i, batch in enumerate(loader, start=1):
                lr = learning_rate(t.lr, epoch * per_epoch + i - 1, per_epoch, epochs * per_epoch)
                means = optimizer_step(step, batch, wrapped, optimizer, lr, device, t)
                if not math.isfinite(means["loss"]):
                    raise TrainingError(
                        f"{stage}: loss is {means['loss']} at epoch {epoch + 1} step {i}; "
                        f"stopped. The last good checkpoint (epoch {epoch}) is intact in {run}; "
                        f"try a lower --lr or --amp off")
                sums = {k: sums.get(k, 0.0) + v for k, v in means.items()}
                seen += len(batch["image"]) * size
                if i % t.log_every == 0 or i == per_epoch:
                    ips = seen / (time.perf_counter() - began)
                    terms = " ".join(f"{k} {v / i:.4f}" for k, v in sums.items())
                    log(f"{stage} epoch {epoch + 1}/{epochs} step {i}/{per_epoch} {terms} | "
                        f"{ips:.1f} img/s | left {(total - seen) / ips:.0f} s")
        except KeyboardInterrupt:
            again = "segment --run" if stage.startswith("segment") else "train --resume"
            raise Interrupted(f"{stage}: stopped by Ctrl-C in epoch {epoch + 1}; `python wsss.py "
                              f"{again} {run}` continues after epoch {epoch}") from None
        save_checkpoint(path, config, net, optimizer, epoch + 1, epoch + 1 == epochs)

# --- files: outputs that never replace what a command reads, masks, figures ------------------

def verify_splits(root: Path) -> None:
    """Read every file of the training split, and of the validation split when there is one."""
    SmokeDataset(root, "train", size=None).verify()
    if (root / "val.txt").exists():
        SmokeDataset(root, "val", size=None).verify()

def write_split(root: Path, split: str, rows: list[tuple[str, list[str]]]) -> None:
    lines = [" ".join([stem, *names]) for stem, names in rows]
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")

def real_path(path: Path) -> Path:
    """The absolute path with links followed (a link loop is left as it is)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(path))

def check_output(path: Path, force: bool, inputs: tuple = (), folders: tuple = ()) -> None:
    """An output may not be, or hold, anything the command reads (`inputs`, files or folders),
    nor lie inside an input folder (`folders`: a dataset, a folder of images); --force or not.
    An existing non-empty output is replaced only with --force."""
    out = real_path(path)
    for item in (*inputs, *folders):
        item = real_path(Path(item))
        if out == item or out in item.parents:
            raise UserError(f"{path}: is or holds {item}, which this command reads; "
                            f"choose another output folder")
    for folder in folders:
        if real_path(Path(folder)) in out.parents:
            raise UserError(f"{path}: lies inside {folder}, which this command reads; "
                            f"choose another output folder")
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise UserError(f"{path}: already exists (use --force to replace it)")

def remove(path: Path) -> None:
    """Delete a folder or file (an old output that --force replaces); nothing if absent."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

def fresh_output_dir(path: Path, force: bool, inputs: tuple = (), folders: tuple = ()) -> None:
    """Create `path` after check_output(); with --force an old output is replaced."""
    check_output(path, force, inputs, folders)
    remove(path)
    path.mkdir(parents=True, exist_ok=True)

@contextlib.contextmanager
def output_dir(path: Path, force: bool, inputs: tuple = (), folders: tuple = ()):
    """Yield an empty temporary sibling of `path` to write into; it takes `path`'s place only
    when the block ends without error, so a failed or interrupted command leaves the old
    output (or none) in place, and a plain rerun works."""
    check_output(path, force, inputs, folders)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"{path}: cannot be written ({e.strerror})") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove(path)
    os.replace(tmp, path)

def save_mask(mask: torch.Tensor, path: Path) -> None:
    Image.fromarray(mask.numpy().astype(np.uint8)).save(path)

def save_picture(rgb: torch.Tensor, path: Path, **options) -> None:
    Image.fromarray(rgb.permute(1, 2, 0).numpy()).save(path, **options)  # (3,H,W) -> (H,W,3)

def evaluate_folder(dataset: "SmokeDataset", pred: Path) -> dict:
    """Scores of the masks pred/<stem>.png against the split's ground truth (full size)."""
    if not dataset.has_masks:
        raise UserError(f"{dataset.root / 'masks'}: no ground-truth masks to evaluate against")
    scores = postprocess.Scores(len(dataset.classes))
    for i, sample in enumerate(dataset.samples):
        path = pred / f"{sample.stem}.png"
        if not path.is_file():
            raise UserError(f"{path}: predicted mask missing for {sample.stem}")
        item = dataset[i]
        size = (item["mask"].shape[1], item["mask"].shape[0])
        mask = torch.from_numpy(load_mask(path, size, len(dataset.classes)))
        scores.add(mask, item["mask"], item.get("context"))
    return scores.result()

def peak_memory_mb() -> float:
    import resource  # POSIX; ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

# --- data generation: synthetic industrial scenes ---------------------------------------------

@dataclass
class SynthConfig:
    n_train: int = setting(1000, "training images", at_least=1)
    n_val: int = setting(200, "validation images", at_least=0)
    size: int = setting(128, "image side in pixels", at_least=16)
    positive_share: float = setting(0.5, "share of images with an emission", **SHARE)
    coupling: float = setting(
        0.0, "the probability that a smoke-free training image has no chimney: 0 = chimneys in "
        "every frame, as in the paper's fixed cameras (smoke always leaves one); higher values "
        "make a chimney's presence itself a hint of smoke (1 = chimneys appear only with smoke)",
        **SHARE)
    val_coupling: float = setting(0.0, "the same for the validation split", **SHARE)
    seed: int = setting(0, "random seed; the same seed gives the same files")

SMOKE_VISIBLE, SMOKE_FAINT = 32, 10  # colour change (0..255) of a labelled / an ignored pixel

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random (cells x cells) grid, bilinearly upsampled to (h, w)."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    ys = np.linspace(0, cells, h, dtype=np.float32)
    xs = np.linspace(0, cells, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy

def _puffs(yy, xx, x, y, radii, densities) -> np.ndarray:
    """Opacity of each Gaussian puff k, d_k * exp(-|p - c_k|^2 / 2 r_k^2): shape (K, H, W)."""
    g = np.exp(-((yy - y[:, None, None]) ** 2 + (xx - x[:, None, None]) ** 2)
               / (2 * radii[:, None, None] ** 2))
    return densities[:, None, None] * g

def _backdrop(rng: np.random.Generator, s: int, yy: np.ndarray, xx: np.ndarray):
    """Sky, ground and factory skyline: an (s, s, 3) float image and the horizon's row."""
    horizon = rng.uniform(0.62, 0.82) * s
    # Sky: vertical gradient from a zenith colour to a paler horizon colour, mildly noisy.
    zenith = rng.uniform([40, 80, 140], [140, 170, 230])
    pale = rng.uniform([150, 160, 170], [225, 225, 235])
    t = np.clip(yy / horizon, 0, 1)[..., None]
    image = zenith * (1 - t) + pale * t
    image += (_smooth_noise(rng, s, s, 4)[..., None] - 0.5) * 20
    ground = rng.uniform([40, 45, 30], [110, 100, 80])
    below = (yy >= horizon)[..., None]
    image = np.where(below, ground + (_smooth_noise(rng, s, s, 8)[..., None] - 0.5) * 30, image)
    for _ in range(rng.integers(2, 6)):  # the skyline: dark boxes standing on the horizon
        x0 = rng.uniform(-0.1, 0.9) * s
        w = rng.uniform(0.08, 0.3) * s
        h = rng.uniform(0.04, 0.16) * s
        colour = rng.uniform(40, 110) + rng.uniform(-10, 10, 3)
        box = (xx >= x0) & (xx < x0 + w) & (yy >= horizon - h) & (yy < horizon + 2)
        image[box] = colour
    return image, horizon

def _chimneys(rng, image, s, yy, xx, horizon):
    """1-3 tall thin columns, often with red/white bands (industrial stacks), painted into
    `image`; returns their (s, s) bool mask and their tops (x, y, width)."""
    context, tops = np.zeros((s, s), bool), []
    for _ in range(rng.integers(1, 4)):
        cx = rng.uniform(0.12, 0.88) * s
        w = rng.uniform(0.035, 0.06) * s
        top = horizon - rng.uniform(0.28, 0.5) * s
        body = (np.abs(xx - cx) <= w / 2) & (yy >= top) & (yy < horizon + 2)
        base = rng.uniform(90, 170) + rng.uniform(-15, 15, 3)
        if rng.random() < 0.6:
            band = ((yy - top) // max(2.0, 0.06 * s)).astype(int) % 2 == 0
            colour = np.where(band[..., None], np.array([190, 50, 45]), base)
            image[:] = np.where(body[..., None], colour, image)
        else:
            image[body] = base
        context |= body
        tops.append((cx, top, w))
    return context, tops

def _distractors(rng, s, yy, xx, horizon) -> np.ndarray:
    """Opacity (s, s) of smoke-like things nobody labels: clouds and a haze band."""
    distractor = np.zeros((s, s), np.float32)
    for _ in range(rng.poisson(1.2)):
        n = rng.integers(3, 7)
        c = np.stack([rng.uniform(0, s) + rng.normal(0, 0.08 * s, n),
                      rng.uniform(0.05, 0.45) * s + rng.normal(0, 0.03 * s, n)], axis=1)
        puffs = _puffs(yy, xx, c[:, 0], c[:, 1], rng.uniform(0.04, 0.09, n) * s,
                       rng.uniform(0.4, 0.8, n))
        distractor = np.maximum(distractor, 1 - np.prod(1 - puffs, axis=0))  # overlaps thicken
    if rng.random() < 0.35:
        haze = np.exp(-((yy - horizon + rng.uniform(0, 0.1) * s) / (0.08 * s)) ** 2)
        distractor = np.maximum(distractor, haze * rng.uniform(0.3, 0.6))
    return distractor

def _plume(rng, s, yy, xx, tops) -> np.ndarray:
    """Opacity (s, s) of emissions: puff chains from some chimney tops, bent by one wind,
    widening and thinning as they rise, with turbulence."""
    plume = np.zeros((s, s), np.float32)
    wind = rng.uniform(-1, 1)
    emitters = [tops[i] for i in rng.permutation(len(tops))[: rng.integers(1, len(tops) + 1)]]
    for cx, top, w in emitters:
        n = 28
        t = np.linspace(0, 1, n, dtype=np.float32)
        length = rng.uniform(0.3, 0.65) * s
        rise = rng.uniform(0.2, 1.0)
        bend = np.sign(wind) * rng.uniform(0, 0.6)
        x = cx + length * (wind * t + bend * t ** 2)
        y = top - length * rise * t * (1 - 0.4 * t) + rng.normal(0, 0.01 * s, n)
        radii = w * 0.5 + t * rng.uniform(0.03, 0.08) * s
        dens = rng.uniform(0.85, 1.0) * (1 - 0.5 * t)
        puffs = _puffs(yy, xx, x, y, radii, dens)
        plume = np.maximum(plume, puffs.max(axis=0))  # max, not a sum: overlap adds no mass
    return plume * (0.75 + 0.25 * _smooth_noise(rng, s, s, 6))  # turbulence

def render_scene(rng: np.random.Generator, size: int, smoke: bool, chimneys: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (H,W,3) uint8 image, (H,W) uint8 mask {0,1,255}, (H,W) bool context."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    image, horizon = _backdrop(rng, s, yy, xx)
    context, tops = np.zeros((s, s), bool), []
    if chimneys or smoke:
        context, tops = _chimneys(rng, image, s, yy, xx, horizon)
    distractor = _distractors(rng, s, yy, xx, horizon)
    image = image * (1 - distractor[..., None]) + rng.uniform(200, 245) * distractor[..., None]
    change = np.zeros((s, s), np.float32)
    if smoke:
        plume = _plume(rng, s, yy, xx, tops)
        colour = rng.choice([[235, 235, 235], [170, 170, 175], [120, 110, 100], [200, 180, 140]])
        colour = colour + rng.uniform(-15, 15, 3)
        change = np.abs(colour - image).max(axis=-1) * plume  # how much the plume shows
        image = image * (1 - plume[..., None]) + colour * plume[..., None]
    image = image + rng.normal(0, 3, image.shape)  # sensor noise
    # Smoke is what a person would label: where the plume visibly changes the scene.
    mask = np.where(change > SMOKE_VISIBLE, 1, np.where(change > SMOKE_FAINT, IGNORE, 0))
    context &= mask == 0
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8), context

def synthesize(out: Path, config: SynthConfig) -> dict:
    """Write a dataset folder of generated scenes into the empty folder `out`; returns counts
    per split."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "masks", "context"):
        (out / sub).mkdir()
    (out / "classes.txt").write_text("smoke\n")
    (out / "synth.json").write_text(json.dumps(dataclasses.asdict(config)) + "\n")
    counts = {}
    for split, n, coupling, offset in (("train", config.n_train, config.coupling, 0),
                                       ("val", config.n_val, config.val_coupling, 1)):
        rng = np.random.default_rng([config.seed, offset])
        rows = []
        for i in range(n):
            smoke = rng.random() < config.positive_share
            chimneys = smoke or rng.random() >= coupling
            image, mask, context = render_scene(rng, config.size, smoke, chimneys)
            stem = f"{split}_{i:05d}"
            Image.fromarray(image).save(out / "images" / f"{stem}.png", compress_level=1)
            Image.fromarray(mask).save(out / "masks" / f"{stem}.png", compress_level=1)
            Image.fromarray(context.astype(np.uint8) * 255).save(out / "context" / f"{stem}.png",
                                                                 compress_level=1)
            rows.append((stem, ["smoke"] if (mask == 1).any() else []))
        write_split(out, split, rows)
        counts[split] = {"images": n, "positive": sum(1 for _, c in rows if c)}
    return counts

def ensure_default_data(path: Path) -> Path:
    """The default dataset: generated once with SynthConfig() when missing; one generated with
    other settings (an older default) is named, never replaced without --force."""
    if not (path / "classes.txt").is_file():
        print(f"generating the default synthetic dataset in {path} ...")
        with output_dir(path, force=False) as tmp:
            synthesize(tmp, SynthConfig())
    made = path / "synth.json"
    if not made.is_file() or json.loads(made.read_text()) != dataclasses.asdict(SynthConfig()):
        raise UserError(f"{path}: not the default synthetic dataset (other settings, or an "
                        f"older default); `python wsss.py synth --out {path} --force` "
                        f"regenerates it")
    return path

# --- data import: SMOKE5K photographs, tiled --------------------------------------------------

@dataclass
class PrepareConfig:
    tile: int = setting(128, "tile side in pixels", at_least=16)
    min_share: float = setting(0.02, "a tile is a positive when at least this share of its "
                               "pixels is smoke", **SHARE)
    val_share: float = setting(0.2, "share of photographs held out for the validation split "
                               "(all tiles of a photo together)", **SHARE)
    seed: int = setting(0, "seed of the train/val split of photographs")

def tile_origins(length: int, tile: int) -> list[int]:
    """Evenly spaced tile starts that cover [0, length) with the fewest tiles (overlap allowed)."""
    if length <= tile:
        return [0]
    n = -(-length // tile)  # ceil
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]

def prepare_smoke5k(src: Path, dst: Path, config: PrepareConfig) -> dict:
    """SMOKE5K layout (SRC/img/*.jpg, SRC/gt/*.png with 0/255) -> tiled dataset folder.

    A tile is positive when smoke covers >= min_share of it, negative when it has no smoke pixel;
    tiles in between are ambiguous and skipped. Photos smaller than a tile are skipped.
    The split is by photograph, so tiles of one photo never land in both splits.
    `dst` is an empty folder.
    """
    for sub in ("img", "gt"):
        if not (src / sub).is_dir():
            raise UserError(f"{src / sub}: folder not found (expected SMOKE5K's img/ and gt/)")
    photos = sorted(p for p in (src / "img").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not photos:
        raise UserError(f"{src / 'img'}: no .jpg or .png photographs")
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    (dst / "classes.txt").write_text("smoke\n")
    rows = {"train": [], "val": []}
    counts = {"photos": len(photos), "skipped_photos": 0, "ambiguous": 0}
    t = config.tile
    for photo in photos:
        gt_path = src / "gt" / (photo.stem + ".png")
        if not gt_path.is_file():
            raise UserError(f"{gt_path}: ground truth missing for {photo.name}")
        image = load_image(photo)
        with Image.open(gt_path) as g:
            gt = np.array(g.convert("L")) > 127
        if gt.shape != (image.height, image.width):
            raise UserError(f"{gt_path}: mask is {gt.shape[1]}x{gt.shape[0]} but its image is "
                            f"{image.width}x{image.height}")
        if image.width < t or image.height < t:
            counts["skipped_photos"] += 1
            continue
        # A stable hash (not Python's salted hash) decides the split of a photograph.
        digest = hashlib.sha1(f"{config.seed}:{photo.stem}".encode()).digest()
        split = "val" if int.from_bytes(digest[:4], "big") / 2**32 < config.val_share else "train"
        pixels = np.array(image)
        for y in tile_origins(image.height, t):
            for x in tile_origins(image.width, t):
                share = gt[y:y + t, x:x + t].mean()
                if 0 < share < config.min_share:
                    counts["ambiguous"] += 1
                    continue
                stem = f"{photo.stem}_y{y}_x{x}"
                Image.fromarray(pixels[y:y + t, x:x + t]).save(dst / "images" / f"{stem}.png")
                Image.fromarray(gt[y:y + t, x:x + t].astype(np.uint8)).save(
                    dst / "masks" / f"{stem}.png")
                rows[split].append((stem, ["smoke"] if share > 0 else []))
    for split, r in rows.items():
        write_split(dst, split, r)
        counts[split] = {"tiles": len(r), "positive": sum(1 for _, c in r if c)}
    return counts

# --- stage 3: a segmentation network trained on the pseudo masks ------------------------------

SEGMENT_CHECKPOINTS = {"pseudo": "segment", "truth": "segment_truth"}  # --seg-targets -> RUN/<>.pt

def train_segmenter(run: Path, config: RunConfig, device: torch.device, log: Log
                    ) -> models.DeepLab:
    """Stage 3 on the pseudo masks (255 ignored), or on the ground truth for the upper bound;
    checkpointed to RUN/segment.pt (segment_truth.pt), resumable."""
    seg = config.segment
    masks = None
    if seg.seg_targets == "pseudo":
        masks = Path(seg.seg_masks) if seg.seg_masks else run / "pseudo_train"
        if not masks.is_dir():
            raise UserError(f"{masks}: no pseudo masks; `python wsss.py pseudo --run {run}` "
                            f"writes them")
    # Random flips, as every segmentation recipe; the pseudo masks flip with their images.
    dataset = SmokeDataset(config.data, "train", size=config.model.image_size, flip=True,
                           masks=masks)
    if not dataset.has_masks:
        raise UserError(f"{Path(config.data) / 'masks'}: no ground-truth masks to train on")
    torch.manual_seed(config.train.seed)
    net = models.build_segmenter(config.model.without_weights(), len(dataset.classes))
    if seg.seg_init == "run":  # the teacher's trained backbone (no ImageNet weights here)
        state = load_checkpoint(checkpoint_path(run, "teacher"))["model"]
        net.backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()
                                      if k.startswith("backbone.")})
    net = net.to(device)
    log(f"stage 3: DeepLabv3 on the teacher's ResNet, {models.count_parameters(net) / 1e6:.2f} M "
        f"parameters, from {seg.seg_init}, on {masks or 'the ground-truth masks'}")
    name = SEGMENT_CHECKPOINTS[seg.seg_targets]
    stage = with_overrides(config, {"batch_size": seg.seg_batch_size, "lr": seg.seg_lr,
                                    "clip_grad": 0.0})

    def step(batch, net):
        return {"loss": losses.segmentation_loss(net(batch["image"]), batch["mask"], IGNORE)}

    train_stage(name, net, step, dataset, run, stage, seg.seg_epochs, device, log)
    return models.freeze(net)

def load_segmenter(run: Path, config: RunConfig, device: torch.device,
                   name: str = "segment") -> torch.nn.Module | None:
    """The run's trained stage-3 network, or None when it has none."""
    path = run / f"{name}.pt"
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    if not ckpt["done"]:
        raise UserError(f"{path}: stage 3 stopped before it finished; `python wsss.py segment "
                        f"--run {run}` continues it")
    num_classes = len(read_classes(Path(config.data)))
    net = models.build_segmenter(config.model.without_weights(), num_classes)
    restore(net, ckpt, path)
    return models.freeze(net.to(device))

def segment_masks(net: torch.nn.Module, images: torch.Tensor, sizes: list[tuple[int, int]],
                  device: torch.device, amp: str) -> list[torch.Tensor]:
    """Stage-3 masks (h, w) uint8 at each image's own size: logits upsampled, then argmax."""
    with torch.no_grad(), models.autocast(amp, device):
        logits = net(images.to(device)).float()
    return [F.interpolate(z[None], size=size, mode="bilinear", align_corners=False)[0]
            .argmax(0).to(torch.uint8).cpu() for z, size in zip(logits, sizes)]

def segment_split(net: torch.nn.Module, config: RunConfig, split: str, out: Path,
                  device: torch.device) -> dict | None:
    """Stage-3 masks of a whole split into `out` (file sizes), scored as `eval` scores them."""
    dataset = SmokeDataset(config.data, split, size=config.model.image_size)
    for batch in torch.utils.data.DataLoader(dataset, batch_size=config.segment.seg_batch_size):
        sizes = [tuple(s) for s in batch["size"].tolist()]
        masks = segment_masks(net, batch["image"], sizes, device, config.train.amp)
        for stem, mask in zip(batch["stem"], masks):
            save_mask(mask, out / f"{stem}.png")
    if not dataset.has_masks:
        return None
    return evaluate_folder(SmokeDataset(config.data, split, size=None), out)

# --- prediction: masks and overlays for any images --------------------------------------------

def find_images(paths: list[str], folder: str | None) -> list[Path]:
    """The files named, or the image files of `folder` (not its subfolders); stems unique,
    since each names its mask."""
    if folder is not None:
        root = Path(folder)
        if not root.is_dir():
            raise UserError(f"{root}: folder not found")
        # Broken links and link loops are kept: reading them fails, and they are reported.
        files = sorted(p for p in root.iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
    else:
        files = [Path(p) for p in paths]
    if not files:
        raise UserError(f"{folder or 'the command line'}: no images "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise UserError(f"{path} and {seen[path.stem]}: two images named {path.stem!r} would "
                            f"write one mask")
        seen[path.stem] = path
    return files

def cam_masks(config: RunConfig, teacher: models.Teacher, student: models.Student, batch: dict,
              sizes: list[tuple[int, int]], device: torch.device) -> list[torch.Tensor]:
    """Without a stage-3 network: the run's CAM and refinement, gated by the CAM network's own
    classifier (a class is present where its sigmoid exceeds 0.5); masks at each image's size."""
    classifier = student if config.cam.cam_network == "student" else teacher
    with torch.no_grad():
        logits = classifier(batch["image"].to(device))[0].float()
    batch = {**batch, "label": (torch.sigmoid(logits) > 0.5).float().cpu()}
    cams = postprocess.batch_cams(batch, config.cam, config.refine, teacher, student, device,
                                  config.train.amp)
    masks = postprocess.pseudo_mask(batch["rgb"], cams, config.cam, config.refine).cpu()
    return [postprocess.resize_mask(m, size) for m, size in zip(masks, sizes)]

def read_batch(files: list[Path], size: int) -> tuple[list, dict, list[str]]:
    """Decodable files as (path, full-size RGB (3,H,W)), the network's batch of them, and the
    files that do not decode (reported and skipped)."""
    loaded, skipped = [], []
    for path in files:
        try:
            rgb = torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1)  # -> (3,H,W)
            loaded.append((path, rgb))
        except UserError as e:
            print(f"skipped {e}", flush=True)
            skipped.append(str(path))
    if not loaded:
        return [], {}, skipped
    rgb = torch.stack([v2.functional.resize(r, [size, size], antialias=True) for _, r in loaded])
    return loaded, {"image": models.network_input(rgb), "rgb": rgb}, skipped

def predict(run: Path, files: list[Path], out: Path, device: torch.device,
            batch_size: int) -> dict:
    """Masks (OUT/<stem>.png, class indices at the input's size) and overlays
    (OUT/overlays/<stem>.jpg) for any images: by the stage-3 network when the run has one."""
    config, teacher, student = load_run(run, device)
    segmenter = load_segmenter(run, config, device)
    num_classes = len(read_classes(Path(config.data)))
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    skipped, done, began = [], 0, time.perf_counter()
    for start in range(0, len(files), batch_size):
        loaded, batch, bad = read_batch(files[start:start + batch_size], config.model.image_size)
        skipped += bad
        if not loaded:
            continue
        sizes = [tuple(rgb.shape[1:]) for _, rgb in loaded]
        if segmenter is not None:
            masks = segment_masks(segmenter, batch["image"], sizes, device, config.train.amp)
        else:
            masks = cam_masks(config, teacher, student, batch, sizes, device)
        for (path, full), mask in zip(loaded, masks):
            save_mask(mask, out / f"{path.stem}.png")
            save_picture(postprocess.overlay(full, mask, num_classes),
                         out / "overlays" / f"{path.stem}.jpg", quality=90)
        done += len(loaded)
    return {"images": done, "skipped": skipped, "seconds": time.perf_counter() - began,
            "method": "stage-3 network" if segmenter is not None else
            f"{config.cam.cam_network} CAM + refinement"}

# --- the ablation: the paper's comparisons, one training per distinct setting and seed ---------

# key -> (label, training overrides, CAM/refine overrides)
ABLATION_ROWS = {
    "teacher": ("teacher CAM (ResNet)", {}, {"cam_network": "teacher"}),
    "alone": ("student CAM alone (ViT, λ = κ = 0)", ALONE, {}),
    "aligned": ("aligned student, cosine channel (the method)", {}, {}),
    "no-distill": ("aligned student without soft labels (κ = 0)", {"distill_weight": 0.0}, {}),
    "squared": ("aligned student, squared target (γ = 2)", {"align_power": 2.0}, {}),
    "guide": ("aligned student + feature guidance (β = 1)", {"guide_weight": 1.0}, {}),
    "global": ("aligned student, cosine global", {"align_reduce": "global"}, {}),
    "window1": ("aligned student, single-patch pooling", {"student_window": 1}, {}),
    "spatial": ("aligned student, cosine spatial", {"align_reduce": "spatial"}, {}),
    "l1": ("aligned student, L1 global", {"align_kind": "l1"}, {}),
    "l2": ("aligned student, L2 global", {"align_kind": "l2"}, {}),
    "lambda1": ("λ = 1 (the paper's)", {"align_weight": 1.0}, {}),
    "lambda0.3": ("λ = 0.3", {"align_weight": 0.3}, {}),
    "lambda0.5": ("λ = 0.5", {"align_weight": 0.5}, {}),
    "lambda1.5": ("λ = 1.5", {"align_weight": 1.5}, {}),
    "no-consistency": ("no consistency loss (μ = 0)", {"consistency_weight": 0.0}, {}),
    "rescale": ("rescaled consistency view", {"consistency_view": "rescale"}, {}),
    "alone-rescale": ("student alone, rescaled consistency view",
                      {**ALONE, "consistency_view": "rescale"}, {}),
    "single-scale": ("single-scale CAM (no multi-scale, no flip)", {},
                     {"cam_scales": (1.0,), "cam_flip": False}),
    "threshold0.3": ("threshold 0.3 (the paper's)", {}, {"threshold": 0.3}),
    "crf": ("+ dense CRF", {}, {"crf": True}),
    "coverage": ("+ coverage fix", {}, {"coverage_fix": True}),
    "crf+coverage": ("+ dense CRF + coverage fix", {}, {"crf": True, "coverage_fix": True}),
}
QUICK_ROWS = ("teacher", "alone", "aligned", "crf")
# The full grid's student budget (the default run and --quick: 8 epochs), so that its student
# trainings over 3 seeds fit in about an hour on 2 CPU cores.
ABLATION_STUDENT_EPOCHS = 4

def ablation_run(root: Path, base: RunConfig, overrides: dict, seed: int) -> Path:
    """Train (or reuse) the run of one training setting. Runs of one seed share the teacher
    stage: it does not depend on the student's settings, so its checkpoint is copied."""
    config = with_overrides(base, {**overrides, "seed": seed})
    # Overrides that change nothing (a row's setting is already the base's) share its run.
    changed = {k: v for k, v in overrides.items() if getattr(getattr(base, FIELDS[k][0]), k) != v}
    name = "_".join(f"{k}={v}" for k, v in sorted(changed.items())) or "default"
    run = root / f"{name.replace(' ', '')}_seed{seed}"
    if (run / "student.pt").is_file() and load_checkpoint(run / "student.pt")["done"]:
        return run
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    shared = root / f"default_seed{seed}" / "teacher.pt"
    if shared.is_file() and not (run / "teacher.pt").exists():
        shutil.copy(shared, run / "teacher.pt")
    dataset = SmokeDataset(config.data, "train", size=config.model.image_size,
                           flip=config.train.flip, crop=config.train.crop)
    train_networks(run, config, dataset, pick_device(config.train.device), Log(run / "log.txt"))
    return run

def ablate(root: Path, base: RunConfig, rows: list[str], seeds: list[int], split: str) -> dict:
    """Pseudo-mask scores on `split` (label -> one result per seed) of every row; each
    distinct training setting is trained once per seed."""
    device = pick_device(base.train.device)
    dataset = SmokeDataset(base.data, split, size=base.model.image_size)
    table = {}
    for seed in seeds:
        loaded = {}  # run -> (teacher, student): rows that differ only in read-out share a run
        for name in sorted(rows, key=lambda n: bool(ABLATION_ROWS[n][1])):  # default runs first
            label, training, read_out = ABLATION_ROWS[name]
            run = ablation_run(root, base, training, seed)
            if run not in loaded:
                loaded[run] = load_run(run, device)[1:]
            teacher, student = loaded[run]
            shown = with_overrides(base, read_out)  # the row's CAM and refinement settings
            scores = write_pseudo_masks(dataset, None, shown.cam, shown.refine, teacher, student,
                                        device, base.train.amp)
            table.setdefault(label, []).append(scores)
            print(postprocess.format_scores(f"{label} (seed {seed})", scores), flush=True)
    return {ABLATION_ROWS[n][0]: table[ABLATION_ROWS[n][0]] for n in rows}

def ablation_table(results: dict, split: str) -> str:
    """Markdown: mean ± std over seeds of the headline figures."""
    keys = (("smoke_iou", "smoke IoU"), ("image_iou", "per-image IoU"), ("precision", "precision"),
            ("recall", "recall"), ("boundary_f1", "boundary F1"),
            ("context_fp", "chimney called smoke %"))
    n = len(next(iter(results.values())))
    lines = [f"| pseudo masks ({split} split, {n} seed{'s' if n > 1 else ''}) | "
             + " | ".join(label for _, label in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for name, runs in results.items():
        cells = []
        for key, _ in keys:
            values = np.array([r[key] for r in runs])
            cells.append(f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1
                         else f"{values.mean():.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

# --- the commands ----------------------------------------------------------------------------

def cmd_synth(args: argparse.Namespace) -> None:
    config = config_from_args(SynthConfig, args)
    check_settings(config)
    start = time.perf_counter()
    with output_dir(Path(args.out), args.force) as tmp:
        counts = synthesize(tmp, config)
    seconds = time.perf_counter() - start
    print(f"wrote {args.out}: {json.dumps(counts)} in {seconds:.1f} s "
          f"({(config.n_train + config.n_val) / seconds:.0f} images/s)")

def cmd_prepare(args: argparse.Namespace) -> None:
    config = config_from_args(PrepareConfig, args)
    check_settings(config)
    src = Path(args.src)
    with output_dir(Path(args.dst), args.force, folders=(src,)) as tmp:
        counts = prepare_smoke5k(src, tmp, config)
    print(f"wrote {args.dst}: {json.dumps(counts)}")

def cmd_pseudo(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    run = run_path(args.run)
    config, teacher, student = load_run(run, device)
    cam = config_from_args(postprocess.CamConfig, args, config.cam)
    refine_config = config_from_args(postprocess.RefineConfig, args, config.refine)
    check_settings(cam, refine_config)
    data = Path(args.data or config.data)
    dataset = SmokeDataset(data, args.split, size=config.model.image_size)
    out = Path(args.out or run / f"pseudo_{args.split}")
    began = time.perf_counter()
    with output_dir(out, args.force, inputs=run_files(run), folders=(data,)) as tmp:
        scores = write_pseudo_masks(dataset, tmp, cam, refine_config, teacher, student, device,
                                    config.train.amp, tmp / "overlays.png")
    seconds = time.perf_counter() - began
    print(f"wrote {len(dataset)} mask{'s' * (len(dataset) != 1)} to {out} in {seconds:.1f} s "
          f"({len(dataset) / seconds:.1f} images/s); overlays: {out / 'overlays.png'}")
    if scores is not None:
        print(postprocess.format_scores(f"{data.name} {args.split}, {cam.cam_network} CAM", scores))
        if args.json:
            print(json.dumps(scores))

def cmd_segment(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    run = run_path(args.run)
    config = read_run_config(run)
    seg = config_from_args(SegmentConfig, args, config.segment)
    check_settings(seg)
    name = SEGMENT_CHECKPOINTS[seg.seg_targets]
    path = run / f"{name}.pt"

    def settings() -> SegmentConfig:
        if path.is_file() and args.force:
            path.unlink()
        elif path.is_file():
            ckpt = load_checkpoint(path)
            if ckpt["done"]:
                raise UserError(f"{path}: already trained (use --force to train it again)")
            return RunConfig.from_dict(ckpt["config"]).segment  # resume as it began
        return seg

    config = dataclasses.replace(config, segment=on_first_process(settings))
    device = pick_device(args.device or config.train.device)
    log = Log(run / "log.txt")
    log(f"segment {run}: " + json.dumps(dataclasses.asdict(config.segment)))
    net = train_segmenter(run, config, device, log)
    if (Path(config.data) / "val.txt").is_file() and rank_and_count()[0] == 0:
        out = run / f"{name}_val"
        fresh_output_dir(out, force=True)  # derived from the checkpoint: always rewritten
        scores = segment_split(net, config, "val", out, device)
        if scores is not None:
            log(postprocess.format_scores(
                f"stage 3 ({config.segment.seg_targets}) on val vs ground truth", scores))
            (run / f"{name}_val.json").write_text(json.dumps(scores, indent=2) + "\n")
    log(f"wall time {time.perf_counter() - began:.0f} s; `python wsss.py predict --run {run} "
        f"--input DIR` segments new images")

def cmd_predict(args: argparse.Namespace) -> None:
    if bool(args.images) == bool(args.input):
        raise UserError("name images, or a folder with --input (not both)")
    run = run_path(args.run)
    read_run_config(run)  # a wrong --run is named before any image is read
    files = find_images(args.images, args.input)
    out = Path(args.out or run / "predict")
    device = pick_device(args.device)
    folders = (Path(args.input),) if args.input else ()
    with output_dir(out, args.force, inputs=(*files, *run_files(run)), folders=folders) as tmp:
        r = predict(run, files, tmp, device, args.batch_size)
    print(f"{r['images']} mask{'s' * (r['images'] != 1)} in {out} ({r['method']}, {device}): "
          f"{r['seconds']:.1f} s, {r['images'] / max(r['seconds'], 1e-9):.1f} images/s; "
          f"overlays in {out / 'overlays'}")
    if r["skipped"]:
        print(f"skipped {len(r['skipped'])} unreadable file(s): {', '.join(r['skipped'][:5])}"
              + (" ..." if len(r["skipped"]) > 5 else ""))

def cmd_eval(args: argparse.Namespace) -> None:
    dataset = SmokeDataset(Path(args.data), args.split, size=None)
    result = evaluate_folder(dataset, Path(args.pred))
    if args.json:
        return print(json.dumps(result))
    print(postprocess.format_scores(f"{len(dataset)} images of {args.data} {args.split} vs "
                                    f"{args.pred}", result))
    print("  IoU per class: " + "  ".join(
        f"{name} {iou:.1f}" for name, iou in zip(["background", *dataset.classes],
                                                  result["per_class_iou"])))

def cmd_ablate(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    if not args.data:
        ensure_default_data(DEFAULT_DATA)
    base = config_from_flags(args)
    if args.student_epochs is None and not args.quick:
        base.train.student_epochs = min(base.train.student_epochs, ABLATION_STUDENT_EPOCHS)
    verify_splits(Path(base.data))
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    rows = args.rows or list(QUICK_ROWS if args.quick else ABLATION_ROWS)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    print(f"ablate: rows {' '.join(rows)}; seeds {' '.join(map(str, seeds))}; scored on "
          f"{args.split}\n{describe(base)}", flush=True)
    results = ablate(root, base, rows, seeds, args.split)
    table = ablation_table(results, args.split)
    (root / "ablation.md").write_text(table)
    (root / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    print(f"wrote {root / 'ablation.md'} in {time.perf_counter() - began:.0f} s")

def cmd_bench(args: argparse.Namespace) -> None:
    """Our dense CRF against pydensecrf on SMOKE5K-style photographs (img/*.jpg, gt/*.png)."""
    root = Path(args.photos)
    masks = sorted((root / "gt").glob("*.png"))[: args.n] if (root / "gt").is_dir() else []
    pairs = [(root / "img" / f"{m.stem}.jpg", m) for m in masks]
    pairs = [(image, mask) for image, mask in pairs if image.is_file()]
    if not pairs:
        raise UserError(f"{root}: no SMOKE5K-style img/*.jpg + gt/*.png pairs")
    print(f"bench crf: {len(pairs)} photographs from {root} at 320x240, 2 classes, "
          f"{args.iters} iterations")
    images, truths = [], []
    for image_path, mask_path in pairs:
        image = load_image(image_path).resize((320, 240), Image.BILINEAR)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))  # (H,W,3) -> (3,H,W)
        with Image.open(mask_path) as m:
            truth = np.array(m.convert("L").resize((320, 240), Image.NEAREST)) > 127
        truths.append(torch.from_numpy(truth).long())
    for row in postprocess.bench_dense_crf(images, truths, args.iters, args.batch):
        print(f"{row['settings']}\n"
              f"  time per image (1 thread, median): ours {row['ours_ms']:.0f} ms, pydensecrf "
              f"{row['pydensecrf_ms']:.0f} ms, ratio {row['ours_ms'] / row['pydensecrf_ms']:.2f}\n"
              f"  ours batched ({args.batch} a batch, {torch.get_num_threads()} threads): "
              f"{row['batched_ips']:.1f} images/s\n"
              f"  label agreement with pydensecrf: {row['agreement']:.2f} % of pixels\n"
              f"  smoke IoU vs ground truth: before CRF {row['iou_before']:.2f}, after "
              f"pydensecrf {row['iou_pydensecrf']:.2f}, after ours {row['iou_ours']:.2f}")

# --- the command line ------------------------------------------------------------------------

def add_field_flag(parser, f: dataclasses.Field) -> None:
    """The --flag of one dataclass field, typed from the field, help from its metadata."""
    flag = "--" + f.name.replace("_", "-")
    default = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    text = f.metadata.get("help", "") + (f" (default: {default})" if default != "" else "")
    if f.type is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
    elif getattr(f.type, "__origin__", None) is tuple:
        parser.add_argument(flag, type=f.type.__args__[0], nargs="+", help=text)
    else:
        parser.add_argument(flag, type=f.type, help=text, choices=f.metadata["choices"] or None)

def add_config_flags(parser, cls: type, skip: tuple = ()) -> None:
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            add_field_flag(parser, f)

def config_from_args(cls: type, args: argparse.Namespace, base=None):
    """The dataclass with every flag the user gave applied over `base` (or the defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    return dataclasses.replace(base if base is not None else cls(), **given)

def config_from_flags(args: argparse.Namespace) -> RunConfig:
    """The preset's values, then every flag the user gave; checked before any work."""
    preset = preset_config(args.preset, str(args.data or DEFAULT_DATA))
    parts = {name: config_from_args(cls, args, getattr(preset, name))
             for name, cls in CONFIGS.items()}
    config = RunConfig(data=preset.data, **parts)
    check_run_config(config)
    return config

def given_flags(args: argparse.Namespace) -> list[str]:
    """The setting flags the user gave on the command line, as --names."""
    return ["--" + name.replace("_", "-") for name in FIELDS
            if getattr(args, name, None) is not None]

def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (the parser names the flag when it is not)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value

class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (exit code 2), not under the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")

def add_common(p: argparse.ArgumentParser, *flags: str, run: str = "") -> None:
    """The flags several commands share, with one wording."""
    if run:  # --run-dir too: torchrun takes a --run after the script for its own --run-path
        p.add_argument("--run", "--run-dir", dest="run", required=True,
                       help=f"{run}; `latest`: the newest run under {RUNS}/")
    texts = {"--force": "replace an existing output", "--json": "also print the scores as JSON",
             "--device": "cuda, mps, cpu or auto (default: auto)"}
    for flag in flags:
        kind = {"action": "store_true"} if flag != "--device" else {"default": "auto"}
        p.add_argument(flag, help=texts[flag], **kind)

FIRST_FLAGS = ("align_weight", "distill_weight", "consistency_weight", "teacher_epochs",
               "student_epochs", "seed")

def add_run_settings(p: argparse.ArgumentParser, preset: str) -> None:
    """train's and ablate's settings: the few a reader changes first, then a group a part."""
    main = p.add_argument_group("main settings")
    main.add_argument("--data", help=f"dataset folder (default: generate {DEFAULT_DATA})")
    main.add_argument("--preset", choices=list(PRESETS), default=preset,
                      help=f"cpu: the default recipe, for a laptop; quick: a three-minute try; "
                           f"squared: a higher mean in bfloat16, a wider spread over seeds; "
                           f"faithful: the paper's recipe on small networks; paper: the paper's "
                           f"sizes, for a GPU (default: {preset})")
    for name in FIRST_FLAGS:
        add_field_flag(main, FIELDS[name][1])
    for name, cls in CONFIGS.items():
        if name != "segment":  # stage 3's settings belong to `segment`
            add_config_flags(p.add_argument_group(f"{name} settings"), cls, skip=FIRST_FLAGS)

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="wsss.py", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train teacher and student, write and score pseudo masks",
                       usage="%(prog)s [--preset P] [--data DIR] [--out RUN | --resume RUN] "
                             "[SETTING ...]")
    add_run_settings(p, "cpu")
    p.add_argument("--out", help=f"run folder to write (default: {RUNS}/<date-time>)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN where it stopped, with its "
                   "settings; `latest`: the newest run")
    add_common(p, "--force")
    p = sub.add_parser("pseudo", help="pseudo masks, overlays and scores from a trained run")
    add_common(p, "--force", "--json", "--device", run="run folder written by `train`")
    p.add_argument("--data", help="dataset folder (default: the run's)")
    p.add_argument("--split", default="train", help="split to label (default: train)")
    p.add_argument("--out", help="folder for the masks (default: RUN/pseudo_<split>)")
    for name in ("cam", "refine"):
        add_config_flags(p.add_argument_group(f"{name} settings (default: the run's)"),
                         CONFIGS[name])
    p = sub.add_parser("segment", help="stage 3: a segmentation network on a run's pseudo masks")
    add_common(p, "--force", run="run folder written by `train`")
    p.add_argument("--device", help="cuda, mps, cpu or auto (default: the run's)")
    add_config_flags(p.add_argument_group("segment settings (default: the run's)"), SegmentConfig)
    p = sub.add_parser("predict", help="masks and overlays for any images")
    add_common(p, "--force", "--device", run="run folder: its stage-3 network when it has one, "
               "else its CAMs + refinement")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--input", help="a folder of images (instead of naming files)")
    p.add_argument("--out", help="folder for <stem>.png masks and overlays/ (default: RUN/predict)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="images a batch (default: 16)")
    p = sub.add_parser("eval", help="score predicted masks against ground truth")
    p.add_argument("--data", required=True, help="dataset folder with masks/")
    p.add_argument("--split", default="val", help="split to score (default: val)")
    p.add_argument("--pred", required=True, help="folder of predicted <stem>.png class masks")
    add_common(p, "--json")
    add_parsers_of_tools(sub)
    return parser

def add_parsers_of_tools(sub) -> None:
    """ablate, synth, prepare and bench."""
    p = sub.add_parser("ablate", help="the paper's comparisons, mean ± std over seeds",
                       usage="%(prog)s [--quick] [--rows ROW ...] [--seeds S ...] [SETTING ...]",
                       description=f"Trains each distinct setting once per seed (students for "
                       f"{ABLATION_STUDENT_EPOCHS} epochs unless --quick or --student-epochs), "
                       f"scores every row's pseudo masks, writes OUT/ablation.md and .json.")
    add_run_settings(p, "cpu")
    p.add_argument("--out", default="runs/ablation", help="folder of the runs and the table; "
                   "finished runs in it are reused (default: runs/ablation)")
    p.add_argument("--quick", action="store_true", help="the four headline rows, one seed, "
                   "students at the default run's budget")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 2; quick: 0)")
    p.add_argument("--rows", nargs="+", choices=list(ABLATION_ROWS), metavar="ROW",
                   help="rows to run (default: all; quick: " + " ".join(QUICK_ROWS) + "); "
                        "any of " + ", ".join(ABLATION_ROWS))
    p.add_argument("--split", default="val", help="split whose pseudo masks are scored "
                   "(default: val)")
    p = sub.add_parser("synth", help="generate an industrial-smoke dataset folder")
    p.add_argument("--out", required=True, help="dataset folder to write")
    add_common(p, "--force")
    add_config_flags(p, SynthConfig)
    p = sub.add_parser("prepare", help="import SMOKE5K photographs into the folder format")
    p.add_argument("source", choices=["smoke5k"], help="which dataset's layout SRC has")
    p.add_argument("src", help="SMOKE5K folder holding img/ and gt/")
    p.add_argument("dst", help="dataset folder to write")
    add_common(p, "--force")
    add_config_flags(p, PrepareConfig)
    p = sub.add_parser("bench", help="our dense CRF against pydensecrf (when installed), side "
                       "by side on real photographs")
    p.add_argument("what", choices=["crf"], help="what to benchmark")
    p.add_argument("--photos", required=True, help="a SMOKE5K-style folder with img/ and gt/")
    p.add_argument("--n", type=positive_int, default=40, help="photographs (default: 40)")
    p.add_argument("--iters", type=positive_int, default=10, help="mean-field iterations "
                   "(default: 10)")
    p.add_argument("--batch", type=positive_int, default=8, help="images a batch (default: 8)")

COMMANDS = {"train": cmd_train, "pseudo": cmd_pseudo, "segment": cmd_segment,
            "predict": cmd_predict, "eval": cmd_eval, "ablate": cmd_ablate, "synth": cmd_synth,
            "prepare": cmd_prepare, "bench": cmd_bench}

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    distributed_run = args.command in ("train", "segment") and init_distributed()
    code, message = 0, ""
    try:
        COMMANDS[args.command](args)
    except (UserError, models.WeightsError) as e:
        code, message = 2, str(e)
    except TrainingError as e:
        code, message = 1, str(e)
    except Interrupted as e:
        code, message = 130, str(e)  # 130: the shell's code for Ctrl-C
    except KeyboardInterrupt:  # Ctrl-C outside a training loop
        code, message = 130, "stopped by Ctrl-C"
    except OSError as e:  # an unwritable or impossible output, a full disk
        code, message = 2, (f"{e.filename}: " if e.filename else "") + f"{e.strerror or e}"
    if code and rank_and_count()[0] == 0:
        print(f"error: {message}", file=sys.stderr)
    if distributed_run:
        # gloo processes abort now and then in their exit handlers ("terminate called without
        # an active exception") although the work is done: leave together, flush, and end the
        # process before those handlers run.
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code

if __name__ == "__main__":
    sys.exit(main())
