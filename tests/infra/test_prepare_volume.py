"""ciris-prepare-volume (components/cloud_init.py) on a real block device (a loop device over a
file): a blank volume is formatted and mounted, a volume with data is never formatted again, and a
volume grown in config gets a filesystem as big as itself, its data kept.

(Here the filesystem grows while unmounted, as after a reboot: this machine's container may not
resize a mounted filesystem. On a host the same script grows it online.)"""

from __future__ import annotations

import os
import subprocess

import pytest

from components import cloud_init
from tests.conftest import require_binary


@pytest.fixture
def volume(tmp_path):
    for tool in ("losetup", "mkfs.ext4", "resize2fs", "e2fsck", "dumpe2fs", "blockdev", "mount", "umount"):
        require_binary(tool)
    if os.geteuid() != 0:
        pytest.fail("ciris-prepare-volume needs root (make test runs as root)")
    image = tmp_path / "volume.img"
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    device = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True).stdout.strip()
    script = tmp_path / "ciris-prepare-volume"
    script.write_text(cloud_init.PREPARE_VOLUME)
    script.chmod(0o755)
    mnt, fstab = tmp_path / "data", tmp_path / "fstab"
    fstab.write_text("")

    def prepare() -> subprocess.CompletedProcess:
        return subprocess.run([str(script), device, str(mnt)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "CIRIS_FSTAB": str(fstab)})

    yield image, device, mnt, fstab, prepare
    subprocess.run(["umount", str(mnt)], capture_output=True)
    subprocess.run(["losetup", "-d", device], capture_output=True)


def size_of(mnt) -> int:
    st = os.statvfs(mnt)
    return st.f_blocks * st.f_frsize


def test_a_blank_volume_is_formatted_mounted_and_grown_with_its_data_kept(volume):
    image, device, mnt, fstab, prepare = volume
    first = prepare()
    assert first.returncode == 0, first.stderr
    assert os.path.ismount(mnt) and fstab.read_text().count(f" {mnt} ext4 ") == 1
    (mnt / "canary").write_text("kept")
    before = size_of(mnt)
    again = prepare()  # every deploy runs it: nothing changes
    assert again.returncode == 0 and again.stderr == "" and fstab.read_text().count(f" {mnt} ext4 ") == 1
    # volume_gb raised: the provider grows the device; the host rebooted before the next deploy.
    subprocess.run(["umount", str(mnt)], check=True)
    with open(image, "r+b") as f:
        f.truncate(128 * 1024 * 1024)
    subprocess.run(["losetup", "-c", device], check=True)
    grown = prepare()
    assert grown.returncode == 0, grown.stderr
    assert f"grew the filesystem on {device}" in grown.stderr, grown.stderr
    assert os.path.ismount(mnt) and (mnt / "canary").read_text() == "kept"
    assert size_of(mnt) > 1.8 * before
