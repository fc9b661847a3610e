"""`data.decode=device`: image-folder JPEGs travel as their file bytes and are decoded in batches
where the batch lands (nvJPEG on a GPU).

    data.name=imagefolder data.root=/data/e4 data.decode=device

The engine calls the dataset's `device_decode(device)` (toolkit.data.imagefolder) instead of
`device_items()`. Then, in a worker, `read_for_device` hands out an 8-bit JPEG as its file bytes
and decodes anything else as toolkit.data.images does; `collate_for_device` packs a batch into
two tensors (EncodedBatch: the bytes end to end, the decoded images stacked) and `DeviceDecode`
decodes its JPEGs in one `torchvision.io.decode_jpeg` call for the training device, resizes and
crops them there with the workers' `resize_crop`, and normalises the batch. On the CPU both
paths give identical pixels (tests/test_device_decode.py).
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image

from toolkit.data.images import IMAGENET, decode_encoded, pil_tensor, read_encoded, resize_crop


def decode_jpeg(data, device: torch.device):
    """torchvision.io.decode_jpeg to RGB: one (B,) uint8 tensor or a list of them. torchvision is
    imported on first use, not with this module (which every image-folder run imports): a run
    that does not decode on the device does not pay its ~1.5 s import."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as torchvision_decode_jpeg

    return torchvision_decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def read_for_device(path: str, image_size: int) -> torch.Tensor:
    """`data.decode=device`, in the worker: an 8-bit JPEG (L, RGB) comes back as its file bytes,
    (B,) uint8, to be decoded where the batch lands (`DeviceDecode`); any other file is decoded
    and resized here, (3, S, S) uint8, as `load_resized` does (the file is read once either way)."""
    fmt, x = read_encoded(path)
    if fmt == "JPEG":
        return x
    return resize_crop(x if fmt is None else decode_encoded(fmt, x, path), image_size)


class EncodedBatch:
    """A batch of `read_for_device` items in two tensors: the JPEGs' bytes end to end, (T,) uint8,
    and the images the workers decoded, (M, 3, S, S) uint8, with where each sits in the batch.
    Two storages whatever the batch size: a worker shares each storage with the main process
    through one file descriptor, and one per image runs out of them at batch 256 with a few
    workers. Neither the DataLoader's pinning nor Accelerate's move to the device looks inside
    (no `to`/`pin_memory`), so the bytes stay on the host, where decode_jpeg wants its input; with
    `split_batches` each rank's loader collates its own slice, so nothing slices it either."""

    def __init__(self, jpeg: torch.Tensor, jpeg_sizes: list[int], jpeg_at: list[int],
                 images: torch.Tensor, images_at: list[int]):
        self.jpeg, self.jpeg_sizes, self.jpeg_at = jpeg, jpeg_sizes, jpeg_at  # (T,) uint8
        self.images, self.images_at = images, images_at  # (M, 3, S, S) uint8

    def __len__(self) -> int:
        return len(self.jpeg_at) + len(self.images_at)


def collate_for_device(batch):
    """[(item, label)] -> (EncodedBatch, (N,) int64)."""
    xs = [x for x, _ in batch]
    jpeg_at = [i for i, x in enumerate(xs) if x.ndim == 1]
    images_at = [i for i, x in enumerate(xs) if x.ndim == 3]
    jpeg = torch.cat([xs[i] for i in jpeg_at]) if jpeg_at else torch.empty(0, dtype=torch.uint8)
    images = (torch.stack([xs[i] for i in images_at]) if images_at
              else torch.empty((0, 3, 1, 1), dtype=torch.uint8))
    return (EncodedBatch(jpeg, [xs[i].numel() for i in jpeg_at], jpeg_at, images, images_at),
            torch.stack([y for _, y in batch]))


class DeviceDecode:
    """`data.decode=device`: EncodedBatch -> (N, 3, S, S) float32 on `device`, ImageNet-normalised.
    The JPEGs of a batch go to one `torchvision.io.decode_jpeg` call for `device` (on a GPU:
    nvJPEG; torchvision parses headers on the host and, for progressive JPEGs or GPUs without a
    hardware JPEG engine, Huffman-decodes there too, and the call returns once the batch is
    decoded), then each is resized and centre-cropped on the device with the workers'
    `resize_crop` and placed beside the images the workers decoded. A batch the batched call
    refuses is decoded image by image, and an image torchvision refuses by Pillow."""

    def __init__(self, image_size: int, device: torch.device):
        self.image_size = image_size
        self.device = torch.device(device)

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor:
        try:
            return decode_jpeg(data, device=self.device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
                return pil_tensor(im.convert("RGB")).to(self.device)

    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        """[(B_i,) uint8 on the host] -> [(3, H_i, W_i) uint8 on the device]."""
        if self.device.type == "cuda":
            # torchvision's batched GPU decoder allocates its outputs on our stream but writes them
            # on its own without waiting for ours: memory that kernels queued on our stream still
            # read could be overwritten. Let our stream finish first (the decode blocks anyway).
            torch.cuda.current_stream(self.device).synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            try:
                return decode_jpeg(datas, device=self.device)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                return [self._decode_one(d) for d in datas]

    def __call__(self, x) -> torch.Tensor:
        if isinstance(x, torch.Tensor):  # already decoded: (N, 3, S, S) uint8
            return IMAGENET(x.to(self.device, non_blocking=True))
        s = self.image_size
        out = torch.empty((len(x), 3, s, s), dtype=torch.uint8, device=self.device)  # (N, 3, S, S)
        if x.images_at:
            out[x.images_at] = x.images.to(self.device, non_blocking=True)
        if x.jpeg_at:
            datas = list(torch.split(x.jpeg, x.jpeg_sizes))  # contiguous views, one per file
            for i, img in zip(x.jpeg_at, self._decode(datas)):  # img: (3, H, W) uint8 on the device
                out[i] = resize_crop(img, s)
        return IMAGENET(out)
