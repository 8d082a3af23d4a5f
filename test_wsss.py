"""Tests: oracles and end-to-end runs on tiny data. Offline, CPU, seconds each.

    python -m pytest -q test_wsss.py
"""

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import losses
import models
import postprocess
import wsss


# -----------------------------------------------------------------------------
# Fixtures and helpers shared by every group


def tiny_synth(root: Path, seed: int = 0, **overrides) -> Path:
    config = wsss.SynthConfig(n_train=12, n_val=6, size=48, seed=seed)
    wsss.synthesize(root, wsss.dataclasses.replace(config, **overrides))
    return root


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return tiny_synth(tmp_path_factory.mktemp("synth") / "data")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = wsss.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


TINY = ("--image-size", 32, "--teacher-width", 8, "--student-depth", 2, "--batch-size", 4,
        "--teacher-epochs", 2, "--student-epochs", 2, "--cam-scales", 1.0, "--log-every", 1,
        "--no-baseline")  # the student alone is trained where a test asks for it


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synth_dir) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert wsss.main(["train", "--data", str(synth_dir), "--out", str(run),
                      *map(str, TINY)]) == 0
    return run


def tiny_teacher(pcm=True):
    return models.Teacher(models.resnet18(output_stride=8, width=8, num_classes=0), 2, pcm=pcm)


def tiny_student(num_classes=2, head="token", stem="patch"):
    vit = models.vit_tiny(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                          num_classes=num_classes if head == "token" else 0, stem=stem)
    return models.Student(vit, num_classes, head=head)


def cam_student():
    return tiny_student(head="cam", stem="conv")


def tiny_torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                            hidden_dim=32, mlp_dim=128, num_classes=5)
    with torch.no_grad():  # torchvision zero-initialises the head and class token
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vit.eval()


def fake_smoke5k(root: Path) -> Path:
    """Two photographs in SMOKE5K's layout with known smoke: a block in the top-left corner."""
    (root / "img").mkdir(parents=True)
    (root / "gt").mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in (("p1", (60, 80)), ("p2", (40, 40))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "img" / f"{name}.jpg")
        gt = np.zeros((h, w), np.uint8)
        gt[:20, :20] = 255
        gt[h - 1, w - 1] = 255  # a single smoke pixel: its tile is ambiguous, not negative
        Image.fromarray(gt).save(root / "gt" / f"{name}.png")
    return root


def broken_copy(synth_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(synth_dir, root)
    return root


def expect_error(capsys, root: Path, *fragments: str) -> None:
    """`train` on bad data stops with one line naming the problem, exit code 2."""
    code, out, err = run_cli(capsys, "train", "--data", root)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_faulty_frames(root: Path) -> dict[str, tuple[int, int] | None]:
    """Frames of every kind a camera folder may hold: name -> (H, W), or None for the ones
    that cannot be read and must be skipped."""
    root.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "truncated.jpg")
    data = (root / "truncated.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "loop.png").symlink_to(root / "loop.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(root / "grey16.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    Image.fromarray(rgb).convert("L").save(root / "grey.jpg")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.new("RGB", (6000, 4000), (90, 90, 90)).save(root / "huge.jpg")
    return {"truncated": None, "empty": None, "loop": None, "one_pixel": (1, 1),
            "grey16": (40, 60), "palette": (40, 60), "grey": (40, 60), "cmyk": (40, 60),
            "huge": (4000, 6000)}


def one_line_error(err: str, flag: str) -> bool:
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0]


def brute_force_crf(image, prob, iters, sxy_g=3.0, compat_g=3.0, sxy_b=80.0, srgb=13.0,
                    compat_b=10.0):
    """Mean field with every pixel pair summed exactly, in float64 (tiny images only)."""
    C, H, W = prob.shape
    unary = torch.log(prob.double().clamp(1e-5, 1)).reshape(C, -1).T  # (HW, C)
    kernels = []
    for features, weight in ((postprocess.pixel_features(None, (1, H, W), sxy_g), compat_g),
                             (postprocess.pixel_features(image[None], (1, H, W), sxy_b, srgb),
                              compat_b)):
        f = features[0].double()
        k = torch.exp(-torch.cdist(f, f) ** 2 / 2)
        kernels.append((k, k.sum(1, keepdim=True).rsqrt(), weight))
    q = unary.softmax(-1)
    for _ in range(iters):
        logits = unary.clone()
        for k, n, w in kernels:
            logits += w * n * (k @ (n * q))
        q = logits.softmax(-1)
    return q.T.reshape(C, H, W)


def edge_scene(seed: int, size: int = 12, centre: float = 5.5):
    """A dark left half, a bright right half, and a soft, noisy foreground ramp."""
    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(3, size, size, generator=g) * 60).to(torch.uint8)
    image[:, :, size // 2:] += 150
    x = torch.arange(size).float().expand(size, size)
    ramp = torch.sigmoid((x - centre + torch.randn(size, size, generator=g)) / 2)
    return image, torch.stack([1 - ramp, ramp]) * 0.8 + 0.1


def loss_curve(log: str, stage: str) -> np.ndarray:
    """The loss terms of every progress line of a stage: (lines, terms)."""
    rows = []
    for line in log.splitlines():
        if line.startswith(f"{stage} epoch"):
            words = line.split("|")[0].split()[5:]  # after "<stage> epoch e/E step s/S"
            rows.append([float(v) for v in words[1::2]])
    return np.array(rows)


# -----------------------------------------------------------------------------
# Data: the folder format, the generator, the importer, and what real folders hold


def test_synth_is_deterministic_by_seed(tmp_path):
    a = tiny_synth(tmp_path / "a", seed=3)
    b = tiny_synth(tmp_path / "b", seed=3)
    c = tiny_synth(tmp_path / "c", seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4 + 3 * 18  # classes/synth/train/val + image/mask/context per scene
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png")


def test_synth_labels_masks_and_context_agree(synth_dir):
    for split in ("train", "val"):
        classes, samples = wsss.read_split(synth_dir, split)
        assert classes == ["smoke"]
        for s in samples:
            image = np.array(Image.open(s.image))
            mask = np.array(Image.open(s.mask))
            context = np.array(Image.open(s.context)) > 0
            assert image.shape == (48, 48, 3) and mask.shape == context.shape == (48, 48)
            assert set(np.unique(mask)) <= {0, 1, wsss.IGNORE}
            assert s.labels == ((1,) if (mask == 1).any() else ())
            assert not (context & (mask != 0)).any(), "context never overlaps smoke or ignore"
            if s.labels:
                assert context.any(), "every emission leaves a chimney"
                # The ignore band wraps the plume: faint edges are not scored.
                assert (mask == wsss.IGNORE).any()
            else:
                assert (mask == 0).all()


def test_default_data_made_with_other_settings_is_named_not_replaced(tmp_path):
    old = tiny_synth(tmp_path / "synth", coupling=0.6)  # as an older default would have made
    before = sorted(p.name for p in (old / "images").iterdir())
    with pytest.raises(wsss.UserError, match="synth --out .* --force"):
        wsss.ensure_default_data(old)
    assert sorted(p.name for p in (old / "images").iterdir()) == before
    # A folder made with the default settings is used as it is.
    (old / "synth.json").write_text(wsss.json.dumps(wsss.dataclasses.asdict(wsss.SynthConfig())))
    assert wsss.ensure_default_data(old) == old


def test_synth_coupling_controls_chimneys_in_smoke_free_images(tmp_path):
    def chimney_share(root):
        _, samples = wsss.read_split(root, "train")
        negatives = [s for s in samples if not s.labels]
        return np.mean([(np.array(Image.open(s.context)) > 0).any() for s in negatives])

    assert chimney_share(tiny_synth(tmp_path / "c1", coupling=1.0, n_train=30)) == 0.0
    assert chimney_share(tiny_synth(tmp_path / "c0", coupling=0.0, n_train=30)) == 1.0


def test_dataset_items(synth_dir):
    ds = wsss.SmokeDataset(synth_dir, "train", size=32)
    assert ds.has_masks and ds.has_context and len(ds) == 12
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["rgb"].shape == (3, 32, 32) and item["rgb"].dtype == torch.uint8
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64
    assert item["context"].dtype == torch.bool
    # Nearest resizing keeps mask values in {0, 1, 255}.
    assert set(item["mask"].unique().tolist()) <= {0, 1, wsss.IGNORE}
    labels = torch.stack([ds[i]["label"] for i in range(len(ds))])
    assert labels.shape == (12, 1)
    assert labels.sum() == sum(1 for s in ds.samples if s.labels)
    # Default collation batches the dicts.
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["stem"]) == 4


def test_dataset_round_trip_of_a_hand_written_folder(tmp_path):
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("smoke\nsteam\n")
    (root / "train.txt").write_text("a smoke steam\nb\n\nc steam\n")
    rng = np.random.default_rng(0)
    for stem, mode in (("a", "RGB"), ("b", "L"), ("c", "RGBA")):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode).save(
            root / "images" / f"{stem}.png")
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:10] = 2
    mask[0, 0] = 255
    Image.fromarray(mask).save(root / "masks" / "a.png")
    ds = wsss.SmokeDataset(root, "train", size=None)
    assert [s.stem for s in ds.samples] == ["a", "b", "c"]
    assert ds[0]["label"].tolist() == [1.0, 1.0]
    assert ds[1]["label"].tolist() == [0.0, 0.0]
    assert ds[2]["label"].tolist() == [0.0, 1.0]
    assert torch.equal(ds[0]["mask"], torch.from_numpy(mask).long())
    assert (ds[1]["mask"] == wsss.IGNORE).all(), "no mask file: everything ignored"
    assert ds[1]["rgb"].shape == (3, 20, 30)  # grayscale converted to RGB


