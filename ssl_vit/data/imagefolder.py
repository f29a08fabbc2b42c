"""A folder of images, listed recursively, with optional class labels from subfolder names.

- Files are images by extension (case-insensitive): jpg, jpeg, png, bmp, gif, webp, tif, tiff.
  Other files (``.txt``, ``.csv``, ...) are ignored and counted (``num_ignored``); hidden files and
  folders (names starting with ``.``) are not looked at.
- Labels: when ``root`` has first-level subfolders holding images, their sorted names are the
  classes and every image below ``root/<class>/`` (at any depth) gets that class's index; images
  lying directly in ``root`` then get ``-1``. A flat folder gives ``-1`` for all images. Labels
  are only used for evaluation (k-NN, linear probe).
- Nothing is pre-dumped: the list is built by walking the folder when the data set is created.

Unreadable files never crash a run, in two layers:

1. **Eagerly, at construction** (``verify="verify"``, the default): every file is opened and
   ``PIL.Image.verify()``-ed. That reads headers only (PNG: all chunks with their checksums), so it
   is cheap; a tqdm progress bar shows when there are many files, and threads overlap the reads.
   Files failing it are dropped before training starts. ``verify="decode"`` fully decodes every
   image instead (thorough, slow); ``verify="none"`` skips this step.
2. **Lazily, in ``__getitem__``**: some damage (a truncated JPEG, for instance) only shows when
   the pixels are decoded. Such a file is recorded as skipped and the next readable image of the
   list is returned in its place, so a batch keeps its size.

Skipped files are counted (``num_skipped``) and listed (``skipped``), and a warning
``skipped N unreadable files (e.g. ...)`` is logged on the ``ssl_vit.data`` logger. Note that files
skipped lazily inside DataLoader worker processes are counted in those processes' copies (their
warnings are still logged). Images are returned converted to RGB.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ssl_vit.data.datasets import LabelledSubset, check_options, resolve_val_size, split_indices

logger = logging.getLogger("ssl_vit.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VERIFY_MODES = ("verify", "decode", "none")
PROGRESS_THRESHOLD = 1000  # show a progress bar when verifying at least this many files
DEFAULT_MAX_VAL_SIZE = 5000
DEFAULT_VAL_FRACTION = 0.1


def load_rgb(path: str) -> Image.Image:
    """Open an image file fully (decoding its pixels), apply its EXIF orientation, return RGB."""
    with Image.open(path) as im:
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        rgb = im.convert("RGB")  # forces decoding: truncated or corrupt data raise here
    return ImageOps.exif_transpose(rgb)


def check_image(path: str, mode: str = "verify") -> str | None:
    """``None`` if ``path`` passes the check of ``mode`` ('verify' or 'decode'), else the error."""
    try:
        if mode == "decode":
            with Image.open(path) as im:
                im.load()
        else:
            with Image.open(path) as im:
                im.verify()
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, DecompressionBomb...
        return f"{type(exc).__name__}: {exc}"
    return None


def _examples(paths: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(paths[:k])
    return shown + (", ..." if len(paths) > k else "")


class ImageFolderDataset(Dataset):
    """Images found recursively under ``root``; items are ``(RGB PIL image, int label)`` (label
    ``-1`` when unlabelled), or ``(transform(image), label)`` with a ``transform``.

    Args:
        root: the folder.
        transform: applied to each RGB PIL image.
        extensions: file name endings that count as images (case-insensitive).
        verify: ``"verify"`` (open + ``PIL`` verify at construction, default), ``"decode"`` (full
            decode at construction) or ``"none"``; ``True``/``False`` mean ``"verify"``/``"none"``.
        setting: the configuration key named in error messages.
        num_threads: threads verifying files (default: ``min(16, 4 * cpu_count)``).
        progress: show a tqdm bar while verifying; default when there are >= 1000 files.

    Attributes: ``samples`` (list of ``(path, label)``), ``targets``, ``classes``,
    ``class_to_idx``, ``labelled``, ``skipped`` / ``num_skipped`` (unreadable image files),
    ``ignored`` / ``num_ignored`` (files that are not images by extension).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        verify: str | bool = "verify",
        setting: str = "data.root",
        num_threads: int | None = None,
        progress: bool | None = None,
    ):
        if verify is True:
            verify = "verify"
        elif verify is False or verify is None:
            verify = "none"
        if verify not in VERIFY_MODES:
            raise ValueError(f"data.verify={verify!r}; allowed: {', '.join(VERIFY_MODES)}")
        if root is None or str(root) == "":
            raise ValueError(f"{setting} must be set to a folder of images")
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.setting = setting
        if not os.path.isdir(self.root):
            raise ValueError(f"{setting}={os.fspath(root)!r} is not an existing folder")
        self.transform = transform
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)

        candidates, self.ignored = self._scan()
        if not candidates:
            raise ValueError(
                f"{setting}={self.root!r} contains no image files (looked recursively for "
                f"{', '.join(self.extensions)}; {len(self.ignored)} other files ignored)"
            )
        if self.ignored:
            logger.info("ignored %d non-image files under %s (e.g. %s)", len(self.ignored), self.root,
                        _examples(self.ignored))

        # classes from first-level subfolder names (stable: independent of which files are readable)
        first_level = [self._first_level(p) for p in candidates]
        self.classes = sorted({c for c in first_level if c is not None})
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        labels = [self.class_to_idx[c] if c is not None else -1 for c in first_level]
        if self.classes and any(c is None for c in first_level):
            logger.warning(
                "%d images lie directly in %s=%s beside the class subfolders; they get label -1",
                sum(c is None for c in first_level), setting, self.root,
            )

        self.skipped: list[str] = []
        self.skip_errors: dict[str, str] = {}
        if verify != "none":
            errors = self._verify_all(candidates, verify, num_threads, progress)
        else:
            errors = [None] * len(candidates)
        self.samples: list[tuple[str, int]] = []
        for path, label, err in zip(candidates, labels, errors):
            if err is None:
                self.samples.append((path, label))
            else:
                self.skipped.append(path)
                self.skip_errors[path] = err
        if not self.samples:
            raise ValueError(
                f"{setting}={self.root!r}: none of its {len(candidates)} image files could be read "
                f"(e.g. {_examples(self.skipped)}: {self.skip_errors[self.skipped[0]]})"
            )
        if self.skipped:
            self._warn_skipped()
        self.targets = [label for _, label in self.samples]
        self._bad: set[int] = set()

    # -- listing --------------------------------------------------------------------------------
    def _scan(self) -> tuple[list[str], list[str]]:
        images: list[str] = []
        others: list[str] = []
        seen_dirs: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:  # a symlink loop
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                if os.path.splitext(name)[1].lower() in self.extensions:
                    images.append(path)
                else:
                    others.append(path)
        return images, others

    def _first_level(self, path: str) -> str | None:
        parts = os.path.relpath(path, self.root).split(os.sep)
        return parts[0] if len(parts) > 1 else None

    def _verify_all(
        self, paths: list[str], mode: str, num_threads: int | None, progress: bool | None
    ) -> list[str | None]:
        many = len(paths) >= PROGRESS_THRESHOLD
        show = many if progress is None else progress
        threads = num_threads or min(16, 4 * (os.cpu_count() or 1))
        results: list[str | None]
        if many and threads > 1:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                it = pool.map(lambda p: check_image(p, mode), paths, chunksize=64)
                results = list(_progress(it, len(paths), f"checking images in {self.root}", show))
        else:
            it = (check_image(p, mode) for p in paths)
            results = list(_progress(it, len(paths), f"checking images in {self.root}", show))
        return results

    def _warn_skipped(self) -> None:
        logger.warning(
            "skipped %d unreadable files (e.g. %s) under %s=%s",
            len(self.skipped), _examples(self.skipped), self.setting, self.root,
        )

    # -- access ---------------------------------------------------------------------------------
    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def num_ignored(self) -> int:
        return len(self.ignored)

    @property
    def labelled(self) -> bool:
        """True when every image has a class label (first-level subfolders, none at the top)."""
        return bool(self.classes) and all(t >= 0 for t in self.targets)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        n = len(self.samples)
        for attempt in range(n):
            i = (index + attempt) % n
            if i in self._bad:
                continue
            path, label = self.samples[i]
            try:
                image = load_rgb(path)
            except Exception as exc:
                self._bad.add(i)
                self.skipped.append(path)
                self.skip_errors[path] = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "skipped %d unreadable files (e.g. %s): %s failed to decode (%s); using the next "
                    "readable image instead", len(self.skipped), _examples(self.skipped), path,
                    self.skip_errors[path],
                )
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, label
        raise RuntimeError(f"none of the {n} images under {self.setting}={self.root!r} could be read")


