"""Readers for the datasets people have: each returns a Source listing (key, label, payload) per split.

    src = imagenet("/datasets/ILSVRC2012")      # train/n01440764/*.JPEG, val/*.JPEG + label files
    src = imagefolder("/datasets/flowers")      # SPLIT/CLASS/*.jpg; channels: 1 if every image is grey, else 3
    src = cifar("cifar-10-python.tar.gz", 10); src = svhn("/datasets/svhn"); src = digits()

A payload is a local file path (read inside the conversion task, so I/O scales with the cluster)
or a uint8 HxWxC array (CIFAR, SVHN, digits). Structural problems raise DataError here, before
any conversion starts; problems with single images are found later and rejected row by row.
"""

import csv
import os
import pickle
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from .manifest import DataError
from .walk import NotRegular, Skip, Tree, check_regular

# Pillow modes of one grey band, with or without alpha: 1-bit, 8-bit, 16-bit, 32-bit int, float.
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class Item(NamedTuple):
    key: str        # the source path relative to SRC, or "file[index]" for array datasets
    label: int
    payload: object  # str: a file to read; np.ndarray: pixels


@dataclass
class Source:
    name: str
    wnids: list      # stable class ids in label order
    classes: list    # display names in label order
    splits: dict     # split name -> [Item]
    channels: int = 3


def imagefolder(src, splits=None, channels="auto"):
    """SRC/<split>/<class>/<file>: every split's classes must be among train's (labels = sorted train).
    channels: 1 (grayscale) or 3 (RGB) to convert every image to, or "auto": 1 when every image of
    the splits read is grayscale (a mode in GREY_MODES), else 3; see grey_only."""
    if channels not in ("auto", 1, 3):
        raise DataError(f"channels {channels!r}: expected 'auto', 1 or 3")
    src = _dir(src)
    names = splits or sorted(d for d in os.listdir(src) if _visible(d) and os.path.isdir(os.path.join(src, d)))
    for name in names:
        if not name or not _visible(name) or os.sep in name or (os.altsep and os.altsep in name):
            raise DataError(f"--splits: {name!r} is not a split folder name; expected folder names in {src} "
                            "such as train,val (not hidden, no path separators)")
    if "train" not in names:
        raise DataError(f"{src}: no train/ folder; imagefolder expects SRC/train/<class>/<image> "
                        f"(found: {', '.join(names) or 'nothing'})")
    tree = Tree(src)
    wnids = _class_dirs(tree, "train")
    index = {w: i for i, w in enumerate(wnids)}
    listed = {}   # (split, class) -> what the folder holds; every split is listed before links are followed
    for split in ["train"] + [s for s in names if s != "train"]:
        for w in _class_dirs(tree, split):
            if w not in index:
                raise DataError(f"{os.path.join(src, split, w)}: class {w!r} is in {split}/ but not "
                                f"in train/; every split's classes must be train's ({len(wnids)} classes)")
            listed[split, w] = tree.list(os.path.join(split, w))
    out = {split: [] for split, _ in listed}
    for (split, w), entries in listed.items():
        out[split] += [Item(k, index[w], p) for k, p in _files(tree, os.path.join(split, w), entries)]
    if channels == "auto":
        channels = 1 if grey_only([it.payload for items in out.values() for it in items
                                   if isinstance(it.payload, str)]) else 3
    return Source("imagefolder", wnids, list(wnids), out, channels=channels)


def grey_only(paths, threads=16, chunk=256):
    """True when every image file among `paths` is grayscale, False at the first that is not.

    Runs on the driver before any conversion task starts, since the tasks must know the mode they
    convert to, and deciding there instead would mean rewriting the shards of a mixed dataset.
    It reads only headers (Pillow's Image.open does not decode pixels), in a thread pool, and in a
    seeded random order, so a colour dataset stops after its first few files whatever the order of
    its classes; only an all-grey dataset is read through. Palette images ("P") count as colour even
    with a grey palette: Pillow's getpalette() decodes the whole image, a header's raw palette is
    format-specific, and a wrong "grey" would drop colour where a wrong "colour" only costs space
    (pass --channels 1 for those). Files Pillow cannot open are skipped here; the conversion
    rejects them, with the reason.
    """
    order = np.random.default_rng(0).permutation(len(paths))
    seen = False
    with warnings.catch_warnings(), ThreadPoolExecutor(threads) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # rejected later, with the reason
        for start in range(0, len(paths), chunk):
            for mode in pool.map(_mode, [paths[i] for i in order[start:start + chunk]]):
                if mode is not None and mode not in GREY_MODES:
                    return False
                seen = seen or mode is not None
    return seen


