"""`kvmlx keygen` and `kvmlx trust add|ls|rm`: publisher keys and the local trust list.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..artifact import trust as trust_api
from ..errors import KvmlxError
from .app import KvmlxGroup, emit, main, read_text


@main.command()
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Private key file to write (default: keys/publisher.pem under $KVMLX_HOME or ~/.config/kvmlx).")
@click.option("--raw", is_flag=True, help="Write the raw 32-byte seed instead of PEM (cannot be encrypted).")
@click.option("--encrypt", is_flag=True, help="Protect the key with a passphrase ($KVMLX_KEY_PASSPHRASE, or asked twice).")
@click.option("--force", is_flag=True, help="Replace an existing key file (artifacts it signed stop being verifiable as yours).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def keygen(out, raw, encrypt, force, as_json) -> None:
    """Make an Ed25519 publisher key (file mode 0600) and print its public id for `kvmlx trust add`."""
    passphrase = None
    if encrypt:
        if raw:
            raise click.UsageError("--raw keys cannot be encrypted; drop --raw or --encrypt")
        passphrase = os.environ.get(trust_api.PASSPHRASE_ENV) or click.prompt(
            "new key passphrase", hide_input=True, confirmation_prompt=True, err=True)
    key = trust_api.generate_key()
    path = trust_api.write_private_key(key, out or trust_api.default_key_path(), encoding="raw" if raw else "pem",
                                       passphrase=passphrase, overwrite=force)
    key_id = trust_api.public_key_id(key)
    if as_json:
        emit({"public_key": key_id, "key_file": str(path), "public_key_file": f"{path}.pub", "encrypted": bool(passphrase)})
    else:
        click.echo(key_id)
        click.echo(f"private key: {path} (mode 600{', passphrase-protected' if passphrase else ''}); public id also in {path}.pub",
                   err=True)


@main.group(cls=KvmlxGroup)
def trust() -> None:
    """Manage the publishers whose signed artifacts you accept (`generate --require-signed`, `verify`)."""


def _key_argument(value: str) -> str:
    """A public key id, or a file holding one (such as the .pub file `kvmlx keygen` writes)."""
    if not value.strip().startswith(trust_api.KEY_PREFIX) and Path(value).is_file():
        first = (read_text(value, "public key file", allow_empty=True)[:256].strip().splitlines() or [""])[0].strip()
        if not first.startswith(trust_api.KEY_PREFIX):
            raise KvmlxError(f"{value}: not a public key file (its first line should be {trust_api.KEY_PREFIX}..., "
                             "as in the .pub file `kvmlx keygen` writes)")
        return first
    return value


@trust.command("add")
@click.argument("pubkey")
@click.option("--name", "-n", default=None, help="A name for this publisher (default: the key's first characters).")
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
def trust_add(pubkey, name, as_json) -> None:
    """Trust PUBKEY (ed25519:..., or a .pub file) as a publisher."""
    entry = trust_api.TrustList.load().add(_key_argument(pubkey), name)
    if as_json:
        emit(entry.to_json())
    else:
        click.echo(f"trusted {entry.key} as {entry.name!r}")


@trust.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the trust list as JSON.")
def trust_ls(as_json) -> None:
    """List trusted publishers."""
    trusted = trust_api.TrustList.load()
    if as_json:
        emit({"path": str(trusted.path), **trusted.to_json()})
        return
    for e in trusted.entries:
        click.echo(f"{e.key}  {e.name}  (added {e.added})")
    if not trusted.entries:
        click.echo(f"no trusted publishers ({trusted.path})", err=True)


@trust.command("rm")
@click.argument("key_or_name")
@click.option("--json", "as_json", is_flag=True, help="Print the removed entry as JSON.")
def trust_rm(key_or_name, as_json) -> None:
    """Stop trusting a publisher, by key id or name."""
    entry = trust_api.TrustList.load().remove(_key_argument(key_or_name))
    if as_json:
        emit(entry.to_json())
    else:
        click.echo(f"removed {entry.key} ({entry.name!r})")
