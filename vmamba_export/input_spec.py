"""How an image becomes a model's input tensor: plain data, shared by the builder (models/configs.py) and the runtime
(the loader reads it back from the manifest). Runtime side: imports nothing but the standard library."""

from __future__ import annotations

from dataclasses import asdict, dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_LABELS = tuple(str(i) for i in range(10))
# Classes of the generated shapes scenes (data/segmentation_sources.py), the bundled segmenter's labels.
SHAPES_LABELS = ("background", "disc", "square", "triangle", "ring")


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the model's input tensor (NCHW float32, RGB)."""

    image_size: int = 224  # side of the square centre crop fed to the model
    resize: int = 256  # shorter side is resized to this before the crop (224 / 0.875)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    labels: tuple[str, ...] | None = None  # None: "class_<i>"
    # False (segmentation): the shorter side is resized to image_size keeping the ratio and nothing is cropped, so
    # every pixel gets a class; `resize` is then unused.
    crop: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> InputSpec:
        """The inverse of to_dict (JSON lists back to tuples), e.g. a manifest's input.preprocessing."""
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        if d.get("labels") is not None:
            d["labels"] = tuple(d["labels"])
        return InputSpec(**d)
