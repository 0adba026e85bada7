import os
from pathlib import Path


def default_cache_dir() -> Path:
    """Where pretrained checkpoints (and downloaded data, under data/) go: $PROFIT_BENCH_CACHE or
    ~/.cache/profit_bench. Here, not in pretrain.py, so that tasks.py can name it without importing pretraining."""
    return Path(os.environ.get("PROFIT_BENCH_CACHE", Path.home() / ".cache" / "profit_bench"))


class UserError(Exception):
    """Bad input a user can fix; CLIs print it on one line and exit 2."""


def safe_name(name, what: str = "name") -> str:
    """`name` unchanged when it can be one file-name component (an experiment, suite, cache-key part); a
    UserError otherwise: names become folder and file names, and must never reach outside their folder."""
    s = str(name)
    if not s or s in (".", "..") or "/" in s or "\\" in s or "\0" in s or s != s.strip() or len(s) > 200:
        raise UserError(f"{what} {s!r} cannot be a folder name: use letters, digits, '-', '_', '.' (no '/', '\\', "
                        f"'..', leading/trailing spaces; at most 200 characters)")
    return s
