"""Small helpers shared across biogen: atomic writes and output folders."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A crash or an exception leaves any previous file untouched and no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write as PNG atomically, and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
    return Path(path)


def prepare_output_dir(path: str | Path, *, overwrite: bool = False) -> Path:
    """Create an output folder; refuse a non-empty existing one unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {path} is not empty; choose another or pass --overwrite")
    path.mkdir(parents=True, exist_ok=True)
    return path
