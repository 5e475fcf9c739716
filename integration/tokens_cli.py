"""`stashflow token ...`: keys and WLCG tokens for a site that runs its own issuer."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import click

from stashflow.integration import tokens
from stashflow.integration.config import ConfigError, parse_duration


def _fail(message: str) -> None:
    click.echo(f"stashflow token: {message}", err=True)
    sys.exit(1)


@click.group("token", context_settings={"help_option_names": ["-h", "--help"]})
def token_group() -> None:
    """Create signing keys and WLCG profile tokens for a site-run issuer.

    \b
    A site that protects a namespace with its own issuer:
      stashflow token keygen --out /etc/stashflow/issuer
      # publish /etc/stashflow/issuer/jwks.json (or give it to the origin as --jwks)
      stashflow token issue --key /etc/stashflow/issuer/<kid>.pem \\
          --issuer https://issuer.example.org --scope storage.read:/ns --lifetime 1h
    """


@token_group.command("keygen")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for <kid>.pem (private key, mode 0600) and jwks.json (public keys).",
)
@click.option("--kid", help="Key id put in the JWKS and in tokens [RFC 7638 thumbprint].")
@click.option(
    "--alg",
    type=click.Choice(["ES256", "ES384", "RS256"]),
    default="ES256",
    show_default=True,
    help="Signature algorithm (ES256: small and fast; RS256: widest support).",
)
def keygen_command(out_dir: str, kid: str | None, alg: str) -> None:
    """Create a signing key and add its public half to DIR/jwks.json.

    Run it again with a new --kid to rotate: the JWKS keeps the previous keys, so tokens
    signed with them stay valid until you remove them from jwks.json.
    """
    try:
        made = tokens.keygen(out_dir, kid=kid, alg=alg)
    except (ValueError, OSError) as e:
        _fail(str(e))
        return
    click.echo(
        json.dumps(
            {
                "kid": made.kid,
                "alg": made.alg,
                "private_key": str(made.private_key),
                "jwks": str(made.jwks),
            }
        )
    )


@token_group.command("issue")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Private key PEM (from `stashflow token keygen`).",
)
@click.option("--issuer", required=True, help="Issuer URL put in 'iss' (as the services trust it).")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    metavar="SCOPE",
    help="e.g. storage.read:/ns, storage.create:/ns/user, storage.modify:/ns. Repeatable.",
)
@click.option(
    "--audience",
    "audiences",
    multiple=True,
    metavar="AUD",
    help=f"Service the token is for ('aud'); repeatable [{tokens.ANY_AUDIENCE}].",
)
@click.option("--lifetime", default="1h", show_default=True, help="Validity, e.g. 20m, 1h, 2d.")
@click.option("--subject", help="'sub' claim: who the token is for [stashflow-token-issue].")
@click.option("--kid", help="Key id [the one jwks.json beside the key gives it, else thumbprint].")
def issue_command(
    key_path: str,
    issuer: str,
    scopes: tuple[str, ...],
    audiences: tuple[str, ...],
    lifetime: str,
    subject: str | None,
    kid: str | None,
) -> None:
    """Print a signed WLCG token (the JWT alone, for `BEARER_TOKEN=$(...)`)."""
    try:
        seconds = parse_duration(lifetime)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="--lifetime") from None
    if seconds <= 0:
        raise click.BadParameter("must be positive", param_hint="--lifetime")
    for scope in scopes:
        name, _, path = scope.partition(":")
        if name.startswith("storage.") and path and not path.startswith("/"):
            raise click.BadParameter(f"{scope!r}: the path must be absolute", param_hint="--scope")
    audience: str | list[str] = (
        list(audiences)
        if len(audiences) > 1
        else (audiences[0] if audiences else tokens.ANY_AUDIENCE)
    )
    try:
        token = tokens.issue(
            key_path,
            issuer,
            scopes,
            audience=audience,
            lifetime=seconds,
            subject=subject,
            kid=kid,
        )
    except ValueError as e:
        _fail(str(e))
        return
    click.echo(token)


@token_group.command("verify")
@click.option("--issuer", "issuers", multiple=True, required=True, help="Trusted issuer URL.")
@click.option(
    "--jwks",
    "jwks",
    multiple=True,
    help="JWKS file or URL of each --issuer, in order [discovered from the issuer].",
)
@click.option("--audience", "audiences", multiple=True, help="Accepted audience; repeatable.")
@click.option("--path", help="Also check that the token allows --action on this path.")
@click.option(
    "--action",
    type=click.Choice(list(tokens.NEEDS)),
    default="read",
    show_default=True,
    help="What --path is checked for.",
)
@click.argument("token", required=False)
def verify_command(
    issuers: tuple[str, ...],
    jwks: tuple[str, ...],
    audiences: tuple[str, ...],
    path: str | None,
    action: str,
    token: str | None,
) -> None:
    """Check TOKEN (or a token on standard input) as a service would; print its claims.

    Exits 1 with the reason when the token would be refused.
    """
    if jwks and len(jwks) != len(issuers):
        raise click.UsageError("give one --jwks per --issuer, or none to discover them")
    raw = token if token is not None else sys.stdin.read().strip()
    sources: dict[str, str | None] = {
        iss: (jwks[i] if jwks else None) for i, iss in enumerate(issuers)
    }

    async def run() -> tokens.Token:
        verifier = tokens.TokenVerifier(sources, audiences=audiences)
        try:
            checked = await verifier.verify(raw)
            if path is not None:
                checked.require(action, path)
            return checked
        finally:
            await verifier.close()

    try:
        checked = asyncio.run(run())
    except tokens.TokenError as e:
        _fail(f"refused (HTTP {e.status}, {e.reason}): {e.message}")
        return
    left = int(checked.expires - time.time())
    click.echo(
        json.dumps(
            {
                "issuer": checked.issuer,
                "subject": checked.subject,
                "audience": list(checked.audiences),
                "expires_in_seconds": left,
                "scopes": [str(s) for s in checked.scopes],
            },
            indent=2,
        )
    )
