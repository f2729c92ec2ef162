"""Debian-packaged tools the cluster launcher, the tests and the benchmarks run for real (Prometheus,
HAProxy, Redis, protoc and its Go plugins): found on the PATH, or installed with apt-get when missing (as
root, as on a fresh CI machine), in one place."""

from __future__ import annotations

import os
import shutil
import subprocess

from gatecast.errors import UserError

_SBIN = "/usr/sbin:/sbin"  # haproxy lives there, outside a non-root PATH


def _which(command: str) -> str | None:
    return shutil.which(command) or shutil.which(command, path=_SBIN)


def ensure_installed(command: str, package: str) -> str:
    """The path of `command`, installing Debian's `package` first when it is missing. Raises UserError,
    saying what to run, when it is missing and cannot be installed here (not root, no apt-get)."""
    found = _which(command)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise UserError(f"{command} is not installed: run `apt-get install -y {package}` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False, timeout=900)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise UserError(f"apt-get could not install {package}: {done.stderr.strip()[-500:]}")
    found = _which(command)
    if found is None:
        raise UserError(f"{package} was installed but {command} is still not on the PATH")
    return found