def _mode(path):
    """Pillow's mode of the image file at `path`, from its header; None if it does not open (or is
    no longer a regular file: opened without blocking, as every source file)."""
    try:
        check_regular(path)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f, Image.open(f) as img:
            return img.mode
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None


def imagenet(src):
    """ILSVRC2012 as distributed: train/<wnid>/*.JPEG and a flat val/ labelled by LOC_val_solution.csv,
    or by ILSVRC2012_validation_ground_truth.txt with the devkit's meta.mat. Labels: sorted wnids,
    the order torchvision and every published ImageNet checkpoint use."""
    src = _dir(src)
    tree = Tree(src)
    wnids = _class_dirs(tree, "train")
    index = {w: i for i, w in enumerate(wnids)}
    listed = {w: tree.list(os.path.join("train", w)) for w in wnids}
    val_listed = tree.list("val") if os.path.isdir(os.path.join(src, "val")) else None
    names = _synset_names(src, wnids)
    train = [Item(k, index[w], p) for w in wnids for k, p in _files(tree, os.path.join("train", w), listed[w])]
    splits = {"train": train}
    if val_listed is not None:
        labels, labels_file = _val_labels(src)
        val = []
        for k, p in _files(tree, "val", val_listed):
            stem = os.path.splitext(os.path.basename(k))[0]
            if stem not in labels:
                if isinstance(p, Skip):   # a FIFO, an outside link...: rejected with its reason, not an error
                    val.append(Item(k, 0, p))
                    continue
                raise DataError(f"{labels_file}: no label for val image {k}")
            wnid = labels[stem]
            if wnid not in index:
                raise DataError(f"{labels_file}: val image {stem} has label {wnid!r}, which is not a "
                                f"class folder in {os.path.join(src, 'train')} ({len(wnids)} classes)")
            val.append(Item(k, index[wnid], p))
        splits["val"] = val
    return Source("imagenet", wnids, names, splits)


def cifar(src, num_classes):
    """The official python version (cifar-10-python.tar.gz / cifar-100-python.tar.gz, or the folder it
    extracts to). Its batches are pickles by definition; we unpickle them allowing only numpy arrays."""
    ten = num_classes == 10
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"],
             "test": ["test_batch"] if ten else ["test"]}
    meta_file, names_key, labels_key = (("batches.meta", b"label_names", b"labels") if ten
                                        else ("meta", b"fine_label_names", b"fine_labels"))
    read = _cifar_reader(src, f"cifar-{num_classes}-batches-py" if ten else "cifar-100-python")
    names = [n.decode() for n in read(meta_file)[names_key]]
    if len(names) != num_classes:
        raise DataError(f"{src}: {meta_file} lists {len(names)} classes; CIFAR-{num_classes} has {num_classes}")
    splits = {}
    for split, batches in files.items():
        items = []
        for b in batches:
            d = read(b)
            pixels = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = d[labels_key]
            _check_labels(labels, num_classes, f"{src}:{b}", labels_key.decode())
            items += [Item(f"{b}[{i}]", int(y), p) for i, (y, p) in enumerate(zip(labels, pixels))]
        splits[split] = items
    return Source(f"cifar{num_classes}", names, names, splits)


