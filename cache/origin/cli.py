"""`stashflow origin serve`: export storage to the federation over HTTP(S)/WebDAV."""

from __future__ import annotations

import os
import sys

import click

from stashflow.integration.config import ConfigError, parse_duration


@click.group("origin", context_settings={"help_option_names": ["-h", "--help"]})
def origin_group() -> None:
    """Export storage (posix, S3, XRootD, WebDAV) to the federation."""


def _split_export(value: str) -> tuple[str, str]:
    prefix, sep, url = value.partition("=")
    if not sep or not prefix.startswith("/") or not url:
        raise click.BadParameter(
            f"{value!r}: use /NS=STORAGE_URL, e.g. /ns=file:///srv/data", param_hint="--export"
        )
    return "/" + prefix.strip("/"), url


@origin_group.command("serve")
@click.option(
    "--listen", default="127.0.0.1:8443", show_default=True, help="HOST:PORT to serve on."
)
@click.option(
    "--export",
    "exports",
    multiple=True,
    required=True,
    metavar="/NS=URL",
    help="Namespace and the storage behind it: file:///dir, s3://bucket/prefix "
    "(endpoint from STASHFLOW_S3_ENDPOINT, keys from AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY), root://host:port//path, https://host/path. Repeatable.",
)
@click.option("--public", is_flag=True, help="Every export can be read without a token.")
@click.option(
    "--public-export",
    "public_exports",
    multiple=True,
    metavar="/NS",
    help="This export can be read without a token (others need one). Repeatable.",
)
@click.option(
    "--issuer",
    "issuers",
    multiple=True,
    metavar="URL",
    help="Trusted token issuer (the tokens' 'iss'). Repeatable.",
)
@click.option(
    "--jwks",
    "jwks",
    multiple=True,
    metavar="FILE|URL",
    help="The public keys of each --issuer, in the same order: a JWKS file or URL "
    "[discovered from the issuer's /.well-known/openid-configuration].",
)
@click.option(
    "--issuer-base-path",
    "base_paths",
    multiple=True,
    metavar="PATH",
    help="The path each --issuer's token scopes are relative to, in the same order "
    "(storage.read:/x with base path /ns grants /ns/x) [/: scopes name federation "
    "paths]. Published to the director at /.well-known/stashflow-origin.",
)
@click.option(
    "--audience",
    "audiences",
    multiple=True,
    help="Token audience accepted besides this origin's URL and the WLCG 'any' "
    "audience. Repeatable.",
)
@click.option(
    "--tls-cert", type=click.Path(dir_okay=False), help="PEM certificate (chain): serve HTTPS."
)
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key of --tls-cert.")
@click.option(
    "--access-log", default="-", show_default=True, help="Access log file, '-' for stderr, 'off'."
)
@click.option(
    "--jwks-refresh",
    default="10m",
    show_default=True,
    help="Refetch a JWKS URL this often.",
)
@click.option(
    "--jwks-min-refresh",
    default="30s",
    show_default=True,
    help="A token with an unknown key id refetches the JWKS at most this often.",
)
def serve(
    listen: str,
    exports: tuple[str, ...],
    public: bool,
    public_exports: tuple[str, ...],
    issuers: tuple[str, ...],
    jwks: tuple[str, ...],
    base_paths: tuple[str, ...],
    audiences: tuple[str, ...],
    tls_cert: str | None,
    tls_key: str | None,
    access_log: str,
    jwks_refresh: str,
    jwks_min_refresh: str,
) -> None:
    """Serve one or more storage exports over HTTP(S) with WebDAV.

    \b
    Examples:
      # public, read-only for anonymous clients:
      stashflow origin serve --listen 0.0.0.0:8443 --export /ns=file:///srv/data --public \\
          --tls-cert host.pem --tls-key host.key
      # protected: every request needs a WLCG token from this issuer:
      stashflow origin serve --export /ns=s3://bucket/data \\
          --issuer https://issuer.example.org --jwks https://issuer.example.org/jwks

    Objects are at <origin>/<ns>/<path>: GET and HEAD (ranges, ETag, Want-Digest),
    PROPFIND (Depth 0 or 1), PUT (atomic; a Digest header is verified), DELETE, MKCOL
    and MOVE. Reads of public exports need no token; everything else needs a bearer
    token whose scope covers the path: storage.read for reads, storage.create for new
    objects and renames onto a free name, storage.modify to overwrite, delete or rename
    onto an existing name.
    """
    from stashflow.cache.origin.server import OriginConfig, build_exports
    from stashflow.cache.origin.server import serve as run
    from stashflow.integration.tokens import normalise_base_path

    exported = dict(_split_export(e) for e in exports)
    unknown = [p for p in public_exports if "/" + p.strip("/") not in exported]
    if unknown:
        raise click.BadParameter(
            f"{', '.join(unknown)} is not an --export", param_hint="--public-export"
        )
    if jwks and len(jwks) != len(issuers):
        raise click.UsageError("give one --jwks per --issuer (same order), or none to discover")
    if base_paths and len(base_paths) != len(issuers):
        raise click.UsageError(
            "give one --issuer-base-path per --issuer (same order; / for absolute scopes), or none"
        )
    issuer_bases: dict[str, str] = {}
    for i, base in enumerate(base_paths):
        try:
            issuer_bases[issuers[i]] = normalise_base_path(base)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--issuer-base-path") from None
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    public_set = {"*"} if public else {"/" + p.strip("/") for p in public_exports}
    protected = [p for p in exported if "*" not in public_set and p not in public_set]
    if protected and not issuers:
        raise click.UsageError(
            f"{', '.join(protected)} would be readable by nobody: give --public (or "
            "--public-export) or an --issuer whose tokens grant access"
        )
    for path in (tls_cert, tls_key):
        if path and not os.path.isfile(path):
            raise click.BadParameter(f"{path} does not exist", param_hint="--tls-cert/--tls-key")
    try:
        cfg = OriginConfig(
            listen=listen,
            exports=exported,
            public=public_set,
            issuers={iss: (jwks[i] if jwks else None) for i, iss in enumerate(issuers)},
            base_paths=issuer_bases,
            audiences=list(audiences),
            tls_cert=tls_cert,
            tls_key=tls_key,
            access_log=None if access_log == "off" else access_log,
            jwks_ttl=parse_duration(jwks_refresh),
            jwks_min_refresh=parse_duration(jwks_min_refresh),
        )
        cfg.host_port  # noqa: B018 - validates --listen before anything starts
        for path, source in cfg.issuers.items():
            if source and "://" not in source and not os.path.isfile(source):
                raise ValueError(f"--jwks {source} (for {path}) does not exist")
        for export in build_exports(cfg):
            storage_root = getattr(export.storage, "root", None)
            if export.storage.scheme == "file" and not os.path.isdir(str(storage_root)):
                raise ValueError(
                    f"--export {export.prefix}: directory {storage_root} does not exist"
                )
    except (ConfigError, ValueError) as e:
        raise click.UsageError(str(e)) from None

    def ready(url: str) -> None:
        names = ", ".join(
            f"{p} ({'public' if p in public_set or '*' in public_set else 'token'})"
            for p in exported
        )
        print(f"stashflow origin: serving {names} on {url}", file=sys.stderr, flush=True)

    run(cfg, ready)
