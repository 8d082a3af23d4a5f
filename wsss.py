"""Weakly supervised smoke segmentation: the command line, the data, training and evaluation.

Everything that touches the outside world lives here (argv, files, datasets, training loops,
checkpoints, logs); models.py, losses.py and postprocess.py are pure libraries.
Sections, top to bottom: config dataclasses -> data -> commands -> __main__.

    python wsss.py synth --out data/synth      # an industrial-smoke dataset, generated
    python wsss.py prepare smoke5k SRC DST     # SMOKE5K photographs -> the folder format
    python wsss.py train                       # the whole method on the embedded default data
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

import losses
import models
import postprocess

IGNORE = 255  # mask value for "do not score this pixel" (faint plume edges, ambiguous pixels)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DATA = Path("data/synth")  # where `train` generates the embedded dataset on first use


class DataError(Exception):
    """Bad input a user can fix: the CLI prints it as one line and exits with code 2."""


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; anything else is passed to torch.device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# -----------------------------------------------------------------------------
# Config dataclasses. Each field's metadata["help"] becomes its --flag's help.


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class SynthConfig:
    n_train: int = field(default=1000, metadata=_help("training images"))
    n_val: int = field(default=200, metadata=_help("validation images"))
    size: int = field(default=128, metadata=_help("image side in pixels"))
    positive_share: float = field(default=0.5, metadata=_help("share of images with an emission"))
    coupling: float = field(default=0.9, metadata=_help(
        "spurious correlation in the training split: the probability that a smoke-free image "
        "has no chimney (1 = chimneys appear only with smoke)"))
    val_coupling: float = field(default=0.3, metadata=_help(
        "the same for the validation split; lower, so that chimney bias shows in the scores"))
    seed: int = field(default=0, metadata=_help("random seed; the same seed gives the same files"))


@dataclass
class PrepareConfig:
    tile: int = field(default=128, metadata=_help("tile side in pixels"))
    min_share: float = field(default=0.02, metadata=_help(
        "a tile is a positive when at least this share of its pixels is smoke"))
    val_share: float = field(default=0.2, metadata=_help(
        "share of photographs held out for the validation split (all tiles of a photo together)"))
    seed: int = field(default=0, metadata=_help("seed of the train/val split of photographs"))


@dataclass
class ModelConfig:
    teacher: str = field(default="resnet18", metadata=_help(
        "teacher backbone: resnet18, resnet34, resnet50 or resnet101"))
    teacher_width: int = field(default=32, metadata=_help(
        "channels of the teacher's first stage (64 = the standard ResNet)"))
    output_stride: int = field(default=8, metadata=_help("teacher output stride: 8, 16 or 32"))
    pcm: bool = field(default=False, metadata=_help(
        "refine the teacher's CAM with SEAM's pixel correlation module"))
    student: str = field(default="vit_tiny", metadata=_help(
        "student backbone: vit_tiny, vit_small or vit_base"))
    student_depth: int = field(default=6, metadata=_help("transformer blocks of the student"))
    patch_size: int = field(default=8, metadata=_help("student patch size"))
    image_size: int = field(default=128, metadata=_help("training image side in pixels"))
    teacher_weights: str = field(default="", metadata=_help(
        "local file of pretrained teacher backbone weights (torchvision names)"))
    student_weights: str = field(default="", metadata=_help(
        "local file of pretrained student backbone weights (timm or torchvision names)"))


@dataclass
class TrainConfig:
    mode: str = field(default="distill", metadata=_help(
        "distill: train the teacher, freeze it, then the student (the paper); "
        "co-train: both from scratch together"))
    teacher_epochs: int = field(default=8, metadata=_help("epochs of the teacher stage"))
    student_epochs: int = field(default=8, metadata=_help("epochs of the student stage"))
    batch_size: int = field(default=16, metadata=_help("images a step"))
    lr: float = field(default=1e-3, metadata=_help(
        "AdamW peak learning rate: linear warm-up over the first epoch, then cosine decay"))
    weight_decay: float = field(default=0.05, metadata=_help("AdamW weight decay"))
    flip: bool = field(default=False, metadata=_help("random horizontal flips (the paper: none)"))
    amp: str = field(default="auto", metadata=_help(
        "mixed precision: auto (bf16 where the device supports it), bf16, fp16 (CUDA) or off"))
    seed: int = field(default=0, metadata=_help("seed of initialisation and data order"))
    device: str = field(default="auto", metadata=_help("cuda, mps, cpu or auto"))
    workers: int = field(default=0, metadata=_help("data loader worker processes"))
    log_every: int = field(default=20, metadata=_help("steps between progress lines"))


@dataclass
class LossConfig:
    align_weight: float = field(default=1.0, metadata=_help(
        "lambda, the weight of the alignment loss (0 = the student alone)"))
    align_kind: str = field(default="cosine", metadata=_help("alignment: cosine, l1 or l2"))
    align_reduce: str = field(default="global", metadata=_help(
        "cosine over the whole map (global), each channel's map, or each location's channels"))
    consistency_weight: float = field(default=0.0, metadata=_help(
        "mu, the weight of the flip + rescale consistency loss of the student's maps"))
    consistency_scale: float = field(default=0.75, metadata=_help(
        "rescale factor of the consistency loss's augmented view"))


@dataclass
class CamConfig:
    cam_network: str = field(default="student", metadata=_help(
        "whose CAMs become pseudo masks: student or teacher"))
    cam_method: str = field(default="gradcam", metadata=_help(
        "student CAM: gradcam (on the last block's norm1, the paper) or proj (its 1x1 map)"))
    cam_scales: tuple[float, ...] = field(default=(1.0, 1.5), metadata=_help(
        "input scales averaged (the paper: 0.5 1 1.5 2)"))
    cam_flip: bool = field(default=True, metadata=_help("also average the horizontally flipped input"))
    threshold: float = field(default=0.3, metadata=_help(
        "background score: a pixel is smoke where its normalised CAM exceeds it"))
    cam_batch_size: int = field(default=32, metadata=_help("images a batch when computing CAMs"))


CONFIGS = {"model": ModelConfig, "train": TrainConfig, "loss": LossConfig, "cam": CamConfig}

# Presets: overrides of the defaults above. "cpu" fits a 2-core laptop in minutes; "paper" is
# the paper's setting (ResNet-50 OS16 + PCM teacher, ViT-B/16 at 512 px, AdamW 1e-4, batch 8).
PRESETS = {
    "cpu": {},
    "paper": {
        "model": dict(teacher="resnet50", teacher_width=64, output_stride=16, pcm=True,
                      student="vit_base", student_depth=12, patch_size=16, image_size=512),
        "train": dict(teacher_epochs=3, student_epochs=3, batch_size=8, lr=1e-4),
        "cam": dict(cam_scales=(0.5, 1.0, 1.5, 2.0), cam_batch_size=8),
    },
}


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field, typed from the field, help from its metadata."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif getattr(f.type, "__origin__", None) is tuple:
            item = f.type.__args__[0]
            parser.add_argument(flag, type=item, nargs="+", default=None, help=text)
        else:
            parser.add_argument(flag, type=f.type, default=None, help=text)


def config_from_args(cls: type, args: argparse.Namespace, base=None):
    """The dataclass with every flag the user gave applied over `base` (or the defaults)."""
    config = base if base is not None else cls()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    return dataclasses.replace(config, **given)


# -----------------------------------------------------------------------------
# Data: the folder format, its reader, the synthetic scene generator, the SMOKE5K importer.
#
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
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    path = root / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path}: file not found (one foreground class name a line)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: a class name appears twice")
    return names


def read_split(root: Path, split: str) -> tuple[list[str], list[Sample]]:
    """Parse DIR/<split>.txt; every named file must exist and every class must be known."""
    classes = read_classes(root)
    index = {name: k + 1 for k, name in enumerate(classes)}
    path = root / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        words = line.split()
        if not words:
            continue
        stem, names = words[0], words[1:]
        for name in names:
            if name not in index:
                raise DataError(f"{path}:{number}: unknown class '{name}' (classes.txt has "
                                f"{', '.join(classes)})")
        image = next((root / "images" / (stem + ext) for ext in IMAGE_EXTENSIONS
                      if (root / "images" / (stem + ext)).is_file()), None)
        if image is None:
            raise DataError(f"{path}:{number}: no image images/{stem}.png or .jpg")
        mask = root / "masks" / f"{stem}.png"
        context = root / "context" / f"{stem}.png"
        samples.append(Sample(stem, image, tuple(sorted({index[n] for n in names})),
                              mask if mask.is_file() else None,
                              context if context.is_file() else None))
    if not samples:
        raise DataError(f"{path}: empty split (no image listed)")
    return classes, samples


def load_image(path: Path) -> Image.Image:
    """An RGB PIL image; a file that does not decode is a DataError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({e.__class__.__name__}: {e})") from None


