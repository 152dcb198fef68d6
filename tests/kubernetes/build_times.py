"""Build times and sizes of gpugate's images with podman: cold (empty store: no base image, no layer
cache), after a runtime change (layer cache warm), cached (the harness finds the same inputs in the
store), and loaded into another empty store from the archives the first one left in the cache (what a
new CI runner with ~/.cache/gpugate restored does).

    .venv/bin/python -m tests.kubernetes.build_times [--rounds N]

Each round uses podman stores and an image cache of its own under a scratch directory
(CONTAINERS_STORAGE_CONF), so the cold figures are cold and the machine's own store and cache are left alone. Prints one table; network downloads
(Debian mirror, PyPI) are part of every cold figure, as they are in CI.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.kubernetes.image_cache import ImageCache
from tests.kubernetes.images import (
    WHEEL_EPOCH,
    PROXY_TAG,
    RUNTIME_TAG,
    build_proxy_image,
    build_runtime_image,
    build_wheel,
    runtime_context,
    runtime_lock,
)
from tests.kubernetes.podman import BuildResult, Podman, ensure_installed

log = logging.getLogger("build_times")

STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{root}/storage"
runroot = "{root}/run"
"""


def timed(step: Callable[[], BuildResult]) -> tuple[float, BuildResult]:
    started = time.monotonic()
    result = step()
    return time.monotonic() - started, result


def fresh_podman(scratch: Path, name: str, cache: ImageCache) -> Podman:
    """A harness on an empty podman store of its own under scratch/name."""
    root = scratch / name
    root.mkdir(parents=True)
    conf = root / "storage.conf"
    conf.write_text(STORAGE_CONF.format(root=root))
    return Podman(root / "work", storage_conf=conf, cache=cache)


def one_round(scratch: Path) -> list[tuple[str, float, str]]:
    """(what, seconds, note) for one round in fresh stores and a fresh image cache under `scratch`."""
    cache = ImageCache(scratch / "cache")
    podman = fresh_podman(scratch, "store", cache)
    rows: list[tuple[str, float, str]] = []
    stores = [podman]
    try:
        seconds, base = timed(podman.base_image)
        rows.append(("base image (debootstrap + import)", seconds, f"{podman.image_size(base.tag) / 1e6:.0f} MB"))
        seconds, proxy = timed(lambda: build_proxy_image(podman, scratch / "empty", base=base.tag))
        rows.append(("proxy image, cold", seconds, f"{podman.image_size(proxy.tag) / 1e6:.0f} MB"))

        started = time.monotonic()
        wheel = build_wheel(scratch / "wheel")
        lock = runtime_lock(scratch / "lock")
        rows.append(("runtime wheel + lock (outside podman)", time.monotonic() - started, lock.name))
        context = runtime_context(scratch / "context", wheel, lock)
        seconds, runtime = timed(lambda: build_runtime_image(podman, context, base=base.tag))
        rows.append(("runtime image, cold", seconds, f"{podman.image_size(runtime.tag) / 1e6:.0f} MB"))

        # A runtime change: a wheel with other bytes (file times of another day), all else the same.
        changed_wheel = build_wheel(scratch / "changed", epoch=str(int(WHEEL_EPOCH) + 86400))
        changed = runtime_context(scratch / "context-changed", changed_wheel, lock)
        seconds, _ = timed(lambda: build_runtime_image(podman, changed, base=base.tag))
        rows.append(("runtime image, wheel changed (layers cached)", seconds, ""))

        seconds, again = timed(lambda: build_runtime_image(podman, changed, base=base.tag))
        assert not again.built
        rows.append(("runtime image, same inputs (harness cache)", seconds, ""))
        seconds, again = timed(lambda: build_proxy_image(podman, scratch / "empty", base=base.tag))
        assert not again.built
        rows.append(("proxy image, same inputs (harness cache)", seconds, ""))
        seconds, base_again = timed(podman.base_image)
        assert not base_again.built
        rows.append(("base image, same recipe (harness cache)", seconds, ""))

        # A new runner: an empty store, the cache's archives (base, proxy, changed runtime).
        archives = sum(path.stat().st_size for path in cache.directory.glob("*.tar"))
        other = fresh_podman(scratch, "restored", cache)
        stores.append(other)
        seconds, base = timed(other.base_image)
        assert base.loaded
        rows.append(("base image, empty store, from the cache's archive", seconds, f"cache holds {archives / 1e6:.0f} MB"))
        seconds, proxy = timed(lambda: build_proxy_image(other, scratch / "empty", base=base.tag))
        assert proxy.loaded
        rows.append(("proxy image, empty store, from the cache's archive", seconds, ""))
        seconds, runtime = timed(lambda: build_runtime_image(other, changed, base=base.tag))
        assert runtime.loaded
        rows.append(("runtime image, empty store, from the cache's archive", seconds, ""))
    finally:
        for store in stores:
            store.run("rmi", "--all", "--force", check=False)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if str(scratch) in line]
        for mount in sorted(mounts, reverse=True):
            subprocess.run(["umount", mount], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="cold rounds (each about 5 min here)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ensure_installed()
    results: list[list[tuple[str, float, str]]] = []
    for n in range(args.rounds):
        log.info("round %d of %d", n + 1, args.rounds)
        results.append(one_round(Path(tempfile.mkdtemp(prefix="gpugate-build-times-", dir="/var/tmp"))))
    width = max(len(what) for what, _, _ in results[0])
    print(f"{'step':<{width}}  " + "  ".join(f"round {n + 1:>2}" for n in range(len(results))) + "  note")
    for i, (what, _, note) in enumerate(results[0]):
        cells = "  ".join(f"{r[i][1]:>7.1f} s" for r in results)
        print(f"{what:<{width}}  {cells}  {note}")
    print(f"(tags in each round's own store: {PROXY_TAG}, {RUNTIME_TAG})")


if __name__ == "__main__":
    main()
