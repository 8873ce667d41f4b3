"""On-disk artifact cache for compiled networks.

Layout: ``<root>/<key>/`` holds one stage's artifacts plus ``manifest.json`` (what was built, from
what, file sizes and SHA-256 digests). ``<root>`` is ``$REGIONDRAG_CACHE/engines`` (default
``~/.cache/regiondrag/engines``).

* A stage whose directory exists with a valid manifest is a hit and is not rebuilt.
* A truncated or corrupt artifact (size or digest differs from the manifest, manifest missing or
  unreadable) is detected before loading, removed and rebuilt.
* Builds of one key are serialised with an exclusive lock file; each build writes into a private
  temporary directory that is renamed into place only when complete, so readers never see a
  partial artifact and concurrent builders do not corrupt each other.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def default_root() -> Path:
    from regiondrag.models import cache_root

    return cache_root() / "engines"


def cache_key(**parts) -> str:
    """A short stable digest of everything that changes a compiled artifact."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ArtifactCache:
    """Content-addressed directories of build outputs, see the module docstring."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def dir(self, key: str) -> Path:
        return self.root / key

    def lookup(self, key: str) -> Path | None:
        """The artifact directory of ``key`` if present and intact; a corrupt one is removed."""
        d = self.dir(key)
        if not d.exists():
            return None
        if self.verify(d):
            return d
        shutil.rmtree(d, ignore_errors=True)
        return None

    @staticmethod
    def verify(d: Path) -> bool:
        """True when every file listed in the manifest exists with its recorded size and digest."""
        try:
            manifest = json.loads((d / MANIFEST).read_text())
            for name, info in manifest["files"].items():
                f = d / name
                if f.stat().st_size != info["size"] or _digest(f) != info["sha256"]:
                    return False
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False

    @contextmanager
    def _lock(self, key: str):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{key}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def get_or_build(self, key: str, build: Callable[[Path], None], meta: dict | None = None) -> tuple[Path, bool]:
        """``(directory, hit)``: the cached artifacts of ``key``, building them with ``build(tmpdir)`` if needed."""
        found = self.lookup(key)
        if found is not None:
            return found, True
        with self._lock(key):
            found = self.lookup(key)  # another process may have built it while we waited
            if found is not None:
                return found, True
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
            try:
                t0 = time.perf_counter()
                build(tmp)
                files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _digest(p)}
                         for p in sorted(tmp.rglob("*")) if p.is_file()}
                if not files:
                    raise RuntimeError(f"build of {key} produced no files")
                manifest = {"key": key, "meta": meta or {}, "files": files,
                            "build_s": round(time.perf_counter() - t0, 3), "created": time.time()}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
                os.replace(tmp, self.dir(key))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return self.dir(key), False

    def entries(self) -> list[dict]:
        """Manifests of the cached artifacts (for ``info``), newest first."""
        out = []
        for d in sorted(self.root.glob("*")) if self.root.is_dir() else []:
            try:
                m = json.loads((d / MANIFEST).read_text())
            except (OSError, ValueError):
                continue
            m["path"] = str(d)
            m["bytes"] = sum(f["size"] for f in m.get("files", {}).values())
            out.append(m)
        return sorted(out, key=lambda m: -m.get("created", 0))
