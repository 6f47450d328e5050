"""Model configurations by name: the nine released classification models, small test models, the bundled ones.

A config carries its own input definition (size, mean/std, labels), as timm's pretrained cfgs do, so the same
preprocessing is applied at export, calibration, validation and in the runtime loader.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

# InputSpec is runtime-side data (the loader reads it from manifests without torch); re-exported here.
from ..input_spec import DIGITS_LABELS, SHAPES_LABELS, InputSpec
from ..input_spec import IMAGENET_MEAN as IMAGENET_MEAN
from ..input_spec import IMAGENET_STD as IMAGENET_STD


@dataclass(frozen=True)
class VMambaConfig:
    name: str
    version: str  # "v0": channel-last, z-gated, no MLP; "v2": channel-first, no z, MLP branch
    depths: tuple[int, ...]
    dims: int
    ssm_ratio: float
    d_state: int
    num_classes: int = 1000
    in_chans: int = 3
    mlp_ratio: float = 0.0
    description: str = ""
    input: InputSpec = field(default_factory=InputSpec)
    published_top1: float | None = None
    # What the model outputs (models/dense.py): "classification" (logits), "backbone" (four feature maps, strides
    # 4..32) or "segmentation" (UperNet per-pixel logits at the input size; num_classes and labels are its classes).
    task: str = "classification"
    out_norm: str = ""  # backbone out-norms: "ln2d", "ln" or "bn"; "" the official default (v2 "ln2d", v0 "ln")
    head_channels: int = 512  # UPerHead width (segmentation)
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)  # UPerHead pyramid pooling (segmentation)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.dims * 2**i for i in range(len(self.depths)))

    @property
    def d_inner(self) -> tuple[int, ...]:
        return tuple(int(self.ssm_ratio * c) for c in self.widths)

    @property
    def dt_rank(self) -> tuple[int, ...]:
        return tuple(math.ceil(c / 16) for c in self.widths)

    @property
    def min_input_size(self) -> int:
        """Smallest input side the stem and the downsamplings take (every stage keeps at least one position)."""
        return 4 if self.version == "v0" else 3

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depths"] = list(self.depths)
        d["pool_scales"] = list(self.pool_scales)
        return d

    def with_overrides(self, **overrides) -> VMambaConfig:
        if "input" in overrides and isinstance(overrides["input"], dict):
            overrides["input"] = InputSpec.from_dict(overrides["input"])
        return replace(self, **overrides)

    @staticmethod
    def from_dict(d: dict) -> VMambaConfig:
        d = dict(d)
        inp = d.pop("input", {}) or {}
        for key in ("mean", "std"):
            if key in inp:
                inp[key] = tuple(inp[key])
        if inp.get("labels") is not None:
            inp["labels"] = tuple(inp["labels"])
        d["depths"] = tuple(d["depths"])
        if "pool_scales" in d:
            d["pool_scales"] = tuple(d["pool_scales"])
        return VMambaConfig(input=InputSpec(**inp), **d)


def _v0(name: str, depths, dims, top1, **kw) -> VMambaConfig:
    return VMambaConfig(name, "v0", tuple(depths), dims, 2.0, 16, published_top1=top1, **kw)


def _v2(name: str, depths, dims, ssm_ratio, top1, **kw) -> VMambaConfig:
    return VMambaConfig(name, "v2", tuple(depths), dims, ssm_ratio, 1, mlp_ratio=4.0, published_top1=top1, **kw)


# The digits images are 8x8 grey; upscaled to 32x32, three stages give maps 8, 4, 2 (every stage keeps >= 2 positions
# a side, which dynamic-shape export needs).
DIGITS_INPUT = InputSpec(
    image_size=32, resize=32, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), labels=DIGITS_LABELS
)

# mmseg's ADE20K inference (ARCHITECTURE.md, "Segmentation releases"): the image resized keeping its ratio, no crop,
# ImageNet mean and std (mmseg's 0-255 values divided by 255).
SEGMENTATION_INPUT = InputSpec(image_size=512, resize=512, interpolation="bilinear", crop=False)
TASKS = ("classification", "backbone", "segmentation")

# The generated 64x64 shapes scenes (data/segmentation_sources.py): no resize at 64, every pixel classified.
SHAPES_INPUT = InputSpec(
    image_size=64,
    resize=64,
    interpolation="bilinear",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    labels=SHAPES_LABELS,
    crop=False,
)


def _upernet(name: str, depths, dims, ssm_ratio, **kw) -> VMambaConfig:
    return _v2(
        name,
        depths,
        dims,
        ssm_ratio,
        None,
        num_classes=150,
        task="segmentation",
        out_norm="ln2d",
        input=SEGMENTATION_INPUT,
        **kw,
    )


def as_segmenter(cfg: VMambaConfig, **fields) -> VMambaConfig:
    """`cfg` with task segmentation (and `fields`). A classification or backbone config becoming a segmenter also
    takes the official segmentation input (512, ratio kept, no crop) and ADE20K's 150 classes, unless `fields` give
    them: a classifier's 224 centre crop would leave the image's borders unlabelled."""
    if cfg.task != "segmentation":
        fields = {"input": SEGMENTATION_INPUT, "num_classes": 150, **fields}
    return cfg.with_overrides(task="segmentation", **fields)


_CONFIGS: dict[str, VMambaConfig] = {
    c.name: c
    for c in [
        _v0("vanilla_vmamba_tiny", (2, 2, 9, 2), 96, 82.2, description="VMamba v0 tiny (d_state 16)"),
        _v0("vanilla_vmamba_small", (2, 2, 27, 2), 96, 83.5, description="VMamba v0 small (d_state 16)"),
        _v0("vanilla_vmamba_base", (2, 2, 27, 2), 128, 83.7, description="VMamba v0 base (d_state 16)"),
        _v2("vmamba_tiny_s2l5", (2, 2, 5, 2), 96, 2.0, 82.5, description="VMamba v2 tiny, ssm_ratio 2"),
        _v2("vmamba_small_s2l15", (2, 2, 15, 2), 96, 2.0, 83.6, description="VMamba v2 small, ssm_ratio 2"),
        _v2("vmamba_base_s2l15", (2, 2, 15, 2), 128, 2.0, 83.9, description="VMamba v2 base, ssm_ratio 2"),
        _v2("vmamba_tiny_s1l8", (2, 2, 8, 2), 96, 1.0, 82.6, description="VMamba v2 tiny, ssm_ratio 1"),
        _v2("vmamba_small_s1l20", (2, 2, 20, 2), 96, 1.0, 83.3, description="VMamba v2 small, ssm_ratio 1"),
        _v2("vmamba_base_s1l20", (2, 2, 20, 2), 128, 1.0, 83.8, description="VMamba v2 base, ssm_ratio 1"),
        # The official UperNet segmenters (segmentation/configs/vssm1, ADE20K 150 classes).
        _upernet("upernet_vssm_tiny", (2, 2, 8, 2), 96, 1.0, description="UperNet + VMamba v2 tiny (ADE20K)"),
        _upernet("upernet_vssm_small", (2, 2, 15, 2), 96, 2.0, description="UperNet + VMamba v2 small (ADE20K)"),
        _upernet("upernet_vssm_base", (2, 2, 15, 2), 128, 2.0, description="UperNet + VMamba v2 base (ADE20K)"),
        # Small configs for tests: same blocks, few and narrow.
        _v0("vmamba_test_v0", (1, 1, 2, 1), 16, None, num_classes=10, description="test config, v0 style, d_state 16"),
        _v2(
            "vmamba_test_v2",
            (1, 1, 2, 1),
            16,
            2.0,
            None,
            num_classes=10,
            description="test config, v2 style, d_state 1",
        ),
        # The bundled trained models (vmamba_export/weights/), trained on scikit-learn's digits.
        _v2(
            "vmamba_digits_v2",
            (1, 2, 1),
            32,
            2.0,
            None,
            num_classes=10,
            input=DIGITS_INPUT,
            description="bundled: trained on digits, v2 style, d_state 1",
        ),
        _v0(
            "vmamba_digits_v0",
            (1, 2, 1),
            32,
            None,
            num_classes=10,
            input=DIGITS_INPUT,
            description="bundled: trained on digits, v0 style, d_state 16",
        ),
        # The bundled segmenter, trained on the generated shapes scenes (scripts/train_segmenter.py). dims 16 with
        # ssm_ratio 1 and mlp_ratio 2 keeps the weights under 2 MB: v2's 3x3 stride-2 downsampling convs dominate the
        # parameters (dims 24 came to 2.8-4.8 MB), and the shapes need no more width.
        VMambaConfig(
            "vmamba_shapes_seg",
            "v2",
            (1, 1, 2, 1),
            16,
            1.0,
            1,
            num_classes=len(SHAPES_LABELS),
            mlp_ratio=2.0,
            input=SHAPES_INPUT,
            task="segmentation",
            out_norm="ln2d",
            head_channels=32,
            pool_scales=(1, 2, 3, 6),
            description="bundled: UperNet segmenter trained on generated shapes, v2 style, d_state 1",
        ),
    ]
}

RELEASED_MODELS = tuple(n for n, c in _CONFIGS.items() if c.published_top1 is not None)
DEFAULT_MODEL = "vmamba_digits_v2"
DEFAULT_SEGMENTATION_MODEL = "vmamba_shapes_seg"  # the default for --task segmentation (bundled, trained)


def list_configs() -> list[VMambaConfig]:
    return list(_CONFIGS.values())


def get_config(name: str) -> VMambaConfig:
    from ..errors import UnknownModelError

    try:
        return _CONFIGS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(_CONFIGS)}") from None