def svhn(src):
    """Format 2 of SVHN (cropped digits): train_32x32.mat, test_32x32.mat, extra_32x32.mat (optional);
    X is 32x32x3xN uint8 and y is Nx1 with 10 standing for the digit 0."""
    from scipy.io import loadmat

    src = _dir(src)
    splits = {}
    for split in ("train", "test", "extra"):
        path = os.path.join(src, f"{split}_32x32.mat")
        if not os.path.exists(path):
            if split != "extra":
                raise DataError(f"{path}: missing; SVHN needs train_32x32.mat and test_32x32.mat")
            continue
        mat = loadmat(_regular(path))
        if "X" not in mat or "y" not in mat or mat["X"].ndim != 4 or mat["X"].shape[:3] != (32, 32, 3):
            raise DataError(f"{path}: expected X of shape 32x32x3xN and y of shape Nx1 "
                            f"(got {sorted(k for k in mat if not k.startswith('__'))})")
        y = mat["y"].reshape(-1).astype(np.int64)
        _check_labels(y, 11, path, "y", low=1)
        pixels = mat["X"].transpose(3, 0, 1, 2)
        splits[split] = [Item(f"{split}_32x32.mat[{i}]", int(label) % 10, p)
                         for i, (label, p) in enumerate(zip(y, pixels))]
    names = [str(d) for d in range(10)]
    return Source("svhn", names, names, splits)


def digits(seed=0, val_fraction=0.2):
    """scikit-learn's bundled 8x8 digits (1797 real scans, offline), as 8-bit grayscale with a
    seeded stratified train/val split: the small dataset for demos and tests."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    pixels = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]   # values 0..16 -> 0..255
    train, val = train_test_split(np.arange(len(d.target)), test_size=val_fraction,
                                  stratify=d.target, random_state=seed)
    names = [str(c) for c in d.target_names]
    splits = {s: [Item(f"digits[{i}]", int(d.target[i]), pixels[i]) for i in sorted(idx)]
              for s, idx in (("train", train), ("val", val))}
    return Source("digits", names, names, splits, channels=1)


def _dir(src):
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise DataError(f"{src}: not a folder")
    return src


def _visible(name):
    return not name.startswith(".")


def _class_dirs(tree, split):
    """The class folders of SRC/split, sorted. A split or class folder that is a link leading outside
    SRC is an error: a whole class is not taken from elsewhere (single files are skipped instead)."""
    folder = os.path.join(tree.root, split)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: missing; expected one folder per class in it")
    classes = sorted(d for d in os.listdir(folder) if _visible(d) and os.path.isdir(os.path.join(folder, d)))
    for path in [folder] + [os.path.join(folder, c) for c in classes]:
        if not tree.inside(os.path.realpath(path)):
            raise DataError(f"{path}: a symbolic link leading outside {tree.root}; links are followed only "
                            "inside the source folder: copy the folder in, or convert from where it lies")
    if not classes:
        raise DataError(f"{folder}: no class folders; expected {split}/<class>/<image>")
    return classes


def _files(tree, rel, listed):
    """(key, real path or Skip) of every visible file under SRC/rel, as walk.Tree lists it (every
    other folder must be listed first, see Tree), sorted, keys relative to SRC. Anything that is not
    an image is rejected later, with its reason."""
    out = tree.resolve(listed)
    if not out:
        raise DataError(f"{os.path.join(tree.root, rel)}: empty folder; a class folder (or ImageNet's val/) "
                        "needs images: remove it or add them")
    return out


def _regular(path):
    """`path`, once it is known to be a regular file (a FIFO would block its reader forever)."""
    try:
        check_regular(path)
    except NotRegular as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"{path}: unreadable: {e.strerror or e}") from None
    return path


def _check_labels(labels, n, where, field, low=0):
    labels = np.asarray(labels)
    bad = labels[(labels < low) | (labels >= n)] if len(labels) else labels
    if len(bad):
        raise DataError(f"{where}: field {field} holds {int(bad[0])}; expected {low}..{n - 1}")


def _synset_names(src, wnids):
    """Class names from LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca"), else from the
    devkit's meta.mat, else the wnids themselves."""
    path = os.path.join(src, "LOC_synset_mapping.txt")
    meta = os.path.join(src, "ILSVRC2012_devkit_t12", "data", "meta.mat")
    if not os.path.exists(path):
        words = {w: text for w, text in _devkit_synsets(meta).values()} if os.path.exists(meta) else {}
        return [words.get(w, w) for w in wnids]
    mapping = {}
    with open(_regular(path)) as f:
        for n, line in enumerate(f, 1):
            parts = line.split(maxsplit=1)
            if len(parts) != 2 and line.strip():
                raise DataError(f"{path}:{n}: {line.strip()!r}; expected '<wnid> <names>'")
            if parts:
                mapping[parts[0]] = parts[1].strip()
    return [mapping.get(w, w) for w in wnids]


