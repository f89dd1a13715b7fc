"""`--decode device`: the pipeline ships JPEG bytes and the augmentation drawn on the CPU; each
training worker decodes and augments its batch on its own device (nvJPEG on a GPU, batched).

    ds = read_split(root, "train", "imagenet_train", order="rows", decode="device")   # rows of ship_batch
    decoder = Decoder("imagenet_train", (224, 224, 3), device=torch.device("cuda"))
    for batch in decoder.batches(shard, batch_size=256, drop_last=True):
        x, y = batch["image"], batch["label"]   # uint8 NHWC and int64 on the device, as iter_torch_batches gives

For nodes short of CPUs: Pillow's decode and resize are most of the pipeline's CPU time, and a GPU
decodes a batch of JPEGs in milliseconds. What stays on the CPU is cheap: the JPEG header (for
the image's size), the random draws, and the rows that are not JPEG (PNG, CMYK JPEG), which are
transformed there exactly as `--decode pipeline` does and shipped as pixels.

ship_batch draws the crop box, flip and colours with the same rng calls, in the same order, as
the CPU transform (transforms.TRANSFORMS), so both paths make the same augmentation from the same
rng; the pixels differ by JPEG decoder rounding only: Pillow decodes a JPEG whose crop shrinks 2x
or more at a reduced DCT scale (draft mode), the worker always decodes it whole (nvJPEG has no
reduced scale), then both resize with antialiased bilinear.

A row is dropped, and counted in the job's skipped-rows counter like the pipeline's, when its
JPEG header does not parse or its label is not a class (in ship_batch), or when neither
torchvision nor Pillow can decode it in the worker (in Decoder). Nothing raises out of a worker
for one bad image: see pipeline's "Bad rows".
"""

import io
import warnings

import numpy as np
import torch
from PIL import Image

from .images import to_mode
from .transforms import EIGVAL, EIGVEC, GREY, TRANSFORMS, color_draws, random_resized_crop_box

# The train transforms the worker can do: a crop box, a flip, and for imagenet_train the colours.
# cifar_train (a zero-padded shift of a 32x32 PNG) gains nothing from a GPU decoder.
DEVICE_TRANSFORMS = ("imagenet_train", "imagenet_train_crop_flip", "none")
# params: top, left, height, width (stored-image pixels), flip (0/1), then for imagenet_train the
# colour factors (brightness, contrast, saturation) and the lighting alphas.
N_PARAMS = {"imagenet_train": 11, "imagenet_train_crop_flip": 5, "none": 5}
# What Pillow raises for a header it cannot read.
HEADER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, Image.DecompressionBombError)


def ship_batch(images, known, *, transform, size, mode, rng):
    """The device-mode columns of one batch of encoded `images` (pipeline.decode_batch calls it for
    --decode device; rows where `known` is False, a label outside the classes, are left out):
    ({"data": the JPEG's bytes, or the pixels of a row transformed here (not JPEG), "jpeg": bool,
    "params": float32 (N, N_PARAMS)}, kept rows (bool), {row: reason} of the other rows whose
    header does not parse). The draws come from `rng` as the transform's own would."""
    fn, n = TRANSFORMS[transform], N_PARAMS[transform]
    rows = len(images)
    data, jpeg, params = np.empty(rows, object), np.zeros(rows, bool), np.zeros((rows, n), np.float32)
    keep, dropped = known.copy(), {}
    for i, encoded in enumerate(images):
        if not known[i]:
            continue
        try:
            img = Image.open(io.BytesIO(encoded))   # the header only: no pixels are decoded here
            # CMYK and other modes: Pillow converts them (nvJPEG refuses CMYK).
            if img.format != "JPEG" or img.mode not in ("L", "RGB"):
                data[i] = np.ascontiguousarray(fn(encoded, size, rng, mode)).tobytes()
                continue
            params[i] = _draw(transform, img.width, img.height, rng, n)
        except HEADER_ERRORS as e:
            keep[i] = False
            dropped[i] = f"image does not decode ({type(e).__name__}: {str(e)[:120]})"
            continue
        data[i], jpeg[i] = bytes(encoded), True
    return {"data": data, "jpeg": jpeg, "params": params}, keep, dropped


