"""The TensorFlow-free event writer (utils/tensorboard.py) against the official protocol buffers
(tensorboardX's compiled copies of tensorboard's event.proto / summary.proto) and the TFRecord framing."""

import io
import struct

import numpy as np
import pytest

from magdiff_jax.utils.tensorboard import EventWriter, crc32c, tfrecord

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")


def _records(path):
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        body = data[pos + 12: pos + 12 + n]
        assert tfrecord(body) == data[pos: pos + 16 + n]  # both CRCs as written
        out.append(event_pb2.Event.FromString(body))
        pos += 16 + n
    return out


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C (Castagnoli) check value
    assert crc32c(b"") == 0


def test_scalars_and_images_parse_as_tensorboard_events(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    with EventWriter(tmp_path) as tb:
        tb.scalars(3, {"loss": 0.25, "lr": 1e-4})
        tb.scalars(2**40, {"loss": -1.5})
        tb.image(7, "samples", image)
        with pytest.raises(ValueError, match="samples"):
            tb.image(8, "samples", image.astype(np.float32))
    (path,) = tmp_path.glob("events.out.tfevents.*")
    first, e1, e2, e3 = _records(path)
    assert first.file_version == "brain.Event:2" and first.wall_time > 0
    assert e1.step == 3 and {v.tag: v.simple_value for v in e1.summary.value} == {"loss": 0.25,
                                                                                   "lr": pytest.approx(1e-4)}
    assert e2.step == 2**40 and e2.summary.value[0].simple_value == -1.5
    img = e3.summary.value[0]
    assert e3.step == 7 and img.tag == "samples" and (img.image.height, img.image.width) == (5, 7)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(img.image.encoded_image_string))), image)
