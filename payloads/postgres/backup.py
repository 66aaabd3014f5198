"""Daily encrypted logical backups of the billing database to S3-compatible storage (FSD §6.1).

    python backup.py run                 # pg_dump -Fc, encrypt, upload, prune past the retention
    python backup.py list
    python backup.py restore NAME --into DSN
    python backup.py status              # the newest backup's time to BACKUP_STATUS_FILE (for pg_exporter.py)

Encryption is client-side AES-256-GCM (the `cryptography` library) with a 32-byte key from a
Pulumi secret: the bucket only ever holds ciphertext, and a tampered or wrongly-keyed object
fails authentication before anything is restored. Object names carry their UTC timestamp, which
is what retention prunes by. Settings come from the environment: DATABASE_URL,
BACKUP_S3_ENDPOINT, BACKUP_S3_BUCKET, BACKUP_S3_ACCESS_KEY, BACKUP_S3_SECRET_KEY,
BACKUP_S3_REGION (optional), BACKUP_ENCRYPTION_KEY (base64 of 32 bytes), BACKUP_RETENTION_DAYS (30),
BACKUP_PREFIX ("pg_dump/"), BACKUP_STATUS_FILE (where `run` and `status` record the newest backup in
the bucket, whichever member made it: the database's exporter serves it as
ciris_backup_last_success_timestamp_seconds).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import boto3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"CIRISBK1"
NAME_RE = re.compile(r"^ciris-(\d{8}T\d{6}Z)\.dump\.enc$")


class BackupError(RuntimeError):
    pass


def encrypt(plain: bytes, key: bytes) -> bytes:
    nonce = os.urandom(12)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, plain, MAGIC)


def decrypt(blob: bytes, key: bytes) -> bytes:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 12 + 16:
        raise BackupError("not a ciris-bridge backup (bad header)")
    nonce, body = blob[len(MAGIC) : len(MAGIC) + 12], blob[len(MAGIC) + 12 :]
    try:
        return AESGCM(key).decrypt(nonce, body, MAGIC)
    except InvalidTag:
        raise BackupError("backup failed authentication: wrong key or tampered object; nothing restored") from None


def backup_name(when: dt.datetime) -> str:
    return f"ciris-{when.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}.dump.enc"


def name_time(name: str) -> dt.datetime | None:
    m = NAME_RE.match(name.rsplit("/", 1)[-1])
    return dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc) if m else None


@dataclass
class Store:
    client: object
    bucket: str
    prefix: str = "pg_dump/"

    def put(self, name: str, blob: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=blob)

    def get(self, name: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise BackupError(f"no backup named {name!r} in s3://{self.bucket}/{self.prefix}") from None

    def names(self) -> list[str]:
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            names += [o["Key"][len(self.prefix) :] for o in page.get("Contents", [])]
        return sorted(n for n in names if name_time(n))

    def prune(self, retention_days: int, now: dt.datetime) -> list[str]:
        cutoff = now - dt.timedelta(days=retention_days)
        old = [n for n in self.names() if name_time(n) < cutoff]
        for n in old:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + n)
        return old


def dump(dsn: str) -> bytes:
    with tempfile.NamedTemporaryFile() as out:
        result = subprocess.run(["pg_dump", "--format=custom", "--file", out.name, dsn], capture_output=True, text=True)
        if result.returncode != 0:
            raise BackupError(f"pg_dump failed: {result.stderr.strip()[-500:]}")
        return open(out.name, "rb").read()


def restore_into(dsn: str, plain: bytes) -> None:
    with tempfile.NamedTemporaryFile() as f:
        f.write(plain)
        f.flush()
        result = subprocess.run(
            ["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", "--dbname", dsn, f.name],
            capture_output=True,
            text=True,
        )
    if result.returncode != 0:
        raise BackupError(f"pg_restore failed: {result.stderr.strip()[-500:]}")


def run(store: Store, dsn: str, key: bytes, retention_days: int, now: dt.datetime | None = None) -> tuple[str, list[str]]:
    now = now or dt.datetime.now(dt.timezone.utc)
    name = backup_name(now)
    store.put(name, encrypt(dump(dsn), key))
    return name, store.prune(retention_days, now)


def newest(store: Store) -> dt.datetime | None:
    names = store.names()
    return name_time(names[-1]) if names else None  # names sort by their timestamp


def write_status(path: str, when: dt.datetime | None) -> None:
    """{"newest": epoch seconds} (atomically: the exporter never reads half a file); nothing when
    the bucket holds no backup yet, so the metric stays absent rather than claim one."""
    if when is None:
        return
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"newest": when.timestamp()}, f)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def restore(store: Store, name: str, key: bytes, target_dsn: str) -> None:
    restore_into(target_dsn, decrypt(store.get(name), key))  # decrypt first: nothing half-restored


def load_env_file() -> None:
    """The container's secret settings come as a file ($CIRIS_ENV_FILE, as env-file.sh reads it for
    the shell scripts), so `docker compose exec backup python3 backup.py ...` finds them too."""
    path = os.environ.get("CIRIS_ENV_FILE", "").strip()
    if not path:
        return
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise BackupError(f"CIRIS_ENV_FILE names {path}, which cannot be read ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        key, sep, value = line.partition("=")
        if line.strip() and not line.startswith("#"):
            if not sep or not key.isidentifier():
                raise BackupError(f"CIRIS_ENV_FILE: line {n} of {path} is not KEY=value")
            os.environ[key] = value


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        raise BackupError(f"{name} is not set")
    return value


def key_from_env() -> bytes:
    try:
        key = base64.b64decode(_env("BACKUP_ENCRYPTION_KEY"), validate=True)
    except ValueError:
        raise BackupError("BACKUP_ENCRYPTION_KEY is not base64") from None
    if len(key) != 32:
        raise BackupError(f"BACKUP_ENCRYPTION_KEY must decode to 32 bytes, not {len(key)}")
    return key


def store_from_env() -> Store:
    client = boto3.client(
        "s3",
        endpoint_url=_env("BACKUP_S3_ENDPOINT"),
        aws_access_key_id=_env("BACKUP_S3_ACCESS_KEY"),
        aws_secret_access_key=_env("BACKUP_S3_SECRET_KEY"),
        region_name=os.environ.get("BACKUP_S3_REGION", "us-east-1"),
    )
    return Store(client, _env("BACKUP_S3_BUCKET"), os.environ.get("BACKUP_PREFIX", "pg_dump/"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run")
    sub.add_parser("list")
    sub.add_parser("status")
    r = sub.add_parser("restore")
    r.add_argument("name")
    r.add_argument("--into", required=True, help="DSN of a fresh, empty database")
    args = parser.parse_args(argv)
    try:
        load_env_file()
        store = store_from_env()
        if args.cmd == "list":
            print("\n".join(store.names()))
        elif args.cmd == "run":
            name, pruned = run(store, _env("DATABASE_URL"), key_from_env(), int(os.environ.get("BACKUP_RETENTION_DAYS", "30")))
            print(f"uploaded {name}; pruned {len(pruned)} older than the retention")
            if os.environ.get("BACKUP_STATUS_FILE"):
                write_status(os.environ["BACKUP_STATUS_FILE"], newest(store))
        elif args.cmd == "status":
            when = newest(store)
            write_status(_env("BACKUP_STATUS_FILE"), when)
            print(f"newest backup: {when:%Y-%m-%dT%H:%M:%SZ}" if when else "no backup in the bucket yet")
        else:
            restore(store, args.name, key_from_env(), args.into)
            print(f"restored {args.name}")
    except BackupError as e:
        print(f"backup: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