def load_mask(path: Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """A (H, W) uint8 class-index mask, checked against its image size and the class count."""
    try:
        with Image.open(path) as im:
            mask = np.array(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot decode mask ({e.__class__.__name__}: {e})") from None
    if mask.ndim != 2:
        raise DataError(f"{path}: mask must have one channel, found shape {mask.shape}")
    if (mask.shape[1], mask.shape[0]) != size:
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                        f"{size[0]}x{size[1]}")
    bad = np.setdiff1d(np.unique(mask), [*range(num_classes + 1), IGNORE])
    if bad.size:
        raise DataError(f"{path}: mask value {int(bad[0])} is neither a class (0..{num_classes}) "
                        f"nor {IGNORE} (ignore)")
    return mask.astype(np.uint8)


class SmokeDataset(Dataset):
    """One split of a dataset folder.

    Item: {"stem", "image" (3,S,S) normalised float, "rgb" (3,S,S) uint8, "label" (K,) multi-hot
    float, and when the folder has them "mask" (S,S) int64 with 255 = ignore, "context" (S,S) bool}.
    Images without a mask file get an all-ignore mask so that batches stay uniform.
    """

    def __init__(self, root: str | Path, split: str, size: int | None = 128, flip: bool = False):
        self.root = Path(root)
        self.classes, self.samples = read_split(self.root, split)
        self.has_masks = any(s.mask is not None for s in self.samples)
        self.has_context = any(s.context is not None for s in self.samples)
        steps = [v2.Resize((size, size), antialias=True)] if size else []
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(steps or [v2.Identity()])
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.samples)

    def label_vector(self, sample: Sample) -> torch.Tensor:
        label = torch.zeros(len(self.classes))
        for k in sample.labels:
            label[k - 1] = 1.0
        return label

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        pil = load_image(s.image)
        h, w = pil.height, pil.width
        image = tv_tensors.Image(torch.from_numpy(np.array(pil)).permute(2, 0, 1))  # (H,W,3) -> (3,H,W)
        extras = {}
        if self.has_masks:
            mask = (load_mask(s.mask, (w, h), len(self.classes)) if s.mask is not None
                    else np.full((h, w), IGNORE, np.uint8))
            extras["mask"] = tv_tensors.Mask(torch.from_numpy(mask).long())
        if self.has_context:
            context = (np.array(Image.open(s.context).convert("L")) > 0 if s.context is not None
                       else np.zeros((h, w), bool))
            if context.shape != (h, w):
                raise DataError(f"{s.context}: context is {context.shape[1]}x{context.shape[0]} "
                                f"but its image is {w}x{h}")
            extras["context"] = tv_tensors.Mask(torch.from_numpy(context))
        image, extras = self.transform(image, extras)
        item = {"stem": s.stem, "rgb": image.as_subclass(torch.Tensor),
                "image": self.normalize(v2.functional.to_dtype(image, torch.float32, scale=True))
                .as_subclass(torch.Tensor),
                "label": self.label_vector(s)}
        item.update({k: t.as_subclass(torch.Tensor) for k, t in extras.items()})
        return item

    def verify(self) -> None:
        """Decode every file once, so that bad input stops a run before training, not during."""
        for i in range(len(self)):
            self[i]


