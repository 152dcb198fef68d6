"""How long a Debian 12 VM takes under QEMU (emulated CPU) to boot and run the gateway's package step, and its memory.

Prints figures; asserts nothing. Run: .venv/bin/python bench/vm_boot.py [--runs 2] [--tb-size 256|0] [--single-thread]
Each run boots the cached test image (tests/vm/disk_image.py; built first if missing, and timed) with user
data that installs the gateway's Debian packages through cloud-init's `packages:`, and reports: QEMU start ->
guest agent answers, -> cloud-init done; the package module's own time (`cloud-init analyze blame`); QEMU's
resident memory when cloud-init is done and at its peak (VmHWM).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.vm.disk_image import ensure_disk_image  # noqa: E402
from tests.vm.qemu import Vm  # noqa: E402

PACKAGES = ("caddy", "prometheus", "prometheus-alertmanager", "python3-venv", "python3-boto3", "socat")
PACKAGE_MODULE = "config-package-update-upgrade-install"
CLOUD_INIT_TIMEOUT_S = 1800
MIB = 1024 * 1024


def user_data(packages: tuple[str, ...]) -> bytes:
    return ("#cloud-config\npackages: [" + ", ".join(packages) + "]\n").encode()


def blame_seconds(blame: str, module: str) -> float | None:
    match = re.search(rf"([0-9.]+)s \([a-z-]+/{re.escape(module)}\)", blame)
    return float(match.group(1)) if match else None


def one_run(args: argparse.Namespace, run: int) -> None:
    image = ensure_disk_image()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gpugate-vm-bench-") as workdir:
        vm = Vm(
            image,
            user_data(PACKAGES if not args.empty else ()),
            Path(workdir),
            memory_mib=args.memory,
            cpus=args.cpus,
            tb_size_mib=args.tb_size or None,
            multi_thread=not args.single_thread,
        )
        with vm:
            agent_s = vm.wait_agent(CLOUD_INIT_TIMEOUT_S)
            done_s = vm.wait_cloud_init(CLOUD_INIT_TIMEOUT_S)
            rss, peak = vm.rss_bytes()
            blame = vm.exec(["cloud-init", "analyze", "blame"]).stdout
            package_s = blame_seconds(blame, PACKAGE_MODULE)
            stop_started = time.monotonic()
        stop_s = time.monotonic() - stop_started
    print(
        f"run {run}: agent {agent_s:.0f} s, cloud-init done {done_s:.0f} s, package module "
        f"{package_s if package_s is not None else '?'} s, QEMU RSS {rss / MIB:.0f} MiB (peak {peak / MIB:.0f} MiB), "
        f"powerdown {stop_s:.0f} s; load average at start {load:.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--memory", type=int, default=1024, help="guest memory, MiB")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--tb-size", type=int, default=256, help="TCG translation cache, MiB; 0 = QEMU's default")
    parser.add_argument("--single-thread", action="store_true", help="TCG thread=single instead of multi")
    parser.add_argument("--empty", action="store_true", help="user data without packages (boot alone)")
    args = parser.parse_args()
    started = time.monotonic()
    image = ensure_disk_image()
    print(f"image {image.directory}: ready in {time.monotonic() - started:.2f} s", flush=True)
    print(
        f"guest: {args.cpus} vCPUs, {args.memory} MiB; accel tcg tb-size={args.tb_size or 'default'} "
        f"thread={'single' if args.single_thread else 'multi'}; packages: {'none' if args.empty else ' '.join(PACKAGES)}",
        flush=True,
    )
    for run in range(1, args.runs + 1):
        one_run(args, run)


if __name__ == "__main__":
    main()
