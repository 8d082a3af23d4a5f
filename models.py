"""The two architectures of the method, from scratch in plain torch.

- ResNet (He et al. 2016) with torchvision's parameter names, so torchvision's weights load
  one-to-one, and an output-stride option (dilated last stages) for CAMs.
- ViT (Dosovitskiy et al. 2021) with timm's parameter names, so DeiT, DINO and AugReg weights
  load one-to-one; hand-written attention that can return its maps.
- Teacher = ResNet + 1x1 classifier (+ SEAM's pixel correlation module); Student = ViT + 1x1
  projection of the patch tokens + a classifier (its class token, or its pooled map).
  Both return (logits, maps); the student also gives its Grad-CAM and, for feature-level
  guidance, its inner tokens projected to the teacher's stage widths.
- Stage 3: DeepLab (ResNet + ASPP), per-pixel logits for training on pseudo masks.
- ModelConfig, the networks of a run (its fields are `train`'s flags), and the builders
  build_teacher, build_student, build_segmenter; `setting` declares any config field.

Networks only: tensors in, tensors out, and weights from a file the caller names; no argv.
"""

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

# -----------------------------------------------------------------------------
# ResNet, after torchvision/models/resnet.py (names kept for one-to-one weight loading)

def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution; padding = dilation keeps the spatial size at stride 1."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)

def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, dilation: int = 1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)  # in place: saves a copy
        return self.relu(out)

class Bottleneck(nn.Module):
    # The stride sits on the 3x3 conv (ResNet v1.5), as in torchvision.
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, dilation: int = 1):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)  # in place: saves a copy
        return self.relu(out)

class ResNet(nn.Module):
    """ResNet with an output stride of 32, 16 or 8.

    Output stride 16 (8) replaces the stride of layer4 (layer3 and layer4) by dilation, the
    DeepLab way, so CAMs come out at 1/16 (1/8) of the input. `width` is the channel count of
    the stem and first stage (64 in the paper); smaller widths make CPU-sized networks.
    `num_classes=0` drops the classifier (`fc` becomes the identity). `zero_init_residual`:
    each block's last BatchNorm scale starts at zero, so every block starts as the identity
    (torchvision's option; Goyal et al. 2017).
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 num_classes: int = 1000, output_stride: int = 32, width: int = 64,
                 zero_init_residual: bool = False):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        dilate = {32: (False, False, False), 16: (False, False, True),
                  8: (False, True, True)}[output_stride]
        self.inplanes = width
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2, dilate=dilate[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        # Channels of layer1..layer4's outputs (what PCM and feature guidance read).
        self.stage_widths = tuple(width * m * block.expansion for m in (1, 2, 4, 8))
        self.num_features = self.stage_widths[-1]
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # as the docstring says; torchvision zeroes the same weights
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:  # keep the resolution, widen the receptive field instead
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        # The first block still sees the previous dilation, as in torchvision and DeepLab.
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, dilation=self.dilation))
        return nn.Sequential(*layers)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B,3,H,W) -> the outputs of layer1..layer4."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        return stages

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B, num_features, H/os, W/os)."""
        return self.forward_stages(x)[-1]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)

def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)

def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)

def resnet101(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)

# -----------------------------------------------------------------------------
# Vision Transformer, after timm/models/vision_transformer.py (names kept)