def _val_labels(src):
    """{image stem: wnid} for val/ and the file it came from."""
    devkit = os.path.join(src, "ILSVRC2012_devkit_t12", "data")
    loc = os.path.join(src, "LOC_val_solution.csv")
    if os.path.exists(loc):
        with open(_regular(loc), newline="") as f:
            rows = list(csv.reader(f))
        if not rows or rows[0][:2] != ["ImageId", "PredictionString"]:
            raise DataError(f"{loc}: expected the header ImageId,PredictionString")
        return {r[0]: r[1].split()[0] for r in rows[1:] if r}, loc
    for folder in (src, devkit):
        truth = os.path.join(folder, "ILSVRC2012_validation_ground_truth.txt")
        if os.path.exists(truth):
            meta = os.path.join(devkit, "meta.mat")
            if not os.path.exists(meta):
                raise DataError(f"{meta}: missing; {truth} labels by ILSVRC2012_ID, which the "
                                "devkit's meta.mat maps to wnids")
            ids = {i: wnid for i, (wnid, _) in _devkit_synsets(meta).items()}
            with open(_regular(truth)) as f:
                labels = [int(line) for line in f if line.strip()]
            unknown = [i for i in labels if i not in ids]
            if unknown:
                raise DataError(f"{truth}: ILSVRC2012_ID {unknown[0]} is not a leaf synset in {meta}")
            return {f"ILSVRC2012_val_{n:08d}": ids[i] for n, i in enumerate(labels, 1)}, truth
    raise DataError(f"{src}: val/ has no labels; put LOC_val_solution.csv in SRC, or "
                    "ILSVRC2012_validation_ground_truth.txt and ILSVRC2012_devkit_t12/data/meta.mat")


def _devkit_synsets(meta):
    """{ILSVRC2012_ID: (wnid, words)} for the 1000 leaf synsets of the devkit's meta.mat."""
    from scipy.io import loadmat

    synsets = loadmat(_regular(meta), squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): (str(s["WNID"]), str(s["words"]))
            for s in synsets if int(s["num_children"]) == 0}


class _NumpyOnly(pickle.Unpickler):
    """CIFAR batches hold dicts, lists, bytes and numpy arrays; refuse anything else a pickle names."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"CIFAR batch refers to {module}.{name}; the official files hold only "
                            "numpy arrays, lists and bytes")
        return super().find_class(module, name)


def _cifar_reader(src, folder):
    """read(name) -> the unpickled batch `name`, from the tar.gz or the extracted folder."""
    if os.path.isdir(src):
        base = os.path.join(src, folder) if os.path.isdir(os.path.join(src, folder)) else src

        def read(name):
            path = os.path.join(base, name)
            if not os.path.exists(path):
                raise DataError(f"{path}: missing from the CIFAR python-version folder")
            with open(_regular(path), "rb") as f:
                return _NumpyOnly(f, encoding="bytes").load()
        return read
    if not os.path.exists(src):
        raise DataError(f"{src}: no such file or folder; expected the official python-version tar.gz "
                        "or the folder it extracts to")
    if not tarfile.is_tarfile(_regular(src)):
        raise DataError(f"{src}: neither the official python-version tar.gz nor its extracted folder")
    tar = tarfile.open(src)

    def read(name):
        try:
            return _NumpyOnly(tar.extractfile(f"{folder}/{name}"), encoding="bytes").load()
        except KeyError:
            raise DataError(f"{src}: no member {folder}/{name}; is this the python version?") from None
    return read


# Datasets that ship with a dependency: `train` converts them into --data on first use (config.dataset).
BUILTIN = {"digits": digits}