def _progress(iterable, total: int, desc: str, show: bool):
    if not show:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="file")


OPTIONS = ("val_root", "test_root", "extensions", "verify")


def build_imagefolder_splits(
    splits: Sequence[str],
    root: str | os.PathLike | None = None,
    val_size: int | float | None = None,
    seed: int = 0,
    cache: dict[str, Dataset] | None = None,
    **options,
) -> dict[str, Dataset]:
    """Splits of an image folder.

    - ``trainval``: every readable image under ``root``.
    - ``train`` / ``val``: with ``val_root``, all of ``root`` / all of ``val_root``; otherwise a
      stratified carve-out of ``val_size`` images (default: 10% of the images, at most 5,000)
      from ``root`` with a fixed seed, and the rest. When ``root`` is not fully labelled (no
      class subfolders, or images beside them), ``train`` is all of it and ``val`` an error.
    - ``test``: all of ``test_root`` (an error if it is not set).

    Options: ``val_root``, ``test_root``, ``extensions``, ``verify`` (see :class:`ImageFolderDataset`).
    ``cache``: a dict of already built splits; its ``trainval`` entry (the scan of ``root``) is
    reused, and stored there once built.
    """
    check_options(options, OPTIONS, "imagefolder")
    val_root = options.pop("val_root", None)
    test_root = options.pop("test_root", None)
    if root is None or str(root) == "":
        raise ValueError("data.root must be set to a folder of images for data set 'imagefolder'")

    out: dict[str, Dataset] = {}
    cache = {} if cache is None else cache

    def get_base() -> ImageFolderDataset:
        if "trainval" not in cache:
            cache["trainval"] = ImageFolderDataset(root, setting="data.root", **options)
        return cache["trainval"]  # type: ignore[return-value]

    for split in splits:
        if split == "trainval":
            out[split] = get_base()
        elif split == "test":
            if not test_root:
                raise ValueError("data set 'imagefolder' has no test split: set data.test_root to a folder")
            out[split] = ImageFolderDataset(test_root, setting="data.test_root", **options)
        elif val_root:
            out[split] = get_base() if split == "train" else ImageFolderDataset(
                val_root, setting="data.val_root", **options
            )
        elif not get_base().labelled:
            # Unlabelled images (the usual self-supervised case): nothing to evaluate k-NN on, so
            # no validation carve-out; training uses every image.
            full = get_base()
            if split == "val":
                raise ValueError(
                    f"the images under data.root={full.root!r} have no class labels, so there is no "
                    "validation split to evaluate on (put them in one subfolder per class, or set data.val_root)"
                )
            out[split] = full
        else:
            full = get_base()
            n = len(full)
            if val_size is None:
                n_val = min(DEFAULT_MAX_VAL_SIZE, int(DEFAULT_VAL_FRACTION * n))
            else:
                n_val = resolve_val_size(val_size, n)
            train_idx, val_idx = split_indices(full.targets, n_val, seed=seed, stratified=True)
            if split == "val" and not val_idx:
                raise ValueError(
                    f"the validation carve-out of data.root={full.root!r} is empty ({n} images, "
                    f"data.val_size={val_size!r}{' (10%, rounded down)' if val_size is None else ''}): "
                    "set data.val_size to 1 or more images or data.val_root, or turn k-NN evaluation off "
                    "(eval.knn_every_n_steps=0 eval.final_knn=false)"
                )
            out[split] = LabelledSubset(full, train_idx if split == "train" else val_idx)
    return out