def resample_pos_embed(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(1, 1+g*g, D) class + square-grid position embeddings -> (1, 1+h*w, D), bicubic."""
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    g = math.isqrt(grid_pos.shape[1])
    grid_pos = grid_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1,g*g,D) -> (1,D,g,g)
    grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bicubic", align_corners=False)
    grid_pos = grid_pos.flatten(2).transpose(1, 2)  # (1,D,h,w) -> (1,h*w,D)
    return torch.cat([cls_pos, grid_pos], dim=1)

class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B,3,H,W) -> (B,D,h,w)
        return x.flatten(2).transpose(1, 2)  # (B,D,h,w) -> (B,h*w,D)

class ConvStem(nn.Module):
    """Convolutional tokenizer (Xiao et al. 2021, "Early convolutions help transformers see
    better"; CCT's tokenizer is the same idea): log2(patch) stride-2 3x3 conv + BN + ReLU
    layers, then a 1x1 conv to the embedding. Same grid as PatchEmbed, but each token sees
    its neighbours: the locality a ViT trained from scratch on little data lacks."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        n = int(math.log2(patch_size))
        if 2 ** n != patch_size:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch_size}")
        self.patch_size = patch_size
        widths = [3] + [max(16, embed_dim // 2 ** (n - 1 - i)) for i in range(n)]
        layers = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [conv3x3(c_in, c_out, stride=2), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(widths[-1], embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.convs(x))  # (B,3,H,W) -> (B,D,h,w)
        return x.flatten(2).transpose(1, 2)  # (B,D,h,w) -> (B,h*w,D)

class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B,N,3,h,d) -> 3 x (B,h,N,d)
        attn = None
        # Written out when the maps are wanted, and on the CPU in bfloat16: there the fused
        # kernel is 2x slower to train (ViT-Tiny, 256 tokens: 37 vs 15 ms a block, fwd + bwd).
        if return_attn or (x.device.type == "cpu" and q.dtype == torch.bfloat16):
            weights = (q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1)  # (B,h,N,N)
            x = weights @ v
            if return_attn:
                attn = weights
        else:  # the fused kernel (flash / memory-efficient where available)
            x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B,h,N,d) -> (B,N,D)
        return self.proj(x), attn

class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        h, attn = self.attn(self.norm1(x), return_attn)
        x = x + h
        x = x + self.mlp(self.norm2(x))
        return x, attn

class VisionTransformer(nn.Module):
    """ViT with a class token. Any input whose sides are multiples of the patch size works:
    the position embeddings (stored for img_size) are resized bicubically, as timm does."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, stem: str = "patch"):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid = img_size // patch_size
        # "patch": the paper's linear patchify; "conv": a convolutional tokenizer.
        self.patch_embed = (ConvStem if stem == "conv" else PatchEmbed)(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        # timm's initialisation: truncated normal(0.02) for weights, zeros for biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and stem == "conv":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an (h, w) patch grid; exact (untouched) at the native grid."""
        if h == w == self.grid:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, h, w)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> tokens (B, 1 + h*w, D) with class token and position embeddings."""
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        return tokens + self.interpolate_pos_embed(H // p, W // p)

    def forward_features(self, x: torch.Tensor, return_attn: bool = False):
        """(B,3,H,W) -> normed tokens (B, 1+N, D), and with return_attn the list of every
        block's attention maps, each (B, heads, 1+N, 1+N)."""
        tokens = self.embed(x)
        maps = []
        for block in self.blocks:
            tokens, attn = block(tokens, return_attn)
            maps.append(attn)
        tokens = self.norm(tokens)
        return (tokens, maps) if return_attn else tokens

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens[:, 0])  # the class token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

def vit_tiny(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3,
                                **kwargs})

def vit_small(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6,
                                **kwargs})

def vit_base(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12,
                                **kwargs})