def test_tile_origins_cover_with_fewest_tiles():
    assert wsss.tile_origins(32, 32) == [0]
    assert wsss.tile_origins(80, 32) == [0, 24, 48]
    assert wsss.tile_origins(320, 128) == [0, 96, 192]


def test_prepare_smoke5k_tiles_and_labels(tmp_path, capsys):
    src = fake_smoke5k(tmp_path / "smoke5k")
    code, out, _ = run_cli(capsys, "prepare", "smoke5k", src, tmp_path / "dst", "--tile", 32,
                           "--val-share", 0.0)
    assert code == 0, out
    dst = tmp_path / "dst"
    _, samples = wsss.read_split(dst, "train")
    labels = {s.stem: s.labels for s in samples}
    # p1 (60x80): tiles at y {0, 28} x {0, 24, 48}; p2 (40x40): y {0, 8} x {0, 8}.
    assert labels["p1_y0_x0"] == (1,)  # 400 of 1024 pixels are smoke
    assert labels["p1_y0_x48"] == ()  # no smoke pixel: a negative
    assert "p1_y28_x48" not in labels  # one smoke pixel only: ambiguous, skipped
    assert labels["p2_y0_x0"] == (1,)
    # p1: 6 tiles - 1 ambiguous; p2: its 4 overlapping tiles all hold >= 2% of the block.
    assert len(labels) == 5 + 4 and all(labels[f"p2_y{y}_x{x}"] for y in (0, 8) for x in (0, 8))
    mask = np.array(Image.open(dst / "masks" / "p1_y0_x0.png"))
    assert mask.shape == (32, 32) and mask[:20, :20].all() and not mask[20:, :].any()
    assert np.array(Image.open(dst / "images" / "p1_y0_x0.png")).shape == (32, 32, 3)
    # The split is by photograph: every tile of a photo lands in the same split.
    code, _, _ = run_cli(capsys, "prepare", "smoke5k", src, tmp_path / "d2", "--tile", 32,
                         "--val-share", 0.5, "--seed", 1)
    assert code == 0
    for split in ("train", "val"):
        stems = (tmp_path / "d2" / f"{split}.txt").read_text().split()
        photos = {s.split("_")[0] for s in stems}
        other = (tmp_path / "d2" / ("val.txt" if split == "train" else "train.txt")).read_text()
        assert not any(p + "_" in other for p in photos)


def test_error_missing_folder_and_files(tmp_path, capsys, synth_dir):
    expect_error(capsys, tmp_path / "nowhere", "nowhere", "not found")
    root = broken_copy(synth_dir, tmp_path)
    (root / "images" / "train_00003.png").unlink()
    expect_error(capsys, root, "train.txt:4", "images/train_00003")
    (root / "classes.txt").unlink()
    expect_error(capsys, root, "classes.txt", "not found")


def test_error_image_that_does_not_decode(tmp_path, capsys, synth_dir):
    root = broken_copy(synth_dir, tmp_path)
    (root / "images" / "train_00002.png").write_bytes(b"not a png at all")
    expect_error(capsys, root, "train_00002.png", "cannot decode")


def test_error_unknown_class(tmp_path, capsys, synth_dir):
    root = broken_copy(synth_dir, tmp_path)
    lines = (root / "train.txt").read_text().splitlines()
    lines[1] = lines[1].split()[0] + " chimney"
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    expect_error(capsys, root, "train.txt:2", "unknown class 'chimney'")


def test_error_mask_size_and_values(tmp_path, capsys, synth_dir):
    root = broken_copy(synth_dir, tmp_path)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "masks" / "train_00001.png")
    expect_error(capsys, root, "masks/train_00001.png", "12x10", "48x48")
    bad = np.zeros((48, 48), np.uint8)
    bad[3, 3] = 7
    Image.fromarray(bad).save(root / "masks" / "train_00001.png")
    expect_error(capsys, root, "masks/train_00001.png", "value 7")


def test_error_empty_split(tmp_path, capsys, synth_dir):
    root = broken_copy(synth_dir, tmp_path)
    (root / "val.txt").write_text("\n")
    expect_error(capsys, root, "val.txt", "empty split")


def test_prepare_missing_source(tmp_path, capsys):
    code, _, err = run_cli(capsys, "prepare", "smoke5k", tmp_path / "none", tmp_path / "out")
    assert code == 2 and "img" in err and "not found" in err


def test_load_image_converts_every_mode_and_names_what_fails(tmp_path):
    expected = write_faulty_frames(tmp_path / "frames")
    for name, size in expected.items():
        path = next((tmp_path / "frames").glob(name + ".*"))
        if size is None:
            with pytest.raises(wsss.UserError, match=name):
                wsss.load_image(path)
            continue
        image = wsss.load_image(path)
        assert image.mode == "RGB" and (image.height, image.width) == size
    # 16-bit grey keeps its picture (PIL alone would clip it to white).
    grey16 = np.array(wsss.load_image(tmp_path / "frames" / "grey16.png"), dtype=int)
    source = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)[..., 0]
    assert all((grey16[..., c] == source).all() for c in range(3))


