"""Side files (anchor tables, speculative predictors): named arrays plus a JSON header in one ``.npz``.

    save_npz(path, header, **arrays) --> <path>.tmp.npz --rename--> path        (never a half-written file)
    load_npz(path, what, arrays, error) --> (header dict, {name: array})        (one ``error`` per problem,
                                                                                 naming the file)

The caller checks the header's format and version and builds its object (whose own checks run on construction).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np


def save_npz(path: str | Path, header: dict, **arrays: np.ndarray) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, header=np.array(json.dumps(header)), **arrays)
    tmp.replace(path)


def load_npz(path: str | Path, *, what: str, arrays: tuple[str, ...],
             error: type[Exception]) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and the named arrays of ``path``; ``error`` (an exception class) when the file is missing,
    unreadable, lacks one of ``arrays`` or has a header that is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise error(f"{path}: not a readable {what} .npz ({exc})") from None
    missing = [k for k in ("header", *arrays) if k not in data]
    if missing:
        raise error(f"{path}: not a complete {what} file (missing {', '.join(missing)})")
    try:
        header = json.loads(str(data.pop("header")))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: bad {what} header ({exc})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: bad {what} header (not a JSON object)")
    return header, data
