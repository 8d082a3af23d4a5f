"""Weakly supervised smoke segmentation: the command line, the data, training and evaluation.

Everything that touches the outside world lives here (argv, files, datasets, training loops,
checkpoints, logs); models.py, losses.py and postprocess.py are pure libraries.
Sections, top to bottom: processes -> config dataclasses -> data -> pretrained weights ->
training -> CAMs -> evaluation -> stage 3 and prediction -> ablation -> benchmarks -> commands
-> __main__.

    python wsss.py synth --out data/synth      # an industrial-smoke dataset, generated
    python wsss.py prepare smoke5k SRC DST     # SMOKE5K photographs -> the folder format
    python wsss.py train                       # the whole method on the embedded default data
    python wsss.py pseudo --run RUN --crf      # pseudo masks from a trained run
    python wsss.py eval --data DIR --pred DIR  # scores against ground truth
    python wsss.py ablate --quick              # the paper's comparisons
    python wsss.py segment --run RUN           # stage 3: a segmentation network on pseudo masks
    python wsss.py predict --run RUN --input D # masks and overlays for any images
    torchrun --nproc_per_node N wsss.py train  # the same, on N processes
    python wsss.py bench models|crf            # speed and fidelity against references
"""

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import os
import shutil
import signal
import sys
import threading
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

IGNORE = 255  # mask value for "do not score this pixel" (faint plume edges, ambiguous pixels)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DATA = Path("data/synth")  # where `train` generates the embedded dataset on first use


class DataError(Exception):
    """Bad input a user can fix: the CLI prints it as one line and exits with code 2."""


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda (this process's GPU under torchrun), then mps, then cpu; anything else is
    passed to torch.device."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available here (use auto or cpu)")
    if name == "mps" and not mps_available():
        raise DataError("--device mps: no MPS device is available here (use auto or cpu)")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


# --- processes: one, or several started by torchrun ----------------------------------------