@pytest.mark.parametrize("kind", ["empty", "truncated"])
def test_error_empty_or_truncated_training_image(tmp_path, capsys, synth_dir, kind):
    root = broken_copy(synth_dir, tmp_path)
    path = root / "images" / "train_00003.png"
    data = path.read_bytes()
    path.write_bytes(b"" if kind == "empty" else data[: len(data) // 2])
    expect_error(capsys, root, "train_00003.png", "cannot decode")


def test_dataset_reads_other_image_and_mask_modes(tmp_path, synth_dir):
    root = broken_copy(synth_dir, tmp_path)
    reference = wsss.SmokeDataset(synth_dir, "train", size=None)
    rgb = np.array(Image.open(root / "images" / "train_00000.png").convert("RGB"))
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "images" / "train_00000.png")
    mask = np.array(Image.open(root / "masks" / "train_00000.png"))
    Image.fromarray(mask.astype(np.uint16)).save(root / "masks" / "train_00000.png")  # 16-bit
    palette_mask = Image.fromarray(mask).convert("P")
    palette_mask.putpalette([0, 0, 0, 255, 0, 0] + [255, 255, 255] * 254)
    palette_mask.save(root / "masks" / "train_00001.png")  # VOC-style palette mask
    dataset = wsss.SmokeDataset(root, "train", size=None)
    for i in (0, 1):
        assert torch.equal(dataset[i]["mask"], reference[i]["mask"] if i else
                           torch.from_numpy(mask).long())
    assert (dataset[0]["rgb"].float() - reference[0]["rgb"].float()).abs().mean() < 8


# -----------------------------------------------------------------------------
# Networks: torchvision and a torchvision ViT are the oracles


def test_pick_device():
    assert wsss.pick_device("cpu") == torch.device("cpu")
    assert wsss.pick_device("auto").type in {"cuda", "mps", "cpu"}


def test_torchrun_processes_beyond_the_gpus_run_on_the_cpu(monkeypatch):
    """Two torchrun processes on a one-GPU machine: NCCL would refuse them a shared GPU, so
    they join with gloo and train on the CPU; asking for CUDA there is a clear error."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(wsss, "rank_and_count", lambda: (0, 2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert not wsss.gpu_each()
    assert wsss.pick_device("auto") == torch.device("cpu")
    with pytest.raises(wsss.UserError, match="outnumber the GPUs"):
        wsss.pick_device("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert wsss.gpu_each()


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_is_bf16_on_cpus_with_amx_only(monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    cpu = torch.device("cpu")
    assert models.autocast_dtype("auto", cpu) == (torch.bfloat16 if amx else None)
    assert models.autocast_dtype("bf16", cpu) == torch.bfloat16
    assert models.autocast_dtype("off", cpu) is None


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_matches_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)().eval()
    ours = getattr(models, name)().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same names, same shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5


def zeroed_weights(net: torch.nn.Module) -> set[str]:
    return {k for k, v in net.state_dict().items() if k.endswith("weight") and not v.any()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual_zeroes_what_torchvision_zeroes(name):
    torchvision = pytest.importorskip("torchvision")
    theirs = zeroed_weights(getattr(torchvision.models, name)(zero_init_residual=True))
    assert zeroed_weights(getattr(models, name)(zero_init_residual=True)) == theirs != set()
    assert zeroed_weights(getattr(models, name)()) == set()
    block = models.resnet18(width=8, zero_init_residual=True).eval().layer1[1]
    x = torch.rand(1, 8, 8, 8)  # non-negative, as after a ReLU
    assert torch.equal(block(x), x)  # each block starts as the identity
    config = models.ModelConfig(teacher_width=8, zero_init_residual=True)
    assert "layer4.1.bn2.weight" in zeroed_weights(models.build_teacher(config, 1).backbone)


@pytest.mark.parametrize("build", [models.resnet18, models.resnet50])
def test_output_stride_changes_only_the_feature_size(build):
    torch.manual_seed(0)
    nets = {os_: build(output_stride=os_, width=16).eval() for os_ in (32, 16, 8)}
    state = nets[32].state_dict()
    x = torch.randn(1, 3, 64, 64)
    for os_, net in nets.items():
        net.load_state_dict(state, strict=True)  # dilation adds no parameter
        f = net.forward_features(x)
        assert f.shape == (1, net.num_features, 64 // os_, 64 // os_)


def test_vit_matches_torchvision_after_conversion():
    theirs = tiny_torchvision_vit()
    ours = models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                    num_heads=2, num_classes=5).eval()
    ours.load_state_dict(models.vit_state_dict_from_torchvision(theirs.state_dict()), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5
        # The hand-written attention (with maps) equals the fused kernel.
        tokens, attn = ours.forward_features(x, return_attn=True)
        assert (ours.forward_head(tokens) - theirs(x)).abs().max() <= 1e-5
    assert len(attn) == 2 and attn[0].shape == (3, 2, 17, 17)
    assert torch.allclose(attn[0].sum(-1), torch.ones(3, 2, 17))
    # On the CPU in bfloat16 the written-out path trains: its gradients are the float32 ones.
    x.requires_grad_(True)
    grad32, = torch.autograd.grad(ours(x).sum(), x)
    with torch.autocast("cpu", torch.bfloat16):
        out16 = ours(x)
    grad16, = torch.autograd.grad(out16.float().sum(), x)
    assert (out16.float() - theirs(x)).abs().max() <= 0.1
    assert torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), 0) > 0.99


def test_vit_names_are_timms_and_pos_embed_resamples():
    vit = models.vit_small(img_size=64, num_classes=3)
    names = set(vit.state_dict())
    for name in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.11.norm1.weight",
                 "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.0.norm2.bias",
                 "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "norm.weight", "head.bias"):
        assert name in names
    assert vit.interpolate_pos_embed(4, 4) is vit.pos_embed  # exact at the native grid
    assert vit.interpolate_pos_embed(6, 8).shape == (1, 1 + 48, 384)
    assert vit(torch.randn(1, 3, 96, 128)).shape == (1, 3)  # any multiple of the patch
    with pytest.raises(ValueError, match="multiple of the patch"):
        vit(torch.randn(1, 3, 65, 64))


@pytest.mark.parametrize("make", [tiny_teacher, tiny_student, cam_student])
def test_every_parameter_gets_a_gradient(make):
    torch.manual_seed(0)
    net = make()
    logits, maps = net(torch.randn(2, 3, 32, 32))
    channels = 2 if make is tiny_teacher else 3  # the student's map has a background channel
    assert logits.shape == (2, 2) and maps.shape == (2, channels, 4, 4)
    (logits.sum() + maps.square().mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("make", [tiny_teacher, tiny_student, cam_student])
def test_tiny_networks_overfit_one_batch(make):
    torch.manual_seed(0)
    net = make()
    x = torch.randn(8, 3, 32, 32)
    y = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]] * 2, dtype=torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(60):
        loss = F.binary_cross_entropy_with_logits(net(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_load_pretrained_drops_a_head_of_another_class_count():
    source = models.vit_tiny(img_size=32, patch_size=8, depth=2, num_classes=1000).state_dict()
    source["pos_embed"] = torch.randn(1, 1 + 8 * 8, 192)  # stored for a 64 px input
    source["extra.thing"] = torch.zeros(1)
    target = models.vit_tiny(img_size=32, patch_size=8, depth=2, num_classes=1)
    report = models.load_pretrained(target, source)
    assert len(report.pop("loaded")) == len(source) - 3
    assert report == {"missing": ["head.weight", "head.bias"], "unexpected": ["extra.thing"],
                      "dropped": ["head.weight", "head.bias"]}
    assert torch.equal(target.blocks[1].attn.qkv.weight, source["blocks.1.attn.qkv.weight"])
    assert target.pos_embed.shape == (1, 17, 192)


def test_weights_from_local_files_in_every_wrapper(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    source = torchvision.models.resnet18()
    sd = source.state_dict()
    files = {"bare.pt": sd, "model.pt": {"model": sd, "epoch": 3},
             "wrapped.pt": {"state_dict": {f"module.{k}": v for k, v in sd.items()}}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        teacher = models.Teacher(models.resnet18(num_classes=0), num_classes=1)
        models.load_weights(teacher.backbone, tmp_path / name, "teacher")
        assert torch.equal(teacher.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
        out = capsys.readouterr().out
        assert "unexpected (2): fc.weight, fc.bias" in out, out
    # A torchvision ViT file is converted to our names on the way in.
    tv_vit = tiny_torchvision_vit()
    torch.save(tv_vit.state_dict(), tmp_path / "vit.pt")
    student = tiny_student()
    models.load_weights(student.backbone, tmp_path / "vit.pt", "student")
    assert "dropped (2): head.weight, head.bias" in capsys.readouterr().out  # 5 classes vs 2
    assert torch.equal(student.backbone.blocks[0].attn.qkv.weight,
                       tv_vit.encoder.layers[0].self_attention.in_proj_weight)


def test_pool_maps_is_the_mean_of_the_strongest_locations():
    maps = torch.randn(2, 3, 5, 4)
    assert torch.allclose(models.pool_maps(maps, 1.0), maps.mean(dim=(2, 3)))
    brute = torch.tensor([[sorted(m.flatten().tolist())[-4:] for m in image] for image in maps])
    assert torch.allclose(models.pool_maps(maps, 0.2), brute.mean(-1))  # 0.2 * 20 = 4 places
    assert torch.allclose(models.pool_maps(maps, 1e-3), maps.amax(dim=(2, 3)))  # at least one
    local = torch.zeros_like(maps)  # window 3: each location's mean over its in-map 3x3
    for y in range(5):
        for x in range(4):
            local[..., y, x] = maps[..., max(0, y - 1):y + 2, max(0, x - 1):x + 2].mean((-2, -1))
    assert torch.allclose(models.pool_maps(maps, 0.2, window=3), models.pool_maps(local, 0.2))
    teacher = models.Teacher(models.resnet18(output_stride=8, width=8, num_classes=0), 1,
                             pool=0.25)
    logits, cams = teacher(torch.randn(2, 3, 32, 32))
    assert torch.allclose(logits, models.pool_maps(cams, 0.25))
    student = models.Student(models.vit_tiny(img_size=32, patch_size=8, depth=1, num_classes=0),
                             1, head="cam", pool=0.25, window=3)
    logits, maps = student(torch.randn(2, 3, 32, 32))
    assert torch.allclose(logits, models.pool_maps(maps[:, 1:], 0.25, window=3))
    config = models.ModelConfig(teacher_width=8, student_depth=1, image_size=32, teacher_pool=0.5)
    assert models.build_teacher(config, 1).pool == 0.5  # each network its own pooling share
    assert models.build_student(config, 1).pool == config.pool != 0.5


def test_projection_start_changes_only_the_projection():
    config = models.ModelConfig(student_depth=1, image_size=32)
    torch.manual_seed(0)
    small = models.build_student(config, 1).state_dict()  # the default start
    torch.manual_seed(0)
    pytorch = models.build_student(dataclasses.replace(config, proj_std=0.0), 1).state_dict()
    changed = [k for k in pytorch if not torch.equal(pytorch[k], small[k])]
    assert changed == ["proj.weight", "proj.bias"]
    drawn = torch.cat([small[k].flatten() for k in changed])  # 2 x 192 + 2 draws
    assert abs(drawn.std().item() - config.proj_std) < 0.001
    assert drawn.std() < pytorch["proj.weight"].std() / 5  # PyTorch's: std 1 / sqrt(3 * 192)


def test_bad_weights_files(tmp_path):
    net = models.resnet18(num_classes=0)
    with pytest.raises(models.WeightsError, match="not found"):
        models.load_weights(net, tmp_path / "none.pt", "teacher")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(models.WeightsError, match="cannot read weights"):
        models.load_weights(net, tmp_path / "junk.pt", "teacher")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(models.WeightsError, match="no tensor matches"):
        models.load_weights(net, tmp_path / "other.pt", "teacher")


def test_faithful_preset_is_the_papers_recipe_and_the_default_differs():
    """`--preset faithful` is one flag from the default: the paper's λ = 1, average pooling, a
    class-token student read by Grad-CAM over four scales, raw-map global cosine, no L_cons."""
    paper, default = wsss.preset_config("faithful"), wsss.preset_config("cpu")
    assert (paper.loss.align_weight, default.loss.align_weight) == (1.0, 3.0)
    assert default.loss.distill_weight == 1.0
    assert paper.model.teacher_pool == paper.model.pool == 1.0
    assert (paper.model.student_head, paper.cam.cam_method) == ("token", "gradcam")
    assert (paper.loss.align_target, paper.loss.align_reduce) == ("raw", "global")
    assert paper.loss.consistency_weight == 0.0 and paper.cam.threshold == 0.3
    assert paper.loss.distill_weight == 0.0  # no soft labels from the teacher in the paper
    assert paper.cam.cam_scales == (0.5, 1.0, 1.5, 2.0)
    assert not paper.model.zero_init_residual and paper.loss.align_power == 1.0
    assert (paper.model.proj_std, default.model.proj_std) == (0.0, 0.0052)  # PyTorch's start


def test_a_run_saved_before_the_small_start_keeps_pytorchs_start():
    saved = wsss.RunConfig(data="d").to_dict()
    del saved["model"]["proj_std"]
    assert wsss.RunConfig.from_dict(saved).model.proj_std == 0.0
    assert wsss.RunConfig.from_dict(wsss.RunConfig(data="d").to_dict()).model.proj_std == 0.0052


def test_squared_preset_changes_only_the_starts_the_teachers_rate_and_the_targets_power():
    squared, default = wsss.preset_config("squared"), wsss.preset_config("cpu")
    assert default.model == dataclasses.replace(squared.model, zero_init_residual=True,
                                                proj_std=0.0052)
    assert default.train == dataclasses.replace(squared.train, teacher_lr=5e-4)
    assert default.loss == dataclasses.replace(squared.loss, align_power=1.0)
    assert (squared.cam, squared.refine) == (default.cam, default.refine)
    assert "layer1.0.bn2.weight" in zeroed_weights(models.build_teacher(default.model, 1).backbone)
    assert not zeroed_weights(models.build_teacher(squared.model, 1).backbone)


# -----------------------------------------------------------------------------
# Losses: L_cls, L_align, L_cons on hand-made inputs with known values


def test_classification_loss_is_bce():
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    p = torch.sigmoid(logits)
    expected = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    assert torch.allclose(losses.classification_loss(logits, labels), expected)


def test_platt_scaling_finds_the_best_positive_scale_and_bias():
    torch.manual_seed(0)
    labels = (torch.rand(200, 2) < 0.4).float()
    logits = 0.3 * (2 * labels - 1) + 0.4 * torch.randn(200, 2)  # right ranking, too timid
    scale, bias = losses.platt_scaling(logits, labels)
    best = losses.classification_loss(logits * scale + bias, labels)
    assert best < losses.classification_loss(logits, labels) - 0.05 and (scale > 1).all()
    # Oracle: every (a, c) of a fine grid, per class (the classes are fitted independently).
    for k in range(2):
        a, c = torch.meshgrid(torch.linspace(0.1, 10, 200), torch.linspace(-3, 3, 200),
                              indexing="ij")
        z = logits[:, k] * a[..., None] + c[..., None]  # (200, 200, N)
        y = labels[:, k].expand_as(z)
        grid = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
        fitted = losses.classification_loss(logits[:, k] * scale[k] + bias[k], labels[:, k])
        assert fitted <= grid.mean(-1).min() + 1e-4


@pytest.mark.parametrize("reduce", losses.ALIGN_REDUCES)
def test_cosine_alignment_identical_zero_opposite_two(reduce):
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4)
    assert losses.alignment_loss(s, s, "cosine", reduce).abs() < 1e-6
    assert losses.alignment_loss(s, 5 * s, "cosine", reduce).abs() < 1e-6  # scale-free
    assert (losses.alignment_loss(s, -s, "cosine", reduce) - 2).abs() < 1e-6


def test_cosine_reduce_modes_differ_as_documented():
    torch.manual_seed(0)
    s = torch.rand(1, 2, 4, 4) + 0.1
    per_channel = s * torch.tensor([1.0, 10.0])[None, :, None, None]  # each channel rescaled
    per_location = s * (torch.rand(1, 1, 4, 4) + 0.5)  # each location rescaled
    assert losses.alignment_loss(s, per_channel, "cosine", "channel") < 1e-6
    assert losses.alignment_loss(s, per_channel, "cosine", "spatial") > 1e-3
    assert losses.alignment_loss(s, per_channel, "cosine", "global") > 1e-3
    assert losses.alignment_loss(s, per_location, "cosine", "spatial") < 1e-6
    assert losses.alignment_loss(s, per_location, "cosine", "channel") > 1e-3


def test_one_channel_maps_make_channel_cosine_global_and_spatial_cosine_inert():
    # Why the pair target (two channels) makes the ablation's channel and spatial rows differ.
    torch.manual_seed(0)
    s = torch.randn(3, 1, 4, 4, requires_grad=True)
    t = torch.randn(3, 1, 4, 4)
    assert torch.equal(losses.alignment_loss(s, t, "cosine", "channel"),
                       losses.alignment_loss(s, t, "cosine", "global"))
    losses.alignment_loss(s, t, "cosine", "spatial").backward()
    assert s.grad.abs().max() < 1e-6  # the cosine of two numbers is +-1: rounding noise only


def test_pair_target_is_label_gated_and_normalised():
    t = torch.tensor([[[[-1.0, 0.5], [2.0, 1.0]]]]).repeat(2, 1, 1, 1)  # (2, 1, 2, 2) raw maps
    labels = torch.tensor([[1.0], [0.0]])  # smoke in the first image only
    target = losses.alignment_target(t, labels, "pair")
    assert target.shape == (2, 2, 2, 2)
    fg = torch.tensor([[0.0, 0.25], [1.0, 0.5]])  # ReLU, then / max (up to the 1e-5 guard)
    assert torch.allclose(target[0, 1], fg, atol=1e-4)
    assert torch.allclose(target[0, 0], 1 - fg, atol=1e-4)
    assert torch.equal(target[1, 1], torch.zeros(2, 2))  # smoke-free: all background
    assert torch.equal(target[1, 0], torch.ones(2, 2))
    assert losses.alignment_target(t, labels, "raw") is t
    sharp = losses.alignment_target(t, labels, "pair", power=2.0)  # weak responses fall faster
    assert torch.allclose(sharp[0, 1], fg ** 2, atol=1e-4)
    assert torch.allclose(sharp[0, 0], 1 - fg ** 2, atol=1e-4)
    assert torch.equal(sharp[1], target[1])


def test_l1_l2_alignment_values_and_teacher_resizing():
    s = torch.zeros(1, 1, 2, 2)
    t = torch.full((1, 1, 8, 8), 2.0)  # a constant teacher map on a finer grid
    assert losses.alignment_loss(s, t, "l1") == 2.0
    assert losses.alignment_loss(s, t, "l2") == 4.0
    for reduce in ("channel", "spatial"):  # a mean of element-wise distances: the same mean
        assert losses.alignment_loss(s, t, "l1", reduce) == 2.0
    with pytest.raises(ValueError, match="kind"):
        losses.alignment_loss(s, t, "kl")


def test_alignment_gradient_reaches_only_the_student():
    student = tiny_student()
    teacher = tiny_teacher(pcm=False)
    x = torch.randn(2, 3, 32, 32)
    _, s_map = student(x)
    _, t_map = teacher(x)
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    target = losses.alignment_target(t_map, labels, "pair")
    losses.alignment_loss(s_map, target).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.proj.weight.grad.abs().sum() > 0


def test_distillation_loss_is_bce_against_the_teachers_probabilities():
    student = torch.tensor([[2.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[0.5, -3.0]], requires_grad=True)
    q, p = torch.sigmoid(teacher).detach(), torch.sigmoid(student)
    expected = -(q * p.log() + (1 - q) * (1 - p).log()).mean()
    loss = losses.distillation_loss(student, teacher)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert teacher.grad is None  # the teacher's decision is a target, never trained
    # Its minimum, where the student believes what the teacher does: the gradient vanishes.
    same = teacher.detach().clone().requires_grad_(True)
    losses.distillation_loss(same, teacher).backward()
    assert same.grad.abs().max() < 1e-7


def test_student_loss_adds_each_weighted_term():
    torch.manual_seed(0)
    student, teacher = tiny_student(), models.freeze(tiny_teacher(pcm=False))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    config = losses.LossConfig(align_weight=2.0, distill_weight=0.5, consistency_weight=0.0)
    terms = wsss.student_loss(student, teacher, x, y, config)
    assert set(terms) == {"cls", "align", "kd", "loss"}
    assert torch.allclose(terms["loss"], terms["cls"] + 2 * terms["align"] + 0.5 * terms["kd"])
    alone = wsss.student_loss(student, None, x, y, config)  # no teacher: no teacher's terms
    assert set(alone) == {"cls", "loss"}


def test_guidance_loss_is_the_mean_per_location_cosine_distance():
    torch.manual_seed(0)
    student = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)]
    teacher = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8, 8)]  # the second is resized
    expected = 0.0
    for s, t in zip(student, teacher):
        t = F.interpolate(t, size=(4, 4), mode="bilinear", align_corners=False)
        distances = [1 - torch.dot(s[b, :, i, j], t[b, :, i, j])
                     / (s[b, :, i, j].norm() * t[b, :, i, j].norm())
                     for b in range(2) for i in range(4) for j in range(4)]
        expected += torch.stack(distances).mean() / 2
    assert torch.allclose(losses.guidance_loss(student, teacher), expected, atol=1e-6)
    assert losses.guidance_loss(teacher[:1], teacher[:1]) < 1e-6


def test_guided_student_adds_projections_and_the_guide_term():
    torch.manual_seed(0)
    model = models.ModelConfig(teacher_width=8, student_depth=2, image_size=32)
    teacher = models.freeze(models.build_teacher(model, 2))
    torch.manual_seed(0)
    plain = models.build_student(model, 2)
    torch.manual_seed(0)
    student = models.build_student(model, 2, guided_by=teacher)
    # The guided student starts as the plain one (its student alone) plus two projections,
    # to the teacher's last two stages (a 2-block student guides both its blocks).
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in plain.state_dict().items())
    assert student.guided_blocks == [0, 1]
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logits, maps, features = student(x, guided=True)
    assert all(torch.equal(a, b) for a, b in zip((logits, maps), student(x)))
    stages = teacher(x, return_stages=True)[2]
    assert [f.shape[1] for f in features] == [s.shape[1] for s in stages[-2:]] == [32, 64]
    config = losses.LossConfig(guide_weight=0.5, consistency_weight=0.0)
    terms = wsss.student_loss(student, teacher, x, y, config)
    assert torch.allclose(terms["guide"], losses.guidance_loss(features, stages[-2:]))
    assert torch.allclose(terms["loss"], terms["cls"] + 3 * terms["align"] + terms["kd"]
                          + 0.5 * terms["guide"])
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.guide.parameters())
    assert "guide" not in wsss.student_loss(student, None, x, y, config)  # the student alone


def test_consistency_loss_zero_for_equivariant_maps():
    maps = torch.linspace(0, 1, 8).expand(2, 1, 8, 8)  # a left-to-right ramp
    aug = losses.flip_and_resize(maps, (6, 6), flip=True)
    assert losses.consistency_loss(aug, losses.flip_and_resize(maps, (6, 6), True)) < 1e-6
    assert losses.consistency_loss(3 * aug, aug) < 1e-4  # maps are max-normalised first
    assert losses.consistency_loss(aug, losses.flip_and_resize(maps, (6, 6), False)) > 0.05
    # The target is resized to the augmented grid when they differ.
    assert losses.consistency_loss(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 8, 8)) < 1e-6


class PatchMeans(torch.nn.Module):
    """A 'student' whose map at each patch is that patch's mean colour, minus a share of the
    whole image's mean when `glance` is set: local, or also lit by what lies elsewhere."""

    def __init__(self, glance: float):
        super().__init__()
        self.glance = glance
        self.backbone = type("ViT", (), {"patch_size": 4})()

    def forward(self, x):
        local = F.avg_pool2d(x.mean(1, keepdim=True), 4)  # (B,1,H,W) -> (B,1,H/4,W/4)
        maps = local - self.glance * x.mean((1, 2, 3))[:, None, None, None]
        return maps.amax((2, 3)), torch.cat([-maps, maps], 1)  # logits, (bg, fg)


def test_crop_consistency_is_zero_only_for_local_maps():
    images = torch.rand(3, 3, 32, 32) * 4
    config = losses.LossConfig(consistency_view="crop", consistency_scale=0.5)
    for glance, expect_zero in ((0.0, True), (1.0, False)):
        net = PatchMeans(glance)
        maps = net(images)[1][:, 1:]
        torch.manual_seed(0)
        loss = wsss.consistency_term(net, images, maps, config)
        assert (loss < 1e-6) == expect_zero, (glance, loss)
    assert losses.crop_consistency_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)) == 0