def vit_state_dict_from_torchvision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision.models.VisionTransformer's state dict under our (timm's) names."""
    out = {
        "patch_embed.proj.weight": sd["conv_proj.weight"],
        "patch_embed.proj.bias": sd["conv_proj.bias"],
        "cls_token": sd["class_token"],
        "pos_embed": sd["encoder.pos_embedding"],
        "norm.weight": sd["encoder.ln.weight"],
        "norm.bias": sd["encoder.ln.bias"],
    }
    if "heads.head.weight" in sd:
        out["head.weight"] = sd["heads.head.weight"]
        out["head.bias"] = sd["heads.head.bias"]
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    names = {"ln_1": "norm1", "ln_2": "norm2", "self_attention.in_proj_": "attn.qkv.",
             "self_attention.out_proj.": "attn.proj.", "mlp.0.": "mlp.fc1.", "mlp.3.": "mlp.fc2."}
    for i in range(depth):
        prefix = f"encoder.layers.encoder_layer_{i}."
        for key, value in sd.items():
            if key.startswith(prefix):
                rest = key[len(prefix):]
                for theirs, ours in names.items():
                    rest = rest.replace(theirs, ours)
                out[f"blocks.{i}.{rest}"] = value
    return out

# -----------------------------------------------------------------------------
# The WSSS networks: teacher and student

class PixelCorrelation(nn.Module):
    """SEAM's pixel correlation module (Wang et al. 2020, eq. 7): refine a CAM by propagating
    it along feature affinities, y_i = sum_j relu(cos(f_i, f_j)) y_j / sum_j relu(cos(f_i, f_j)).

    Features are the image and two backbone stages, detached as in SEAM, so the module learns
    its own affinity embedding without pulling the classifier's features.
    """

    def __init__(self, in_channels: int, dim: int = 64):
        super().__init__()
        self.embed = nn.Conv2d(in_channels + 3, dim, 1, bias=False)

    def forward(self, cam: torch.Tensor, image: torch.Tensor,
                features: list[torch.Tensor]) -> torch.Tensor:
        B, K, h, w = cam.shape
        image = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)
        feats = [F.interpolate(f.detach(), size=(h, w), mode="bilinear", align_corners=False)
                 for f in features]
        f = self.embed(torch.cat([image, *feats], dim=1)).flatten(2)  # (B,dim,h,w) -> (B,dim,hw)
        f = F.normalize(f, dim=1)
        aff = F.relu(f.transpose(1, 2) @ f)  # (B,hw,hw) cosine affinities
        aff = aff / (aff.sum(dim=1, keepdim=True) + 1e-5)  # each column sums to one
        return (cam.flatten(2) @ aff).reshape(B, K, h, w)  # (B,K,hw) @ (B,hw,hw) -> (B,K,h,w)

def pool_maps(maps: torch.Tensor, share: float = 1.0, window: int = 1) -> torch.Tensor:
    """Class maps (B, K, h, w) -> logits (B, K): the mean of each map's top `share` of
    locations; share = 1 is global average pooling (the CAM of Zhou et al. 2016). A smaller
    share scores an image by its strongest region, so a small object need not light the
    whole map (top-k pooling, as in WILDCAT, Durand et al. 2017). With window > 1 a location
    is first replaced by the mean of its window x window neighbourhood, so a region scores
    and a lone strong location does not."""
    if window > 1:
        maps = F.avg_pool2d(maps, window, stride=1, padding=window // 2,
                            count_include_pad=False)
    flat = maps.flatten(2)  # (B, K, h, w) -> (B, K, hw)
    if share >= 1:
        return flat.mean(dim=-1)
    k = max(1, round(share * flat.shape[-1]))
    return flat.topk(k, dim=-1).values.mean(dim=-1)

class Calibration(nn.Module):
    """Logits (B, K) -> scale * logits + bias, per class: identity (1, 0) while a network trains;
    fitted to the training labels after it (Platt scaling, `wsss.calibrate`). Monotone, so it
    changes a network's probabilities, never its maps or the ranking of its images."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(num_classes))
        self.register_buffer("bias", torch.zeros(num_classes))

    def reset(self) -> None:
        self.scale.fill_(1.0)
        self.bias.zero_()

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale + self.bias

