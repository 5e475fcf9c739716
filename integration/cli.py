"""The `stashflow` command. Its groups mirror the project's folders; each package adds
its own group, imported lazily so that `stashflow cache ...` never imports placement."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

# group name -> (module, attribute) providing a click.Group
_GROUPS = {
    "cache": ("stashflow.cache.cli", "cache_group"),
    "director": ("stashflow.cache.director.cli", "director_group"),
    "origin": ("stashflow.cache.origin.cli", "origin_group"),
    "token": ("stashflow.integration.tokens_cli", "token_group"),
    "placement": ("stashflow.placement.cli", "placement_group"),
    "swdist": ("stashflow.swdist.cli", "swdist_group"),
    "federation": ("stashflow.integration.federation", "federation_group"),
}

_HELP = {
    "cache": "Run and manage a caching proxy near compute.",
    "director": "Run the federation director (redirects clients to caches).",
    "origin": "Export storage to the federation.",
    "token": "Create keys and WLCG tokens for a site-run issuer.",
    "placement": "Catalog, placement rules and transfers (Rucio-compatible server).",
    "swdist": "Publish and mount software repositories.",
    "federation": "Run a whole local federation with embedded defaults.",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in _GROUPS if self._available(name))

    def _loaded(self, ctx: click.Context, name: str) -> bool:
        return self.get_command(ctx, name) is not None

    @staticmethod
    def _available(name: str) -> bool:
        module, _ = _GROUPS[name]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _GROUPS or not self._available(cmd_name):
            return None
        module, attr = _GROUPS[cmd_name]
        command: click.Command | None = getattr(importlib.import_module(module), attr, None)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _HELP.get(name, "")) for name in self.list_commands(ctx)
                if self._loaded(ctx, name)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stashflow")
def cli() -> None:
    """stashflow: caches, data placement and software distribution for grid sites.

    Each command group has its own --help, e.g. `stashflow cache serve --help`.
    """


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