# -----------------------------------------------------------------------------
# Training: tiny end-to-end runs, resume, torchrun


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_optimizer_step_clips_the_gradient_norm(clip):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    before = torch.cat([p.detach().flatten() for p in net.parameters()])
    x = torch.randn(8, 4) * 10  # a large gradient
    step = lambda batch, n: {"loss": (n(batch["image"]) ** 2).mean()}
    grad = torch.autograd.grad(step({"image": x}, net)["loss"], list(net.parameters()))
    norm = torch.cat([g.flatten() for g in grad]).norm()
    config = wsss.TrainConfig(clip_grad=clip, amp="off")
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    wsss.optimizer_step(step, {"image": x}, net, optimizer, 1.0, torch.device("cpu"), config)
    moved = (torch.cat([p.detach().flatten() for p in net.parameters()]) - before).norm()
    assert norm > 1 and torch.isclose(moved, norm if clip == 0 else torch.tensor(clip))


def test_student_alone_starts_where_the_aligned_student_starts(monkeypatch, tmp_path):
    # A paired comparison: the two students differ only in the teacher's terms.
    starts = {}

    def record(stage, net, *args):
        starts[stage] = {k: v.clone() for k, v in net.state_dict().items()}

    monkeypatch.setattr(wsss, "train_stage", record)
    config = wsss.preset_config("quick")
    dataset = types.SimpleNamespace(classes=["smoke"])
    log = wsss.Log(None)
    wsss.train_networks(tmp_path, config, dataset, torch.device("cpu"), log)
    wsss.train_alone(tmp_path, config, dataset, torch.device("cpu"), log)
    assert set(starts) == {"teacher", "student", "alone"}
    assert all(torch.equal(v, starts["alone"][k]) for k, v in starts["student"].items())
    other = wsss.with_overrides(config, {"seed": 1})
    wsss.train_alone(tmp_path, other, dataset, torch.device("cpu"), log)
    assert not torch.equal(starts["alone"]["proj.weight"], starts["student"]["proj.weight"])