def world() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) unless torchrun started this process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR): NCCL between GPUs, gloo between CPU processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def on_first_process(fn):
    """fn() on the first process only (the one that writes files); every process gets its
    result, or its DataError, so that no process waits for one that has failed."""
    result, error = None, None
    if world()[0] == 0:
        try:
            result = fn()
        except DataError as e:
            error = str(e)
    if world()[1] > 1:
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise DataError(error)
    return result


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over processes of a tensor each process holds (itself with one process)."""
    if world()[1] > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world()[1]
    return values


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
    coupling: float = field(default=0.6, metadata=_help(
        "spurious correlation in the training split: the probability that a smoke-free image "
        "has no chimney (1 = chimneys appear only with smoke)"))
    val_coupling: float = field(default=0.2, metadata=_help(
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
    student_stem: str = field(default="conv", metadata=_help(
        "student tokenizer: patch (linear patchify, the paper) or conv (stride-2 3x3 convs)"))
    student_head: str = field(default="cam", metadata=_help(
        "student classifier: token (class-token head, the paper) or cam (the mean of its "
        "projected map, so the aligned map is the one read out)"))
    patch_size: int = field(default=8, metadata=_help("student patch size"))
    image_size: int = field(default=128, metadata=_help("training image side in pixels"))
    teacher_weights: str = field(default="", metadata=_help(
        "local file of pretrained teacher backbone weights (torchvision names)"))
    student_weights: str = field(default="", metadata=_help(
        "local file of pretrained student backbone weights (timm or torchvision names)"))

    def architecture(self) -> "ModelConfig":
        """These networks without pretrained-weight files: for building networks whose
        weights come from a checkpoint (or are only counted)."""
        return dataclasses.replace(self, teacher_weights="", student_weights="")


@dataclass
class TrainConfig:
    mode: str = field(default="distill", metadata=_help(
        "distill: train the teacher, freeze it, then the student (the paper); "
        "co-train: both from scratch together"))
    teacher_epochs: int = field(default=8, metadata=_help("epochs of the teacher stage"))
    student_epochs: int = field(default=8, metadata=_help("epochs of the student stage"))
    batch_size: int = field(default=16, metadata=_help("images a step"))
    lr: float = field(default=5e-4, metadata=_help(
        "AdamW peak learning rate: linear warm-up over the first epoch, then cosine decay"))
    weight_decay: float = field(default=0.05, metadata=_help("AdamW weight decay"))
    flip: bool = field(default=True, metadata=_help("random horizontal flips (the paper: none)"))
    crop: float = field(default=0.7, metadata=_help(
        "random resized crops covering at least this share of the image (1 = none, the paper)"))
    amp: str = field(default="auto", metadata=_help(
        "mixed precision: auto (bf16 where the device supports it), bf16, fp16 (CUDA) or off"))
    seed: int = field(default=0, metadata=_help("seed of initialisation and data order"))
    device: str = field(default="auto", metadata=_help("cuda, mps, cpu or auto"))
    workers: int = field(default=0, metadata=_help("data loader worker processes"))
    channels_last: bool = field(default=False, metadata=_help(
        "channels-last memory format for images and ResNets: faster convolutions on CUDA"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the trained networks (the first steps are slow while it compiles)"))
    log_every: int = field(default=20, metadata=_help("steps between progress lines"))
    baseline: bool = field(default=True, metadata=_help(
        "also train the student alone (lambda = 0), scored beside the teacher and the aligned "
        "student"))


@dataclass
class LossConfig:
    align_weight: float = field(default=1.0, metadata=_help(
        "lambda, the weight of the alignment loss (0 = the student alone)"))
    align_kind: str = field(default="cosine", metadata=_help("alignment: cosine, l1 or l2"))
    align_reduce: str = field(default="global", metadata=_help(
        "cosine over the whole map (global), each channel's map, or each location's channels"))
    align_target: str = field(default="pair", metadata=_help(
        "raw: the teacher's raw class map (the paper's code); pair: its normalised, "
        "label-gated (background, foreground) pair"))
    consistency_weight: float = field(default=1.0, metadata=_help(
        "mu, the weight of the flip + rescale consistency loss of the student's maps"))
    consistency_scale: float = field(default=0.75, metadata=_help(
        "rescale factor of the consistency loss's augmented view"))


@dataclass
class CamConfig:
    cam_network: str = field(default="student", metadata=_help(
        "whose CAMs become pseudo masks: student or teacher"))
    cam_method: str = field(default="proj", metadata=_help(
        "student CAM: gradcam (on the last block's norm1, the paper) or proj (its projected "
        "class map, the map the alignment trains)"))
    cam_scales: tuple[float, ...] = field(default=(1.0,), metadata=_help(
        "input scales averaged (the paper: 0.5 1 1.5 2)"))
    cam_flip: bool = field(default=True, metadata=_help("also average the horizontally flipped input"))
    threshold: float = field(default=0.7, metadata=_help(
        "a pixel is smoke where its max-normalised CAM exceeds this (the paper: 0.3; 0.7 was "
        "chosen on the synthetic validation split)"))
    cam_batch_size: int = field(default=32, metadata=_help("images a batch when computing CAMs"))


@dataclass
class RefineConfig:
    background: str = field(default="threshold", metadata=_help(
        "background score: threshold (the constant --threshold) or power ((1 - max cam)^alpha, "
        "psa's, for the CRF)"))
    alpha: float = field(default=8.0, metadata=_help("exponent of the power background"))
    crf: bool = field(default=False, metadata=_help("refine with the dense CRF"))
    crf_iters: int = field(default=10, metadata=_help("mean-field iterations"))
    crf_sxy_gaussian: float = field(default=3.0, metadata=_help("position kernel width, px"))
    crf_compat_gaussian: float = field(default=3.0, metadata=_help("position kernel weight"))
    crf_sxy_bilateral: float = field(default=80.0, metadata=_help(
        "colour kernel's position width, px"))
    crf_srgb: float = field(default=13.0, metadata=_help("colour kernel's colour width"))
    crf_compat_bilateral: float = field(default=10.0, metadata=_help("colour kernel weight"))
    ignore_band: float = field(default=0.0, metadata=_help(
        "pixels whose two best scores differ by less than this become 255 (ignore), for "
        "stage-3 training (CLIP-ES); scoring counts them as background"))
    fill: bool = field(default=False, metadata=_help(
        "the coverage fix: a random walk of the CAMs over the student's attention affinities"))
    fill_steps: int = field(default=2, metadata=_help("random-walk steps of the coverage fix"))
    fill_beta: float = field(default=2.0, metadata=_help(
        "power that sharpens the attention affinities"))


@dataclass
class SegmentConfig:
    seg_network: str = field(default="resnet", metadata=_help(
        "stage-3 network: resnet (DeepLabv3 on the teacher's ResNet) or vit (a linear decoder "
        "on the student's ViT)"))
    seg_targets: str = field(default="pseudo", metadata=_help(
        "pseudo: train on the pseudo masks in --seg-masks; truth: on the ground-truth masks "
        "(the fully supervised upper bound)"))
    seg_masks: str = field(default="", metadata=_help(
        "folder of pseudo masks <stem>.png, 255 = ignore (default: RUN/pseudo)"))
    seg_init: str = field(default="run", metadata=_help(
        "run: start from the run's trained backbone (teacher's ResNet or student's ViT); "
        "scratch: random initialisation"))
    seg_epochs: int = field(default=12, metadata=_help("epochs of stage 3"))
    seg_batch_size: int = field(default=16, metadata=_help("images a step in stage 3"))
    seg_lr: float = field(default=5e-4, metadata=_help("AdamW peak learning rate of stage 3"))


CONFIGS = {"model": ModelConfig, "train": TrainConfig, "loss": LossConfig, "cam": CamConfig,
           "refine": RefineConfig, "segment": SegmentConfig}

# Presets: overrides of the defaults above. "cpu" (the defaults) fits a 2-core laptop in
# minutes. "faithful" is the paper's recipe on the same small networks: no augmentation,
# class-token student with a patchify stem, raw-map cosine alignment, no consistency loss,
# Grad-CAM over four scales, threshold 0.3. "paper" is that recipe at the paper's size
# (ResNet-50 OS16 + PCM teacher, ViT-B/16 at 512 px, AdamW 1e-4, batch 8, 3 epochs).
FAITHFUL = {
    "model": dict(student_stem="patch", student_head="token"),
    "train": dict(flip=False, crop=1.0),
    "loss": dict(align_target="raw", consistency_weight=0.0),
    "cam": dict(cam_method="gradcam", cam_scales=(0.5, 1.0, 1.5, 2.0), threshold=0.3),
}
PRESETS = {
    "cpu": {},
    "faithful": FAITHFUL,
    "paper": {
        "model": dict(FAITHFUL["model"], teacher="resnet50", teacher_width=64, output_stride=16,
                      pcm=True, student="vit_base", student_depth=12, patch_size=16,
                      image_size=512),
        "train": dict(FAITHFUL["train"], teacher_epochs=3, student_epochs=3, batch_size=8,
                      lr=1e-4, channels_last=True),
        "loss": FAITHFUL["loss"],
        "cam": dict(FAITHFUL["cam"], cam_batch_size=8),
    },
}


# What each setting allows, in one place: a tuple of choices, or a numeric range
# (low, high, low_open): low <= v <= high, or low < v with low_open. None = unbounded.
# The parser enforces the choices; check_settings() enforces all of it, flags or config.json.
CHOICES = {
    "teacher": ("resnet18", "resnet34", "resnet50", "resnet101"), "output_stride": (8, 16, 32),
    "student": ("vit_tiny", "vit_small", "vit_base"), "student_stem": ("patch", "conv"),
    "student_head": ("token", "cam"), "mode": ("distill", "co-train"),
    "amp": ("auto", "bf16", "fp16", "off"), "device": ("auto", "cpu", "cuda", "mps"),
    "align_kind": losses.ALIGN_KINDS, "align_reduce": losses.ALIGN_REDUCES,
    "align_target": losses.ALIGN_TARGETS, "cam_network": ("student", "teacher"),
    "cam_method": ("proj", "gradcam"), "background": ("threshold", "power"),
    "seg_network": ("resnet", "vit"), "seg_targets": ("pseudo", "truth"),
    "seg_init": ("run", "scratch"),
}
POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = (0, None, True), (0, None, False), (1, None, False)
SHARE, PIXELS = (0, 1, False), (16, None, False)
RANGES = {
    "n_train": AT_LEAST_ONE, "n_val": NON_NEGATIVE, "size": PIXELS, "positive_share": SHARE,
    "coupling": SHARE, "val_coupling": SHARE, "tile": PIXELS, "min_share": SHARE,
    "val_share": SHARE, "teacher_width": AT_LEAST_ONE, "student_depth": AT_LEAST_ONE,
    "patch_size": AT_LEAST_ONE, "image_size": PIXELS, "teacher_epochs": AT_LEAST_ONE,
    "student_epochs": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE, "crop": (0, 1, True), "workers": NON_NEGATIVE,
    "log_every": AT_LEAST_ONE, "align_weight": NON_NEGATIVE, "consistency_weight": NON_NEGATIVE,
    "consistency_scale": POSITIVE, "cam_scales": POSITIVE, "threshold": SHARE,
    "cam_batch_size": AT_LEAST_ONE, "alpha": POSITIVE, "crf_iters": AT_LEAST_ONE,
    "crf_sxy_gaussian": POSITIVE, "crf_compat_gaussian": NON_NEGATIVE,
    "crf_sxy_bilateral": POSITIVE, "crf_srgb": POSITIVE, "crf_compat_bilateral": NON_NEGATIVE,
    "ignore_band": NON_NEGATIVE, "fill_steps": AT_LEAST_ONE, "fill_beta": POSITIVE,
    "seg_epochs": AT_LEAST_ONE, "seg_batch_size": AT_LEAST_ONE, "seg_lr": POSITIVE,
}


def allowed(name: str) -> str:
    """What a setting allows, in words."""
    if name in CHOICES:
        return "one of " + ", ".join(str(c) for c in CHOICES[name])
    low, high, low_open = RANGES[name]
    if high is not None:
        return f"{'above' if low_open else 'at least'} {low} and at most {high}"
    return f"{'above' if low_open else 'at least'} {low}"


def check_value(name: str, value) -> None:
    """DataError naming the flag, the value and what is allowed, when `value` is not allowed."""
    bad = False
    if name in CHOICES:
        bad = value not in CHOICES[name]
    elif name in RANGES:
        low, high, low_open = RANGES[name]
        for v in (value if isinstance(value, tuple) else (value,)):
            bad |= v < low or (low_open and v == low) or (high is not None and v > high)
        bad |= isinstance(value, tuple) and not value
    if bad:
        shown = " ".join(str(v) for v in value) if isinstance(value, tuple) else value
        raise DataError(f"--{name.replace('_', '-')} {shown}: must be {allowed(name)}")


def check_settings(*configs) -> None:
    """Every field of the given config dataclasses (or of a RunConfig's parts) is allowed."""
    for config in configs:
        if isinstance(config, RunConfig):
            check_settings(*(getattr(config, name) for name in CONFIGS))
            continue
        for f in dataclasses.fields(config):
            check_value(f.name, getattr(config, f.name))


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field, typed from the field, help from its metadata."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        text = f"{f.metadata.get('help', '')} (default: {default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif getattr(f.type, "__origin__", None) is tuple:
            item = f.type.__args__[0]
            parser.add_argument(flag, type=item, nargs="+", default=None, help=text)
        else:
            parser.add_argument(flag, type=f.type, default=None, help=text,
                                choices=CHOICES.get(f.name))


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
    """An RGB PIL image; a file that does not decode (truncated, empty, a link loop) is a
    DataError naming it. Grey, palette, CMYK and alpha images are converted; 16-bit grey is
    scaled to 8 bits (PIL's own conversion would clip it to white)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit grey
                grey = (np.asarray(im, dtype=np.float64) / 257).clip(0, 255).round()
                return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
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


def network_input(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> float, ImageNet-normalised (what every network here reads)."""
    x = v2.functional.to_dtype(rgb, torch.float32, scale=True)
    return v2.functional.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


class SmokeDataset(Dataset):
    """One split of a dataset folder.

    Item: {"stem", "size" (2,) the file's (H, W), "image" (3,S,S) normalised float, "rgb"
    (3,S,S) uint8, "label" (K,) multi-hot float, and when the folder has them "mask" (S,S) int64
    with 255 = ignore, "context" (S,S) bool}.
    Images without a mask file get an all-ignore mask so that batches stay uniform.
    `masks` names a folder of <stem>.png masks to use instead of DIR/masks (stage 3 trains on
    pseudo masks this way).
    """

    def __init__(self, root: str | Path, split: str, size: int | None = 128, flip: bool = False,
                 masks: Path | None = None, crop: float = 1.0):
        self.root = Path(root)
        self.classes, self.samples = read_split(self.root, split)
        if masks is not None:
            missing = [s.stem for s in self.samples if not (masks / f"{s.stem}.png").is_file()]
            if missing:
                raise DataError(f"{masks / missing[0]}.png: mask missing ({len(missing)} of "
                                f"{len(self.samples)} {split} images have none; `python wsss.py "
                                f"pseudo` writes pseudo masks)")
            self.samples = [dataclasses.replace(s, mask=masks / f"{s.stem}.png")
                            for s in self.samples]
        self.index = {s.stem: i for i, s in enumerate(self.samples)}
        self.has_masks = any(s.mask is not None for s in self.samples)
        self.has_context = any(s.context is not None for s in self.samples)
        steps = [v2.Resize((size, size), antialias=True)] if size else []
        if size and crop < 1:
            steps = [v2.RandomResizedCrop((size, size), scale=(crop, 1.0), antialias=True)]
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(steps or [v2.Identity()])

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
        extras = {k: tv_tensors.Mask(v) for k, v in self.full_truth(s, h, w).items()}
        image, extras = self.transform(image, extras)
        item = {"stem": s.stem, "size": torch.tensor([h, w]), "rgb": image.as_subclass(torch.Tensor),
                "image": network_input(image.as_subclass(torch.Tensor)),
                "label": self.label_vector(s)}
        item.update({k: t.as_subclass(torch.Tensor) for k, t in extras.items()})
        return item

    def full_truth(self, s: Sample, h: int, w: int) -> dict[str, torch.Tensor]:
        """{"mask": (h, w) int64, "context": (h, w) bool}, as far as the folder has them."""
        extras = {}
        if self.has_masks:
            mask = (load_mask(s.mask, (w, h), len(self.classes)) if s.mask is not None
                    else np.full((h, w), IGNORE, np.uint8))
            extras["mask"] = torch.from_numpy(mask).long()
        if self.has_context:
            context = (np.array(Image.open(s.context).convert("L")) > 0 if s.context is not None
                       else np.zeros((h, w), bool))
            if context.shape != (h, w):
                raise DataError(f"{s.context}: context is {context.shape[1]}x{context.shape[0]} "
                                f"but its image is {w}x{h}")
            extras["context"] = torch.from_numpy(context)
        return extras

    def truth(self, stem: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ground truth of one image at the image file's own size: (mask, context)."""
        s = self.samples[self.index[stem]]
        with Image.open(s.image) as im:
            w, h = im.size
        extras = self.full_truth(s, h, w)
        return extras["mask"], extras.get("context")

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
            raise DataError(f"{path}: is or holds {item}, which this command reads; "
                            f"choose another output folder")
    for folder in folders:
        if real_path(Path(folder)) in out.parents:
            raise DataError(f"{path}: lies inside {folder}, which this command reads; "
                            f"choose another output folder")
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise DataError(f"{path}: already exists (use --force to replace it)")


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
        raise DataError(f"{path}: cannot be written ({e.strerror})") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove(path)
    os.replace(tmp, path)


# --- the synthetic industrial-smoke scene generator --------------------------------------------
# A scene: sky gradient, ground, factory skyline, striped chimneys; an emission is a chain of
# soft Gaussian puffs that leaves a chimney top, bent by wind, thinning as it rises. Clouds and
# haze are smoke-like but unlabelled. Mask = pixels whose colour the plume changes by more
# than 32 levels, with an ignore band down to 10 (faint edges nobody can label); context =
# chimney pixels that are not smoke.

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
        puffs = _puffs(yy, xx, c[:, 0], c[:, 1], rng.uniform(0.04, 0.09, n) * s,
                       rng.uniform(0.4, 0.8, n))
        distractor = np.maximum(distractor, 1 - np.prod(1 - puffs, axis=0))  # overlaps thicken
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
            dens = rng.uniform(0.85, 1.0) * (1 - 0.5 * t)
            puffs = _puffs(yy, xx, x, y, radii, dens)
            plume = np.maximum(plume, puffs.max(axis=0))  # max, not a sum: overlap adds no mass
        plume *= 0.75 + 0.25 * _smooth_noise(rng, s, s, 6)  # turbulence
        colour = rng.choice([[235, 235, 235], [170, 170, 175], [120, 110, 100], [200, 180, 140]])
        colour = colour + rng.uniform(-15, 15, 3)
        change = np.abs(colour - image).max(axis=-1) * plume  # how much the plume shows
        image = image * (1 - plume[..., None]) + colour * plume[..., None]
    else:
        change = plume
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


def prepare_smoke5k(src: Path, dst: Path, config: PrepareConfig) -> dict:
    """SMOKE5K layout (SRC/img/*.jpg, SRC/gt/*.png with 0/255) -> tiled dataset folder.

    A tile is positive when smoke covers >= min_share of it, negative when it has no smoke pixel;
    tiles in between are ambiguous and skipped. Photos smaller than a tile are skipped.
    The split is by photograph, so tiles of one photo never land in both splits.
    `dst` is an empty folder.
    """
    for sub in ("img", "gt"):
        if not (src / sub).is_dir():
            raise DataError(f"{src / sub}: folder not found (expected SMOKE5K's img/ and gt/)")
    photos = sorted(p for p in (src / "img").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not photos:
        raise DataError(f"{src / 'img'}: no .jpg or .png photographs")
    (dst / "images").mkdir(parents=True)
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
        with output_dir(path, force=False) as tmp:
            synthesize(tmp, SynthConfig())
    return path


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
# Training: building the networks, the two stages, checkpoints, resume


class Interrupted(Exception):
    """Ctrl-C during training, after the checkpoint was written: exit code 130."""


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
    refine: RefineConfig = field(default_factory=RefineConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        parts = {}
        for name, config_cls in CONFIGS.items():
            values = dict(d.get(name, {}))
            for f in dataclasses.fields(config_cls):
                if f.name in values and getattr(f.type, "__origin__", None) is tuple:
                    values[f.name] = tuple(values[f.name])
            parts[name] = config_cls(**values)
        return cls(data=d["data"], **parts)


class Log:
    """Prints a line and appends it to RUN/log.txt (the first process only)."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, line: str) -> None:
        if world()[0] != 0:
            return
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
    if device.type == "cuda":  # "auto" (the choices are checked with the other settings)
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":  # fast only with AVX512-BF16 or AMX; slower than fp32 elsewhere
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return None


def build_teacher(config: ModelConfig, num_classes: int) -> models.Teacher:
    backbone = getattr(models, config.teacher)(num_classes=0, output_stride=config.output_stride,
                                               width=config.teacher_width)
    if config.teacher_weights:
        load_weights(backbone, Path(config.teacher_weights), "teacher")
    return models.Teacher(backbone, num_classes, pcm=config.pcm)


def build_student(config: ModelConfig, num_classes: int) -> models.Student:
    if config.image_size % config.patch_size:
        raise DataError(f"--image-size {config.image_size} is not a multiple of --patch-size "
                        f"{config.patch_size}")
    # A CAM-head student classifies with its projected map: no class-token head to train.
    head_classes = num_classes if config.student_head == "token" else 0
    backbone = getattr(models, config.student)(img_size=config.image_size,
                                               patch_size=config.patch_size,
                                               depth=config.student_depth,
                                               num_classes=head_classes, stem=config.student_stem)
    if config.student_weights:
        load_weights(backbone, Path(config.student_weights), "student")
    return models.Student(backbone, num_classes, head=config.student_head)


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, config: RunConfig, net: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, epoch: int, done: bool,
                    step: int = 0) -> None:
    """`epoch` epochs and `step` steps of the next are done; the random state is saved so
    that a run resumed mid-epoch draws what the uninterrupted run would have drawn."""
    if world()[0] != 0:  # one writer; every process holds the same weights
        return
    atomic_save({"format": CHECKPOINT_FORMAT, "config": config.to_dict(),
                 "model": net.state_dict(),
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "epoch": epoch, "step": step, "rng": torch.get_rng_state(), "done": done}, path)


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message runs to many lines: its first says what failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{path}: cannot read checkpoint ({e.__class__.__name__}: {first})"
                        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a checkpoint of format {CHECKPOINT_FORMAT}")
    return ckpt


def check_compatible(ckpt: dict, config: RunConfig, path: Path) -> None:
    """A checkpoint resumes only the networks it was written for (the ablation shares one
    teacher checkpoint among runs of other loss settings, so those may differ)."""
    saved = RunConfig.from_dict(ckpt["config"])
    for part in ("model", "segment"):
        a, b = dataclasses.asdict(getattr(saved, part)), dataclasses.asdict(getattr(config, part))
        changed = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]
        if changed:
            raise TrainingError(f"{path}: written with other {part} settings ({'; '.join(changed)}); "
                                f"resume with the settings it began with, or start a new run")


def restore(net: torch.nn.Module, ckpt: dict, path: Path) -> None:
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise TrainingError(f"{path}: does not fit the configured network ({first[1].strip() if len(first) > 1 else first[0]})") from None


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of n images for one epoch, a function of (seed, epoch) alone: the order
    DataLoader(shuffle=True, generator=g) gives, which draws its workers' base seed from g
    before the permutation."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the base-seed draw
    return torch.randperm(n, generator=generator).tolist()


class DealingSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler dealing out epoch_order's permutation (padded to a multiple of the
    processes, as DistributedSampler pads): process r takes images r, r + N, r + 2N, ..., so
    the N processes' batches together are the single process's batches."""

    def __iter__(self):
        order = epoch_order(len(self.dataset), self.seed, self.epoch)
        order += order[: self.total_size - len(order)]
        return iter(order[self.rank:self.total_size:self.num_replicas])


def make_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, workers: int,
                device: torch.device, skip: int = 0) -> torch.utils.data.DataLoader:
    """One epoch's batches of `batch_size` (the global batch), in an order that depends only
    on (seed, epoch), so that a resumed run sees the same batches; `skip` drops the first
    images (a run resumed mid-epoch). Under torchrun each process takes its share of the
    same order (DealingSampler); together they see the single process's batches."""
    rank, size = world()
    if size > 1:
        sampler = DealingSampler(dataset, size, rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip // size:]
    else:
        indices = epoch_order(len(dataset), seed, epoch)[skip:]
    # Its own generator, so that making the loader draws nothing from the global random state.
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size // size, shuffle=False,
        generator=torch.Generator().manual_seed(epoch), num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=False)


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return getattr(net, "module", net)


def distributed(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module to call in training: under torchrun, wrapped in DistributedDataParallel
    (gradients averaged across processes during backward; BatchNorm synchronised on CUDA,
    per process on CPU, where SyncBatchNorm does not run); else the network itself."""
    if world()[1] == 1:
        return net
    if device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)


class StopFlag:
    """Turns Ctrl-C (SIGINT) into a flag the training loop reads between steps, so the
    checkpoint it writes never holds a half-done optimizer step. A second Ctrl-C stops at once."""

    def __enter__(self):
        self.set = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def student_losses(student: models.Student, images: torch.Tensor, labels: torch.Tensor,
                   teacher_maps: torch.Tensor | None, config: LossConfig) -> dict:
    """L = L_cls + lambda L_align + mu L_cons for one batch of the student."""
    logits, maps = student(images)  # `student` may be wrapped for distributed training
    terms = {"cls": losses.classification_loss(logits, labels)}
    if teacher_maps is not None and config.align_weight > 0:
        target = losses.alignment_target(teacher_maps, labels, config.align_target)
        aligned = maps if config.align_target == "pair" else maps[:, 1:]  # (bg, fg) or fg
        terms["align"] = losses.alignment_loss(aligned, target, config.align_kind,
                                               config.align_reduce)
    if config.consistency_weight > 0:
        p = unwrap(student).backbone.patch_size
        side = max(p, round(images.shape[-1] * config.consistency_scale / p) * p)
        flip = bool(torch.rand(()) < 0.5)
        _, maps_aug = student(losses.flip_and_resize(images, (side, side), flip))
        terms["cons"] = losses.consistency_loss(maps_aug[:, 1:], losses.flip_and_resize(
            maps[:, 1:], maps_aug.shape[-2:], flip))
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
    """Generic epoch loop: `step(batch, nets) -> {"loss": ..., other terms}`, with the batch's
    tensors on the device and `nets` the modules to call (wrapped under torchrun). Trains every
    module of `nets` with one AdamW; writes RUN/<name>.pt atomically after every epoch and on
    Ctrl-C; resumes from those checkpoints exactly, mid-epoch too; stops on a non-finite loss
    with the last good checkpoint intact."""
    t = config.train
    rank, size = world()
    if t.batch_size % size:
        raise DataError(f"--batch-size {t.batch_size} is the global batch; it must divide "
                        f"evenly among {size} processes")
    params = [p for net in nets.values() for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    start, skip, rng = 0, 0, None
    paths = {name: run / f"{name}.pt" for name in nets}
    if all(p.is_file() for p in paths.values()):
        ckpts = {name: load_checkpoint(p) for name, p in paths.items()}
        for name, net in nets.items():
            check_compatible(ckpts[name], config, paths[name])
            restore(net, ckpts[name], paths[name])
        first = ckpts[next(iter(nets))]
        start, skip, rng = first["epoch"], first.get("step", 0), first.get("rng")
        if start >= epochs:
            log(f"{stage}: done in an earlier run ({start} epochs)")
            return
        if first["optimizer"] is not None:
            optimizer.load_state_dict(first["optimizer"])
        log(f"{stage}: resuming after epoch {start}" + (f" step {skip}" if skip else ""))
    if t.channels_last:
        for net in nets.values():
            net.to(memory_format=torch.channels_last)
    wrapped = {name: distributed(net, device) for name, net in nets.items()}
    if t.compile:
        wrapped = {name: torch.compile(net) for name, net in wrapped.items()}
    dtype = autocast_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    steps_per_epoch = -(-len(dataset) // t.batch_size)
    total_steps = epochs * steps_per_epoch
    total_images = (epochs - start) * len(dataset) - skip * t.batch_size
    seen, began = 0, time.perf_counter()
    with StopFlag() as stop:
        for epoch in range(start, epochs):
            done_steps = skip if epoch == start else 0
            if done_steps and rng is not None:
                torch.set_rng_state(rng)  # where the interrupted run stood
            else:
                torch.manual_seed(t.seed * 100_003 + epoch)  # augmentation draws, per epoch
            for net in nets.values():
                net.train()
            sums: dict[str, float] = {}
            loader = make_loader(dataset, t.batch_size, t.seed, epoch, t.workers, device,
                                 skip=done_steps * t.batch_size)
            for i, batch in enumerate(loader, start=done_steps + 1):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()
                         if isinstance(v, torch.Tensor)}
                if t.channels_last:
                    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=dtype or torch.float32,
                                    enabled=dtype is not None):
                    terms = step(batch, wrapped)
                # The global batch's terms: every process sees the same (and stops together).
                values = global_mean(torch.stack([v.detach().float() for v in terms.values()]))
                means = dict(zip(terms, values.tolist()))
                if not math.isfinite(means["loss"]):
                    raise TrainingError(
                        f"{stage}: loss is {means['loss']} at epoch {epoch + 1} step {i}; "
                        f"stopped. The last good checkpoint (epoch {epoch}) is intact in {run}; "
                        f"try a lower --lr or --amp off")
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(t.lr, epoch * steps_per_epoch + i - 1,
                                                steps_per_epoch, total_steps)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(terms["loss"]).backward()
                scaler.step(optimizer)
                scaler.update()
                seen += len(batch["image"]) * size
                for k, v in means.items():
                    sums[k] = sums.get(k, 0.0) + v
                if i % t.log_every == 0 or i == steps_per_epoch:
                    ips = seen / (time.perf_counter() - began)
                    terms_text = " ".join(f"{k} {v / (i - done_steps):.4f}" for k, v in sums.items())
                    log(f"{stage} epoch {epoch + 1}/{epochs} step {i}/{steps_per_epoch} "
                        f"{terms_text} | {ips:.1f} img/s | left {(total_images - seen) / ips:.0f} s")
                if stop.set:
                    for name, net in nets.items():
                        save_checkpoint(paths[name], config, net, optimizer, epoch, False, step=i)
                    again = (f"segment --run {run}" if stage.startswith("segment")
                             else f"train --resume {run}")
                    raise Interrupted(f"{stage}: stopped by Ctrl-C after epoch {epoch} step {i}; "
                                      f"checkpoint written; `python wsss.py {again}` continues "
                                      f"from there")
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

    def teacher_step(batch, nets):
        logits, _ = nets["teacher"](batch["image"])
        loss = losses.classification_loss(logits, batch["label"])
        return {"loss": loss, "cls": loss}

    if t.mode == "distill":
        train_stage("teacher", {"teacher": teacher}, teacher_step, dataset, run, config,
                    t.teacher_epochs, device, log)
        freeze(teacher)

        def student_step(batch, nets):
            teacher_maps = None
            if config.loss.align_weight > 0:
                with torch.no_grad():  # the frozen teacher: not wrapped, not trained
                    _, teacher_maps = teacher(batch["image"])
            return student_losses(nets["student"], batch["image"], batch["label"], teacher_maps,
                                  config.loss)

        train_stage("student", {"student": student}, student_step, dataset, run, config,
                    t.student_epochs, device, log)
    else:  # co-train
        def joint_step(batch, nets):
            logits, teacher_maps = nets["teacher"](batch["image"])
            cls_t = losses.classification_loss(logits, batch["label"])
            terms = student_losses(nets["student"], batch["image"], batch["label"], teacher_maps,
                                   config.loss)
            terms["loss"] = terms["loss"] + cls_t
            terms["teacher_cls"] = cls_t
            return terms

        train_stage("co-train", {"teacher": teacher, "student": student}, joint_step, dataset,
                    run, config, max(t.teacher_epochs, t.student_epochs), device, log)
        freeze(teacher)
    return teacher, freeze(student)


def train_alone(run: Path, config: RunConfig, dataset: "SmokeDataset", device: torch.device,
                log: Log) -> models.Student:
    """The baseline: the same student and recipe without the teacher (lambda = 0), so the
    alignment's effect is the difference of the two students (RUN/alone.pt)."""
    k = len(dataset.classes)
    torch.manual_seed(config.train.seed)
    alone = build_student(config.model, k).to(device)
    alone_loss = dataclasses.replace(config.loss, align_weight=0.0)

    def alone_step(batch, nets):
        return student_losses(nets["alone"], batch["image"], batch["label"], None, alone_loss)

    train_stage("alone", {"alone": alone}, alone_step, dataset, run, config,
                config.train.student_epochs, device, log)
    return freeze(alone)


# -----------------------------------------------------------------------------
# CAMs: teacher CAM, student Grad-CAM or projection map; multi-scale and flip


def teacher_cam(teacher: models.Teacher, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,K,h,w): the teacher's class maps (its CAM, + PCM when it has one)."""
    with torch.no_grad():
        return teacher(images)[1].float()


def student_proj_cam(student: models.Student, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,K,h,w): the class channels of the student's projected patch tokens."""
    with torch.no_grad():
        return student(images)[1][:, 1:].float()


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
    fn = student_gradcam if config.cam_method == "gradcam" else student_proj_cam
    return (lambda x: fn(student, x)), student.backbone.patch_size


def fill_coverage(student: models.Student, images: torch.Tensor, cams: torch.Tensor,
                  config: RefineConfig) -> torch.Tensor:
    """The coverage fix: CAMs (B,K,H,W) pooled to the student's patch grid, walked over its
    attention affinities, and brought back to (H, W)."""
    p = student.backbone.patch_size
    h, w = images.shape[2] // p, images.shape[3] // p
    with torch.no_grad():
        _, attentions = student.backbone.forward_features(images, return_attn=True)
    transition = postprocess.attention_affinity(attentions, config.fill_beta)
    grid = F.adaptive_avg_pool2d(F.relu(cams.float()), (h, w))
    walked = postprocess.random_walk(grid, transition, config.fill_steps)
    return F.interpolate(walked, size=cams.shape[-2:], mode="bilinear", align_corners=False)


def refine(rgb: torch.Tensor, cams: torch.Tensor, cam_config: CamConfig,
           config: RefineConfig) -> torch.Tensor:
    """Normalised CAMs (B,K,H,W) -> masks (B,H,W) uint8: background score, dense CRF."""
    probs = postprocess.cams_to_probs(cams, config.background, cam_config.threshold,
                                      config.alpha)
    if config.crf:
        probs = postprocess.dense_crf(
            rgb.to(probs.device), probs, iters=config.crf_iters,
            sxy_gaussian=config.crf_sxy_gaussian, compat_gaussian=config.crf_compat_gaussian,
            sxy_bilateral=config.crf_sxy_bilateral, srgb=config.crf_srgb,
            compat_bilateral=config.crf_compat_bilateral)
    return postprocess.probs_to_mask(probs, config.ignore_band)


def pseudo_masks(dataset: "SmokeDataset", cam_config: CamConfig, refine_config: RefineConfig,
                 teacher, student, device: torch.device, amp: str = "off"):
    """Yield (batch, cams (B,K,H,W), masks (B,H,W) uint8) for every image of the split (under
    torchrun, for this process's share): the configured CAMs, normalised and gated by the
    image labels, and the masks refined from them."""
    rank, size = world()
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), size))
    loader = torch.utils.data.DataLoader(share, batch_size=cam_config.cam_batch_size)
    for batch in loader:
        cams = batch_cams(batch, cam_config, refine_config, teacher, student, device, amp)
        yield batch, cams.cpu(), refine(batch["rgb"], cams, cam_config, refine_config).cpu()


def batch_cams(batch: dict, cam_config: CamConfig, refine_config: RefineConfig, teacher,
               student, device: torch.device, amp: str = "off") -> torch.Tensor:
    """Normalised CAMs (B,K,H,W) of a batch: multi-scale, coverage fix, gated by labels."""
    cams = raw_batch_cams(batch, cam_config, teacher, student, device, amp)
    return finish_cams(cams, batch, refine_config, student, device)


def raw_batch_cams(batch: dict, cam_config: CamConfig, teacher, student, device: torch.device,
                   amp: str = "off") -> torch.Tensor:
    """The multi-scale CAMs (B,K,H,W) of a batch, before the coverage fix and normalisation."""
    fn, multiple = cam_function(cam_config, teacher, student)
    dtype = autocast_dtype(amp, device)
    images = batch["image"].to(device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return multiscale_cam(fn, images, cam_config.cam_scales, cam_config.cam_flip, multiple)


def finish_cams(cams: torch.Tensor, batch: dict, refine_config: RefineConfig, student,
                device: torch.device) -> torch.Tensor:
    """Multi-scale CAMs (B,K,H,W) -> the coverage fix when configured -> normalised CAMs,
    zero for the classes an image's label lacks."""
    if refine_config.fill:
        cams = fill_coverage(student, batch["image"].to(device), cams, refine_config)
    return postprocess.normalize_cams(cams, batch["label"].to(device))


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (H, W) class mask at another size, nearest neighbour (the file's own size)."""
    if tuple(mask.shape) == size:
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].to(mask.dtype)


def save_mask(mask: torch.Tensor, path: Path) -> None:
    Image.fromarray(mask.numpy().astype(np.uint8)).save(path)


def paint(rgb: torch.Tensor, cam: torch.Tensor | None = None,
          masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """A (3,H,W) uint8 photo with a CAM (H,W) in [0,1] painted red over it, or with masks
    (bool (H,W)) painted red, yellow, blue in turn."""
    from torchvision.utils import draw_segmentation_masks
    if masks is not None:
        colors = ["red", "yellow", "blue", "lime", "cyan", "magenta"]
        return draw_segmentation_masks(rgb, torch.stack(masks), alpha=0.55,
                                       colors=(colors * len(masks))[:len(masks)])
    a = 0.7 * cam.clamp(0, 1)[None].cpu()
    red = torch.tensor([255.0, 0.0, 0.0])[:, None, None]
    return (rgb.float() * (1 - a) + red * a).to(torch.uint8)


def overlay_grid(rgbs: list[torch.Tensor], masks: list[torch.Tensor], path: Path,
                 num_classes: int) -> None:
    """Photos and their masks over them (smoke red), in a grid a person can look at."""
    from torchvision.utils import make_grid
    tiles = []
    for rgb, mask in zip(rgbs, masks):
        tiles += [rgb, paint(rgb, masks=[mask == k for k in range(1, num_classes + 1)])]
    grid = make_grid(torch.stack(tiles), nrow=8, padding=2, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)  # (3,H,W) -> (H,W,3)


def comparison_figure(dataset: "SmokeDataset", columns: list, path: Path, count: int = 6) -> None:
    """Rows of labelled images: the photo, one panel per function of `columns`
    (batch -> (B,3,H,W) uint8), then the ground truth."""
    from torchvision.utils import make_grid
    picks = [i for i, s in enumerate(dataset.samples) if s.labels][:count]
    batch = torch.utils.data.default_collate([dataset[i] for i in picks])
    panels = [batch["rgb"], *[fn(batch) for fn in columns]]
    if "mask" in batch:
        panels.append(torch.stack([paint(rgb, masks=[m == 1, m == IGNORE])
                                   for rgb, m in zip(batch["rgb"], batch["mask"])]))
    tiles = torch.stack(panels, dim=1).flatten(0, 1)  # (B,columns,3,H,W) -> (B*columns,3,H,W)
    grid = make_grid(tiles, nrow=len(panels), padding=2, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)  # (3,H,W) -> (H,W,3)


# -----------------------------------------------------------------------------
# Evaluation: masks against ground truth (255 ignored)


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

    def add_batch(self, masks: torch.Tensor, batch: dict, dataset: "SmokeDataset") -> None:
        """Masks (B, H, W) at the network's size, scored as they are written: at each ground
        truth's own size (so `train`, `pseudo` and `eval` agree on the same masks)."""
        for i, mask in enumerate(masks):
            size = tuple(batch["size"][i].tolist())
            if tuple(mask.shape) == size:  # the batch holds the truth at its own size
                self.add(mask, batch["mask"][i], batch["context"][i] if "context" in batch
                         else None)
            else:
                self.add(resize_mask(mask, size), *dataset.truth(batch["stem"][i]))

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
    def f(key: str) -> str:  # a figure without pixels to count (no context masks) is n/a
        return "n/a" if math.isnan(r[key]) else f"{r[key]:.1f}"
    return (f"{name}: smoke IoU {f('smoke_iou')}  mIoU {f('miou')}  "
            f"precision {f('precision')}  recall {f('recall')}  "
            f"boundary F1 {f('boundary_f1')}  per-image IoU {f('image_iou')}  "
            f"chimney called smoke {f('context_fp')} %"
            + (f"  BCE {r['bce']:.3f}" if "bce" in r else ""))


def evaluate_folder(dataset: "SmokeDataset", pred: Path) -> dict:
    """Scores of the masks pred/<stem>.png against the split's ground truth (full size)."""
    if not dataset.has_masks:
        raise DataError(f"{dataset.root / 'masks'}: no ground-truth masks to evaluate against")
    scores = Scores(len(dataset.classes))
    for i, sample in enumerate(dataset.samples):
        path = pred / f"{sample.stem}.png"
        if not path.is_file():
            raise DataError(f"{path}: predicted mask missing for {sample.stem}")
        item = dataset[i]
        mask = torch.from_numpy(load_mask(path, (item["mask"].shape[1], item["mask"].shape[0]),
                                          len(dataset.classes)))
        scores.add(mask, item["mask"], item.get("context"))
    return scores.result()


def write_pseudo_masks(dataset: "SmokeDataset", out: Path, cam_config: CamConfig,
                       refine_config: RefineConfig, teacher, student, device: torch.device,
                       amp: str, overlays: Path | None, save_cams: bool = False) -> dict | None:
    """Masks for every image of the split into `out` at each file's own size (and the CAMs,
    at the network's input size, into out/cams/<stem>.npy, float16 (K,H,W), with save_cams),
    an overlay grid of images with a label, and the masks' scores against the ground truth at
    the network's input size when the dataset has masks (`eval` scores at full size)."""
    out.mkdir(parents=True, exist_ok=True)
    if save_cams:
        (out / "cams").mkdir(exist_ok=True)
    scores = Scores(len(dataset.classes)) if dataset.has_masks else None
    shown_rgb, shown_mask = [], []
    for batch, cams, masks in pseudo_masks(dataset, cam_config, refine_config, teacher, student,
                                           device, amp):
        for i, (stem, mask) in enumerate(zip(batch["stem"], masks)):
            save_mask(resize_mask(mask, tuple(batch["size"][i].tolist())), out / f"{stem}.png")
            if save_cams:
                np.save(out / "cams" / f"{stem}.npy", cams[i].numpy().astype(np.float16))
            if len(shown_rgb) < 16 and batch["label"][i].any():
                shown_rgb.append(batch["rgb"][i])
                shown_mask.append(mask)
        if scores is not None:
            scores.add_batch(masks, batch, dataset)
    if overlays is not None and shown_rgb and world()[0] == 0:
        overlay_grid(shown_rgb, shown_mask, overlays, len(dataset.classes))
    return None if scores is None else gather_scores(scores).result()


def read_run_config(run: Path) -> RunConfig:
    path = run / "config.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; `python wsss.py train` makes a run folder")
    try:
        config = RunConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # truncated, foreign, edited
        raise DataError(f"{path}: not a run's config ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'malformed'})") from None
    check_settings(config)  # an edited file is held to the same table as the flags
    return config


def run_files(run: Path) -> tuple[Path, ...]:
    """What a run folder holds that commands read: its config, checkpoints and log."""
    return tuple(p for p in run.iterdir() if p.is_file()) if run.is_dir() else ()


def load_run(run: Path, device: torch.device) -> tuple[RunConfig, models.Teacher, models.Student]:
    """A run's config and its trained, frozen networks."""
    config = read_run_config(run)
    num_classes = len(read_classes(Path(config.data)))
    nets = []
    for name, build in (("teacher", build_teacher), ("student", build_student)):
        path = run / f"{name}.pt"
        if not path.is_file():
            raise DataError(f"{path}: not found; `python wsss.py train --resume {run}` "
                            f"finishes the run")
        net = build(config.model.architecture(), num_classes)
        restore(net, load_checkpoint(path), path)
        nets.append(freeze(net.to(device)))
    return config, nets[0], nets[1]


# -----------------------------------------------------------------------------
# Stage 3: a segmentation network trained on the pseudo masks, and masks for any image

SEGMENT_CHECKPOINTS = {"pseudo": "segment", "truth": "segment_truth"}  # --seg-targets -> RUN/<name>.pt


def build_segmenter(model: ModelConfig, seg: SegmentConfig, num_classes: int) -> torch.nn.Module:
    """DeepLabv3 on the teacher's ResNet, or a linear decoder on the student's ViT; K + 1
    outputs (background first)."""
    if seg.seg_network == "resnet":
        backbone = build_teacher(model, num_classes).backbone
        side = model.image_size // model.output_stride
        # DeepLabv3's rates (6, 12, 18) suit its 33x33 feature maps (513 px at output stride
        # 16); scaled to this map's side, so that the branches still see different contexts.
        rates = tuple(max(1, round(r * side / 33)) for r in (6, 12, 18))
        return models.DeepLab(backbone, num_classes + 1, rates=rates)
    if seg.seg_network == "vit":
        return models.LinearSegmenter(build_student(model, num_classes).backbone, num_classes + 1)
    raise DataError(f"--seg-network must be resnet or vit, got {seg.seg_network!r}")


def init_from_run(net: torch.nn.Module, run: Path, seg: SegmentConfig) -> None:
    """Start stage 3 from the backbone the run trained (no ImageNet weights are downloaded)."""
    name = "teacher" if seg.seg_network == "resnet" else "student"
    path = run / f"{name}.pt"
    if not path.is_file():
        raise DataError(f"{path}: not found; `python wsss.py train --resume {run}` finishes the "
                        f"run (or use --seg-init scratch)")
    state = {k.removeprefix("backbone."): v for k, v in load_checkpoint(path)["model"].items()
             if k.startswith("backbone.")}
    net.backbone.load_state_dict(state)


def train_segmenter(run: Path, config: RunConfig, device: torch.device, log: Log) -> torch.nn.Module:
    """Stage 3: the segmentation network on the pseudo masks (255 ignored), or on the ground
    truth for the upper bound; checkpointed to RUN/segment.pt (segment_truth.pt), resumable."""
    seg = config.segment
    if seg.seg_targets not in SEGMENT_CHECKPOINTS:
        raise DataError(f"--seg-targets must be pseudo or truth, got {seg.seg_targets!r}")
    masks = None
    if seg.seg_targets == "pseudo":
        masks = Path(seg.seg_masks) if seg.seg_masks else run / "pseudo"
        if not masks.is_dir():
            raise DataError(f"{masks}: no pseudo masks; `python wsss.py pseudo --run {run} "
                            f"--out {masks}` writes them")
    # Random flips, as every segmentation recipe; the pseudo masks flip with their images.
    dataset = SmokeDataset(config.data, "train", size=config.model.image_size, flip=True,
                           masks=masks)
    if not dataset.has_masks:
        raise DataError(f"{Path(config.data) / 'masks'}: no ground-truth masks to train on")
    torch.manual_seed(config.train.seed)
    model = config.model.architecture()
    net = build_segmenter(model, seg, len(dataset.classes))
    if seg.seg_init == "run":
        init_from_run(net, run, seg)
    elif seg.seg_init != "scratch":
        raise DataError(f"--seg-init must be run or scratch, got {seg.seg_init!r}")
    net = net.to(device)
    log(f"stage 3: {seg.seg_network} segmenter, {models.count_parameters(net) / 1e6:.2f} M "
        f"parameters, from {seg.seg_init}, on {masks or 'the ground-truth masks'}")
    name = SEGMENT_CHECKPOINTS[seg.seg_targets]
    stage = dataclasses.replace(config, train=dataclasses.replace(
        config.train, batch_size=seg.seg_batch_size, lr=seg.seg_lr))

    def step(batch, nets):
        loss = losses.segmentation_loss(nets[name](batch["image"]), batch["mask"], IGNORE)
        return {"loss": loss}

    train_stage(name, {name: net}, step, dataset, run, stage, seg.seg_epochs, device, log)
    return freeze(net)


def load_segmenter(run: Path, config: RunConfig, device: torch.device,
                   name: str = "segment") -> torch.nn.Module | None:
    """The run's trained stage-3 network, or None when it has none."""
    path = run / f"{name}.pt"
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    if not ckpt["done"]:
        raise DataError(f"{path}: stage 3 stopped before it finished; `python wsss.py segment "
                        f"--run {run}` continues it")
    model = config.model.architecture()
    seg = RunConfig.from_dict(ckpt["config"]).segment
    net = build_segmenter(model, seg, len(read_classes(Path(config.data))))
    restore(net, ckpt, path)
    return freeze(net.to(device))


def segment_masks(net: torch.nn.Module, images: torch.Tensor, sizes: list[tuple[int, int]],
                  device: torch.device, amp: str) -> list[torch.Tensor]:
    """Stage-3 masks (h, w) uint8 at each image's own size: logits upsampled, then argmax."""
    dtype = autocast_dtype(amp, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                         enabled=dtype is not None):
        logits = net(images.to(device)).float()
    return [F.interpolate(z[None], size=size, mode="bilinear", align_corners=False)[0]
            .argmax(0).to(torch.uint8).cpu() for z, size in zip(logits, sizes)]


def cam_masks(config: RunConfig, teacher: models.Teacher, student: models.Student, batch: dict,
              sizes: list[tuple[int, int]], device: torch.device) -> list[torch.Tensor]:
    """Without a stage-3 network: the run's CAM and refinement, gated by the CAM network's own
    classifier (a class is present where its sigmoid exceeds 0.5); masks at each image's size."""
    classifier = student if config.cam.cam_network == "student" else teacher
    with torch.no_grad():
        logits = classifier(batch["image"].to(device))[0].float()
    batch = {**batch, "label": (torch.sigmoid(logits) > 0.5).float().cpu()}
    cams = batch_cams(batch, config.cam, config.refine, teacher, student, device, config.train.amp)
    masks = refine(batch["rgb"], cams, config.cam, config.refine).cpu()
    return [resize_mask(m, size) for m, size in zip(masks, sizes)]


def segment_split(net: torch.nn.Module, config: RunConfig, split: str, out: Path,
                  device: torch.device) -> dict | None:
    """Stage-3 masks of a whole split into `out` (file sizes), scored as `eval` scores them."""
    dataset = SmokeDataset(config.data, split, size=config.model.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.segment.seg_batch_size)
    for batch in loader:
        sizes = [tuple(s) for s in batch["size"].tolist()]
        for stem, mask in zip(batch["stem"], segment_masks(net, batch["image"], sizes, device,
                                                           config.train.amp)):
            save_mask(mask, out / f"{stem}.png")
    if not dataset.has_masks:
        return None
    return evaluate_folder(SmokeDataset(config.data, split, size=None), out)


PREDICT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def find_images(paths: list[str], folder: str | None) -> list[Path]:
    """The files named, or the image files of `folder` (not its subfolders); stems unique,
    since each names its mask."""
    if folder is not None:
        root = Path(folder)
        if not root.is_dir():
            raise DataError(f"{root}: folder not found")
        # Broken links and link loops are kept: reading them fails, and they are reported.
        files = sorted(p for p in root.iterdir()
                       if p.suffix.lower() in PREDICT_EXTENSIONS and not p.is_dir())
    else:
        files = [Path(p) for p in paths]
    if not files:
        raise DataError(f"{folder or 'the command line'}: no images ({', '.join(PREDICT_EXTENSIONS)})")
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise DataError(f"{path} and {seen[path.stem]}: two images named {path.stem!r} would "
                            f"write one mask")
        seen[path.stem] = path
    return files


def overlay(rgb: torch.Tensor, mask: torch.Tensor, num_classes: int, side: int = 768) -> Image.Image:
    """The photo with its mask painted over it, at most `side` pixels on its long side."""
    h, w = mask.shape
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    rgb = v2.functional.resize(rgb, list(size), antialias=True)
    mask = resize_mask(mask, size)
    painted = paint(rgb, masks=[mask == k for k in range(1, num_classes + 1)])
    return Image.fromarray(painted.permute(1, 2, 0).numpy())  # (3,H,W) -> (H,W,3)


def predict(run: Path, files: list[Path], out: Path, device: torch.device,
            batch_size: int) -> dict:
    """Masks (OUT/<stem>.png, class indices at the input's size) and overlays
    (OUT/overlays/<stem>.jpg) for any images. Unreadable files are reported and skipped."""
    config, teacher, student = load_run(run, device)
    segmenter = load_segmenter(run, config, device)
    num_classes = len(read_classes(Path(config.data)))
    size = config.model.image_size
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    skipped, done, began = [], 0, time.perf_counter()
    for start in range(0, len(files), batch_size):
        loaded = []
        for path in files[start:start + batch_size]:
            try:
                pil = load_image(path)
            except DataError as e:
                print(f"skipped {e}", flush=True)
                skipped.append(str(path))
                continue
            loaded.append((path, torch.from_numpy(np.array(pil)).permute(2, 0, 1)))  # (H,W,3) -> (3,H,W)
        if not loaded:
            continue
        sizes = [tuple(rgb.shape[1:]) for _, rgb in loaded]
        rgb = torch.stack([v2.functional.resize(r, [size, size], antialias=True) for _, r in loaded])
        batch = {"image": network_input(rgb), "rgb": rgb}
        if segmenter is not None:
            masks = segment_masks(segmenter, batch["image"], sizes, device, config.train.amp)
        else:
            masks = cam_masks(config, teacher, student, batch, sizes, device)
        for (path, full), mask in zip(loaded, masks):
            save_mask(mask, out / f"{path.stem}.png")
            overlay(full, mask, num_classes).save(out / "overlays" / f"{path.stem}.jpg", quality=90)
        done += len(loaded)
    seconds = time.perf_counter() - began
    return {"images": done, "skipped": skipped, "seconds": seconds,
            "method": "stage-3 network" if segmenter is not None else
            f"{config.cam.cam_network} CAM + refinement"}


# -----------------------------------------------------------------------------
# Ablation: the paper's comparisons, trained once per distinct training setting and seed

# key -> (label, training overrides, CAM/refine overrides); rows with equal training
# overrides share their trained runs.
ABLATION_ROWS = {
    "teacher": ("teacher CAM (ResNet)", {}, {"cam_network": "teacher"}),
    "alone": ("student CAM alone (ViT, λ = 0)", {"align_weight": 0.0}, {}),
    "aligned": ("aligned student, cosine global (the method)", {}, {}),
    "channel": ("aligned student, cosine channel", {"align_reduce": "channel"}, {}),
    "spatial": ("aligned student, cosine spatial", {"align_reduce": "spatial"}, {}),
    "l1": ("aligned student, L1 global", {"align_kind": "l1"}, {}),
    "l2": ("aligned student, L2 global", {"align_kind": "l2"}, {}),
    "cotrain": ("co-training from scratch, cosine global", {"mode": "co-train"}, {}),
    "lambda0.3": ("λ = 0.3", {"align_weight": 0.3}, {}),
    "lambda0.5": ("λ = 0.5", {"align_weight": 0.5}, {}),
    "lambda1.5": ("λ = 1.5", {"align_weight": 1.5}, {}),
    "consistency": ("+ consistency loss (μ = 1)", {"consistency_weight": 1.0}, {}),
    "single-scale": ("single-scale CAM (no multi-scale, no flip)", {},
                     {"cam_scales": (1.0,), "cam_flip": False}),
    "crf": ("+ dense CRF", {}, {"crf": True}),
    "fill": ("+ coverage fix", {}, {"fill": True}),
    "crf+fill": ("+ dense CRF + coverage fix", {}, {"crf": True, "fill": True}),
}
QUICK_ROWS = ("teacher", "alone", "aligned", "crf")
# The full grid's student budget (the default run and --quick: 8 epochs), so that its student
# trainings and CAM passes over 3 seeds fit in an hour on 2 CPU cores.
ABLATION_STUDENT_EPOCHS = 4


# With one class the maps have one channel: the per-channel cosine is then the global cosine
# itself, and the per-location cosine compares single numbers (always +-1: its gradient is
# rounding noise). Those rows share a run instead of training the same network again.
# row -> (the row whose run it shares, the note its label gets). The paper's maps also have a
# background channel.
ONE_CHANNEL_SHARES = {"channel": ("aligned", "one channel: = global"),
                      "spatial": ("alone", "one channel: no gradient, = λ = 0")}


def training_overrides(name: str, one_channel: bool) -> dict:
    """A row's training overrides, those of the row whose run it shares when it has to."""
    if one_channel and name in ONE_CHANNEL_SHARES:
        name = ONE_CHANNEL_SHARES[name][0]
    return ABLATION_ROWS[name][1]


def run_name(overrides: dict, seed: int) -> str:
    parts = [f"{k}={v}" for k, v in sorted(overrides.items())] or ["default"]
    return "_".join(parts).replace(" ", "") + f"_seed{seed}"


def ablation_run(root: Path, base: RunConfig, overrides: dict, seed: int) -> Path:
    """Train (or reuse) the run of one training setting. Runs of one seed share the teacher
    stage: it does not depend on the student's settings, so its checkpoint is copied."""
    run = root / run_name(overrides, seed)
    if (run / "student.pt").is_file() and load_checkpoint(run / "student.pt")["done"]:
        return run
    values = {name: dataclasses.asdict(getattr(base, name)) for name in CONFIGS}
    for key, value in {**overrides, "seed": seed}.items():
        part = next(n for n, cls in CONFIGS.items() if key in {f.name for f in dataclasses.fields(cls)})
        values[part][key] = value
    config = RunConfig.from_dict({"data": base.data, **values})
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    shared = root / run_name({}, seed) / "teacher.pt"
    if config.train.mode == "distill" and shared.is_file() and not (run / "teacher.pt").exists():
        shutil.copy(shared, run / "teacher.pt")
    log = Log(run / "log.txt")
    dataset = SmokeDataset(config.data, "train", size=config.model.image_size,
                           flip=config.train.flip, crop=config.train.crop)
    train_networks(run, config, dataset, pick_device(config.train.device), log)
    return run


def score_rows(run: Path, base: RunConfig, names: list[str], split: str) -> dict:
    """Pseudo-mask scores on `split` of the rows `names`, which share the trained `run`.
    Rows that differ only after the CAMs (CRF, coverage fix) share one multi-scale pass."""
    device = pick_device(base.train.device)
    config, teacher, student = load_run(run, device)
    dataset = SmokeDataset(base.data, split, size=base.model.image_size)
    settings = {}
    for name in names:
        overrides = argparse.Namespace(**ABLATION_ROWS[name][2])
        settings[name] = (config_from_args(CamConfig, overrides, base.cam),
                          config_from_args(RefineConfig, overrides, base.refine))
    scores = {name: Scores(len(dataset.classes)) for name in names}
    for batch in torch.utils.data.DataLoader(dataset, batch_size=base.cam.cam_batch_size):
        raw = {}
        for name, (cam, refine_config) in settings.items():
            key = (cam.cam_network, cam.cam_method, cam.cam_scales, cam.cam_flip)
            if key not in raw:
                raw[key] = raw_batch_cams(batch, cam, teacher, student, device, config.train.amp)
            cams = finish_cams(raw[key], batch, refine_config, student, device)
            scores[name].add_batch(refine(batch["rgb"], cams, cam, refine_config).cpu(), batch,
                                   dataset)
    return {name: s.result() for name, s in scores.items()}


def _quiet_worker(threads: int) -> None:
    """A task process: its share of the cores; progress goes to the runs' log files."""
    torch.set_num_threads(threads)
    sys.stdout = open(os.devnull, "w")


def run_tasks(tasks: list[tuple], jobs: int) -> list:
    """Run tasks (description, function, args, indices of the tasks it needs first), at most
    `jobs` at a time in processes that split the cores; their results, in order. One job runs
    them here, in order (a task is listed after the tasks it needs)."""
    results, began = {}, time.perf_counter()

    def finished(i: int, result) -> None:
        results[i] = result
        print(f"[{len(results)}/{len(tasks)}] {tasks[i][0]} ({time.perf_counter() - began:.0f} s)",
              flush=True)

    if jobs == 1:
        for i, (_, fn, args, _) in enumerate(tasks):
            finished(i, fn(*args))
        return [results[i] for i in range(len(tasks))]
    import concurrent.futures as cf
    import multiprocessing
    threads = max(1, torch.get_num_threads() // jobs)
    pending, running = dict(enumerate(tasks)), {}
    with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_quiet_worker, initargs=(threads,)) as pool:
        while pending or running:
            for i, (_, fn, args, needs) in list(pending.items()):
                if len(running) < jobs and all(n in results for n in needs):
                    running[pool.submit(fn, *args)] = i
                    del pending[i]
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                finished(running.pop(future), future.result())
    return [results[i] for i in range(len(tasks))]


def ablate(root: Path, base: RunConfig, rows: list[str], seeds: list[int], split: str,
           jobs: int = 1) -> dict:
    """Pseudo-mask scores on `split` (label -> one result per seed) of every row: each distinct
    training setting trained once per seed, then scored, on `jobs` processes."""
    # The raw target has one channel a class; the pair target adds the background channel.
    one_channel = len(read_classes(Path(base.data))) == 1 and base.loss.align_target == "raw"
    runs = {}  # run key (name, seed) -> (training overrides, rows scored on that run)
    row_run = {}  # (row, seed) -> run key
    for seed in seeds:
        for name in rows:
            overrides = training_overrides(name, one_channel)
            key = row_run[name, seed] = (run_name(overrides, seed), seed)
            runs.setdefault(key, (overrides, []))[1].append(name)

    def default(key: tuple) -> tuple:  # the run of the same seed whose teacher the others copy
        return (run_name({}, key[1]), key[1])

    def independent(key: tuple) -> bool:
        overrides = runs[key][0]
        return not overrides or overrides.get("mode") == "co-train" or default(key) not in runs

    # Runs that need no other run first start first; each run's scoring follows it.
    order = sorted(runs, key=lambda key: not independent(key))
    tasks, trained = [], {}
    for key in order:
        overrides, _ = runs[key]
        needs = [] if independent(key) else [trained[default(key)]]
        trained[key] = len(tasks)
        tasks.append((f"trained {key[0]}", ablation_run, (root, base, overrides, key[1]), needs))
    scored = {}
    for key in order:
        scored[key] = len(tasks)
        tasks.append((f"scored {key[0]} on {split}", score_rows,
                      (root / key[0], base, runs[key][1], split), [trained[key]]))
    results = run_tasks(tasks, jobs)
    table = {}
    for name in rows:
        label = ABLATION_ROWS[name][0]
        if one_channel and name in ONE_CHANNEL_SHARES:
            label += f" ({ONE_CHANNEL_SHARES[name][1]})"
        for seed in seeds:
            scores = results[scored[row_run[name, seed]]][name]
            table.setdefault(label, []).append(scores)
            print(format_scores(f"{label} (seed {seed})", scores), flush=True)
    return table


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
    check_settings(config)
    start = time.perf_counter()
    with output_dir(Path(args.out), args.force) as tmp:
        counts = synthesize(tmp, config)
    seconds = time.perf_counter() - start
    total = config.n_train + config.n_val
    print(f"wrote {args.out}: {json.dumps(counts)} in {seconds:.1f} s "
          f"({total / seconds:.0f} images/s)")


def cmd_prepare(args: argparse.Namespace) -> None:
    config = config_from_args(PrepareConfig, args)
    check_settings(config)
    src = Path(args.src)
    with output_dir(Path(args.dst), args.force, folders=(src,)) as tmp:
        counts = prepare_smoke5k(src, tmp, config)
    print(f"wrote {args.dst}: {json.dumps(counts)}")


def config_from_flags(args: argparse.Namespace) -> RunConfig:
    """The preset's values, then every flag the user gave; checked before any work."""
    preset = PRESETS[args.preset]
    parts = {name: config_from_args(cls, args, cls(**preset.get(name, {})))
             for name, cls in CONFIGS.items()}
    config = RunConfig(data=str(args.data or DEFAULT_DATA), **parts)
    check_run_config(config)
    return config


def check_run_config(config: RunConfig) -> None:
    """Every setting in range, the settings that depend on each other consistent, and the
    device present: before a folder is made or a network trained."""
    check_settings(config)
    m = config.model
    if m.image_size % m.patch_size:
        raise DataError(f"--image-size {m.image_size}: must be a multiple of --patch-size "
                        f"{m.patch_size}")
    if m.student_stem == "conv" and m.patch_size & (m.patch_size - 1):
        raise DataError(f"--patch-size {m.patch_size}: a conv stem needs a power of two "
                        f"(or --student-stem patch)")
    device = pick_device(config.train.device)
    autocast_dtype(config.train.amp, device)  # fp16 without CUDA is named here


def given_flags(args: argparse.Namespace, classes) -> list[str]:
    """The config flags the user gave on the command line, as --names."""
    return ["--" + f.name.replace("_", "-") for cls in classes for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None]


def peak_memory_mb() -> float:
    import resource  # POSIX; ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_train(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    if args.resume:
        run = Path(args.resume)
        config = read_run_config(run)
        flags = given_flags(args, CONFIGS.values()) + (["--data"] if args.data else [])
        if flags:
            raise DataError(f"--resume continues {run} with the settings it began with; "
                            f"{', '.join(flags)} cannot change them (start a new run instead)")
        check_run_config(config)
    else:
        config = config_from_flags(args)

        def make_run_folder() -> Path:
            run = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
            if not args.data:
                ensure_default_data(DEFAULT_DATA)
            verify_splits(Path(config.data))  # bad data stops here, before a run folder is made
            fresh_output_dir(run, args.force, folders=(config.data,))
            (run / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            return run

        run = on_first_process(make_run_folder)
    log = Log(run / "log.txt")
    log(f"run {run}: " + json.dumps(config.to_dict()))
    size = config.model.image_size
    dataset = SmokeDataset(config.data, "train", size=size, flip=config.train.flip,
                           crop=config.train.crop)
    device = pick_device(config.train.device)
    log(f"{config.data}: {len(dataset)} training images, classes {dataset.classes}; device "
        f"{device}, autocast {autocast_dtype(config.train.amp, device)}")
    teacher, student = train_networks(run, config, dataset, device, log)
    alone = train_alone(run, config, dataset, device, log) if config.train.baseline else None
    plain = SmokeDataset(config.data, "train", size=size)
    write_pseudo_masks(plain, run / "pseudo", config.cam, config.refine, teacher, student,
                       device, config.train.amp, run / "overlays.png")
    log(f"pseudo masks: {run / 'pseudo'} ({len(plain)} PNGs), overlays: {run / 'overlays.png'}")
    split = "val" if (Path(config.data) / "val.txt").is_file() else "train"
    scored = SmokeDataset(config.data, split, size=size)
    if scored.has_masks:
        rows = {"teacher CAM (ResNet)": (dataclasses.replace(config.cam, cam_network="teacher"),
                                         None),
                "student alone (ViT)": (config.cam, alone),
                "aligned student (ViT)": (config.cam, student)}
        scores = {name: score_masks(scored, cam, config.refine, teacher, net, device,
                                    config.train.amp)
                  for name, (cam, net) in rows.items() if cam.cam_network == "teacher" or net}
        for name, (cam, net) in rows.items():  # how well each network classifies, too
            if name in scores:
                scores[name]["bce"] = classification_bce(teacher if net is None else net, scored,
                                                         device)
        log(f"pseudo masks of the {split} split ({len(scored)} images) vs ground truth, one "
            f"read-out for all (threshold {config.cam.threshold}, scales "
            f"{list(config.cam.cam_scales)}; students' map: {config.cam.cam_method}):")
        for name, r in scores.items():
            log(format_scores(f"  {name:22s}", r))
        if world()[0] == 0:
            (run / "scores.json").write_text(json.dumps({"split": split, **scores}, indent=2)
                                             + "\n")
    log(f"wall time {time.perf_counter() - began:.0f} s, peak memory {peak_memory_mb():.0f} MB")


def classification_bce(net: torch.nn.Module, dataset: "SmokeDataset", device: torch.device
                       ) -> float:
    """The network's L_cls over a split (float32): how well it has learned the labels."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            logits = net(batch["image"].to(device))[0].float()
            labels = batch["label"].to(device)
            total += losses.classification_loss(logits, labels).item() * labels.numel()
            count += labels.numel()
    return total / count


def score_masks(dataset: "SmokeDataset", cam_config: CamConfig, refine_config: RefineConfig,
                teacher, student, device: torch.device, amp: str) -> dict:
    """Scores of the pseudo masks of one network over a split, without writing files."""
    scores = Scores(len(dataset.classes))
    for batch, _, masks in pseudo_masks(dataset, cam_config, refine_config, teacher, student,
                                        device, amp):
        scores.add_batch(masks, batch, dataset)
    return gather_scores(scores).result()


def gather_scores(scores: "Scores") -> "Scores":
    """Under torchrun every process scored its share of a split; add them up."""
    if world()[1] == 1:
        return scores
    shares = [None] * world()[1]
    dist.all_gather_object(shares, scores)
    for other in shares[1:]:
        shares[0].merge(other)
    return shares[0]


def cmd_pseudo(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    run = Path(args.run)
    config, teacher, student = load_run(run, device)
    cam = config_from_args(CamConfig, args, config.cam)
    refine_config = config_from_args(RefineConfig, args, config.refine)
    check_settings(cam, refine_config)
    data = Path(args.data or config.data)
    dataset = SmokeDataset(data, args.split, size=config.model.image_size)
    out = Path(args.out or run / f"pseudo_{args.split}")
    began = time.perf_counter()
    with output_dir(out, args.force, inputs=run_files(run), folders=(data,)) as tmp:
        scores = write_pseudo_masks(dataset, tmp, cam, refine_config, teacher, student, device,
                                    config.train.amp, tmp / "overlays.png", args.save_cams)
    seconds = time.perf_counter() - began
    print(f"wrote {len(dataset)} masks to {out} in {seconds:.1f} s "
          f"({len(dataset) / seconds:.1f} images/s); overlays: {out / 'overlays.png'}")
    if scores is not None:
        print(format_scores(f"{data.name} {args.split}, {cam.cam_network} CAM", scores))
        if args.json:
            print(json.dumps(scores))


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


CRF_SETTINGS = {
    "common WSSS (psa, SEAM, IRN): 3/3, 80/13/10": dict(
        sxy_gaussian=3, compat_gaussian=3, sxy_bilateral=80, srgb=13, compat_bilateral=10),
    "the paper: 3/5, 60/5/15": dict(
        sxy_gaussian=3, compat_gaussian=5, sxy_bilateral=60, srgb=5, compat_bilateral=15),
}


def bench_crf(photos: list[tuple[Path, Path]], iters: int, batch: int) -> list[dict]:
    """Ours vs pydensecrf per image (one thread each), label agreement, IoU vs ground truth."""
    images, probs, truths = [], [], []
    for k, (image_path, mask_path) in enumerate(photos):
        image = load_image(image_path).resize((320, 240), Image.BILINEAR)
        with Image.open(mask_path) as m:
            truth = np.array(m.convert("L").resize((320, 240), Image.NEAREST)) > 127
        truth = torch.from_numpy(truth)
        cam = cam_like(truth, k)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))  # (H,W,3) -> (3,H,W)
        probs.append(torch.stack([1 - cam, cam]))
        truths.append(truth.long())
    threads = torch.get_num_threads()
    rows = []
    for name, settings in CRF_SETTINGS.items():
        torch.set_num_threads(1)
        postprocess.dense_crf(images[0], probs[0], iters=iters, **settings)  # warm-up
        ours_ms, ref_ms, agree = [], [], []
        scores = {k: Scores(1) for k in ("before", "pydensecrf", "ours")}
        for image, prob, truth in zip(images, probs, truths):
            start = time.perf_counter()
            ours = postprocess.dense_crf(image, prob, iters=iters, **settings).argmax(0)
            ours_ms.append(1000 * (time.perf_counter() - start))
            scores["before"].add(prob.argmax(0), truth)
            scores["ours"].add(ours, truth)
            start = time.perf_counter()
            ref = crf_reference(image.permute(1, 2, 0).numpy(), prob.numpy(), iters, settings)
            if ref is not None:
                ref_ms.append(1000 * (time.perf_counter() - start))
                ref = torch.from_numpy(ref.argmax(0))
                agree.append((ref == ours).float().mean().item())
                scores["pydensecrf"].add(ref, truth)
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            postprocess.dense_crf(torch.stack(images[i:i + batch]),
                                  torch.stack(probs[i:i + batch]), iters=iters, **settings)
        nan = float("nan")
        row = {"settings": name, "ours_ms": float(np.median(ours_ms)),
               "pydensecrf_ms": float(np.median(ref_ms)) if ref_ms else nan,
               "agreement": 100 * float(np.mean(agree)) if agree else nan,
               "batched_ips": len(images) / (time.perf_counter() - start),
               **{f"iou_{k}": s.result()["smoke_iou"] if s.image_ious else nan
                  for k, s in scores.items()}}
        rows.append(row)
        print(f"{name}\n"
              f"  time per image (1 thread, median): ours {row['ours_ms']:.0f} ms, pydensecrf "
              f"{row['pydensecrf_ms']:.0f} ms, ratio {row['ours_ms'] / row['pydensecrf_ms']:.2f}\n"
              f"  ours batched ({batch} a batch, {threads} threads): "
              f"{row['batched_ips']:.1f} images/s\n"
              f"  label agreement with pydensecrf: {row['agreement']:.2f} % of pixels\n"
              f"  smoke IoU vs ground truth: before CRF {row['iou_before']:.2f}, after "
              f"pydensecrf {row['iou_pydensecrf']:.2f}, after ours {row['iou_ours']:.2f}")
    return rows


def threshold_sweep(dataset: "SmokeDataset", cams_dir: Path, thresholds: list[float]) -> dict:
    """Smoke IoU of the CAMs in cams_dir thresholded at each background score (SEAM's curve),
    and the per-image oracle: each image at its own best threshold, IoU averaged per image."""
    if not cams_dir.is_dir():
        raise DataError(f"{cams_dir}: no CAMs; write them with `pseudo --save-cams`")
    curve = [Scores(len(dataset.classes)) for _ in thresholds]
    oracle = []
    for i, sample in enumerate(dataset.samples):
        path = cams_dir / f"{sample.stem}.npy"
        if not path.is_file():
            raise DataError(f"{path}: CAM missing for {sample.stem}")
        item = dataset[i]
        cams = torch.from_numpy(np.load(path).astype(np.float32))[None]
        cams = F.interpolate(cams, size=item["mask"].shape, mode="bilinear", align_corners=False)
        ious = []
        for scores, t in zip(curve, thresholds):
            mask = postprocess.probs_to_mask(postprocess.cams_to_probs(cams, "threshold", t))[0]
            before = len(scores.image_ious)
            scores.add(mask, item["mask"], item.get("context"))
            ious += scores.image_ious[before:]  # one IoU when the image shows smoke
        if ious:
            oracle.append(max(ious))
    rows = [{"threshold": t, **s.result()} for t, s in zip(thresholds, curve)]
    top = max(rows, key=lambda r: r["smoke_iou"])
    return {"curve": rows, "best_threshold": top["threshold"], "best_smoke_iou": top["smoke_iou"],
            "oracle_image_iou": 100 * float(np.mean(oracle)) if oracle else float("nan")}


def cmd_segment(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    run = Path(args.run)
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
                raise DataError(f"{path}: already trained (use --force to train it again)")
            return RunConfig.from_dict(ckpt["config"]).segment  # resume as it began
        return seg

    config = dataclasses.replace(config, segment=on_first_process(settings))
    seg = config.segment
    device = pick_device(args.device or config.train.device)
    log = Log(run / "log.txt")
    log(f"segment {run}: " + json.dumps(dataclasses.asdict(seg)))
    net = train_segmenter(run, config, device, log)
    if (Path(config.data) / "val.txt").is_file() and world()[0] == 0:
        out = run / f"{name}_val"
        fresh_output_dir(out, force=True)  # derived from the checkpoint: always rewritten
        scores = segment_split(net, config, "val", out, device)
        if scores is not None:
            log(format_scores(f"stage 3 ({seg.seg_targets}) on val vs ground truth", scores))
            (run / f"{name}_val.json").write_text(json.dumps(scores, indent=2) + "\n")
    log(f"wall time {time.perf_counter() - began:.0f} s; `python wsss.py predict --run {run} "
        f"--input DIR` segments new images")


def cmd_predict(args: argparse.Namespace) -> None:
    if bool(args.images) == bool(args.input):
        raise DataError("name images, or a folder with --input (not both)")
    run = Path(args.run)
    read_run_config(run)  # a wrong --run is named before any image is read
    files = find_images(args.images, args.input)
    out = Path(args.out or run / "predict")
    device = pick_device(args.device)
    folders = (Path(args.input),) if args.input else ()
    with output_dir(out, args.force, inputs=(*files, *run_files(run)), folders=folders) as tmp:
        r = predict(run, files, tmp, device, args.batch_size)
    print(f"{r['images']} masks in {out} ({r['method']}, {device}): {r['seconds']:.1f} s, "
          f"{r['images'] / max(r['seconds'], 1e-9):.1f} images/s; overlays in {out / 'overlays'}")
    if r["skipped"]:
        print(f"skipped {len(r['skipped'])} unreadable file(s): {', '.join(r['skipped'][:5])}"
              + (" ..." if len(r["skipped"]) > 5 else ""))


def cmd_eval(args: argparse.Namespace) -> None:
    dataset = SmokeDataset(Path(args.data), args.split, size=None)
    result = evaluate_folder(dataset, Path(args.pred))
    if args.sweep:
        result["sweep"] = threshold_sweep(dataset, Path(args.pred) / "cams",
                                          [round(0.05 * k, 2) for k in range(1, 20)])
    if args.json:
        print(json.dumps(result))
        return
    print(f"{len(dataset)} images of {args.data} {args.split} vs {args.pred}")
    names = ["background", *dataset.classes]
    for name, iou in zip(names, result["per_class_iou"]):
        print(f"  IoU {name:12s} {iou:6.2f}")
    for key, label in (("miou", "mIoU"), ("precision", "smoke precision"),
                       ("recall", "smoke recall (coverage)"), ("boundary_f1", "boundary F1 (2 px)"),
                       ("image_iou", "smoke IoU per image"),
                       ("context_fp", "chimney pixels called smoke %")):
        value = result[key]
        print(f"  {label:30s} " + ("   n/a" if math.isnan(value) else f"{value:6.2f}"))
    if args.sweep:
        sweep = result["sweep"]
        print("  background threshold -> smoke IoU: " + ", ".join(
            f"{r['threshold']:.2f}: {r['smoke_iou']:.1f}" for r in sweep["curve"]))
        print(f"  best threshold {sweep['best_threshold']:.2f}: smoke IoU "
              f"{sweep['best_smoke_iou']:.2f}; per-image oracle threshold: smoke IoU per image "
              f"{sweep['oracle_image_iou']:.2f}")


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
    jobs = args.jobs or (min(2, os.cpu_count() or 1) if not args.quick and
                         pick_device(base.train.device).type == "cpu" else 1)
    print(f"ablate: rows {' '.join(rows)}; seeds {' '.join(map(str, seeds))}; scored on "
          f"{args.split}; {jobs} job{'s' if jobs > 1 else ''}; " + json.dumps(base.to_dict()),
          flush=True)
    results = ablate(root, base, rows, seeds, args.split, jobs)
    table = ablation_table(results, args.split)
    (root / "ablation.md").write_text(table)
    (root / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    figure = ablation_figure(root, base, seeds[0], args.split)
    print(f"wrote {root / 'ablation.md'}{', ' + str(figure) if figure else ''} in "
          f"{time.perf_counter() - began:.0f} s")


def ablation_figure(root: Path, base: RunConfig, seed: int, split: str) -> Path | None:
    """Per image: photo, teacher CAM, student CAM alone, aligned student CAM, its pseudo mask
    refined by the CRF, ground truth; from the ablation's runs of one seed, when they exist."""
    aligned, alone = root / run_name({}, seed), root / run_name({"align_weight": 0.0}, seed)
    if not ((aligned / "student.pt").is_file() and (alone / "student.pt").is_file()):
        return None
    device = pick_device(base.train.device)
    config, teacher, student = load_run(aligned, device)
    student_alone = load_run(alone, device)[2]
    dataset = SmokeDataset(base.data, split, size=config.model.image_size)
    crf = dataclasses.replace(config.refine, crf=True)

    def cam_panel(network: str, s: models.Student):
        cam_config = dataclasses.replace(config.cam, cam_network=network)
        return lambda batch: torch.stack([
            paint(rgb, cam[0]) for rgb, cam in
            zip(batch["rgb"], batch_cams(batch, cam_config, config.refine, teacher, s, device))])

    def refined(batch):
        cams = batch_cams(batch, config.cam, crf, teacher, student, device)
        masks = refine(batch["rgb"], cams, config.cam, crf).cpu()
        return torch.stack([paint(rgb, masks=[m == 1]) for rgb, m in zip(batch["rgb"], masks)])

    path = root / "figure.png"
    comparison_figure(dataset, [cam_panel("teacher", student), cam_panel("student", student_alone),
                                cam_panel("student", student), refined], path)
    return path


def saved_for_backward(fn, net: torch.nn.Module) -> int:
    """Bytes of the activations autograd saves for backward while fn() runs (the weights it
    also saves, or views of them, are the network's own memory and not counted)."""
    weights = {id(p) for p in net.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if id(t) not in weights and (t._base is None or id(t._base) not in weights):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def training_memory(config: RunConfig, num_classes: int = 1) -> list[dict]:
    """Memory of a training step of each stage, counted on the meta device (no compute, no
    memory used): the trained parameters four times in float32 (weights, gradients, AdamW's
    two moments), the frozen teacher's weights, and the activations autograd saves, float32,
    attention maps included (fused attention on a GPU saves less; bf16 autocast about half)."""
    m, t = config.model.architecture(), config.train
    rows = []
    with torch.device("meta"):
        teacher, student = build_teacher(m, num_classes), build_student(m, num_classes)
        images = torch.empty(t.batch_size, 3, m.image_size, m.image_size)
        teacher_bytes = 4 * sum(p.numel() for p in teacher.parameters())
        student_bytes = 4 * sum(p.numel() for p in student.parameters())
        rows.append({"stage": "teacher", "parameters": teacher_bytes / 4,
                     "state": 4 * teacher_bytes,
                     "activations": saved_for_backward(lambda: teacher(images), teacher)})
        freeze(teacher)
        rows.append({"stage": "student", "parameters": student_bytes / 4,
                     "state": 4 * student_bytes + teacher_bytes,
                     "activations": saved_for_backward(lambda: student(images), student)})
    for row in rows:
        row["total"] = row["state"] + row["activations"]
    return rows


def measured_step_memory(config: RunConfig, device: torch.device, num_classes: int = 1) -> list[int]:
    """Peak CUDA memory of one real training step of each stage (bytes), with the config's
    autocast and memory format."""
    m, t = config.model.architecture(), config.train
    dtype = autocast_dtype(t.amp, device)
    teacher = build_teacher(m, num_classes).to(device)
    student = build_student(m, num_classes).to(device)
    images = torch.randn(t.batch_size, 3, m.image_size, m.image_size, device=device)
    labels = torch.ones(t.batch_size, num_classes, device=device)
    if t.channels_last:
        teacher.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    peaks = []
    for stage in ("teacher", "student"):
        net = teacher if stage == "teacher" else student
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):  # the second step holds AdamW's moments too
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                if stage == "teacher":
                    loss = losses.classification_loss(teacher(images)[0], labels)
                else:
                    with torch.no_grad():
                        _, teacher_maps = teacher(images)
                    loss = student_losses(student, images, labels, teacher_maps, config.loss)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        peaks.append(torch.cuda.max_memory_allocated(device))
        if stage == "teacher":
            freeze(teacher)
    return peaks


def bench_memory(config: RunConfig, device: torch.device) -> None:
    gib = 2 ** 30
    m, t = config.model, config.train
    print(f"{m.teacher} (output stride {m.output_stride}{', PCM' if m.pcm else ''}) and "
          f"{m.student} ({m.student_depth} blocks, patch {m.patch_size}) at {m.image_size} px, "
          f"batch {t.batch_size}")
    rows = training_memory(config)
    measured = measured_step_memory(config, device) if device.type == "cuda" else None
    for i, r in enumerate(rows):
        line = (f"{r['stage']:8s} {r['parameters'] / 1e6:6.1f} M trained parameters | weights, "
                f"gradients, AdamW (+ frozen teacher) {r['state'] / gib:5.2f} GiB | activations "
                f"(float32) {r['activations'] / gib:5.2f} GiB | estimate {r['total'] / gib:5.2f} GiB")
        if measured is not None:
            line += f" | measured on {device}: {measured[i] / gib:5.2f} GiB"
        print(line)


def cmd_bench(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    if args.what == "memory":
        preset = PRESETS[args.preset]
        bench_memory(RunConfig(data="", **{name: cls(**preset.get(name, {}))
                                           for name, cls in CONFIGS.items()}), device)
        return
    if args.what == "crf":
        root = Path(args.photos)
        masks = sorted((root / "gt").glob("*.png"))[: args.n] if (root / "gt").is_dir() else []
        pairs = [(root / "img" / (m.stem + ".jpg"), m) for m in masks]
        pairs = [(p, m) for p, m in pairs if p.is_file()]
        if not pairs:
            raise DataError(f"{root}: no SMOKE5K-style img/*.jpg + gt/*.png pairs")
        print(f"bench crf: {len(pairs)} photographs from {root} at 320x240, 2 classes, "
              f"{args.iters} iterations")
        bench_crf(pairs, args.iters, args.batch)
        return
    print(f"bench {args.what} on {device} ({torch.get_num_threads()} threads), "
          f"batch {args.batch}, {args.size} px, median of {args.steps} steps")
    bench_models(device, args.batch, args.size, args.steps)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (the parser names the flag when it is not)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def add_run_flag(parser: argparse.ArgumentParser, text: str) -> None:
    """--run RUN, also spelled --run-dir: torchrun reads a --run after the script as an
    abbreviation of its own --run-path."""
    parser.add_argument("--run", "--run-dir", dest="run", required=True,
                        help=f"{text} (--run-dir: the same, for use under torchrun)")


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (exit code 2), not under the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="wsss.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="generate an industrial-smoke dataset folder")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    add_config_flags(p, SynthConfig)
    p.set_defaults(handler=cmd_synth)

    p = sub.add_parser("prepare", help="import a public dataset into the folder format")
    p.add_argument("source", choices=["smoke5k"], help="which dataset's layout SRC has")
    p.add_argument("src", help="SMOKE5K folder holding img/ and gt/")
    p.add_argument("dst", help="dataset folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    add_config_flags(p, PrepareConfig)
    p.set_defaults(handler=cmd_prepare)

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
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("segment", help="stage 3: a segmentation network on a run's pseudo masks")
    add_run_flag(p, "run folder written by `train`")
    p.add_argument("--force", action="store_true", help="train again over a finished network")
    p.add_argument("--device", help="cuda, mps, cpu or auto (default: the run's)")
    add_config_flags(p.add_argument_group("segment settings (default: the run's)"), SegmentConfig)
    p.set_defaults(handler=cmd_segment)

    p = sub.add_parser("predict", help="masks and overlays for any images")
    add_run_flag(p, "run folder: its stage-3 network when it has one, else its CAMs + refinement")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--input", help="a folder of images (instead of naming files)")
    p.add_argument("--out", help="folder for <stem>.png masks and overlays/ (default: RUN/predict)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="images a batch (default: 16)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default: auto)")
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("pseudo", help="pseudo masks (and overlays) from a trained run")
    add_run_flag(p, "run folder written by `train`")
    p.add_argument("--data", help="dataset folder (default: the run's)")
    p.add_argument("--split", default="train", help="split to label (default: train)")
    p.add_argument("--out", help="folder for the masks (default: RUN/pseudo_<split>)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default: auto)")
    p.add_argument("--json", action="store_true", help="also print the scores as JSON")
    p.add_argument("--save-cams", action="store_true",
                   help="also write the normalised CAMs to OUT/cams/<stem>.npy (for eval --sweep)")
    add_config_flags(p.add_argument_group("cam settings (default: the run's)"), CamConfig)
    add_config_flags(p.add_argument_group("refine settings (default: the run's)"), RefineConfig)
    p.set_defaults(handler=cmd_pseudo)

    p = sub.add_parser("ablate", help="the paper's comparisons, mean ± std over seeds",
                       description=(
        f"Trains each distinct setting once per seed (students for {ABLATION_STUDENT_EPOCHS} "
        "epochs unless --quick or --student-epochs), scores every row's pseudo masks, "
        "writes OUT/ablation.md, ablation.json and figure.png."))
    p.add_argument("--data", help=f"dataset folder (default: generate {DEFAULT_DATA})")
    p.add_argument("--out", default="runs/ablation", help="folder of the runs and the table "
                   "(finished runs in it are reused; default: runs/ablation)")
    p.add_argument("--quick", action="store_true", help="the four headline rows, one seed, "
                   "students at the default run's budget, one job")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 2; quick: 0)")
    p.add_argument("--rows", nargs="+", choices=list(ABLATION_ROWS), metavar="ROW",
                   help="rows to run (default: all; quick: " + " ".join(QUICK_ROWS) + "); "
                        "one of " + ", ".join(ABLATION_ROWS))
    p.add_argument("--split", default="val", help="split whose pseudo masks are scored "
                   "(default: val: held out, and its chimneys appear without smoke more often)")
    p.add_argument("--jobs", type=int, help="runs trained and scored side by side, each on "
                   "its share of the cores; fewer threads round differently, so the trained "
                   "networks differ from one job's (default: 2 on a CPU with 2 or more cores, "
                   "1 for --quick)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="faithful",
                   help="the recipe the rows change: faithful (the paper's, default) or cpu")
    for name, cls in CONFIGS.items():
        add_config_flags(p.add_argument_group(f"{name} settings"), cls)
    p.set_defaults(handler=cmd_ablate)

    p = sub.add_parser("eval", help="score predicted masks against ground truth")
    p.add_argument("--data", required=True, help="dataset folder with masks/")
    p.add_argument("--split", default="val", help="split to score (default: val)")
    p.add_argument("--pred", required=True, help="folder of predicted <stem>.png class masks")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON line")
    p.add_argument("--sweep", action="store_true", help="also the IoU-vs-threshold curve and "
                   "the per-image oracle threshold, from PRED/cams/ (pseudo --save-cams)")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("bench", help="benchmarks that print figures side by side")
    p.add_argument("what", choices=["models", "crf", "memory"], help="models: training-step "
                   "throughput, ours vs torchvision, float32 and bfloat16 autocast; crf: our "
                   "dense CRF vs pydensecrf (when installed) on real photographs; memory: a "
                   "preset's training memory, estimated (and measured on CUDA)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="memory: the preset to size (default: paper)")
    p.add_argument("--photos", default="../shared/data/smoke5k-real/train",
                   help="crf: a SMOKE5K-style folder with img/ and gt/")
    p.add_argument("--n", type=int, default=40, help="crf: photographs to use (default: 40)")
    p.add_argument("--iters", type=int, default=10, help="crf: mean-field iterations")
    p.add_argument("--batch", type=int, default=8, help="images a step (default: 8)")
    p.add_argument("--size", type=int, default=224, help="image side (default: 224)")
    p.add_argument("--steps", type=int, default=5, help="timed steps a row (default: 5)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default: auto)")
    p.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    distributed_run = args.command in ("train", "segment") and init_distributed()
    code, message = 0, ""
    try:
        args.handler(args)
    except DataError as e:
        code, message = 2, str(e)
    except TrainingError as e:
        code, message = 1, str(e)
    except Interrupted as e:
        code, message = 130, str(e)  # 130: the shell's code for Ctrl-C
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
        code, message = 130, "stopped by Ctrl-C"
    except OSError as e:  # an unwritable or impossible output, a full disk
        where = f"{e.filename}: " if e.filename else ""
        code, message = 2, f"{where}{e.strerror or e}"
    if code and world()[0] == 0:
        print(f"error: {message}", file=sys.stderr)
    if distributed_run:
        # gloo processes abort now and then in their exit handlers ("terminate called without
        # an active exception") although the work is done: leave together, flush, and end
        # the process before those handlers run.
        if code == 0:
            barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