def _draw(transform, width, height, rng, n):
    """The transform's draws for one image of width x height, in its order (transforms.py)."""
    out = np.zeros(n, np.float32)
    if transform == "none":
        out[:4] = 0, 0, height, width
        return out
    out[:4] = random_resized_crop_box(width, height, rng)
    out[4] = rng.random() < 0.5
    if transform == "imagenet_train":
        out[5:8], out[8:11] = color_draws(rng)
    return out


class Decoder:
    """ship_batch's rows -> uint8 NHWC images and int64 labels on `device`.

    transform: a DEVICE_TRANSFORMS key; shape: the (H, W, C) the transform makes (pipeline's
    output_shape); on_skip(n, notes): where rows that cannot be decoded are counted (the job's
    skipped-rows counter). `counts` holds the rows decoded so far: "jpeg" (by torchvision on the
    device), "pillow" (JPEGs torchvision refused, decoded by Pillow here), "pipeline" (rows the
    pipeline transformed), "skipped".
    """

    def __init__(self, transform, shape, device="cpu", on_skip=None):
        if transform not in DEVICE_TRANSFORMS:
            raise ValueError(f"transform {transform!r}: device decoding does {', '.join(DEVICE_TRANSFORMS)}")
        self.transform, self.shape, self.device = transform, tuple(shape), torch.device(device)
        self.on_skip = on_skip
        self.counts = {"jpeg": 0, "pillow": 0, "pipeline": 0, "skipped": 0}
        self._taken = 0

    def take(self):
        """JPEG rows decoded here (by torchvision or Pillow) since the last take()."""
        done = self.counts["jpeg"] + self.counts["pillow"]
        taken, self._taken = done - self._taken, done
        return taken

    def batches(self, shard, **options):
        """Decoded batches of `shard` (a DataIterator; `options` for its iter_batches), in the
        caller's thread, so a GPU's work stays on the training stream."""
        for batch in shard.iter_batches(batch_format="numpy", **options):
            yield self(batch)

    def __call__(self, batch):
        """One numpy batch of ship_batch's rows -> {"image": uint8 (N, H, W, C), "label": int64 (N,)}
        on the device (and the rows' "row" ids, on the CPU, when they have them), in the batch's
        order; rows that decode nowhere are left out (and counted)."""
        jpeg = np.asarray(batch["jpeg"], bool)
        at, dev = np.flatnonzero(jpeg), self.device
        images, failed = self._decode([batch["data"][i] for i in at])
        ok = np.setdiff1d(np.arange(len(at)), failed)
        # NHWC, contiguous: channels_last in memory, as the pipeline's batches are (what Prepare takes).
        out = torch.empty((len(jpeg), *self.shape), dtype=torch.uint8, device=dev)
        if len(ok):
            crops = self._augment([images[j] for j in ok], np.asarray(batch["params"])[at[ok]])
            out[torch.as_tensor(at[ok], device=dev)] = crops.permute(0, 2, 3, 1)
        if len(cpu := np.flatnonzero(~jpeg)):   # transformed in the pipeline: HWC pixels
            pixels = np.stack([np.frombuffer(batch["data"][i], np.uint8) for i in cpu]).reshape(len(cpu), *self.shape)
            out[torch.as_tensor(cpu, device=dev)] = torch.from_numpy(pixels).to(dev)
            self.counts["pipeline"] += len(cpu)
        labels = torch.from_numpy(np.array(batch["label"], np.int64))   # a copy: Ray's arrays are read-only
        ids = {"row": torch.from_numpy(np.array(batch["row"], np.int64))} if "row" in batch else {}  # row_ids: CPU
        if not failed:
            return {"image": out, "label": labels.to(dev, non_blocking=True), **ids}
        self._skip(batch, at[failed])
        keep = np.ones(len(jpeg), bool)
        keep[at[failed]] = False
        return {"image": out[torch.as_tensor(keep, device=dev)], "label": labels[torch.from_numpy(keep)].to(dev),
                **{k: v[torch.from_numpy(keep)] for k, v in ids.items()}}

    def _decode(self, blobs):
        """(CHW uint8 tensors on the device, positions that neither torchvision nor Pillow decodes).
        One batched call; when it fails (it returns nothing then), each image alone, then Pillow."""
        mode = _READ_MODE[self.shape[2]]
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        if not tensors:
            return [], []
        try:
            images = _decode_jpeg(tensors, mode, self.device)
            self.counts["jpeg"] += len(images)
            return images, []
        except RuntimeError:
            pass
        images, failed = [], []
        for j, t in enumerate(tensors):
            try:
                images.append(_decode_jpeg([t], mode, self.device)[0])
                self.counts["jpeg"] += 1
                continue
            except RuntimeError:
                pass
            try:
                images.append(self._pillow(blobs[j]))
                self.counts["pillow"] += 1
            except HEADER_ERRORS:
                images.append(None)
                failed.append(j)
        return images, failed

    def _pillow(self, blob):
        img = to_mode(Image.open(io.BytesIO(blob)), "L" if self.shape[2] == 1 else "RGB")
        a = np.asarray(img).reshape(img.height, img.width, -1)
        return torch.from_numpy(a.copy()).permute(2, 0, 1).to(self.device)

    def _augment(self, images, params):
        """Crop each image to its box, resize to the output size, flip, colour: (N, C, H, W) uint8."""
        hw = self.shape[:2]
        out = torch.stack([_resize(img[:, int(t):int(t + h), int(l_):int(l_ + w)], hw)
                           for img, (t, l_, h, w) in zip(images, params[:, :4])])
        if self.transform == "imagenet_train":
            out = color_jitter_lighting(out, torch.tensor(params[:, 5:8]), torch.tensor(params[:, 8:11]))
        flip = torch.from_numpy(params[:, 4] > 0.5).to(self.device)
        return torch.where(flip[:, None, None, None], out.flip(-1), out)

    def _skip(self, batch, rows):
        self.counts["skipped"] += len(rows)
        if self.on_skip is None:
            return
        keys = batch.get("key")
        notes = [(f"key {str(keys[i])[:200]}" if keys is not None else f"row {i} of a batch")
                 + ": JPEG does not decode in the training worker (torchvision nor Pillow), skipped" for i in rows]
        self.on_skip(len(rows), notes)