def verify_splits(root: Path) -> None:
    """Read every file of the training split, and of the validation split when there is one."""
    SmokeDataset(root, "train", size=None).verify()
    if (root / "val.txt").exists():
        SmokeDataset(root, "val", size=None).verify()


def write_split(root: Path, split: str, rows: list[tuple[str, list[str]]]) -> None:
    lines = [" ".join([stem, *names]) for stem, names in rows]
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def fresh_output_dir(path: Path, force: bool) -> None:
    """Create `path`; an existing non-empty folder is replaced only with --force."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not force:
            raise DataError(f"{path}: already exists (use --force to replace it)")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir(parents=True, exist_ok=True)


# --- the synthetic industrial-smoke scene generator --------------------------------------------
# A scene: sky gradient, ground, factory skyline, striped chimneys; an emission is a chain of
# soft Gaussian puffs that leaves a chimney top, bent by wind, thinning as it rises. Clouds and
# haze are smoke-like but unlabelled. Mask = plume opacity > 0.25, with an ignore band down to
# 0.08 (faint edges nobody can label); context = chimney pixels that are not smoke.

SMOKE_OPAQUE, SMOKE_FAINT = 0.25, 0.08


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


def _puffs(yy, xx, centres, radii, densities) -> np.ndarray:
    """Opacity of overlapping Gaussian puffs: 1 - prod_k (1 - d_k * g_k), shape (H, W)."""
    cy = centres[:, 1, None, None]
    cx = centres[:, 0, None, None]
    g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radii[:, None, None] ** 2))
    return 1 - np.prod(1 - densities[:, None, None] * g, axis=0)


def render_scene(rng: np.random.Generator, size: int, smoke: bool, chimneys: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (H,W,3) uint8 image, (H,W) uint8 mask {0,1,255}, (H,W) bool context."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    horizon = rng.uniform(0.62, 0.82) * s
    # Sky: vertical gradient from a zenith colour to a paler horizon colour, mildly noisy.
    zenith = rng.uniform([40, 80, 140], [140, 170, 230])
    pale = rng.uniform([150, 160, 170], [225, 225, 235])
    t = np.clip(yy / horizon, 0, 1)[..., None]
    image = zenith * (1 - t) + pale * t
    image += (_smooth_noise(rng, s, s, 4)[..., None] - 0.5) * 20
    # Ground below the horizon.
    ground = rng.uniform([40, 45, 30], [110, 100, 80])
    below = (yy >= horizon)[..., None]
    image = np.where(below, ground + (_smooth_noise(rng, s, s, 8)[..., None] - 0.5) * 30, image)
    # Factory skyline: dark boxes standing on the horizon.
    for _ in range(rng.integers(2, 6)):
        x0 = rng.uniform(-0.1, 0.9) * s
        w = rng.uniform(0.08, 0.3) * s
        h = rng.uniform(0.04, 0.16) * s
        colour = rng.uniform(40, 110) + rng.uniform(-10, 10, 3)
        box = (xx >= x0) & (xx < x0 + w) & (yy >= horizon - h) & (yy < horizon + 2)
        image[box] = colour
    # Chimneys: tall thin columns, often with red/white bands (industrial stacks).
    context = np.zeros((s, s), bool)
    tops = []
    if chimneys or smoke:
        for _ in range(rng.integers(1, 4)):
            cx = rng.uniform(0.12, 0.88) * s
            w = rng.uniform(0.035, 0.06) * s
            top = horizon - rng.uniform(0.28, 0.5) * s
            body = (np.abs(xx - cx) <= w / 2) & (yy >= top) & (yy < horizon + 2)
            base = rng.uniform(90, 170) + rng.uniform(-15, 15, 3)
            if rng.random() < 0.6:
                band = ((yy - top) // max(2.0, 0.06 * s)).astype(int) % 2 == 0
                colour = np.where(band[..., None], np.array([190, 50, 45]), base)
                image = np.where(body[..., None], colour, image)
            else:
                image[body] = base
            context |= body
            tops.append((cx, top, w))
    # Smoke-like distractors, as likely with smoke as without: clouds and a haze band.
    distractor = np.zeros((s, s), np.float32)
    for _ in range(rng.poisson(1.2)):
        n = rng.integers(3, 7)
        c = np.stack([rng.uniform(0, s) + rng.normal(0, 0.08 * s, n),
                      rng.uniform(0.05, 0.45) * s + rng.normal(0, 0.03 * s, n)], axis=1)
        distractor = np.maximum(distractor, _puffs(yy, xx, c, rng.uniform(0.04, 0.09, n) * s,
                                                   rng.uniform(0.4, 0.8, n)))
    if rng.random() < 0.35:
        haze = np.exp(-((yy - horizon + rng.uniform(0, 0.1) * s) / (0.08 * s)) ** 2)
        distractor = np.maximum(distractor, haze * rng.uniform(0.3, 0.6))
    image = image * (1 - distractor[..., None]) + rng.uniform(200, 245) * distractor[..., None]
    # Emissions: puff chains from one or more chimney tops, bent by one wind.
    plume = np.zeros((s, s), np.float32)
    if smoke:
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
            dens = rng.uniform(0.7, 1.0) * (1 - 0.75 * t) ** 1.5
            puffs = dens[:, None, None] * np.exp(
                -((yy - y[:, None, None]) ** 2 + (xx - x[:, None, None]) ** 2)
                / (2 * radii[:, None, None] ** 2))
            plume = np.maximum(plume, puffs.max(axis=0))  # max, not a sum: overlap adds no mass
        plume *= 0.65 + 0.35 * _smooth_noise(rng, s, s, 6)  # turbulence
        colour = rng.choice([[235, 235, 235], [170, 170, 175], [120, 110, 100], [200, 180, 140]])
        colour = colour + rng.uniform(-15, 15, 3)
        image = image * (1 - plume[..., None]) + colour * plume[..., None]
    image = image + rng.normal(0, 3, image.shape)  # sensor noise
    mask = np.where(plume > SMOKE_OPAQUE, 1, np.where(plume > SMOKE_FAINT, IGNORE, 0))
    context &= mask == 0
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8), context


def synthesize(out: Path, config: SynthConfig, force: bool = False) -> dict:
    """Write a dataset folder of generated scenes; returns counts per split."""
    fresh_output_dir(out, force)
    for sub in ("images", "masks", "context"):
        (out / sub).mkdir()
    (out / "classes.txt").write_text("smoke\n")
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


# --- SMOKE5K import ------------------------------------------------------------------------------


def tile_origins(length: int, tile: int) -> list[int]:
    """Evenly spaced tile starts that cover [0, length) with the fewest tiles (overlap allowed)."""
    if length <= tile:
        return [0]
    n = -(-length // tile)  # ceil
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def prepare_smoke5k(src: Path, dst: Path, config: PrepareConfig, force: bool = False) -> dict:
    """SMOKE5K layout (SRC/img/*.jpg, SRC/gt/*.png with 0/255) -> tiled dataset folder.

    A tile is positive when smoke covers >= min_share of it, negative when it has no smoke pixel;
    tiles in between are ambiguous and skipped. Photos smaller than a tile are skipped.
    The split is by photograph, so tiles of one photo never land in both splits.
    """
    for sub in ("img", "gt"):
        if not (src / sub).is_dir():
            raise DataError(f"{src / sub}: folder not found (expected SMOKE5K's img/ and gt/)")
    photos = sorted(p for p in (src / "img").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not photos:
        raise DataError(f"{src / 'img'}: no .jpg or .png photographs")
    fresh_output_dir(dst, force)
    (dst / "images").mkdir()
    (dst / "masks").mkdir()
    (dst / "classes.txt").write_text("smoke\n")
    rows = {"train": [], "val": []}
    counts = {"photos": len(photos), "skipped_photos": 0, "ambiguous": 0}
    t = config.tile
    for photo in photos:
        gt_path = src / "gt" / (photo.stem + ".png")
        if not gt_path.is_file():
            raise DataError(f"{gt_path}: ground truth missing for {photo.name}")
        image = load_image(photo)
        with Image.open(gt_path) as g:
            gt = np.array(g.convert("L")) > 127
        if gt.shape != (image.height, image.width):
            raise DataError(f"{gt_path}: mask is {gt.shape[1]}x{gt.shape[0]} but its image is "
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


def ensure_default_data(path: Path) -> Path:
    """The embedded default dataset: generated once with SynthConfig() when missing."""
    if not (path / "classes.txt").is_file():
        print(f"generating the default synthetic dataset in {path} ...")
        synthesize(path, SynthConfig(), force=False)
    return path


# -----------------------------------------------------------------------------
# Training: building the networks, the two stages, checkpoints, resume


class TrainingError(Exception):
    """Training cannot go on (a NaN loss, an incompatible checkpoint): one line, exit code 1."""


CHECKPOINT_FORMAT = 1


@dataclass
class RunConfig:
    """Every setting of a run, as saved in RUN/config.json and in each checkpoint."""
    data: str
    model: ModelConfig
    train: TrainConfig
    loss: LossConfig
    cam: CamConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        parts = {}
        for name, config_cls in CONFIGS.items():
            values = dict(d[name])
            for f in dataclasses.fields(config_cls):
                if f.name in values and getattr(f.type, "__origin__", None) is tuple:
                    values[f.name] = tuple(values[f.name])
            parts[name] = config_cls(**values)
        return cls(data=d["data"], **parts)


class Log:
    """Prints a line and appends it to RUN/log.txt."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp on this device, or None for float32."""
    if amp == "off":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise DataError("--amp fp16 needs a CUDA device (use bf16 or off)")
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp != "auto":
        raise DataError(f"--amp must be auto, bf16, fp16 or off, got {amp!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":  # fast only with AVX512-BF16 or AMX; slower than fp32 elsewhere
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return None


def build_teacher(config: ModelConfig, num_classes: int) -> models.Teacher:
    if config.teacher not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise DataError(f"unknown teacher {config.teacher!r}")
    backbone = getattr(models, config.teacher)(num_classes=0, output_stride=config.output_stride,
                                               width=config.teacher_width)
    if config.teacher_weights:
        load_weights(backbone, Path(config.teacher_weights), "teacher")
    return models.Teacher(backbone, num_classes, pcm=config.pcm)


def build_student(config: ModelConfig, num_classes: int) -> models.Student:
    if config.student not in ("vit_tiny", "vit_small", "vit_base"):
        raise DataError(f"unknown student {config.student!r}")
    if config.image_size % config.patch_size:
        raise DataError(f"--image-size {config.image_size} is not a multiple of --patch-size "
                        f"{config.patch_size}")
    backbone = getattr(models, config.student)(img_size=config.image_size,
                                               patch_size=config.patch_size,
                                               depth=config.student_depth, num_classes=num_classes)
    if config.student_weights:
        load_weights(backbone, Path(config.student_weights), "student")
    return models.Student(backbone, map_channels=num_classes)


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, config: RunConfig, net: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, epoch: int, done: bool) -> None:
    atomic_save({"format": CHECKPOINT_FORMAT, "config": config.to_dict(),
                 "model": net.state_dict(),
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "epoch": epoch, "done": done}, path)


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path}: cannot read checkpoint ({e.__class__.__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a checkpoint of format {CHECKPOINT_FORMAT}")
    return ckpt


def restore(net: torch.nn.Module, ckpt: dict, path: Path) -> None:
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise TrainingError(f"{path}: does not fit the configured network ({first[1].strip() if len(first) > 1 else first[0]})") from None


def make_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, workers: int,
                device: torch.device, shuffle: bool = True) -> torch.utils.data.DataLoader:
    """The data order depends only on (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       generator=generator, num_workers=workers,
                                       pin_memory=device.type == "cuda", drop_last=False)


def student_losses(student: models.Student, images: torch.Tensor, labels: torch.Tensor,
                   teacher_maps: torch.Tensor | None, config: LossConfig) -> dict:
    """L = L_cls + lambda L_align + mu L_cons for one batch of the student."""
    logits, maps = student(images)
    terms = {"cls": losses.classification_loss(logits, labels)}
    if teacher_maps is not None and config.align_weight > 0:
        terms["align"] = losses.alignment_loss(maps, teacher_maps, config.align_kind,
                                               config.align_reduce)
    if config.consistency_weight > 0:
        p = student.backbone.patch_size
        side = max(p, round(images.shape[-1] * config.consistency_scale / p) * p)
        flip = bool(torch.rand(()) < 0.5)
        _, maps_aug = student(losses.flip_and_resize(images, (side, side), flip))
        terms["cons"] = losses.consistency_loss(maps_aug, losses.flip_and_resize(
            maps, maps_aug.shape[-2:], flip))
    weights = {"cls": 1.0, "align": config.align_weight, "cons": config.consistency_weight}
    terms["loss"] = sum(weights[k] * v for k, v in terms.items())
    return terms


def learning_rate(peak: float, step: int, warmup: int, total: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to zero: ViTs trained
    from scratch diverge or stall without the warm-up. A function of the step alone, so a
    resumed run follows the same schedule."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train_stage(stage: str, nets: dict[str, torch.nn.Module], step, dataset: Dataset,
                run: Path, config: RunConfig, epochs: int, device: torch.device,
                log: Log) -> None:
    """Generic epoch loop: `step(batch) -> {"loss": ..., other terms}`; trains every module in
    `nets` with one AdamW, checkpoints RUN/<name>.pt atomically after every epoch, resumes from
    those checkpoints, and stops on a non-finite loss with the last good checkpoint intact."""
    t = config.train
    params = [p for net in nets.values() for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    start = 0
    paths = {name: run / f"{name}.pt" for name in nets}
    if all(p.is_file() for p in paths.values()):
        ckpts = {name: load_checkpoint(p) for name, p in paths.items()}
        for name, net in nets.items():
            restore(net, ckpts[name], paths[name])
        start = min(c["epoch"] for c in ckpts.values())
        optimizer_state = ckpts[next(iter(nets))]["optimizer"]
        if start < epochs and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        if start >= epochs:
            log(f"{stage}: done in an earlier run ({start} epochs)")
            return
        log(f"{stage}: resuming after epoch {start}")
    dtype = autocast_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    steps_per_epoch = -(-len(dataset) // t.batch_size)
    total_steps = epochs * steps_per_epoch
    total_images = (epochs - start) * len(dataset)
    seen, began = 0, time.perf_counter()
    for epoch in range(start, epochs):
        torch.manual_seed(t.seed * 100_003 + epoch)  # augmentation draws, resumable per epoch
        for net in nets.values():
            net.train()
        sums: dict[str, float] = {}
        loader = make_loader(dataset, t.batch_size, t.seed, epoch, t.workers, device)
        for i, batch in enumerate(loader, start=1):
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                terms = step(images, labels)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"{stage}: loss is {loss.item()} at epoch {epoch + 1} step {i}; stopped. "
                    f"The last good checkpoint (epoch {epoch}) is intact in {run}; "
                    f"try a lower --lr or --amp off")
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(t.lr, epoch * steps_per_epoch + i - 1,
                                            steps_per_epoch, total_steps)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += len(images)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            if i % t.log_every == 0 or i == steps_per_epoch:
                elapsed = time.perf_counter() - began
                ips = seen / elapsed
                terms_text = " ".join(f"{k} {v / i:.4f}" for k, v in sums.items())
                log(f"{stage} epoch {epoch + 1}/{epochs} step {i}/{steps_per_epoch} "
                    f"{terms_text} | {ips:.1f} img/s | left {(total_images - seen) / ips:.0f} s")
        for name, net in nets.items():
            save_checkpoint(paths[name], config, net, optimizer, epoch + 1, epoch + 1 == epochs)


def freeze(net: torch.nn.Module) -> torch.nn.Module:
    """The frozen teacher: eval mode (BatchNorm statistics fixed) and no gradients."""
    net.eval()
    net.requires_grad_(False)
    return net


def train_networks(run: Path, config: RunConfig, dataset: "SmokeDataset", device: torch.device,
                   log: Log) -> tuple[models.Teacher, models.Student]:
    """Stage 1 teacher, stage 2 student aligned to the frozen teacher (or both together)."""
    k = len(dataset.classes)
    torch.manual_seed(config.train.seed)
    teacher = build_teacher(config.model, k).to(device)
    student = build_student(config.model, k).to(device)
    log(f"teacher {config.model.teacher}: {models.count_parameters(teacher) / 1e6:.2f} M "
        f"parameters; student {config.model.student}: "
        f"{models.count_parameters(student) / 1e6:.2f} M parameters")
    t = config.train

    def teacher_step(images, labels):
        logits, _ = teacher(images)
        loss = losses.classification_loss(logits, labels)
        return {"loss": loss, "cls": loss}

    if t.mode == "distill":
        train_stage("teacher", {"teacher": teacher}, teacher_step, dataset, run, config,
                    t.teacher_epochs, device, log)
        freeze(teacher)

        def student_step(images, labels):
            teacher_maps = None
            if config.loss.align_weight > 0:
                with torch.no_grad():
                    _, teacher_maps = teacher(images)
            return student_losses(student, images, labels, teacher_maps, config.loss)

        train_stage("student", {"student": student}, student_step, dataset, run, config,
                    t.student_epochs, device, log)
    elif t.mode == "co-train":
        def joint_step(images, labels):
            logits, teacher_maps = teacher(images)
            cls_t = losses.classification_loss(logits, labels)
            terms = student_losses(student, images, labels, teacher_maps, config.loss)
            terms["loss"] = terms["loss"] + cls_t
            terms["teacher_cls"] = cls_t
            return terms

        train_stage("co-train", {"teacher": teacher, "student": student}, joint_step, dataset,
                    run, config, max(t.teacher_epochs, t.student_epochs), device, log)
        freeze(teacher)
    else:
        raise DataError(f"--mode must be distill or co-train, got {t.mode!r}")
    return teacher, freeze(student)


# -----------------------------------------------------------------------------
# Pretrained weights from a local file (nothing is downloaded)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torchvision, timm, DeiT or DINO file: bare, or wrapped in
    {"model": ...} / {"state_dict": ...}; DDP's "module." prefixes are removed and torchvision
    ViT names are converted to ours."""
    if not path.is_file():
        raise DataError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: unpickling errors of many kinds
        raise DataError(f"{path}: cannot read weights ({e.__class__.__name__}: {e})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path}: not a state dict (a mapping of names to tensors)")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    if "conv_proj.weight" in obj:
        obj = models.vit_state_dict_from_torchvision(obj)
    return obj


def load_weights(module: torch.nn.Module, path: Path, what: str) -> None:
    """Load a local weights file into `module`, saying what did not fit."""
    report = models.load_pretrained(module, read_state_dict(path))
    loaded = len(report.pop("loaded"))
    print(f"{what}: loaded {loaded} tensors from {path}")
    for kind, keys in report.items():
        if keys:
            print(f"  {kind} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
    if loaded == 0:
        raise DataError(f"{path}: no tensor matches the {what}'s names")


# -----------------------------------------------------------------------------
# CAMs: teacher CAM, student Grad-CAM or projection map; multi-scale and flip


def teacher_cam(teacher: models.Teacher, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,K,h,w): the teacher's class maps (its CAM, + PCM when it has one)."""
    with torch.no_grad():
        return teacher(images)[1].float()


def student_proj_cam(student: models.Student, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,K,h,w): the student's 1x1 projection of its patch tokens."""
    with torch.no_grad():
        return student(images)[1].float()


def student_gradcam(student: models.Student, images: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on the last block's norm1 tokens, class token dropped:
    cam_k = ReLU( sum_d  mean_n(d y_k / d A_nd) * A_nd ).  (B,3,H,W) -> (B,K,h,w)."""
    p = student.backbone.patch_size
    h, w = images.shape[2] // p, images.shape[3] // p
    with torch.enable_grad():
        logits, tokens = student.forward_gradcam(images)
        cams = []
        for k in range(logits.shape[1]):
            grad, = torch.autograd.grad(logits[:, k].sum(), tokens, retain_graph=True)
            weights = grad[:, 1:].mean(dim=1, keepdim=True)  # (B,1,D): pooled gradients
            cam = (tokens[:, 1:] * weights).sum(dim=-1)  # (B,N,D) -> (B,N)
            cams.append(F.relu(cam).reshape(-1, h, w).detach())
    return torch.stack(cams, dim=1).float()


def multiscale_cam(cam_fn, images: torch.Tensor, scales: tuple[float, ...], flip: bool,
                   multiple: int) -> torch.Tensor:
    """Sum of ReLU'd CAMs over input scales (and the flipped input), at the input size.
    Scaled sides are rounded to a multiple of `multiple` (the student's patch size)."""
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


def cam_function(config: CamConfig, teacher: models.Teacher | None,
                 student: models.Student | None):
    """(function images -> CAMs, the size multiple its inputs need) for the configured CAM."""
    if config.cam_network == "teacher":
        return (lambda x: teacher_cam(teacher, x)), 1
    if config.cam_network != "student":
        raise DataError(f"--cam-network must be teacher or student, got {config.cam_network!r}")
    if config.cam_method not in ("gradcam", "proj"):
        raise DataError(f"--cam-method must be gradcam or proj, got {config.cam_method!r}")
    fn = student_gradcam if config.cam_method == "gradcam" else student_proj_cam
    return (lambda x: fn(student, x)), student.backbone.patch_size


def pseudo_masks(dataset: "SmokeDataset", cam_config: CamConfig, teacher, student,
                 device: torch.device, amp: str = "off"):
    """Yield (stems, rgb, masks (B,H,W) uint8, cams (B,K,H,W)) for every image of the split,
    from the configured CAMs, normalised, gated by the image labels and thresholded."""
    fn, multiple = cam_function(cam_config, teacher, student)
    dtype = autocast_dtype(amp, device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cam_config.cam_batch_size)
    for batch in loader:
        images = batch["image"].to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            cams = multiscale_cam(fn, images, cam_config.cam_scales, cam_config.cam_flip, multiple)
        cams = postprocess.normalize_cams(cams, batch["label"].to(device))
        probs = postprocess.cams_to_probs(cams, "threshold", cam_config.threshold)
        yield batch["stem"], batch["rgb"], postprocess.probs_to_mask(probs).cpu(), cams.cpu()


def save_mask(mask: torch.Tensor, path: Path) -> None:
    Image.fromarray(mask.numpy().astype(np.uint8)).save(path)


def overlay_grid(rgbs: list[torch.Tensor], masks: list[torch.Tensor], path: Path,
                 num_classes: int) -> None:
    """Photos and their masks over them (smoke red), in a grid a person can look at."""
    from torchvision.utils import draw_segmentation_masks, make_grid
    tiles = []
    for rgb, mask in zip(rgbs, masks):
        onehot = torch.stack([mask == k for k in range(1, num_classes + 1)])
        tiles += [rgb, draw_segmentation_masks(rgb, onehot, alpha=0.55,
                                               colors=["red", "cyan", "yellow", "lime"][:num_classes])]
    grid = make_grid(torch.stack(tiles), nrow=8, padding=2, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)  # (3,H,W) -> (H,W,3)


# -----------------------------------------------------------------------------
# Evaluation: masks against ground truth (255 ignored)


class Scores:
    """Accumulates a confusion matrix, per-image smoke IoU and context false positives."""

    def __init__(self, num_classes: int):
        self.n = num_classes + 1  # background first
        self.confusion = torch.zeros(self.n, self.n, dtype=torch.int64)  # [truth, prediction]
        self.image_ious: list[float] = []
        self.context_pixels = 0
        self.context_called_fg = 0

    def add(self, pred: torch.Tensor, truth: torch.Tensor, context: torch.Tensor | None = None):
        """pred, truth: (H, W) class indices (truth 255 = ignore); context: (H, W) bool."""
        valid = truth != IGNORE
        p, t = pred[valid].long(), truth[valid].long()
        self.confusion += torch.bincount(t * self.n + p.clamp(max=self.n - 1),
                                         minlength=self.n ** 2).reshape(self.n, self.n)
        fg_t, fg_p = t > 0, p > 0
        if fg_t.any():  # the paper's figure: IoU averaged over images that show smoke
            self.image_ious.append(((fg_t & fg_p).sum() / (fg_t | fg_p).sum()).item())
        if context is not None:
            self.context_pixels += int(context.sum())
            self.context_called_fg += int((context & (pred > 0) & (pred != IGNORE)).sum())

    def result(self) -> dict:
        c = self.confusion.double()
        tp = c.diag()
        iou = tp / (c.sum(0) + c.sum(1) - tp).clamp(min=1)
        fg_tp = c[1:, 1:].sum()
        return {
            "smoke_iou": 100 * iou[1].item() if self.n == 2 else 100 * iou[1:].mean().item(),
            "miou": 100 * iou.mean().item(),
            "per_class_iou": [100 * v for v in iou.tolist()],
            "precision": 100 * (fg_tp / c[:, 1:].sum().clamp(min=1)).item(),
            "recall": 100 * (fg_tp / c[1:, :].sum().clamp(min=1)).item(),
            "image_iou": 100 * float(np.mean(self.image_ious)) if self.image_ious else float("nan"),
            "context_fp": (100 * self.context_called_fg / self.context_pixels
                           if self.context_pixels else float("nan")),
        }


def format_scores(name: str, r: dict) -> str:
    return (f"{name}: smoke IoU {r['smoke_iou']:.1f}  mIoU {r['miou']:.1f}  "
            f"precision {r['precision']:.1f}  recall {r['recall']:.1f}  "
            f"per-image IoU {r['image_iou']:.1f}  chimney called smoke {r['context_fp']:.1f} %")


def write_pseudo_masks(dataset: "SmokeDataset", out: Path, cam_config: CamConfig, teacher,
                       student, device: torch.device, amp: str, overlays: Path | None) -> dict | None:
    """Masks for every image of the split into `out`, an overlay grid, and their scores
    against the ground truth when the dataset has masks."""
    out.mkdir(parents=True, exist_ok=True)
    scores = Scores(len(dataset.classes)) if dataset.has_masks else None
    shown_rgb, shown_mask = [], []
    index = 0
    for stems, rgbs, masks, _ in pseudo_masks(dataset, cam_config, teacher, student, device, amp):
        for stem, rgb, mask in zip(stems, rgbs, masks):
            save_mask(mask, out / f"{stem}.png")
            if scores is not None:
                item = dataset[index]
                scores.add(mask, item["mask"], item.get("context"))
            if len(shown_rgb) < 16 and dataset.samples[index].labels:
                shown_rgb.append(rgb)
                shown_mask.append(mask)
            index += 1
    if overlays is not None and shown_rgb:
        overlay_grid(shown_rgb, shown_mask, overlays, len(dataset.classes))
    return scores.result() if scores is not None else None


# -----------------------------------------------------------------------------
# Benchmarks: ours and the reference, side by side in one run, interleaved step by step


def _train_step_seconds(net: torch.nn.Module, x: torch.Tensor, amp: bool) -> float:
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = net(x)
    out.float().square().mean().backward()
    net.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_models(device: torch.device, batch: int, size: int, steps: int) -> list[dict]:
    """Training-step throughput (forward + backward) of our networks vs torchvision's."""
    from torchvision.models import resnet50 as tv_resnet50
    from torchvision.models.vision_transformer import VisionTransformer as TvViT

    pairs = {
        "ResNet-50": (models.resnet50(), tv_resnet50()),
        "ViT-S/16": (models.vit_small(img_size=size),
                     TvViT(image_size=size, patch_size=16, num_layers=12, num_heads=6,
                           hidden_dim=384, mlp_dim=1536)),
    }
    x = torch.randn(batch, 3, size, size, device=device)
    rows = []
    for name, (ours, theirs) in pairs.items():
        ours.to(device).train()
        theirs.to(device).train()
        for amp in (False, True):
            times = {"ours": [], "theirs": []}
            for step in range(steps + 1):  # step 0 warms up
                order = (("ours", ours), ("theirs", theirs))
                for who, net in order[::1 if step % 2 else -1]:  # alternate who goes first
                    seconds = _train_step_seconds(net, x, amp)
                    if step:
                        times[who].append(seconds)
            ips = {who: batch / float(np.median(t)) for who, t in times.items()}
            rows.append({"model": name, "precision": "bf16 autocast" if amp else "float32",
                         "ours": ips["ours"], "reference": ips["theirs"],
                         "ratio": ips["ours"] / ips["theirs"]})
            print(f"{name:10s} {rows[-1]['precision']:14s} ours {ips['ours']:7.2f} img/s   "
                  f"reference {ips['theirs']:7.2f} img/s   ratio {rows[-1]['ratio']:.2f}")
    return rows


# -----------------------------------------------------------------------------
# Commands


def cmd_synth(args: argparse.Namespace) -> None:
    config = config_from_args(SynthConfig, args)
    start = time.perf_counter()
    counts = synthesize(Path(args.out), config, force=args.force)
    seconds = time.perf_counter() - start
    total = config.n_train + config.n_val
    print(f"wrote {args.out}: {json.dumps(counts)} in {seconds:.1f} s "
          f"({total / seconds:.0f} images/s)")


def cmd_prepare(args: argparse.Namespace) -> None:
    config = config_from_args(PrepareConfig, args)
    counts = prepare_smoke5k(Path(args.src), Path(args.dst), config, force=args.force)
    print(f"wrote {args.dst}: {json.dumps(counts)}")


def config_from_flags(args: argparse.Namespace) -> RunConfig:
    """The preset's values, then every flag the user gave."""
    preset = PRESETS[args.preset]
    parts = {name: config_from_args(cls, args, cls(**preset.get(name, {})))
             for name, cls in CONFIGS.items()}
    return RunConfig(data=str(args.data or DEFAULT_DATA), **parts)


def peak_memory_mb() -> float:
    import resource  # POSIX; ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_train(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.json").is_file():
            raise DataError(f"{run / 'config.json'}: not found; --resume takes a run folder")
        config = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    else:
        config = config_from_flags(args)
        run = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
        if not args.data:
            ensure_default_data(DEFAULT_DATA)
        verify_splits(Path(config.data))  # bad data stops here, before a run folder is made
        fresh_output_dir(run, args.force)
        (run / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    log = Log(run / "log.txt")
    log(f"run {run}: " + json.dumps(config.to_dict()))
    size = config.model.image_size
    dataset = SmokeDataset(config.data, "train", size=size, flip=config.train.flip)
    device = pick_device(config.train.device)
    log(f"{config.data}: {len(dataset)} training images, classes {dataset.classes}; device "
        f"{device}, autocast {autocast_dtype(config.train.amp, device)}")
    teacher, student = train_networks(run, config, dataset, device, log)
    plain = SmokeDataset(config.data, "train", size=size)
    scores = write_pseudo_masks(plain, run / "pseudo", config.cam, teacher, student, device,
                                config.train.amp, run / "overlays.png")
    log(f"pseudo masks: {run / 'pseudo'} ({len(plain)} PNGs), overlays: {run / 'overlays.png'}")
    if scores is not None:
        log(format_scores(f"pseudo masks vs ground truth ({config.cam.cam_network} CAM)", scores))
        (run / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    log(f"wall time {time.perf_counter() - began:.0f} s, peak memory {peak_memory_mb():.0f} MB")


def cmd_bench(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    print(f"bench {args.what} on {device} ({torch.get_num_threads()} threads), "
          f"batch {args.batch}, {args.size} px, median of {args.steps} steps")
    bench_models(device, args.batch, args.size, args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsss.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="generate an industrial-smoke dataset folder")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    add_config_flags(p, SynthConfig)
    p.set_defaults(run=cmd_synth)

    p = sub.add_parser("prepare", help="import a public dataset into the folder format")
    p.add_argument("source", choices=["smoke5k"], help="which dataset's layout SRC has")
    p.add_argument("src", help="SMOKE5K folder holding img/ and gt/")
    p.add_argument("dst", help="dataset folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    add_config_flags(p, PrepareConfig)
    p.set_defaults(run=cmd_prepare)

    p = sub.add_parser("train", help="train teacher and student, write pseudo masks")
    p.add_argument("--data", help=f"dataset folder (default: generate {DEFAULT_DATA} on first use)")
    p.add_argument("--out", help="run folder to write (default: runs/<date-time>)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: sizes for a 2-core laptop (default); paper: the paper's setting, "
                        "for a GPU")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN where it stopped "
                   "(its config.json is used; other flags are ignored)")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    for name, cls in CONFIGS.items():
        add_config_flags(p.add_argument_group(f"{name} settings"), cls)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("bench", help="benchmarks that print figures side by side")
    p.add_argument("what", choices=["models"], help="models: training-step throughput, "
                   "ours vs torchvision, float32 and bfloat16 autocast")
    p.add_argument("--batch", type=int, default=8, help="images a step (default: 8)")
    p.add_argument("--size", type=int, default=224, help="image side (default: 224)")
    p.add_argument("--steps", type=int, default=5, help="timed steps a row (default: 5)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default: auto)")
    p.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
