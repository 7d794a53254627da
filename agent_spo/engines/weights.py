"""Policy weights on their way from the learner to the engine replicas (the disk path).

The learner's ``named_weights()`` yields one full tensor at a time (under FSDP2 each is
gathered, then dropped). :func:`write_weights` packs them into size-capped buckets, each
written as one safetensors file as soon as it is full, so the writer never holds more
than one bucket; a replica reads them back with :func:`read_weights` bucket by bucket.
One version is a folder::

    DIR/v000012/bucket-00000.safetensors
               /bucket-00001.safetensors
               /manifest.json     {"version", "buckets", "names", "shapes", "dtypes", "bytes"}

``manifest.json`` is written last, under a temporary name and renamed, so a folder
without one is an unfinished write and is never read. A replica checks every name and
shape against its model from the manifest before it copies anything, so a bad update
leaves its weights as they were.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"v{int(version):06d}"


@dataclass(frozen=True)
class Written:
    path: Path  # the version's folder
    tensors: int
    bytes: int
    buckets: int


def write_weights(
    weights: Iterable[tuple[str, torch.Tensor]],
    root: str | Path,
    version: int,
    *,
    bucket_bytes: int = 512 * 2**20,
) -> Written:
    """Write ``weights`` as version ``version`` under ``root``, one bucket in memory at a
    time; a tensor larger than ``bucket_bytes`` is a bucket of its own."""
    from safetensors.torch import save_file

    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    out = version_dir(root, version)
    if out.exists():  # a half-written folder from a crash, or a version written again
        shutil.rmtree(out)
    out.mkdir(parents=True)
    names: list[str] = []
    shapes: list[list[int]] = []
    dtypes: list[str] = []
    buckets: list[str] = []
    bucket: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal bucket, size
        if bucket:
            name = f"bucket-{len(buckets):05d}.safetensors"
            save_file(bucket, str(out / name))
            buckets.append(name)
        bucket, size = {}, 0

    for name, tensor in weights:
        if name in bucket or name in names:
            raise ValueError(f"weight {name!r} is listed twice")
        t = tensor.detach().cpu().contiguous()
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            flush()
        if any(t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr()
               for o in bucket.values()):  # fmt: skip
            t = t.clone()  # a tied weight under its second name: safetensors wants a copy
        bucket[name] = t
        size += n
        total += n
        names.append(name)
        shapes.append(list(t.shape))
        dtypes.append(str(t.dtype).removeprefix("torch."))
    flush()
    manifest = {"version": int(version), "buckets": buckets, "names": names,
                "shapes": shapes, "dtypes": dtypes, "bytes": total}  # fmt: skip
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, out / MANIFEST)
    return Written(out, len(names), total, len(buckets))


class WeightsOnDisk:
    """One written version, read back bucket by bucket: iterate for ``(name, tensor)``.

    ``shapes`` (name -> shape) comes from the manifest without reading any tensor, so the
    receiver can check the whole update before it copies the first weight.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{self.path} holds no finished weight update (no {MANIFEST}): wrong path, "
                "or the writer has not finished"
            )
        m = json.loads(manifest.read_text())
        self.version = int(m["version"])
        self.buckets: list[str] = list(m["buckets"])
        self.bytes = int(m["bytes"])
        self.shapes = {n: tuple(s) for n, s in zip(m["names"], m["shapes"], strict=True)}

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors.torch import load_file

        for name in self.buckets:
            yield from load_file(str(self.path / name)).items()

    def __len__(self) -> int:
        return len(self.shapes)


def read_weights(path: str | Path) -> WeightsOnDisk:
    return WeightsOnDisk(path)


def prune(root: str | Path, keep: int) -> None:
    """Remove every version folder under ``root`` but ``keep`` and newer ones."""
    for d in Path(root).glob("v[0-9]*"):
        if d.is_dir() and d.name[1:].isdigit() and int(d.name[1:]) < keep:
            shutil.rmtree(d, ignore_errors=True)
