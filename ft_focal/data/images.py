"""Reading one image as 8-bit RGB, with errors that name the file.

Every image source (split lists, image folders, Hugging Face datasets, arrays) goes through
`to_rgb`, so an image loads the same way in training, evaluation and `ft-focal check-data`:

* CMYK (JPEG), grayscale ("L", "1"), grayscale+alpha ("LA"), palette ("P", with or without
  transparency), RGBA, YCbCr: converted to RGB. Alpha is dropped, as torchvision's default
  loader and the reference codes (LIFT, Focal-SAM) do (`Image.convert("RGB")`).
* 16-bit / 32-bit integer grayscale ("I;16*", "I", as 16-bit PNGs open): scaled from the
  16-bit range to 8 bits (value / 257), not clipped (a plain `convert` would clip nearly every
  pixel to white). Float ("F"): values in [0, 1] are scaled by 255, otherwise clipped to 0..255.
* EXIF orientation is NOT applied (the reference codes do not; ImageNet / iNat lists assume it).

A missing, truncated or undecodable file raises `DataError` (a `UserError`) naming the file.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

from ft_focal.errors import UserError


class DataError(UserError):
    """A `UserError` about the data that stays one line when re-raised by a DataLoader worker.

    torch's DataLoader re-raises an exception from a worker process as
    `type(exc)("Caught DataError in DataLoader worker process 0.\\nOriginal Traceback ...")`,
    i.e. with the worker's traceback inside the message. This class recognises that form and
    keeps only the original one-line message, so the command line can still print one line.
    """

    def __init__(self, message: str = ""):
        message = str(message)
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = [line for line in message.strip().splitlines() if line.strip()][-1]
            prefix = f"{type(self).__name__}: "
            if prefix in last:
                message = last.split(prefix, 1)[1]
            else:  # pragma: no cover - defensive
                message = last
        super().__init__(message)


def _where(origin: str | None) -> str:
    return f" ({origin})" if origin else ""


_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I", "I;32", "I;32B", "I;32L")


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Convert any PIL image to 8-bit RGB (see the module docstring for each mode)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if np.nanmax(arr, initial=0.0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" or mode == "PA":
        # Going through RGBA avoids Pillow's warning about transparency in palette images.
        return img.convert("RGBA").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DataError(f"{name}: cannot convert image mode {mode} to RGB ({exc})") from None


def _why_unidentified(path: str) -> str | None:
    """Why Pillow rejected a file whose header a format plugin recognises, e.g. "TIFF: unknown
    pixel mode" for a float RGB or 2-channel TIFF; None if no plugin recognises it."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(16)
            Image.init()
            for fmt, (factory, accept) in list(Image.OPEN.items()):
                if accept is None or not accept(prefix):
                    continue
                handle.seek(0)
                try:
                    factory(handle, path)
                except Exception as exc:  # the plugin's own reason
                    return f"{fmt}: {' '.join(str(exc).split()) or type(exc).__name__}"
    except Exception:  # best effort only: fall back to the generic message
        return None
    return None


def open_rgb(path: str | os.PathLike, origin: str | None = None) -> Image.Image:
    """Open, fully decode and convert one image file to RGB.

    `origin` says where the path came from (e.g. "listed in train.txt line 12") and is added to
    error messages. Raises `DataError` for a missing, unreadable, truncated or corrupt file.
    """
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data", decompression bomb warning
            with Image.open(path) as img:
                img.load()
                return to_rgb(img, path)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found{_where(origin)}") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an image file{_where(origin)}") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied{_where(origin)}") from None
    except Image.UnidentifiedImageError:
        reason = _why_unidentified(path)
        if reason and "mode" in reason:
            raise DataError(f"{path}: unsupported image mode ({reason}; convert it to 8-bit RGB){_where(origin)}") from None
        if reason:
            raise DataError(f"{path}: corrupt image ({reason}){_where(origin)}") from None
        raise DataError(f"{path}: not a readable image (unknown or corrupt format){_where(origin)}") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image too large ({exc}){_where(origin)}") from None
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if "truncated" in text:
            text = "truncated image file (" + text + ")"
        raise DataError(f"{path}: corrupt image ({text}){_where(origin)}") from None


def array_to_pil(arr, name: str = "image") -> Image.Image:
    """An HWC / HW numpy array (uint8, or floats in [0, 1]) as an RGB PIL image."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise DataError(f"{name}: expected an image array of shape HxW or HxWxC, got {arr.shape}")
    return to_rgb(Image.fromarray(arr), name)
