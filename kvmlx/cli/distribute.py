"""The distribution commands: `serve-artifacts`, `fetch`, `token issue|report`, `push` and `pull`,
registered on the root `kvmlx` group; arguments and printing only, over kvmlx.serving.{artifacts,
entitlements,fetch,hub} (docs/DISTRIBUTION.md has the whole story).

    server:  kvmlx serve-artifacts DIR --publisher-key ed25519:... [--price DIGEST=USD]
    buyer:   kvmlx fetch http://host:8377/artifacts/<digest> --token <token>
    tokens:  kvmlx token issue --artifact <digest> --loads 3 --expires 30d      (publisher, private key)
             kvmlx token report --log DIR/metering.jsonl --prices DIR/prices.json
"""

from __future__ import annotations

import sys

import click

from ..artifact import trust as trust_api
from ..serving.artifacts import (DEFAULT_HOST, DEFAULT_PORT, METERING_FILE, PRICES_FILE, ArtifactServer,
                                 run_server)
from ..serving.entitlements import (DIGEST_RE, format_report, issue_token, load_prices, parse_expiry, parse_prices,
                                    report, token_claims_unverified)
from ..serving.fetch import fetch
from ..serving.hub import pull, push
from .app import KvmlxGroup, ask_passphrase, emit, main


@main.command("serve-artifacts")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to bind (default: this machine only).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option("--price", "prices", multiple=True, metavar="DIGEST=USD",
              help=f"Price per load (repeatable; also read from DIRECTORY/{PRICES_FILE}).")
@click.option("--publisher-key", default=None, metavar="ed25519:...|FILE",
              help="Public key whose tokens unlock priced artifacts (the server never holds the private key).")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None,
              help=f"Metering log (JSON lines); the token ledger is LOG.ledger.sqlite beside it.  "
                   f"[default: DIRECTORY/{METERING_FILE}]")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes (uvicorn); they share the SQLite token ledger, so loads stay exact.")
def serve_artifacts(directory, host, port, prices, publisher_key, log_path, workers) -> None:
    """Serve the artifacts in DIRECTORY (a folder of .kvmlx files or a kvmlx store) over HTTP."""
    server = ArtifactServer(directory, prices=parse_prices(list(prices)), publisher_key=publisher_key, log=log_path)
    click.echo(f"serving {len(server.catalog)} artifacts on http://{host}:{port}/catalog"
               + (f" ({workers} workers)" if workers > 1 else ""), err=True)
    run_server(server, host=host, port=port, workers=workers)


@main.command("fetch")
@click.argument("url")
@click.option("--token", default=None, envvar="KVMLX_TOKEN", help="Access token for a priced artifact ($KVMLX_TOKEN).")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None, help="Store directory (default: $KVMLX_HOME/store).")
@click.option("--require-signed", is_flag=True, help="Refuse the artifact unless signed by a key in your trust list.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def fetch_command(url, token, store_dir, require_signed, quiet, as_json) -> None:
    """Download an artifact (resuming a partial download) and add it to the local store, verified."""
    res = fetch(url, token=token, store=store_dir, require_signed=require_signed,
                progress=not quiet and not as_json and sys.stderr.isatty())
    if as_json:
        emit(res.to_json())
    else:
        click.echo(f"stored {res.key} ({res.path.stat().st_size:,} bytes; {res.bytes_downloaded:,} downloaded"
                   + (f", resumed at {res.resumed_from:,}" if res.resumed_from else "") + ")")


@main.group("token", cls=KvmlxGroup)
def token_group() -> None:
    """Issue access tokens for priced artifacts; report what the metering log says was sold."""


@token_group.command("issue")
@click.option("--artifact", "artifact", required=True, help="Header digest (hex) of the artifact, as in the catalog.")
@click.option("--loads", type=click.IntRange(1), default=1, show_default=True, help="Full downloads the token allows.")
@click.option("--expires", default="30d", show_default=True, help="Duration (90s, 15m, 12h, 30d), Unix time or ISO date.")
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The publisher's private key (default: the one `kvmlx keygen` wrote).")
@click.option("--json", "as_json", is_flag=True, help="Print the token and its claims as JSON.")
def token_issue(artifact, loads, expires, key_path, as_json) -> None:
    """Mint a signed access token for one artifact."""
    if not DIGEST_RE.match(artifact.lower()):
        raise click.BadParameter("a 64-hex header digest, as in the catalog", param_hint="--artifact")
    key = trust_api.load_private_key(key_path or trust_api.default_key_path(), ask_passphrase)
    try:
        exp = parse_expiry(expires)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--expires") from None
    tok = issue_token(key, artifact.lower(), loads, exp)
    if as_json:
        emit({"token": tok, "claims": token_claims_unverified(tok)})
    else:
        click.echo(tok)


@token_group.command("report")
@click.option("--log", "log_path", type=click.Path(exists=True, dir_okay=False), required=True, help="The server's metering log.")
@click.option("--prices", "prices_path", type=click.Path(exists=True, dir_okay=False), default=None, help="prices.json.")
@click.option("--price", "prices", multiple=True, metavar="DIGEST=USD", help="Price per load (repeatable).")
@click.option("--egress-per-gb", type=float, default=None, help="Egress $ per GB.  [default: kvmlx cost's 0.09]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def token_report(log_path, prices_path, prices, egress_per_gb, as_json) -> None:
    """Per-artifact loads, bytes served, revenue and egress cost from a metering log."""
    p = load_prices(prices_path) if prices_path else {}
    p.update(parse_prices(list(prices)))
    rep = report(log_path, p, egress_per_gb=egress_per_gb)
    emit(rep) if as_json else click.echo(format_report(rep))


@main.command("push")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--repo", required=True, help="Hub repository OWNER/NAME (created if missing).")
@click.option("--path-in-repo", default=None, help="File name in the repository (default: the artifact's).")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--no-card", is_flag=True, help="Do not write the README.md model card.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def push_command(artifact, repo, path_in_repo, private, no_card, as_json) -> None:
    """Upload an artifact to the Hugging Face Hub, with a model card (README.md: base model, tokens,
    dtype, fingerprints, signature)."""
    res = push(artifact, repo, path_in_repo=path_in_repo, private=private, card=not no_card)
    emit(res) if as_json else click.echo(f"pushed {res['file']} to {repo} ({res['digest'][:16]})")


@main.command("pull")
@click.argument("spec", metavar="OWNER/NAME[:FILE]")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None, help="Store directory.")
@click.option("--revision", default=None, help="Branch, tag or commit.")
@click.option("--require-signed", is_flag=True, help="Refuse the artifact unless signed by a key in your trust list.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def pull_command(spec, store_dir, revision, require_signed, as_json) -> None:
    """Download an artifact from the Hugging Face Hub into the local store, verified."""
    res = pull(spec, store=store_dir, require_signed=require_signed, revision=revision)
    emit(res.to_json()) if as_json else click.echo(f"stored {res.key} from {spec}")
