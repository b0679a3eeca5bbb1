"""Networks: a small time-conditioned U-Net for 28x28 / 32x32 images, and an MLP for 2-D toy data.

Both take ``(x, t)`` with ``t`` a float tensor of shape ``(batch,)`` (DDPM chapters pass the step
index 0..T) and return a tensor shaped like ``x``; what that output means (ε, x₀, velocity) is the
training objective's business, not the network's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding :math:`[\\cos(t\\omega_k), \\sin(t\\omega_k)]`, :math:`\\omega_k = P^{-k/(d/2)}`."""
    if t.ndim != 1:
        raise ValueError(f"t must have shape (batch,), got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def checked_inputs(net: nn.Module, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None,
                   num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a network's ``(x, t, y)`` with errors that say what to fix; returns ``t`` as a ``(batch,)`` tensor.

    ``t`` may be a number or a 0-d tensor (the same time for the whole batch). ``y`` must be integer class labels in
    ``0..num_classes`` (``num_classes`` itself means "no class") and is refused by an unconditional network.
    """
    name = type(net).__name__
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}; images from "
                        "diffbook.data are scaled to [-1, 1] floats by ImageDataset.tensor()")
    weight_dtype = next(net.parameters()).dtype
    if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name}: x is {x.dtype} but the weights are {weight_dtype}: pass x.to({weight_dtype}) "
                        f"or convert the network with .to({x.dtype})")
    if not isinstance(t, torch.Tensor):
        if not isinstance(t, (int, float)):
            raise TypeError(f"{name}: t must be a number or a tensor of shape (batch,), got {type(t).__name__}")
        t = torch.tensor(float(t), device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: t must be a number or have shape ({x.shape[0]},) like the batch of x, "
                         f"got shape {tuple(t.shape)}")
    if y is not None:
        if num_classes is None:
            raise ValueError(f"{name} is unconditional (num_classes=None) but got class labels y; drop y, or "
                             "train a class-conditional network (UNetConfig(num_classes=...))")
        if y.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool) or y.ndim != 1 \
                or y.shape[0] != x.shape[0]:
            raise ValueError(f"{name}: y must be integer labels of shape ({x.shape[0]},), got {y.dtype} "
                             f"{tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > num_classes):
            raise ValueError(f"{name}: labels must lie in 0..{num_classes - 1} ({num_classes} means 'no class'), "
                             f"got {int(y.min())}..{int(y.max())}")
    return t, y


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ResBlock(nn.Module):
    """GroupNorm–SiLU–conv, add the time embedding, GroupNorm–SiLU–dropout–conv, plus a skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        attended = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a :class:`UNet`. The default (1.8M parameters, 32/64/96 channels at 28/14/7) trains on MNIST on a CPU in ~30 min."""

    image_size: int = 28
    in_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 3)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (7,)
    dropout: float = 0.0
    num_classes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        values = dict(values)
        for key in ("channel_mults", "attention_resolutions"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


class UNet(nn.Module):
    """A DDPM-style U-Net (Ho et al. 2020, smaller): residual blocks, attention at chosen resolutions,
    sinusoidal time embedding, optional class conditioning (label ``num_classes`` means "no class")."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        c = config.base_channels
        emb_dim = 4 * c
        self.time_mlp = nn.Sequential(nn.Linear(c, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes else None
        self.stem = nn.Conv2d(config.in_channels, c, 3, padding=1)

        res = config.image_size
        self.down = nn.ModuleList()
        skips = [c]
        ch = c
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.num_res_blocks):
                self.down.append(self._block(ch, c * mult, emb_dim, res))
                ch = c * mult
                skips.append(ch)
            if level < len(config.channel_mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                res = _resolution(config.image_size, level + 1)
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, config.dropout), SelfAttention(ch),
                                  ResBlock(ch, ch, emb_dim, config.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(self._block(ch + skips.pop(), c * mult, emb_dim, res))
                ch = c * mult
            if level > 0:
                res = _resolution(config.image_size, level - 1)
                self.up.append(Upsample(ch, res))
        self.head = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, config.in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def _block(self, c_in: int, c_out: int, emb_dim: int, res: int) -> nn.Module:
        block = ResBlock(c_in, c_out, emb_dim, self.config.dropout)
        if res in self.config.attention_resolutions:
            return nn.ModuleList([block, SelfAttention(c_out)])
        return block

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expected x of shape (batch, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(x.shape)}")
        t, y = checked_inputs(self, x, t, y, cfg.num_classes)
        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), cfg.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(y)
        return self._body(x, emb)

    def _body(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The network after the embedding: stem, down path, middle, up path with skips, head."""
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = _apply(layer, h, emb)
            hs.append(h)
        for layer in self.mid:
            h = _apply(layer, h, emb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = _apply(layer, torch.cat([h, hs.pop()], dim=1), emb)
        return self.head(h)


class FlowMapUNet(UNet):
    r"""The :class:`UNet` with a second time input, for flow maps (chapter 9): ``net(x, t, s)`` is an average
    velocity :math:`\bar u(x, t, s)`. The jump's length :math:`t - s` gets its own embedding, added to the time's (as
    MeanFlow does); its last layer starts at zero, so at initialisation the network ignores it."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__(config)
        c = config.base_channels
        self.jump_mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.SiLU(), nn.Linear(4 * c, 4 * c))
        nn.init.zeros_(self.jump_mlp[-1].weight)
        nn.init.zeros_(self.jump_mlp[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expected x of shape (batch, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(x.shape)}")
        t, y = checked_inputs(self, x, t, y, cfg.num_classes)
        s, _ = checked_inputs(self, x, s, None, cfg.num_classes)
        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels))
        emb = emb + self.jump_mlp(timestep_embedding(t - s, cfg.base_channels))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), cfg.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(y)
        return self._body(x, emb)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to a fixed size (so odd sizes such as 7 -> 14 -> 28 round-trip), then a conv."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=(self.size, self.size), mode="nearest"))


def _resolution(image_size: int, level: int) -> int:
    """Feature-map size at U-Net ``level`` (each level halves, rounding up: 28, 14, 7 or 32, 16, 8, 4)."""
    for _ in range(level):
        image_size = (image_size + 1) // 2
    return image_size


def _apply(layer: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, ResBlock):
        return layer(h, emb)
    if isinstance(layer, nn.ModuleList):  # ResBlock followed by attention
        return layer[1](layer[0](h, emb))
    return layer(h)


@dataclass(frozen=True)
class MLPConfig:
    """Shape of a :class:`TimeMLP` for low-dimensional toy data."""

    dim: int = 2
    hidden: int = 128
    layers: int = 3
    time_dim: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


class TimeMLP(nn.Module):
    """An MLP on ``concat(x, embed(t))`` with SiLU activations, for 2-D toy distributions."""

    def __init__(self, config: MLPConfig = MLPConfig()):
        super().__init__()
        self.config = config
        widths = [config.dim + config.time_dim] + [config.hidden] * config.layers
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.SiLU()]
        layers.append(nn.Linear(widths[-1], config.dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"expected x of shape (batch, {self.config.dim}), got {tuple(x.shape)}")
        t, _ = checked_inputs(self, x, t, y, None)
        return self.net(torch.cat([x, timestep_embedding(t, self.config.time_dim)], dim=1))


class FlowMapMLP(nn.Module):
    r"""A two-time MLP for flow maps (chapter 9): ``net(x, t, s)`` is an average velocity :math:`\bar u(x, t, s)` from
    time ``t`` to time ``s``, computed from ``concat(x, embed(t), embed(t - s))`` (the jump's length as the second
    time input, as MeanFlow does), with SiLU activations."""

    def __init__(self, config: MLPConfig = MLPConfig()):
        super().__init__()
        self.config = config
        widths = [config.dim + 2 * config.time_dim] + [config.hidden] * config.layers
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.SiLU()]
        layers.append(nn.Linear(widths[-1], config.dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"expected x of shape (batch, {self.config.dim}), got {tuple(x.shape)}")
        t, _ = checked_inputs(self, x, t, None, None)
        s, _ = checked_inputs(self, x, s, None, None)
        embed = self.config.time_dim
        return self.net(torch.cat([x, timestep_embedding(t, embed), timestep_embedding(t - s, embed)], dim=1))


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of a :class:`Classifier`: two conv blocks, then a ``features``-wide penultimate layer."""

    image_size: int = 28
    in_channels: int = 1
    channels: tuple[int, int] = (32, 64)
    features: int = 128
    num_classes: int = 10
    dropout: float = 0.25

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ClassifierConfig":
        return cls(**{**values, "channels": tuple(values.get("channels", cls.channels))})


class Classifier(nn.Module):
    """A small CNN for 28x28 digits. :meth:`features` gives the penultimate layer, the space in which
    :mod:`diffbook.metrics` measures sample quality (the role Inception features play in FID)."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        self.body = nn.Sequential(
            nn.Conv2d(config.in_channels, c1, 3, padding=1), nn.GroupNorm(_groups(c1), c1), nn.SiLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.GroupNorm(_groups(c1), c1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.GroupNorm(_groups(c2), c2), nn.SiLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.GroupNorm(_groups(c2), c2), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(config.dropout),
            nn.Linear(c2 * (config.image_size // 4) ** 2, config.features), nn.SiLU())
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.features, config.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expected images of shape (batch, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits. ``t`` and ``y`` are accepted (and ignored) so the training loop can call every net alike."""
        return self.head(self.features(x))


@dataclass(frozen=True)
class NoisyClassifierConfig:
    """Shape of a :class:`NoisyClassifier`: the :class:`Classifier`'s two conv blocks, each shifted by a time embedding."""

    image_size: int = 28
    in_channels: int = 1
    channels: tuple[int, int] = (32, 64)
    features: int = 128
    num_classes: int = 10
    time_dim: int = 64

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "NoisyClassifierConfig":
        return cls(**{**values, "channels": tuple(values.get("channels", cls.channels))})


class NoisyClassifier(nn.Module):
    r"""A classifier of noisy images :math:`p_\phi(c \mid x_t, t)`, as classifier guidance needs (Dhariwal & Nichol
    2021, who train it on :math:`x_t` at uniformly drawn steps). ``t`` is the network time (DDPM's step index), like
    :class:`UNet`'s; the time embedding is added to every conv block's output before its activation."""

    def __init__(self, config: NoisyClassifierConfig = NoisyClassifierConfig()):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        widths = [(config.in_channels, c1), (c1, c1), (c1, c2), (c2, c2)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in widths)
        self.norms = nn.ModuleList(nn.GroupNorm(_groups(b), b) for _, b in widths)
        self.time = nn.ModuleList(nn.Linear(config.time_dim, b) for _, b in widths)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * (config.image_size // 4) ** 2, config.features),
                                  nn.SiLU(), nn.Linear(config.features, config.num_classes))

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits of the noisy images ``x`` at network time ``t``; ``y`` is accepted and ignored."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expected images of shape (batch, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(x.shape)}")
        t, _ = checked_inputs(self, x, t, None, None)
        emb = F.silu(timestep_embedding(t, cfg.time_dim))
        h = x
        for i, (conv, norm, time) in enumerate(zip(self.convs, self.norms, self.time)):
            h = F.silu(norm(conv(h)) + time(emb)[:, :, None, None])
            if i % 2 == 1:
                h = F.max_pool2d(h, 2)
        return self.head(h)


def build_net(kind: str, config: dict) -> nn.Module:
    """Construct a network from its name (``"unet"``, ``"mlp"``, ``"flow_map_mlp"``, ``"flow_map_unet"``,
    ``"classifier"`` or ``"noisy_classifier"``) and a config dict."""
    if kind == "unet":
        return UNet(UNetConfig.from_dict(config))
    if kind == "mlp":
        return TimeMLP(MLPConfig(**config))
    if kind == "flow_map_mlp":
        return FlowMapMLP(MLPConfig(**config))
    if kind == "flow_map_unet":
        return FlowMapUNet(UNetConfig.from_dict(config))
    if kind == "classifier":
        return Classifier(ClassifierConfig.from_dict(config))
    if kind == "noisy_classifier":
        return NoisyClassifier(NoisyClassifierConfig.from_dict(config))
    raise ValueError(f"unknown network kind {kind!r}: expected 'unet', 'mlp', 'flow_map_mlp', "
                     "'flow_map_unet', 'classifier' or 'noisy_classifier'")


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
