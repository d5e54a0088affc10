"""Reading images and masks into tensors.

Images load as RGB float (3, H, W) in [0, 1] at a chosen square size: grayscale becomes 3 channels, alpha is
dropped, 16-bit images are scaled by 65535. Masks load as (1, H, W) float {0, 1}, binarised at 0.5 after resizing.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from adkit.core.errors import AdkitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageReadError(AdkitError):
    """An image or mask file that cannot be read (corrupt, truncated, empty, or not an image)."""


class ImageTooLarge(ImageReadError):
    """An upload whose header declares more pixels than allowed (refused before decoding)."""


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _pixels(img: Image.Image) -> np.ndarray:
    """A decoded PIL image as float32 (H, W) or (H, W, 3) in [0, 1]."""
    img.load()
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
    if mode == "I":
        raw = np.asarray(img, dtype=np.int64)
        scale = 65535.0 if raw.max(initial=0) > 255 else 255.0
        return raw.astype(np.float32) / scale
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return arr / 255.0 if arr.max(initial=0) > 1.0 else arr
    if mode in ("L", "1"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if mode == "LA":
        return np.asarray(img.getchannel(0), dtype=np.float32) / 255.0
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _read_array(path: Path) -> np.ndarray:
    """Decode to float32 (H, W, C) in [0, 1] with C in {1, 3}."""
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: empty file; remove it or pass --skip-bad")
        with Image.open(path) as img:
            arr = _pixels(img)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc}); fix or remove it, or pass --skip-bad") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.clip(arr, 0.0, 1.0)


def decode_image(data: bytes, name: str, max_pixels: int) -> torch.Tensor:
    """Image bytes (an upload) -> RGB float (3, H, W) in [0, 1], as ``load_image`` reads files. The size is read
    from the header first: more than ``max_pixels`` pixels is refused before anything is decoded (no
    decompression bombs). Unreadable, truncated or empty data raise ImageReadError naming ``name``."""
    if not data:
        raise ImageReadError(f"{name}: empty upload")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{name}: {width}x{height} px is more than the {max_pixels:,} pixels allowed")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                arr = _pixels(img)
    except ImageReadError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):  # PIL's own limit, read from the header
        raise ImageTooLarge(f"{name}: the image header declares more than the {max_pixels:,} pixels allowed") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: not a readable image ({type(exc).__name__})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(np.clip(arr, 0.0, 1.0))).permute(2, 0, 1)
    return (tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor).contiguous()


def _resize(tensor: torch.Tensor, size: int | tuple[int, int] | None) -> torch.Tensor:
    if size is None:
        return tensor
    hw = (size, size) if isinstance(size, int) else size
    if tuple(tensor.shape[-2:]) == hw:
        return tensor
    return F.interpolate(tensor[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]


def load_image(path: Path, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """RGB float tensor (3, H, W) in [0, 1], resized to ``size`` (side or (H, W)) when given."""
    arr = _read_array(Path(path))
    tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return _resize(tensor.contiguous(), size).clamp_(0.0, 1.0)


def load_mask(path: Path, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Binary float mask (1, H, W): any channel's intensity > 0.5 of the range after resizing."""
    arr = _read_array(Path(path)).max(axis=2, keepdims=True)
    tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return (_resize(tensor, size) > 0.5).float()


def save_image(tensor: torch.Tensor, path: Path) -> None:
    """Write (3, H, W) or (1, H, W) / (H, W) float in [0, 1] as an 8-bit PNG or JPEG."""
    t = tensor.detach().float().cpu().clamp(0, 1)
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    arr = (t.numpy() * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3:
        arr = arr.transpose(1, 2, 0)
    Image.fromarray(arr).save(path)
