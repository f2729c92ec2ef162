"""The model repository: <repo>/<name>/<version>/{model.onnx, manifest.json}.

Read at start and polled: a new version is loaded (in a thread, warm-up included) before it becomes
the default, so no request fails while it arrives. Loaded versions stay loaded; sessions stay on the
version they opened with.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from gatecast.manifest import MANIFEST_FILE

from .batcher import Batcher
from .errors import NotFound
from .metrics import Metrics
from .pool import StatePool
from .runtime import ModelRuntime
from .settings import Settings

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


def scan(repo: Path) -> list[tuple[str, int, Path]]:
    """(name, version, folder) for every complete version folder; staging folders are skipped."""
    found: list[tuple[str, int, Path]] = []
    if not repo.is_dir():
        return found
    for model_dir in sorted(repo.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        for vdir in model_dir.iterdir():
            if vdir.is_dir() and vdir.name.isdigit() and (vdir / MANIFEST_FILE).is_file():
                found.append((model_dir.name, int(vdir.name), vdir))
    return found


class Repository:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._failed: dict[Path, float] = {}  # folder -> manifest mtime when loading failed

    def versions(self) -> list[ModelVersion]:
        return [mv for versions in self._models.values() for _, mv in sorted(versions.items())]

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
        """Loads every version on disk that is not loaded yet; returns how many were added."""
        added = 0
        for name, version, folder in scan(self.settings.repo):
            if version in self._models.get(name, {}):
                continue
            mtime = (folder / MANIFEST_FILE).stat().st_mtime
            if self._failed.get(folder) == mtime:
                continue
            try:
                runtime = await asyncio.to_thread(ModelRuntime.load, folder, self.settings)
                if runtime.manifest.name != name or runtime.manifest.version != version:
                    raise ValueError(
                        f"manifest says {runtime.manifest.name} v{runtime.manifest.version}, "
                        f"folder says {name}/{version}"
                    )
            except Exception as e:
                self._failed[folder] = mtime
                log.error("cannot load %s: %s", folder, e)
                continue
            self._add(runtime)
            added += 1
        return added

    def _add(self, runtime: ModelRuntime) -> None:
        s = self.settings
        pool = StatePool(runtime.manifest.states, s.initial_session_slots, s.max_sessions)
        batcher = Batcher(runtime, pool, self.metrics, s.max_batch_size, s.max_queue_delay_ms, s.max_queue_size)
        batcher.start()
        m = runtime.manifest
        self._models.setdefault(m.name, {})[m.version] = ModelVersion(runtime, pool, batcher)
        self.metrics.model_loaded.labels(m.name, str(m.version), runtime.provider).set(1)
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
        await asyncio.gather(*(mv.batcher.close() for mv in self.versions()))