_READ_MODE = {1: "GRAY", 3: "RGB"}


def _decode_jpeg(tensors, mode, device):
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():   # torchvision 0.29 deprecates its decoders for TorchCodec's
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(tensors, mode=ImageReadMode[mode], device=device)


def _resize(img, hw):
    """Antialiased bilinear resize of one CHW uint8 image, as transforms._resize: torch's uint8
    kernel on the CPU (the same arithmetic, so the same pixels); float and round elsewhere (CUDA has
    no uint8 antialiased kernel)."""
    if tuple(img.shape[1:]) == tuple(hw):
        return img
    x = img.unsqueeze(0)
    if img.device.type != "cpu":
        x = x.float()
    y = torch.nn.functional.interpolate(x, size=tuple(hw), mode="bilinear", antialias=True, align_corners=False)
    if y.dtype != torch.uint8:
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y[0]


def color_jitter_lighting(x, factors, alpha):
    """transforms.color_jitter_lighting on a batch: uint8 (N, C, H, W), factors and alpha (N, 3).
    The same affine map p -> M @ p + b per image, in float32, rounded (+0.5, truncated) and
    clipped as there."""
    n, c = x.shape[:2]
    dev = x.device
    factors, alpha = factors.to(dev, torch.float64), alpha.to(dev, torch.float64)
    grey = torch.tensor(GREY if c == 3 else [1.0], dtype=torch.float64, device=dev)
    flat = x.reshape(n, c, -1)
    mean_grey = (flat.sum(-1, dtype=torch.float64) @ grey) / flat.shape[-1]
    brightness, contrast, saturation = factors.unbind(1)
    eye, ones_grey = torch.eye(c, dtype=torch.float64, device=dev), torch.ones(c, 1, dtype=torch.float64, device=dev) * grey
    m = (brightness * contrast)[:, None, None] * (saturation[:, None, None] * eye
                                                   + (1 - saturation)[:, None, None] * ones_grey)
    b = (brightness * (1 - contrast) * mean_grey)[:, None].expand(n, c)
    if c == 3:
        eigvec, eigval = (torch.tensor(a, dtype=torch.float64, device=dev) for a in (EIGVEC, EIGVAL))
        b = b + 255 * (alpha * eigval) @ eigvec.T
    y = torch.bmm(m.float(), flat.float()) + (b + 0.5).float()[:, :, None]
    return y.clamp_(0, 255).to(torch.uint8).reshape(x.shape)
