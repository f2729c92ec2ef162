"""The model repository: <repo>/<name>/<version>/{model.onnx, manifest.json}.

Read at start and polled: a new version is loaded (in a thread, warm-up included) and its graph's
outputs are checked against its manifest before it becomes the default, so no request fails while it
arrives. A folder that fails to load (copied in file by file, half written) is retried when any of its
files changes, and after a backoff in any case. Sessions stay on the version they opened with: a version
whose folder is deleted stops being resolvable at once and is unloaded when its last session ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gatecast.manifest import MANIFEST_FILE, Manifest, version_dirs

from .batcher import Batcher
from .errors import NotFound
from .metrics import Metrics
from .pool import StatePool
from .runtime import ModelLoadError, ModelRuntime
from .settings import Settings, SettingsError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ModelVersion:
    runtime: ModelRuntime
    pool: StatePool
    batcher: Batcher

    @property
    def name(self) -> str:
        return self.runtime.manifest.name

    @property
    def version(self) -> int:
        return self.runtime.manifest.version


RETRY_FIRST_S = 10.0  # a folder that failed to load and has not changed is tried again after this...
RETRY_MAX_S = 300.0  # ...doubling up to this


def check_repo(repo: Path) -> None:
    """Raises SettingsError unless `repo` is a folder the server can list and read."""
    if not repo.exists():
        raise SettingsError(f"model repository {repo}: no such folder (GATECAST_REPO / --repo)")
    if not repo.is_dir():
        raise SettingsError(f"model repository {repo}: not a folder (GATECAST_REPO / --repo)")
    if not os.access(repo, os.R_OK | os.X_OK):
        raise SettingsError(f"model repository {repo}: not readable by this user (uid {os.getuid()})")
    try:
        next(iter(repo.iterdir()), None)
    except OSError as e:
        raise SettingsError(f"model repository {repo}: cannot be read: {e.strerror or e}") from e


_odd_warned: set[Path] = set()  # folders `scan` has warned about as not versions (each once per process)


def scan(repo: Path) -> list[tuple[str, int, Path]]:
    """(name, version, folder) for every complete version folder; staging folders are skipped. Raises
    OSError when the repository itself cannot be listed; a model folder that cannot be listed is skipped."""
    found: list[tuple[str, int, Path]] = []
    for model_dir in sorted(repo.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        odd: list[Path] = []
        try:
            for version, vdir in version_dirs(model_dir, odd).items():
                if (vdir / MANIFEST_FILE).is_file():
                    found.append((model_dir.name, version, vdir))
        except OSError as e:
            log.error("cannot list %s: %s", model_dir, e)
        for p in odd:
            if p not in _odd_warned:  # once per folder, not at every scan
                _odd_warned.add(p)
                log.warning(
                    "%s is not a version folder and is skipped: versions are named 1, 2, 3, ... in ASCII digits "
                    "without a leading zero",
                    p,
                )
    return found


def folder_signature(folder: Path) -> tuple[tuple[str, int, int, int], ...] | None:
    """What changes when any file of the folder is written, replaced, added or removed (None: unreadable)."""
    try:
        entries = []
        for p in folder.iterdir():
            st = p.stat()
            entries.append((p.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(sorted(entries))
    except OSError:
        return None


def check_outputs(rt: ModelRuntime) -> None:
    """Runs the graph once and checks every output's shape against the manifest: y [batch, horizon,
    targets], each state [dims0, batch, dims1], and the quantile output [batch, horizon, targets,
    quantiles] when the manifest names one. Raises ModelLoadError on the first mismatch."""
    m = rt.manifest
    where = f"{rt.path / m.onnx.file}"
    expected: list[tuple[str, tuple[int, ...], str]] = [
        (m.onnx.output, (2, m.horizon, m.n_targets), f"[batch, horizon {m.horizon}, targets {m.n_targets}]")
    ]
    expected += [(s.output, (s.dims[0], 2, s.dims[1]), f"[{s.dims[0]}, batch, {s.dims[1]}]") for s in m.states]
    if m.onnx.quantile_output:
        q = len(m.quantiles)
        expected.append(
            (
                m.onnx.quantile_output,
                (2, m.horizon, m.n_targets, q),
                f"[batch, horizon {m.horizon}, targets {m.n_targets}, quantiles {q}]",
            )
        )
    x = np.tile(np.asarray(m.scaler.mean, np.float32), (2, 3, 1))
    feed = {m.onnx.input: x}
    for spec, zero in zip(m.states, rt.zero_states(2), strict=True):
        feed[spec.input] = zero
    outs = rt.session.run([name for name, _, _ in expected], feed)
    for (name, shape, meaning), out in zip(expected, outs, strict=True):
        if tuple(out.shape) != shape:
            got = list(out.shape)
            raise ModelLoadError(
                f"{where}: output {name!r} has shape {got} at batch 2, the manifest says {meaning}; refusing to serve "
                f"{m.name} v{m.version}"
            )


class Repository:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._retiring: list[ModelVersion] = []  # deleted from disk; unloaded when their last session ends
        # folder -> (its signature when loading failed, monotonic time of the next retry, backoff, error)
        self._failed: dict[Path, tuple[object, float, float, str]] = {}

    def versions(self) -> list[ModelVersion]:
        """The versions being served (what ListModels lists); versions deleted from disk are not."""
        return [mv for versions in self._models.values() for _, mv in sorted(versions.items())]

    @property
    def failures(self) -> dict[Path, str]:
        """Folders that failed to load and wait for a retry, with the error."""
        return {folder: error for folder, (_, _, _, error) in self._failed.items()}

    @property
    def retiring(self) -> list[ModelVersion]:
        return list(self._retiring)

    def default_version(self, name: str) -> int:
        return max(self._models[name])

    def resolve(self, name: str, version: int = 0) -> ModelVersion:
        versions = self._models.get(name)
        if not versions:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"model {name!r} not found; loaded models: {known}")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version}; loaded versions: {sorted(versions)}")
        return versions[version]

    async def refresh(self) -> int:
        """Loads every version on disk that is not loaded yet, retires versions whose folder is gone and
        unloads retired versions that no session uses any more; returns how many versions were added.
        Raises OSError when the repository cannot be listed (nothing is unloaded then)."""
        found = scan(self.settings.repo)
        on_disk = {(name, version) for name, version, _ in found}
        self._retire_deleted(on_disk)
        added = 0
        for name, version, folder in found:
            if version in self._models.get(name, {}) or self._blocked_by_retiring(name, version, folder):
                continue
            signature = folder_signature(folder)
            failed = self._failed.get(folder)
            if failed is not None and failed[0] == signature and time.monotonic() < failed[1]:
                continue  # nothing changed since it failed, and its backoff has not run out
            try:
                runtime = await asyncio.to_thread(self._load, folder, name, version)
            except Exception as e:
                backoff = RETRY_FIRST_S if failed is None else min(RETRY_MAX_S, failed[2] * 2)
                self._failed[folder] = (signature, time.monotonic() + backoff, backoff, str(e))
                log.error("cannot load %s (retried when a file in it changes, or in %.0f s): %s", folder, backoff, e)
                continue
            self._failed.pop(folder, None)
            self._add(runtime, folder)
            added += 1
        for folder in [f for f in self._failed if not f.is_dir()]:
            del self._failed[folder]
        await self._unload_unused()
        return added

    def _load(self, folder: Path, name: str, version: int) -> ModelRuntime:
        runtime = ModelRuntime.load(folder, self.settings)
        if runtime.manifest.name != name or runtime.manifest.version != version:
            raise ModelLoadError(
                f"manifest says {runtime.manifest.name} v{runtime.manifest.version}, folder says {name}/{version}"
            )
        check_outputs(runtime)
        return runtime

    def _blocked_by_retiring(self, name: str, version: int, folder: Path) -> bool:
        """A deleted version that comes back while its old copy still has sessions is served again from the
        old copy when the graph is the same; a different graph waits until the old copy is unloaded."""
        old = next((mv for mv in self._retiring if (mv.name, mv.version) == (name, version)), None)
        if old is None:
            return False
        try:
            same = Manifest.read(folder).onnx.sha256 == old.runtime.manifest.onnx.sha256
        except Exception:
            same = False
        if same:
            self._retiring.remove(old)
            self._models.setdefault(name, {})[version] = old
            log.info("%s v%d is back on disk with the same graph: served again", name, version)
        return True

    def _retire_deleted(self, on_disk: set[tuple[str, int]]) -> None:
        for name, versions in list(self._models.items()):
            for version, mv in list(versions.items()):
                if (name, version) in on_disk:
                    continue
                if mv.runtime.path.is_dir():
                    continue  # its manifest is being replaced: not deleted
                del versions[version]
                if not versions:
                    del self._models[name]
                self._retiring.append(mv)
                log.info(
                    "%s v%d was deleted from disk: no longer served; unloaded when its %d session(s) end",
                    name,
                    version,
                    mv.pool.used,
                )

    async def _unload_unused(self) -> None:
        idle = [mv for mv in self._retiring if mv.pool.used == 0]
        for mv in idle:
            self._retiring.remove(mv)
            await mv.batcher.close()
            self.metrics.remove_version(mv.name, mv.version, mv.runtime.provider)
            log.info("unloaded %s v%d (deleted from disk, no session left)", mv.name, mv.version)

    def _add(self, runtime: ModelRuntime, folder: Path) -> None:
        s = self.settings
        pool = StatePool(runtime.manifest.states, s.initial_session_slots, s.max_sessions)
        batcher = Batcher(runtime, pool, self.metrics, s.max_batch_size, s.max_queue_delay_ms, s.max_queue_size)
        batcher.start()
        m = runtime.manifest
        self._models.setdefault(m.name, {})[m.version] = ModelVersion(runtime, pool, batcher)
        self.metrics.add_version(m.name, m.version, runtime.provider)
        log.info(
            "serving %s v%d (%s %dx%d, context %d, horizon %d) on %s; default version now %d",
            m.name,
            m.version,
            m.cell,
            m.layers,
            m.hidden_size,
            m.context_length,
            m.horizon,
            runtime.provider,
            self.default_version(m.name),
        )

    async def close(self) -> None:
        await asyncio.gather(*(mv.batcher.close() for mv in [*self.versions(), *self._retiring]))
