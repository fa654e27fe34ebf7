"""TensorBoard event files without TensorFlow: scalars and images, written by process 0 of a run.

    with EventWriter(workdir / "tensorboard") as tb:
        tb.scalars(step, {"loss": 0.12, "lr": 1e-4})
        tb.image(step, "samples", uint8_hwc_image)

An event file is a sequence of TFRecords (little-endian uint64 length, masked CRC-32C of the length, the bytes,
masked CRC-32C of the bytes), each holding one serialized `tensorflow.Event` protocol buffer. The few message
fields used here are encoded by hand (field numbers from tensorboard's event.proto and summary.proto):

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; Image image = 4; }
    Image   { int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4; }

tests/test_tensorboard.py parses the files with the official message classes (tensorboardX's copies).
"""

from __future__ import annotations

import io
import os
import socket
import struct
import time

import numpy as np

from magdiff_jax.utils.files import GrowingFile, as_path


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


# --- protocol-buffer wire format: varints, tagged fields ------------------------------------------------------------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s are ten-byte two's complement
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _field_double(number: int, value: float) -> bytes:
    return _varint(number << 3 | 1) + struct.pack("<d", value)


def _field_float(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def _event(step: int | None = None, *, summary: bytes | None = None, file_version: str | None = None) -> bytes:
    msg = _field_double(1, time.time())
    if step is not None:
        msg += _field_varint(2, int(step))
    if file_version is not None:
        msg += _field_bytes(3, file_version.encode())
    if summary is not None:
        msg += _field_bytes(5, summary)
    return msg


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buf, format="PNG")
    return buf.getvalue()


class EventWriter:
    """Appends events to a new `events.out.tfevents.<time>.<host>.<pid>` file in `logdir` (local or in an object
    store: `utils.files.GrowingFile`); every write is flushed, so a killed run keeps what it logged (TensorBoard
    reads all the files of a folder, and rereads a file that grew)."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = as_path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.logdir / name
        self._file = GrowingFile(self.path)
        self._write(_event(file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._file.append(tfrecord(event))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = b"".join(_field_bytes(1, _field_bytes(1, tag.encode()) + _field_float(2, float(v)))
                           for tag, v in values.items())
        self._write(_event(step, summary=summary))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A uint8 (H, W, 3) image, stored as PNG."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image {tag!r}: expected uint8 (H, W, 1|3|4), got {image.dtype} {image.shape}")
        h, w, c = image.shape
        img = (_field_varint(1, h) + _field_varint(2, w) + _field_varint(3, c)
               + _field_bytes(4, png_bytes(image[..., 0] if c == 1 else image)))
        self._write(_event(step, summary=_field_bytes(1, _field_bytes(1, tag.encode()) + _field_bytes(4, img))))

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