class Teacher(nn.Module):
    """ResNet + 1x1 classifier: the class maps are the CAMs themselves (Zhou et al. 2016).

    maps = cam (+ PCM(cam) with `pcm`), (B, K, H/os, W/os); logits = pool_maps(maps, pool),
    so the class score is the mean of what the map shows (over its strongest `pool` share),
    then calibrated (the identity until training ends).
    """

    def __init__(self, backbone: ResNet, num_classes: int, pcm: bool = False,
                 pool: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.classifier = nn.Conv2d(backbone.num_features, num_classes, 1, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.01)
        self.calibration = Calibration(num_classes)
        self.pcm = None
        if pcm:
            self.pcm = PixelCorrelation(backbone.stage_widths[2] + backbone.num_features)

    def forward(self, x: torch.Tensor, return_stages: bool = False):
        """-> logits (B, K), maps (B, K, h, w); with return_stages also the list of the
        outputs of layer1..layer4 (the features that guide the student's blocks)."""
        stages = self.backbone.forward_stages(x)
        maps = self.classifier(stages[-1])  # (B,C,h,w) -> (B,K,h,w)
        if self.pcm is not None:
            maps = maps + self.pcm(maps, x, stages[2:])
        out = self.calibration(pool_maps(maps, self.pool)), maps
        return (*out, stages) if return_stages else out

class Student(nn.Module):
    """ViT + a 1x1 projection of the patch tokens to (background, class 1..K) maps, the map
    the alignment loss reads (the paper's 2 channels: background, smoke), + a classifier:

    head="token": the ViT's own class-token head (the paper; timm checkpoints load into
      `student.backbone` with it);
    head="cam": logits = pool_maps(projected class maps, pool, window), a CAM classifier, as
      the teacher; then the map the alignment shapes is the map that becomes the mask.
    Either head's logits are then calibrated (the identity until training ends).

    `guide`: channel counts of the teacher stages that guide evenly spaced blocks (the last
    block guided by the last stage); each guided block has its own 1x1 projection to them.
    `proj_std` > 0: the projection's weight and bias start N(0, proj_std), drawn after the
    ViT's weights, so that the ViT starts as with PyTorch's default.
    """

    def __init__(self, backbone: VisionTransformer, num_classes: int, head: str = "token",
                 pool: float = 1.0, window: int = 1, guide: tuple[int, ...] = (),
                 proj_std: float = 0.0):
        super().__init__()
        if head not in ("token", "cam"):
            raise ValueError(f"head must be 'token' or 'cam', got {head!r}")
        self.pool, self.window = pool, window
        self.backbone = backbone
        self.head = head
        self.proj = nn.Conv2d(backbone.embed_dim, 1 + num_classes, 1)
        if proj_std > 0:  # before the guides' draws: a guided student and its alone start alike
            nn.init.normal_(self.proj.weight, std=proj_std)
            nn.init.normal_(self.proj.bias, std=proj_std)
        self.calibration = Calibration(num_classes)
        depth, n = len(backbone.blocks), len(guide)
        self.guided_blocks = [depth * (j + 1) // n - 1 for j in range(n)]  # 6 blocks, 3: 1 3 5
        self.guide = nn.ModuleList(nn.Conv2d(backbone.embed_dim, c, 1) for c in guide)

    def tokens_to_map(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)  # -> (B,D,h,w)

    def forward_head(self, tokens: torch.Tensor, h: int, w: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed tokens (B, 1+N, D) -> logits (B, K), maps (B, 1+K, h, w)."""
        maps = self.proj(self.tokens_to_map(tokens, h, w))
        if self.head == "cam":
            logits = pool_maps(maps[:, 1:], self.pool, self.window)
        else:
            logits = self.backbone.forward_head(tokens)
        return self.calibration(logits), maps

    def forward(self, x: torch.Tensor, guided: bool = False):
        """-> logits (B, K), maps (B, 1+K, h, w); with `guided` also the list of the guided
        blocks' projected patch tokens, each (B, C_j, h, w)."""
        vit, p = self.backbone, self.backbone.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        if not guided:
            return self.forward_head(vit.forward_features(x), h, w)
        projections = dict(zip(self.guided_blocks, self.guide))  # block index -> its 1x1 conv
        tokens, features = vit.embed(x), []
        for i, block in enumerate(vit.blocks):
            tokens, _ = block(tokens)
            if i in projections:
                features.append(projections[i](self.tokens_to_map(tokens, h, w)))  # (B,C_j,h,w)
        return (*self.forward_head(vit.norm(tokens), h, w), features)

    def gradcam(self, x: torch.Tensor) -> torch.Tensor:
        """Grad-CAM (Selvaraju et al. 2017) of the last block's norm1 tokens, the layer the
        paper reads (pytorch-grad-cam's ViT recipe; after the last block, patch tokens no
        longer reach the class token, so their gradient would be zero):
        cam_k = ReLU(sum_d mean_n(d y_k / d A_nd) * A_nd), class token dropped.
        (B, 3, H, W) -> (B, K, H/p, W/p)."""
        vit, p = self.backbone, self.backbone.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        with torch.enable_grad():
            tokens = vit.embed(x)
            for block in vit.blocks[:-1]:
                tokens, _ = block(tokens)
            last = vit.blocks[-1]
            normed = last.norm1(tokens)
            if not normed.requires_grad:  # a frozen student: make this layer the graph's leaf
                normed.requires_grad_(True)
            tokens = tokens + last.attn(normed)[0]  # the rest of Block.forward, on `normed`
            tokens = tokens + last.mlp(last.norm2(tokens))
            logits, _ = self.forward_head(vit.norm(tokens), h, w)
            cams = []
            for k in range(logits.shape[1]):
                grad, = torch.autograd.grad(logits[:, k].sum(), normed, retain_graph=True)
                weights = grad[:, 1:].mean(dim=1, keepdim=True)  # (B, 1, D): pooled gradients
                cam = (normed[:, 1:] * weights).sum(dim=-1)  # (B, N, D) -> (B, N)
                cams.append(F.relu(cam).reshape(-1, h, w).detach())
        return torch.stack(cams, dim=1).float()

# -----------------------------------------------------------------------------
# Stage 3: a segmentation network trained on the pseudo masks: per-pixel logits
# (B, K+1, H, W) at the input size, background first.

class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3, Chen et al. 2017): a 1x1 branch, dilated 3x3
    branches and an image-pooling branch, concatenated and fused by a 1x1 convolution."""

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(
            conv1x1(in_channels, channels), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))])
        for rate in rates:
            self.branches.append(nn.Sequential(
                conv3x3(in_channels, channels, dilation=rate), nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True)))
        # No BatchNorm after pooling: a (B, C, 1, 1) batch of one image has no statistics.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv1x1(in_channels, channels),
                                  nn.ReLU(inplace=True))
        self.project = nn.Sequential(conv1x1(channels * (len(rates) + 2), channels),
                                     nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[2], x.shape[3]))  # (B,C,1,1) -> (B,C,h,w)
        return self.project(torch.cat(outs, dim=1))

class DeepLab(nn.Module):
    """DeepLabv3: a dilated ResNet (output stride 8 or 16), ASPP, a 1x1 classifier, and
    bilinear upsampling of the logits to the input size."""

    def __init__(self, backbone: ResNet, num_classes: int, channels: int = 128,
                 rates: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone.num_features, channels, rates)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.aspp(self.backbone.forward_features(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

# -----------------------------------------------------------------------------
# Loading pretrained weights from a local file: names and shapes matched

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a torchvision, timm, DeiT or DINO file: bare, or wrapped in
    {"model": ...} / {"state_dict": ...}; DDP's "module." prefixes are removed and torchvision
    ViT names are converted to ours. ValueError when the file holds none."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: unpickling errors of many kinds
        raise ValueError(f"cannot read weights ({e.__class__.__name__}: {e})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict (a mapping of names to tensors)")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return vit_state_dict_from_torchvision(obj) if "conv_proj.weight" in obj else obj

def load_pretrained(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, list]:
    """Load `state_dict` into `module`, dropping entries whose shape differs (a classification
    head for another class count) and reporting what was missing or unexpected. ViT position
    embeddings stored for another input size are resampled to the module's grid.

    Returns {"loaded": [...], "missing": [...], "unexpected": [...], "dropped": [...]}.
    """
    own = module.state_dict()
    state_dict = dict(state_dict)
    for key in [k for k in own if k.endswith("pos_embed") and k in state_dict]:
        if state_dict[key].shape != own[key].shape:  # a checkpoint for another input size
            g = math.isqrt(own[key].shape[1] - 1)
            state_dict[key] = resample_pos_embed(state_dict[key], g, g)
    dropped = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    kept = {k: v for k, v in state_dict.items() if k not in dropped}
    result = module.load_state_dict(kept, strict=False)
    return {"loaded": [k for k in kept if k in own], "missing": list(result.missing_keys),
            "unexpected": list(result.unexpected_keys), "dropped": dropped}

def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

def freeze(net: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm statistics fixed) and no gradients: the frozen teacher, or any
    network once trained."""
    net.eval()
    net.requires_grad_(False)
    return net

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

def network_input(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> float, ImageNet-normalised (what every network here reads)."""
    return TF.normalize(TF.to_dtype(rgb, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)

# -----------------------------------------------------------------------------
# The networks of a run: ModelConfig (its fields are `train`'s --flags) and the builders

def setting(default, help: str, *, choices: tuple = (), at_least: float | None = None,
            above: float | None = None, at_most: float | None = None):
    """A config field: its default, the help of its --flag, and the values it allows (checked
    for flags and for a run's config.json alike, by wsss.check_settings)."""
    allows = dict(choices=choices, at_least=at_least, above=above, at_most=at_most)
    return field(default=default, metadata={"help": help, **allows})

SHARE = dict(at_least=0, at_most=1)  # a share in [0, 1]
TEACHERS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50,
            "resnet101": resnet101}
STUDENTS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}

@dataclass
class ModelConfig:
    teacher: str = setting("resnet18", "teacher ResNet", choices=tuple(TEACHERS))
    teacher_width: int = setting(32, "channels of the teacher's first stage (64: the standard "
                                 "ResNet)", at_least=1)
    output_stride: int = setting(8, "teacher output stride", choices=(8, 16, 32))
    zero_init_residual: bool = setting(True, "the teacher's residual blocks start as the "
                                       "identity: each block's last BatchNorm scale at zero "
                                       "(torchvision's zero_init_residual; steadies the "
                                       "teacher's map over seeds; the paper: off)")
    pcm: bool = setting(False, "refine the teacher's CAM by its feature affinities (SEAM's "
                        "pixel correlation module, PCM)")
    teacher_pool: float = setting(0.1, "the teacher scores a class by the mean of this share "
                                  "of its map's strongest locations (1: average pooling, the "
                                  "paper; 0.1 picked on the synthetic validation split)",
                                  above=0, at_most=1)
    student: str = setting("vit_tiny", "student ViT", choices=tuple(STUDENTS))
    student_depth: int = setting(6, "transformer blocks of the student", at_least=1)
    student_stem: str = setting("conv", "student tokenizer: patch (linear patchify, the paper) or "
                                "conv (stride-2 3x3 convs)", choices=("patch", "conv"))
    student_head: str = setting(
        "cam", "student classifier: token (class-token head, the paper) or cam (its projected "
        "map pooled, so that the aligned map is the one read out)", choices=("token", "cam"))
    pool: float = setting(0.03, "the same for the CAM-head student (0.03 picked on the "
                          "synthetic validation split)", above=0, at_most=1)
    student_window: int = setting(3, "the CAM-head student pools window x window means of its "
                                  "map, so a region scores and a lone patch does not (picked on "
                                  "the synthetic validation split)", choices=(1, 3, 5))
    proj_std: float = setting(0.0052, "the student's 1x1 projection starts with weight and "
                              "bias drawn N(0, this), an eighth of PyTorch's default, so the "
                              "alignment shapes the map before the labels do (README); 0: "
                              "PyTorch's default (uniform, std 0.042 at width 192)", at_least=0)
    patch_size: int = setting(8, "student patch size in pixels", at_least=1)
    image_size: int = setting(128, "training image side in pixels", at_least=16)
    teacher_weights: str = setting("", "local file of pretrained teacher weights (torchvision "
                                   "names)")
    student_weights: str = setting("", "local file of pretrained student weights (timm or "
                                   "torchvision names)")

    def without_weights(self) -> "ModelConfig":
        """The same networks without weight files: for networks a checkpoint fills."""
        return replace(self, teacher_weights="", student_weights="")

def build_teacher(config: ModelConfig, num_classes: int) -> Teacher:
    """A ResNet CAM classifier: its class maps are its CAMs (Zhou et al. 2016)."""
    backbone = TEACHERS[config.teacher](num_classes=0, output_stride=config.output_stride,
                                        width=config.teacher_width,
                                        zero_init_residual=config.zero_init_residual)
    if config.teacher_weights:
        load_weights(backbone, Path(config.teacher_weights), "teacher")
    return Teacher(backbone, num_classes, pcm=config.pcm, pool=config.teacher_pool)

def build_student(config: ModelConfig, num_classes: int, guided_by: Teacher | None = None
                  ) -> Student:
    """A ViT whose patch tokens, projected, give a (background, class 1..K) map; `guided_by`:
    with 1x1 projections to that teacher's layer2..layer4 widths (feature-level guidance)."""
    # A CAM-head student classifies with its projected map: no class-token head to train.
    head_classes = num_classes if config.student_head == "token" else 0
    backbone = STUDENTS[config.student](
        img_size=config.image_size, patch_size=config.patch_size, depth=config.student_depth,
        num_classes=head_classes, stem=config.student_stem)
    if config.student_weights:
        load_weights(backbone, Path(config.student_weights), "student")
    # Guidance: the teacher's last three stages (fewer for a shallower student), their widths.
    widths = guided_by.backbone.stage_widths[1:] if guided_by is not None else ()
    guide = widths[-min(3, config.student_depth):]
    return Student(backbone, num_classes, head=config.student_head, pool=config.pool,
                   window=config.student_window, guide=guide, proj_std=config.proj_std)

def build_segmenter(model: ModelConfig, num_classes: int) -> DeepLab:
    """DeepLabv3 on the teacher's ResNet; K + 1 outputs (background first)."""
    side = model.image_size // model.output_stride
    # DeepLabv3's rates (6, 12, 18) suit its 33x33 feature maps (513 px at output stride 16);
    # scaled to this map's side, so that the branches still see different contexts.
    rates = tuple(max(1, round(r * side / 33)) for r in (6, 12, 18))
    return DeepLab(build_teacher(model, num_classes).backbone, num_classes + 1, rates=rates)

class WeightsError(ValueError):
    """A weights file that is missing, unreadable or fits nothing: the user names another."""

def load_weights(module: torch.nn.Module, path: Path, what: str) -> None:
    """Load a local weights file into `module`, saying what did not fit."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        report = load_pretrained(module, read_state_dict(path))
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None
    loaded = len(report.pop("loaded"))
    print(f"{what}: loaded {loaded} tensors from {path}")
    for kind, keys in report.items():
        if keys:
            print(f"  {kind} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
    if loaded == 0:
        raise WeightsError(f"{path}: no tensor matches the {what}'s names")

# -----------------------------------------------------------------------------
# Precision: bfloat16 autocast where the device runs it fast (--amp)

def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --amp on this device: bfloat16, or None for float32. auto: bf16
    on CUDA that runs it, and on CPUs with AMX matrix units; on a 2-core AVX512-BF16 CPU
    without AMX a bf16 training step took 1.25x (student) to 1.6x (teacher) fp32's time."""
    if amp != "auto":
        return torch.bfloat16 if amp == "bf16" else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if has_amx else None
    return None

def autocast(amp: str, device: torch.device):
    """The autocast context of --amp on this device (float32 when it has none)."""
    dtype = autocast_dtype(amp, device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