def test_train_writes_a_loadable_run_folder(tmp_path, capsys, synth_dir):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data", synth_dir, "--out", run, *TINY,
                             "--consistency-weight", 0.5, "--teacher-lr", 1e-3, "--baseline")
    assert code == 0, err
    assert "student epoch 2/2 step 3/3 cls" in out and "align" in out and "cons" in out
    config = wsss.RunConfig.from_dict(wsss.json.loads((run / "config.json").read_text()))
    assert config.model.image_size == 32 and config.cam.cam_scales == (1.0,)
    for name, lr in (("teacher", 1e-3), ("student", config.train.lr)):
        ckpt = wsss.load_checkpoint(run / f"{name}.pt")
        assert ckpt["epoch"] == 2 and ckpt["done"]
        assert ckpt["config"]["train"]["lr"] == lr  # each stage's config, as it trained
        assert ckpt["config"]["model"] == config.to_dict()["model"]
    wsss.load_run(run, torch.device("cpu"))
    assert len(list((run / "pseudo_train").glob("*.png"))) == 12
    assert (run / "overlays.png").is_file() and "student epoch" in (run / "log.txt").read_text()
    # The run ends with the three networks scored side by side on the validation split.
    assert wsss.load_checkpoint(run / "alone.pt")["done"]
    scores = wsss.json.loads((run / "scores.json").read_text())
    rows = ("teacher CAM (ResNet)", "student alone (ViT)", "aligned student (ViT)")
    assert scores["split"] == "val" and all(name in scores for name in rows)
    for name in rows:
        assert 0 <= scores[name]["smoke_iou"] <= 100 and 0 <= scores[name]["recall"] <= 100
    assert [line.split(":")[0].strip() for line in out.strip().splitlines()[-4:-1]] == list(rows)
    # Existing run folders are not overwritten.
    code, _, err = run_cli(capsys, "train", "--data", synth_dir, "--out", run, *TINY)
    assert code == 2 and "--force" in err


def test_calibration_changes_the_probabilities_and_no_map(tiny_run, synth_dir):
    assert "logits calibrated on the training labels" in (tiny_run / "log.txt").read_text()
    _, teacher, student = wsss.load_run(tiny_run, torch.device("cpu"))
    train = wsss.SmokeDataset(synth_dir, "train", size=32)
    for net in (teacher, student):
        logits, labels = wsss.split_logits(net, train, torch.device("cpu"))
        _, maps = net(train[0]["image"][None])
        scale, bias = net.calibration.scale.clone(), net.calibration.bias.clone()
        net.calibration.reset()
        raw, _ = wsss.split_logits(net, train, torch.device("cpu"))
        assert torch.equal(net(train[0]["image"][None])[1], maps)
        assert torch.allclose(logits, raw * scale + bias, atol=1e-5)
        assert losses.classification_loss(logits, labels) <= losses.classification_loss(raw,
                                                                                         labels)
    # A checkpoint written before the calibration existed loads with the identity.
    ckpt = wsss.load_checkpoint(tiny_run / "student.pt")
    old = {k: v for k, v in ckpt["model"].items() if not k.startswith("calibration.")}
    net = models.build_student(wsss.read_run_config(tiny_run).model, 1)
    wsss.restore(net, {**ckpt, "model": old}, tiny_run / "student.pt")
    assert net.calibration.scale.eq(1).all() and net.calibration.bias.eq(0).all()


def test_ctrl_c_mid_epoch_then_resume_repeats_the_epoch_exactly(
        tmp_path, capsys, synth_dir, monkeypatch):
    # Flips and the consistency loss draw random numbers: the resumed run must draw the same.
    args = [*TINY, "--flip", "--consistency-weight", 0.5]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli(capsys, "train", "--data", synth_dir, "--out", full, *args)[0] == 0
    calls = {"n": 0}
    real = losses.alignment_loss

    def interrupted(*a, **kw):  # Ctrl-C in the middle of the student's second epoch
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(losses, "alignment_loss", interrupted)
    code, _, err = run_cli(capsys, "train", "--data", synth_dir, "--out", cut, *args)
    assert code == 130 and "stopped by Ctrl-C in epoch 2" in err and "after epoch 1" in err
    assert "--resume" in err and "Traceback" not in err
    ckpt = wsss.load_checkpoint(cut / "student.pt")
    assert (ckpt["epoch"], ckpt["done"]) == (1, False)
    monkeypatch.setattr(losses, "alignment_loss", real)
    code, out, _ = run_cli(capsys, "train", "--resume", cut)
    assert code == 0 and "teacher: done in an earlier run" in out
    assert "student: resuming after epoch 1" in out
    for name in ("teacher", "student"):
        a = wsss.load_checkpoint(full / f"{name}.pt")["model"]
        b = wsss.load_checkpoint(cut / f"{name}.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_refuses_a_checkpoint_of_another_network(tmp_path, capsys, synth_dir):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--data", synth_dir, "--out", run, *TINY)[0] == 0
    (run / "student.pt").unlink()
    config = wsss.json.loads((run / "config.json").read_text())
    config["model"]["teacher_width"] = 16
    (run / "config.json").write_text(wsss.json.dumps(config))
    code, _, err = run_cli(capsys, "train", "--resume", run)
    assert code == 1 and "teacher.pt" in err and "teacher_width: 8 -> 16" in err


def test_sigkill_then_resume_loses_at_most_one_epoch(tmp_path, capsys, synth_dir):
    """Killed at a random moment after its first checkpoint, a run resumes from the last
    whole epoch, finds no corrupt file, and ends with the uninterrupted run's weights."""
    args = [str(a) for a in (*TINY, "--teacher-epochs", 4, "--student-epochs", 4)]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli(capsys, "train", "--data", synth_dir, "--out", full, *args)[0] == 0
    command = [sys.executable, "wsss.py", "train", "--data", str(synth_dir), "--out", str(cut),
               *args]
    process = subprocess.Popen(command, cwd=Path(wsss.__file__).parent,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (cut / "teacher.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))  # anywhere in the run
    process.kill()
    process.wait()
    for path in cut.glob("*.pt"):  # what was written is whole (atomic rename)
        ckpt = wsss.load_checkpoint(path)
        assert ckpt["epoch"] >= 1
    code, out, err = run_cli(capsys, "train", "--resume", cut)
    assert code == 0, err
    for name in ("teacher", "student"):
        a = wsss.load_checkpoint(full / f"{name}.pt")["model"]
        b = wsss.load_checkpoint(cut / f"{name}.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, capsys, synth_dir, monkeypatch):
    calls = {"n": 0}
    real = losses.classification_loss

    def poisoned(logits, labels):
        calls["n"] += 1
        return real(logits, labels) * (float("nan") if calls["n"] == 5 else 1.0)

    monkeypatch.setattr(losses, "classification_loss", poisoned)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", synth_dir, "--out", run, *TINY)
    assert code == 1 and "loss is nan at epoch 2 step 2" in err and "Traceback" not in err
    ckpt = wsss.load_checkpoint(run / "teacher.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                      if v.is_floating_point())


def test_torchrun_two_processes_match_one_process(tmp_path, capsys, synth_dir):
    """The student stage under `torchrun --nproc_per_node 2` (gloo, global batch 4 = 2 + 2)
    follows the single-process run: same loss curve and weights within float tolerance, and
    the pseudo masks of both processes' shares. (The teacher stage is shared: its BatchNorm
    normalises each process's half batch on CPU, where SyncBatchNorm does not run.)"""
    # Deterministic data and no BatchNorm in the student (a conv stem's would see half batches).
    args = [*TINY, "--amp", "off", "--no-flip", "--crop", 1.0, "--student-stem", "patch",
            "--device", "cpu"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert run_cli(capsys, "train", "--data", synth_dir, "--out", single, *args)[0] == 0
    ddp.mkdir()
    for name in ("config.json", "teacher.pt"):
        shutil.copy(single / name, ddp / name)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "wsss.py"]
    result = subprocess.run([*torchrun, "train", "--resume", str(ddp)],
                            cwd=Path(wsss.__file__).parent, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("student epoch 2/2 step 3/3") == 1  # one process logs
    a = loss_curve((single / "log.txt").read_text(), "student")
    b = loss_curve((ddp / "log.txt").read_text(), "student")
    assert a.shape == b.shape == (6, 5) and np.allclose(a, b, atol=1e-4)  # cls align kd cons loss
    wa = wsss.load_checkpoint(single / "student.pt")["model"]
    wb = wsss.load_checkpoint(ddp / "student.pt")["model"]
    # Within 1e-3: the key bias has no true gradient (softmax ignores a shift shared by all
    # keys), so Adam turns rounding noise there into steps of up to lr = 5e-4; elsewhere within
    # a fifth of one step (Adam divides near-zero gradients by their own size too).
    assert all(torch.allclose(wa[k], wb[k], atol=1e-3) for k in wa)
    far = [k for k in wa if "qkv.bias" not in k and not torch.allclose(wa[k], wb[k], atol=1e-4)]
    assert not far, [(k, (wa[k] - wb[k]).abs().max().item()) for k in far]
    assert len(list((ddp / "pseudo_train").glob("*.png"))) == 12
    scores = wsss.json.loads((ddp / "scores.json").read_text())
    assert 0 <= scores["aligned student (ViT)"]["smoke_iou"] <= 100
    # Stage 3 under torchrun too: one checkpoint, one validation score.
    # --run-dir: torchrun would read --run as an abbreviation of its own --run-path.
    result = subprocess.run([*torchrun, "segment", "--run-dir", str(ddp), "--seg-epochs", "1",
                             "--seg-batch-size", "4"], cwd=Path(wsss.__file__).parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert wsss.load_checkpoint(ddp / "segment.pt")["done"]
    assert result.stdout.count("stage 3 (pseudo) on val") == 1


def test_channels_last_training_runs(tmp_path, capsys, synth_dir):
    code, out, err = run_cli(capsys, "train", "--data", synth_dir, "--out", tmp_path / "cl",
                             *TINY, "--channels-last")
    assert code == 0 and "smoke IoU" in out, err


def test_latest_names_the_newest_run(tmp_path, monkeypatch):
    monkeypatch.setattr(wsss, "RUNS", tmp_path / "runs")
    with pytest.raises(wsss.UserError, match="no run folder"):
        wsss.run_path("latest")
    for name, when in (("old", 1_000), ("new", 2_000), ("no_config", 3_000)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        if name != "no_config":
            (tmp_path / "runs" / name / "config.json").write_text("{}")
            os.utime(tmp_path / "runs" / name / "config.json", (when, when))
    assert wsss.run_path("latest") == tmp_path / "runs" / "new"
    assert wsss.run_path("runs/old") == Path("runs/old")


# -----------------------------------------------------------------------------
# CAMs to pseudo masks: Grad-CAM, the dense CRF against a brute-force oracle, the coverage fix


def test_student_gradcam_weights_the_last_blocks_input_by_pooled_gradients():
    torch.manual_seed(0)
    student = tiny_student().eval()
    x = torch.randn(2, 3, 32, 32)
    cams = student.gradcam(x)
    assert cams.shape == (2, 2, 4, 4) and (cams >= 0).all() and cams.sum() > 0
    # Oracle: the same formula from a hook on the last block's norm1 and autograd.
    saved = {}
    hook = student.backbone.blocks[-1].norm1.register_forward_hook(
        lambda m, i, o: saved.setdefault("a", o))
    x.requires_grad_(True)
    logits, _ = student(x)
    hook.remove()
    grad, = torch.autograd.grad(logits[:, 0].sum(), saved["a"])
    expect = torch.relu((saved["a"][:, 1:] * grad[:, 1:].mean(1, keepdim=True)).sum(-1))
    assert torch.allclose(cams[:, 0].flatten(1), expect, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_dense_crf_matches_brute_force_mean_field(seed):
    image, prob = edge_scene(seed)
    # The lattice approximates the Gaussian filter; its error shows most after one update
    # and is averaged away by the fixed point (the bounds stated in postprocess.dense_crf).
    one = postprocess.dense_crf(image, prob, iters=1).double()
    assert (one - brute_force_crf(image, prob, 1)).abs().max() < 0.1
    ten = postprocess.dense_crf(image, prob, iters=10).double()
    exact = brute_force_crf(image, prob, 10)
    assert (ten - exact).abs().max() < 0.01
    assert torch.equal(ten.argmax(0), exact.argmax(0))


def test_lattice_filter_approximates_the_gaussian():
    torch.manual_seed(0)
    f = torch.rand(1, 300, 2) * 6
    lattice = postprocess.PermutohedralLattice(f)
    exact = torch.exp(-torch.cdist(f[0].double(), f[0].double()) ** 2 / 2).sum(1)
    ours = lattice.filter(torch.ones(1, 300, 1))[0, :, 0].double()
    assert ((ours - exact).abs() / exact).mean() < 0.2  # densecrf's lattice: ~16 % here


def test_dense_crf_moves_a_soft_boundary_to_the_image_edge():
    image, prob = edge_scene(0, size=24, centre=9.0)  # unary boundary 3 px left of the edge
    before = prob.argmax(0)
    after = postprocess.dense_crf(image, prob).argmax(0)
    truth = (torch.arange(24) >= 12).expand(24, 24).long()
    assert (after != truth).sum() < (before != truth).sum() / 4


def test_dense_crf_batched_equals_one_by_one_and_keeps_device():
    scenes = [edge_scene(s) for s in (1, 2)]
    images = torch.stack([i for i, _ in scenes])
    probs = torch.stack([p for _, p in scenes])
    batched = postprocess.dense_crf(images, probs)
    for (image, prob), out in zip(scenes, batched):
        assert torch.allclose(postprocess.dense_crf(image, prob), out, atol=1e-5)
    assert batched.shape == probs.shape and batched.device == probs.device
    assert torch.allclose(batched.sum(1), torch.ones(2, 12, 12), atol=1e-5)


@pytest.mark.parametrize("seed", (0, 2, 3))
def test_crf_defaults_keep_a_plume_that_deeplab_widths_erase(seed):
    # A generated 128 px scene and a CAM as coarse as the student's (its mask averaged on the
    # 16 x 16 patch grid): the default read-out with --crf keeps the plume; pydensecrf's
    # DeepLab widths, made for ~500 px photographs, smooth it away at this size.
    image, mask, _ = wsss.render_scene(np.random.default_rng(seed), 128, True, True)
    truth, valid = torch.from_numpy(mask == 1), torch.from_numpy(mask != postprocess.IGNORE)
    grid = F.adaptive_avg_pool2d(truth[None, None].float(), 16)
    cams = F.interpolate(grid, size=(128, 128), mode="bilinear", align_corners=False)
    rgb = torch.from_numpy(image).permute(2, 0, 1)[None]  # (H,W,3) -> (1,3,H,W)

    def iou(refine):
        fg = postprocess.pseudo_mask(rgb, cams / cams.max(), postprocess.CamConfig(), refine)[0]
        return ((fg == 1) & truth & valid).sum() / (((fg == 1) | truth) & valid).sum()

    deeplab = postprocess.RefineConfig(crf=True, crf_iters=10, crf_compat_gaussian=3.0,
                                       crf_sxy_bilateral=80.0, crf_srgb=13.0,
                                       crf_compat_bilateral=10.0)
    assert iou(postprocess.RefineConfig(crf=True)) > 0.8
    assert iou(deeplab) < 0.1


def test_cams_to_masks():
    cams = torch.zeros(2, 1, 4, 4)
    cams[:, 0, :2] = 2.0
    cams[:, 0, 2, 0] = 0.5  # a quarter of the maximum: below the 0.3 threshold
    norm = losses.normalize_maps(cams, torch.tensor([[1.0], [0.0]]))
    assert norm[0].max() == pytest.approx(1.0, abs=1e-4) and norm[1].abs().sum() == 0
    mask = postprocess.probs_to_mask(postprocess.cams_to_probs(norm, "threshold", 0.3))
    assert mask[0, :2].eq(1).all() and mask[0, 2:].eq(0).all() and mask[1].eq(0).all()
    power = postprocess.cams_to_probs(norm, "power", alpha=48)
    assert torch.allclose(power.sum(1), torch.ones(2, 4, 4))


def test_random_walk_over_affinities():
    torch.manual_seed(0)
    cams = torch.rand(2, 1, 3, 4)
    identity = torch.eye(12).expand(2, 12, 12)
    assert torch.allclose(postprocess.random_walk(cams, identity, steps=3), cams)
    uniform = torch.full((2, 12, 12), 1 / 12)
    walked = postprocess.random_walk(cams, uniform, steps=1)
    assert torch.allclose(walked, cams.mean(dim=(2, 3), keepdim=True).expand_as(cams))
    attn = [torch.rand(2, 3, 13, 13).softmax(-1) for _ in range(2)]
    t = postprocess.attention_affinity(attn, beta=2.0)
    assert t.shape == (2, 12, 12) and torch.allclose(t.sum(-1), torch.ones(2, 12))
    a = (attn[0][:, :, 1:, 1:].mean(1) + attn[1][:, :, 1:, 1:].mean(1)) / 2  # brute force
    a = ((a + a.transpose(1, 2)) / 2) ** 2
    assert torch.allclose(t, a / a.sum(-1, keepdim=True), atol=1e-6)
    # A sharp power of the near-uniform attention of 256 tokens, 1/256 ** 32, underflows
    # float32; the transition must still be the power's normalised rows, not zeros.
    near_uniform = [torch.full((1, 1, 257, 257), 1 / 257) + torch.eye(257) * 1e-3]
    t = postprocess.attention_affinity(near_uniform, beta=32.0)
    assert torch.allclose(t.sum(-1), torch.ones(1, 256))
    assert torch.allclose(t[0, 0, 0] / t[0, 0, 1], torch.tensor(((1 / 257 + 1e-3) * 257) ** 32))


def test_pseudo_writes_masks_overlays_and_scores(tiny_run, tmp_path, capsys):
    out = tmp_path / "masks"
    code, stdout, err = run_cli(capsys, "pseudo", "--run", tiny_run, "--split", "val", "--out",
                                out, "--crf", "--coverage-fix", "--json")
    assert code == 0, err
    masks = [m for m in out.glob("*.png") if m.name != "overlays.png"]
    assert len(masks) == 6 and (out / "overlays.png").is_file()
    assert all(set(np.unique(np.array(Image.open(m)))) <= {0, 1} for m in masks)
    assert "smoke IoU" in stdout and '"context_fp"' in stdout
    code, _, err = run_cli(capsys, "pseudo", "--run", tiny_run, "--split", "val", "--out", out)
    assert code == 2 and "--force" in err


def test_pseudo_names_the_command_that_makes_a_missing_checkpoint(tiny_run, tmp_path, capsys):
    run = tmp_path / "partial"
    shutil.copytree(tiny_run, run)
    (run / "student.pt").unlink()
    code, _, err = run_cli(capsys, "pseudo", "--run", run, "--out", tmp_path / "m")
    assert code == 2 and "student.pt" in err and "train --resume" in err
    code, _, err = run_cli(capsys, "pseudo", "--run", tmp_path / "nothing", "--out", tmp_path / "m")
    assert code == 2 and "config.json" in err and "wsss.py train" in err


# -----------------------------------------------------------------------------
# Scores: masks against ground truth, eval, the ablation


def test_scores_on_hand_made_masks():
    truth = torch.zeros(8, 8, dtype=torch.long)
    truth[2:6, 2:6] = 1  # a 4x4 smoke square
    truth[0, :] = wsss.IGNORE
    context = torch.zeros(8, 8, dtype=torch.bool)
    context[6:, 2] = True  # a 2-pixel chimney
    pred = torch.zeros(8, 8, dtype=torch.uint8)
    pred[2:6, 2:4] = 1  # half of the square
    pred[6, 2] = 1  # one chimney pixel called smoke
    pred[0, 0] = 1  # inside ignore: not scored
    s = postprocess.Scores(1)
    s.add(pred, truth, context)
    r = s.result()
    assert r["smoke_iou"] == pytest.approx(100 * 8 / 17)  # 8 hits, 16 + 1 false positive
    assert r["precision"] == pytest.approx(100 * 8 / 9) and r["recall"] == pytest.approx(50)
    assert r["context_fp"] == pytest.approx(50)
    assert r["miou"] == pytest.approx((r["per_class_iou"][0] + r["smoke_iou"]) / 2)
    perfect = postprocess.Scores(1)
    perfect.add(truth.clamp(max=1).to(torch.uint8) * (truth == 1), truth)
    assert perfect.result()["boundary_f1"] == pytest.approx(100)
    shifted = postprocess.Scores(1)
    moved = torch.zeros(8, 8, dtype=torch.uint8)
    moved[2:6, 3:7] = 1  # one pixel off: within the 2-pixel tolerance
    shifted.add(moved, truth)
    assert shifted.result()["boundary_f1"] == pytest.approx(100)


def test_scores_without_context_print_n_a():
    r = postprocess.Scores(1)
    r.add(torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4, 4, dtype=torch.long))
    assert "chimney called smoke n/a %" in postprocess.format_scores("x", r.result())


def test_pseudo_and_eval_agree_at_the_truths_resolution(tiny_run, synth_dir, tmp_path, capsys):
    """The run's networks read 32 px; the data is 48 px: both commands score the written
    masks against the 48 px ground truth, to the last digit."""
    out = tmp_path / "masks"
    code, stdout, err = run_cli(capsys, "pseudo", "--run", tiny_run, "--split", "val", "--out",
                                out, "--json")
    assert code == 0, err
    from_pseudo = wsss.json.loads(stdout.strip().splitlines()[-1])
    code, stdout, err = run_cli(capsys, "eval", "--data", synth_dir, "--split", "val", "--pred",
                                out, "--json")
    assert code == 0, err
    assert wsss.json.loads(stdout) == from_pseudo


def test_eval_command(tmp_path, capsys, synth_dir):
    pred = tmp_path / "pred"
    pred.mkdir()
    for s in wsss.read_split(synth_dir, "val")[1]:
        truth = np.array(Image.open(s.mask))
        Image.fromarray(np.where(truth == 1, 1, 0).astype(np.uint8)).save(pred / f"{s.stem}.png")
    code, out, _ = run_cli(capsys, "eval", "--data", synth_dir, "--split", "val", "--pred", pred,
                           "--json")
    r = wsss.json.loads(out)
    assert code == 0 and r["smoke_iou"] == 100 and r["context_fp"] == 0
    (pred / "val_00001.png").unlink()
    code, _, err = run_cli(capsys, "eval", "--data", synth_dir, "--split", "val", "--pred", pred)
    assert code == 2 and "val_00001.png" in err


def test_ablate_quick_writes_a_table_and_reuses_runs(tmp_path, capsys, synth_dir):
    out = tmp_path / "ablation"
    args = ["ablate", "--data", synth_dir, "--out", out, "--quick", "--seeds", 0, 1, *TINY]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    table = (out / "ablation.md").read_text()
    assert "teacher CAM (ResNet)" in table and "+ dense CRF" in table and " ± " in table
    assert "(val split, 2 seeds)" in table  # --quick scores the validation split
    runs = sorted(p.name for p in out.iterdir() if p.name.endswith(("seed0", "seed1")))
    alone = "align_weight=0.0_distill_weight=0.0"  # the student alone: no teacher's term
    assert runs == [f"{alone}_seed0", f"{alone}_seed1", "default_seed0", "default_seed1"]
    # The teacher stage is shared by the runs of one seed.
    a = wsss.load_checkpoint(out / "default_seed0" / "teacher.pt")["model"]
    b = wsss.load_checkpoint(out / f"{alone}_seed0" / "teacher.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A second call trains nothing: finished runs are reused.
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0 and "epoch 1/" not in stdout


# -----------------------------------------------------------------------------
# Stage 3 and prediction


def test_segmentation_loss_ignores_255_and_is_zero_without_labels():
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    target[0, :2] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    loss = losses.segmentation_loss(logits, target, postprocess.IGNORE)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert losses.segmentation_loss(logits, torch.full((2, 5, 5), 255), postprocess.IGNORE) == 0


def test_segmenter_overfits_one_batch():
    torch.manual_seed(0)
    model = models.ModelConfig(image_size=32, teacher_width=8, student_depth=2)
    net = models.build_segmenter(model, num_classes=1)
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 32, 32, dtype=torch.long)
    y[0, :, :16] = 1  # smoke on the left of one image, at the bottom of the other
    y[1, 16:] = 1
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(40):
        logits = net(x)
        loss = losses.segmentation_loss(logits, y, postprocess.IGNORE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert logits.shape == (2, 2, 32, 32)
    net.eval()
    assert (net(x).argmax(1) == y).float().mean() > 0.9


def test_segment_then_predict_end_to_end(tiny_run, tmp_path, capsys, synth_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, out, err = run_cli(capsys, "segment", "--run", run, "--seg-epochs", 2,
                             "--seg-batch-size", 4)
    assert code == 0, err
    assert "segment epoch 2/2 step 3/3 loss" in out and "stage 3 (pseudo) on val" in out
    assert wsss.load_checkpoint(run / "segment.pt")["done"]
    assert len(list((run / "segment_val").glob("*.png"))) == 6
    assert 0 <= wsss.json.loads((run / "segment_val.json").read_text())["smoke_iou"] <= 100
    code, _, err = run_cli(capsys, "segment", "--run", run)
    assert code == 2 and "already trained" in err and "--force" in err
    # The fully supervised upper bound, from scratch.
    code, out, err = run_cli(capsys, "segment", "--run", run, "--seg-targets", "truth",
                             "--seg-init", "scratch", "--seg-epochs", 1, "--seg-batch-size", 4)
    assert code == 0 and (run / "segment_truth.pt").is_file(), err

    # A folder of frames with one that does not decode, and one of another size.
    frames = tmp_path / "frames"
    frames.mkdir()
    for path in sorted((synth_dir / "images").glob("val_*.png"))[:3]:
        shutil.copy(path, frames / path.name)
    (frames / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (90, 60), (120, 130, 140)).save(frames / "wide.jpg")
    pred = tmp_path / "pred"
    code, out, err = run_cli(capsys, "predict", "--run", run, "--input", frames, "--out", pred,
                             "--batch-size", 2)
    assert code == 0, err
    assert "4 masks" in out and "stage-3 network" in out and "images/s" in out
    assert "broken.jpg" in out and "skipped 1 unreadable" in out
    assert np.array(Image.open(pred / "wide.png")).shape == (60, 90)  # the input's own size
    assert len(list((pred / "overlays").glob("*.jpg"))) == 4
    code, _, err = run_cli(capsys, "predict", "--run", run, "--input", frames, "--out", pred)
    assert code == 2 and "--force" in err

    # Without a stage-3 network: the student's CAM, gated by its classifier; files by name.
    (run / "segment.pt").unlink()
    code, out, err = run_cli(capsys, "predict", "--run", run, frames / "wide.jpg",
                             "--out", tmp_path / "cam")
    assert code == 0 and "1 mask in" in out and "student CAM" in out, err
    assert set(np.unique(np.array(Image.open(tmp_path / "cam" / "wide.png")))) <= {0, 1}


def test_segment_and_predict_name_what_is_missing(tiny_run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "segment", "--run", tiny_run, "--seg-masks", tmp_path / "no")
    assert code == 2 and "pseudo --run" in err
    code, _, err = run_cli(capsys, "predict", "--run", tmp_path / "nothing", "--input", tmp_path)
    assert code == 2 and "wsss.py train" in err
    code, _, err = run_cli(capsys, "predict", "--run", tiny_run, "--input", tmp_path / "none")
    assert code == 2 and "folder not found" in err


def test_predict_skips_unreadable_frames_and_keeps_sizes(tiny_run, tmp_path, capsys):
    expected = write_faulty_frames(tmp_path / "frames")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "predict", "--run", tiny_run, "--input",
                                tmp_path / "frames", "--out", out, "--batch-size", 4)
    assert code == 0, err
    assert "skipped 3 unreadable" in stdout and "6 masks" in stdout
    for name, size in expected.items():
        mask = out / f"{name}.png"
        if size is None:
            assert name in stdout and not mask.exists()
        else:
            assert np.array(Image.open(mask)).shape == size


def test_predict_refuses_an_unfinished_stage_3(tiny_run, tmp_path, synth_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = wsss.read_run_config(run)
    net = models.build_segmenter(config.model, 1)
    wsss.save_checkpoint(run / "segment.pt", config, net, None, 0, False)
    code, _, err = run_cli(capsys, "predict", "--run", run, "--out", tmp_path / "o",
                           synth_dir / "images" / "val_00000.png")
    assert code == 2 and one_line_error(err, "segment --run"), err


# -----------------------------------------------------------------------------
# Bad settings and outputs: checked before any work, nothing read is ever deleted


def test_existing_output_needs_force(tmp_path, capsys):
    out = tiny_synth(tmp_path / "s")
    before = (out / "images" / "train_00000.png").read_bytes()
    code, _, err = run_cli(capsys, "synth", "--out", out, "--n-train", 4, "--n-val", 2,
                           "--size", 32, "--seed", 9)
    assert code == 2 and "--force" in err and "Traceback" not in err
    assert (out / "images" / "train_00000.png").read_bytes() == before
    src = fake_smoke5k(tmp_path / "smoke5k")
    code, _, err = run_cli(capsys, "prepare", "smoke5k", src, out)
    assert code == 2 and "--force" in err
    code, _, _ = run_cli(capsys, "synth", "--out", out, "--n-train", 4, "--n-val", 2,
                         "--size", 32, "--force")
    assert code == 0 and len(list((out / "images").iterdir())) == 6


BAD_TRAIN_FLAGS = [
    ("--batch-size", "0"), ("--batch-size", "-4"), ("--lr", "-1"), ("--image-size", "0"),
    ("--image-size", "-32"), ("--output-stride", "5"), ("--device", "foo"),
    ("--cam-batch-size", "0"), ("--weight-decay", "-1"), ("--teacher-epochs", "0"),
    ("--teacher-epochs", "-1"), ("--student-epochs", "0"), ("--consistency-weight", "-2"),
    ("--threshold", "1.5"), ("--threshold", "-1"), ("--cam-scales", "0"), ("--cam-scales", "-1"),
    ("--align-kind", "foo"), ("--align-reduce", "foo"), ("--align-target", "foo"),
    ("--cam-network", "foo"), ("--cam-method", "foo"), ("--background", "foo"),
    ("--amp", "foo"), ("--teacher", "foo"), ("--student-head", "foo"),
    ("--crop", "0"), ("--teacher-pool", "0"),
    ("--image-size", "100"),  # not a multiple of the patch size
] + ([] if wsss.torch.cuda.is_available() else [("--device", "cuda")])


@pytest.mark.parametrize("flag,value", BAD_TRAIN_FLAGS)
def test_bad_train_settings_stop_before_any_folder(flag, value, tmp_path, synth_dir, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) if value in ("foo", "5") else contextlib.nullcontext() as e:
        code, _, err = run_cli(capsys, "train", "--data", synth_dir, "--out", run, flag,
                               *value.split())
    if e is not None:  # the parser's choices: argparse exits 2 with one line
        code, err = e.value.code, capsys.readouterr().err
    assert code == 2 and one_line_error(err, flag.split("-")[-1]), err
    assert not run.exists()


@pytest.mark.parametrize("argv", [
    ["synth", "--size", "0"], ["synth", "--n-train", "-5"], ["synth", "--positive-share", "1.5"],
    ["synth", "--coupling", "-1"], ["prepare", "smoke5k", "SRC", "--tile", "0"],
    ["prepare", "smoke5k", "SRC", "--val-share", "1.5"],
    ["prepare", "smoke5k", "SRC", "--min-share", "-1"],
])
def test_bad_data_settings_leave_the_old_dataset(argv, tmp_path, capsys):
    old = tiny_synth(tmp_path / "old")
    before = sorted(p.name for p in old.rglob("*"))
    flag = argv[-2]
    if argv[0] == "synth":
        argv = [*argv, "--out", str(old), "--force"]
    else:
        argv = [argv[0], argv[1], str(tmp_path / "src"), str(old), *argv[3:], "--force"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and one_line_error(err, flag), err
    assert sorted(p.name for p in old.rglob("*")) == before


def test_outputs_that_hold_an_input_are_refused(tiny_run, synth_dir, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(synth_dir / "images" / "val_00000.png", frames / name)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    kept = sorted(p.name for p in run.iterdir())
    probes = [
        ["predict", "--run", run, "--input", frames, "--out", frames, "--force"],
        ["predict", "--run", run, "--input", frames, "--out", frames / "masks", "--force"],
        ["predict", "--run", run, "--out", run, "--force", frames / "a.png"],
        ["pseudo", "--run", run, "--out", run, "--force"],
        ["train", "--data", synth_dir, "--out", synth_dir, "--force"],
        ["train", "--data", synth_dir, "--out", synth_dir / "runs", "--force"],
    ]
    for argv in probes:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and one_line_error(err, "this command reads"), (argv, err)
    assert sorted(p.name for p in frames.iterdir()) == ["a.png", "b.png"]
    assert sorted(p.name for p in run.iterdir()) == kept
    assert (synth_dir / "classes.txt").is_file()


def test_resume_refuses_flags_it_cannot_honour(tiny_run, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", tiny_run, "--student-epochs", 3)
    assert code == 2 and one_line_error(err, "--student-epochs"), err


def test_small_bad_flags_of_other_commands(tiny_run, tmp_path, capsys):
    for argv in (["pseudo", "--run", tiny_run, "--out", tmp_path / "p", "--cam-batch-size", 0],
                 ["segment", "--run", tiny_run, "--seg-batch-size", 0]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and one_line_error(err, "batch-size"), err
    assert not (tmp_path / "p").exists() and not (tiny_run / "segment.pt").exists()
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "predict", "--run", tiny_run, "--batch-size", 0, "x.png")
    assert e.value.code == 2 and one_line_error(capsys.readouterr().err, "--batch-size")


def test_broken_files_and_outputs_end_in_one_line(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "config.json").write_text('{"data": "x", "model": {')  # truncated
    code, _, err = run_cli(capsys, "pseudo", "--run", run, "--out", tmp_path / "m")
    assert code == 2 and one_line_error(err, "config.json"), err
    shutil.copy(tiny_run / "config.json", run / "config.json")
    (run / "student.pt").write_bytes(b"not a checkpoint" * 100)
    code, _, err = run_cli(capsys, "pseudo", "--run", run, "--out", tmp_path / "m")
    assert code == 2 and one_line_error(err, "student.pt"), err
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code, _, err = run_cli(capsys, "synth", "--out", blocker / "data", "--n-train", 2,
                           "--n-val", 1, "--size", 32)
    assert code == 2 and one_line_error(err, "file"), err
    assert not (tmp_path / "m").exists()


def test_an_interrupted_command_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = wsss.render_scene

    def render_then_stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(wsss, "render_scene", render_then_stop)
    out = tmp_path / "data"
    code, _, err = run_cli(capsys, "synth", "--out", out, "--n-train", 4, "--n-val", 1,
                           "--size", 32)
    assert code == 130 and one_line_error(err, "Ctrl-C"), err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


# -----------------------------------------------------------------------------
# Benchmarks


def test_bench_crf_prints_ours_beside_the_reference(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            tmp_path / "img" / f"p{i}.jpg")
        mask = np.zeros((48, 64), np.uint8)
        mask[10:30, 20:50] = 255
        Image.fromarray(mask).save(tmp_path / "gt" / f"p{i}.png")
    code, out, err = run_cli(capsys, "bench", "crf", "--photos", tmp_path, "--iters", 1)
    assert code == 0, err
    assert out.count("time per image") == 2 and "smoke IoU vs ground truth: before CRF" in out
    code, _, err = run_cli(capsys, "bench", "crf", "--photos", tmp_path / "none")
    assert code == 2 and "no SMOKE5K-style" in err
