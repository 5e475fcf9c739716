"""`stashcp`: copy objects out of (and into) a stashflow / Pelican / OSDF federation.

    stashcp [options] SOURCE... DEST
    stashcp -classad
    stashcp -infile IN -outfile OUT [-upload]

See docs/stashcp.md for the job author's guide and the exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import posixpath
import sys
import time
from pathlib import Path
from typing import Any

from stashflow.cache.client import bulk, condor
from stashflow.cache.client.allocator import keep_freed_memory
from stashflow.cache.client.discovery import Remote, is_remote, parse_remote, server_of
from stashflow.cache.client.errors import (
    EXIT_OK,
    EXIT_PERMANENT,
    EXIT_USAGE,
    LocalError,
    NotFound,
    StashError,
    UsageError,
)
from stashflow.cache.client.progress import Progress
from stashflow.cache.client.transfer import Client, Options, Result

log = logging.getLogger("stashcp")

EPILOG = """\
sources: stash:///ns/path, osdf:///ns/path, pelican://federation-host/ns/path,
  a plain /ns/path, or an http(s):// URL (read directly). A DEST URL means upload.

exit codes: 0 success, 2 usage, 10 not found, 11 authorization,
  12 transfer failed (retryable), 13 transfer failed (permanent).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stashcp",
        usage="stashcp [options] SOURCE... DEST",
        description="Copy objects from (or to) a data federation through the nearest cache.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("paths", nargs="*", metavar="SOURCE... DEST", help=argparse.SUPPRESS)
    p.add_argument("-d", "--debug", action="store_true", help="print debugging information")
    p.add_argument("-r", "--recursive", action="store_true", help="copy collections recursively")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress", action="store_true", help="a progress bar even when not a tty")
    p.add_argument(
        "-c",
        "--cache",
        action="append",
        metavar="URL",
        help="read through these caches only (repeatable or comma-separated), "
        "skipping the director",
    )
    p.add_argument("--director", metavar="URL", help="the director [STASHFLOW_DIRECTOR]")
    p.add_argument(
        "--origin",
        metavar="URL",
        help="without a director: the origin for listings (-r), uploads and, after "
        "the --cache list, reads",
    )
    p.add_argument("-t", "--token", metavar="TOKEN|FILE", help="bearer token, or a file with it")
    p.add_argument(
        "--methods",
        metavar="LIST",
        help="transfer methods, classic stashcp style; only http is implemented",
    )
    p.add_argument("--closest", action="store_true", help="print the nearest cache and exit")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("-j", "--parallel", type=int, metavar="N", help="files in parallel [16]")
    p.add_argument("--chunks", type=int, metavar="N", help="parallel ranges per large file [4]")
    p.add_argument("--chunk-size", metavar="SIZE", help="size of one range request [32MiB]")
    p.add_argument(
        "--checksum",
        metavar="ALG",
        help="auto (the best the server offers), none, adler32, md5, crc32c or sha256",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore partial earlier downloads")
    p.add_argument("--limit-rate", metavar="SIZE", help="cap the total rate, bytes per second")
    p.add_argument("--min-rate", metavar="SIZE",
                   help="slower than this per second is a stall [64KiB]")
    p.add_argument("--stall-window", metavar="DURATION", help="over this window [30s]")
    p.add_argument("--no-origin", action="store_true", help="never fall back to the origin")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    # HTCondor file-transfer plugin mode
    p.add_argument("-classad", action="store_true", help="HTCondor: print the plugin ad")
    p.add_argument("-infile", metavar="FILE", help="HTCondor: transfers to do (ClassAds)")
    p.add_argument("-outfile", metavar="FILE", help="HTCondor: where to write result ads")
    p.add_argument("-upload", action="store_true", help="HTCondor: upload instead of download")
    return p


def _options(args: argparse.Namespace) -> Options:
    caches: list[str] | None = None
    if args.cache:
        caches = [c.strip() for item in args.cache for c in item.split(",") if c.strip()]
    return Options.load(
        director=args.director,
        caches=caches,
        origin=args.origin,
        token=args.token,
        parallel_files=args.parallel,
        parallel_chunks=args.chunks,
        chunk_size=args.chunk_size,
        checksum=args.checksum,
        resume=False if args.no_resume else None,
        rate_limit=args.limit_rate,
        min_rate=args.min_rate,
        stall_window=args.stall_window,
        origin_fallback=False if args.no_origin else None,
    )


def _check_methods(methods: str | None) -> None:
    if methods is None:
        return
    names = [m.strip().lower() for m in methods.split(",") if m.strip()]
    if not any(m in ("http", "https") for m in names):
        raise UsageError("--methods", f"{methods!r}: only the http method is implemented")
    others = [m for m in names if m not in ("http", "https")]
    if others:
        log.debug("ignoring transfer methods %s: only http is implemented", ", ".join(others))


# -- planning -----------------------------------------------------------------------------


def _local_target(dest: str, name: str, many: bool) -> Path:
    d = Path(dest)
    if many or dest.endswith(os.sep) or d.is_dir():
        return d / name
    return d


async def _plan_downloads(
    client: Client, sources: list[str], dest: str, recursive: bool
) -> tuple[list[tuple[Remote, Path, int]], list[Result]]:
    """(remote, local path, index of the SOURCE argument) per object, and the sources
    that failed already while planning."""
    plan: list[tuple[Remote, Path, int]] = []
    failed: list[Result] = []
    many = len(sources) > 1
    dest_is_dir = await asyncio.to_thread(os.path.isdir, dest)
    for arg, text in enumerate(sources):
        try:
            remote = parse_remote(text)
        except ValueError as e:
            failed.append(_failure(text, dest, UsageError(text, str(e)), arg))
            continue
        found: list[tuple[Remote, Path]] = []
        try:
            if remote.has_glob():
                entries = await client.glob(remote)
                if not entries:
                    raise NotFound(remote.url(), "no object matches the pattern")
                for ent in entries:
                    name = posixpath.basename(ent.path.rstrip("/"))
                    if ent.is_dir:
                        if not recursive:
                            log.warning("stashcp: skipping collection %s (use -r)", ent.path)
                            continue
                        found += await _plan_tree(client, remote.child(ent.path), Path(dest) / name)
                    else:
                        found.append((remote.child(ent.path), Path(dest) / name))
            elif recursive:
                name = posixpath.basename(remote.path.rstrip("/")) or "root"
                root = Path(dest) / name if (dest_is_dir or many) else Path(dest)
                tree = await _plan_tree(
                    client, remote, root, single=_local_target(dest, name, many)
                )
                found += tree
            else:
                name = posixpath.basename(remote.path.rstrip("/"))
                if not name:
                    raise UsageError(remote.url(), "names a collection: use -r to copy it")
                found.append((remote, _local_target(dest, name, many)))
        except StashError as e:
            failed.append(_failure(remote.url(), dest, e, arg))
        plan += [(r, p, arg) for r, p in found]
    return plan, failed


async def _plan_tree(
    client: Client, remote: Remote, root: Path, single: Path | None = None
) -> list[tuple[Remote, Path]]:
    me, _ = await client.propfind(remote, depth=0)
    if me is not None and not me.is_dir:
        return [(remote, single or root)]
    files = await client.walk(remote)
    base = remote.path.rstrip("/")
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    out: list[tuple[Remote, Path]] = []
    for ent in files:
        rel = ent.path[len(base) :].lstrip("/")
        target = root.joinpath(*rel.split("/"))
        out.append((remote.child(ent.path), target))
    for parent in sorted({t.parent for _, t in out}):
        await asyncio.to_thread(parent.mkdir, parents=True, exist_ok=True)
    return out


def _plan_uploads(
    sources: list[str], dest: Remote, recursive: bool
) -> tuple[list[tuple[Path, Remote, int]], list[str], list[Result]]:
    """(local file, remote, index of the SOURCE argument) per file, the collections to
    create, and the sources that failed already while planning."""
    plan: list[tuple[Path, Remote, int]] = []
    dirs: list[str] = []
    failed: list[Result] = []
    many = len(sources) > 1
    into = dest.path.endswith("/") or many
    for arg, text in enumerate(sources):
        src = Path(text)
        if src.is_dir():
            if not recursive:
                failed.append(
                    _failure(text, dest.url(), LocalError(text, "is a directory: use -r"), arg)
                )
                continue
            base = dest.path.rstrip("/")
            if into:
                base = posixpath.join(base, src.resolve().name)
            dirs.append(base)
            for root, subdirs, files in os.walk(src):
                subdirs.sort()
                rel_root = os.path.relpath(root, src)
                remote_root = (
                    base if rel_root == "." else posixpath.join(base, *rel_root.split(os.sep))
                )
                if rel_root != ".":
                    dirs.append(remote_root)
                for f in sorted(files):
                    remote = dest.child(posixpath.join(remote_root, f))
                    plan.append((Path(root) / f, remote, arg))
        elif src.exists():
            target = posixpath.join(dest.path, src.name) if into else dest.path
            plan.append((src, dest.child(target), arg))
        else:
            failed.append(_failure(text, dest.url(), LocalError(text, "no such file"), arg))
    return plan, dirs, failed


def _failure(source: str, dest: str, err: StashError, arg: int) -> Result:
    r = Result(source=source, dest=dest, error=err)
    r.end = r.start
    r.arg = arg
    return r


def _in_argument_order(results: list[Result]) -> list[Result]:
    """Planning failures and transfers merged back into the order of the SOURCE
    arguments (stable within one argument), so that the first failure reported, and
    the exit code, are those of the first failing argument as docs/stashcp.md says."""
    return sorted(results, key=lambda r: r.arg)


# -- running ------------------------------------------------------------------------------


async def _copy(args: argparse.Namespace, opts: Options, progress: Progress) -> list[Result]:
    *sources, dest = args.paths
    async with Client(opts, progress) as client:
        drawer = asyncio.create_task(progress.run())
        try:
            sem = asyncio.Semaphore(opts.parallel_files)
            if is_remote(dest) and not any(is_remote(s) for s in sources):
                target = parse_remote(dest)
                uploads, dirs, failed = _plan_uploads(sources, target, args.recursive)
                progress.files_total = len(uploads)
                for d in dirs:
                    try:
                        await client.mkcol(target.child(d))
                    except StashError as e:
                        log.debug("MKCOL %s: %s", d, e)

                async def up(src: Path, remote: Remote, arg: int) -> Result:
                    async with sem:
                        result = await client.upload(src, remote)
                    result.arg = arg
                    return result

                done = await asyncio.gather(*(up(s, r, a) for s, r, a in uploads))
                return _in_argument_order(failed + list(done))
            if is_remote(dest):
                raise UsageError(dest, "copying between two remote locations is not supported")
            plan, failed = await _plan_downloads(client, sources, dest, args.recursive)
            progress.files_total = len(plan)
            fetched: list[Result] = []
            if len(plan) > 1 and bulk.usable(opts):
                plan, fetched = await _fetch_whole(client, plan, progress)

            async def down(remote: Remote, path: Path, arg: int) -> Result:
                async with sem:
                    result = await client.download(remote, path)
                result.arg = arg
                return result

            done = await asyncio.gather(*(down(r, p, a) for r, p, a in plan))
            return _in_argument_order(failed + fetched + list(done))
        finally:
            drawer.cancel()
            await asyncio.gather(drawer, return_exceptions=True)


async def _fetch_whole(
    client: Client, plan: list[tuple[Remote, Path, int]], progress: Progress
) -> tuple[list[tuple[Remote, Path, int]], list[Result]]:
    """The libcurl first pass over the planned downloads: what is left for the
    transfer engine, and the results of what it fetched."""
    fetched = await bulk.first_pass(client, [(r, p) for r, p, _ in plan], progress)
    for i, result in fetched.items():
        result.arg = plan[i][2]
    left = [item for i, item in enumerate(plan) if i not in fetched]
    return left, list(fetched.values())


async def _closest(args: argparse.Namespace, opts: Options) -> int:
    path = args.paths[0] if args.paths else "/"
    async with Client(opts) as client:
        if opts.caches:
            print(server_of(opts.caches[0]))
            return EXIT_OK
        loc = await client.locate(parse_remote(path))
        print(server_of(loc.urls[0]))
    return EXIT_OK


def _exit_code(results: list[Result]) -> int:
    for r in results:
        if r.error is not None:
            return r.error.exit_code
    return EXIT_OK


def _summary(results: list[Result], started: float, code: int) -> dict[str, Any]:
    return {
        "exit_code": code,
        "ok": code == EXIT_OK,
        "files": len(results),
        "failed": sum(1 for r in results if not r.ok),
        "bytes": sum(r.size for r in results if r.ok),
        "transferred": sum(r.transferred for r in results),
        "seconds": round(time.monotonic() - started, 6),
        "transfers": [r.to_json() for r in results],
    }


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="stashcp: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    if not args.debug:
        logging.getLogger("aiohttp").setLevel(logging.ERROR)
    if args.version:
        print(f"stashcp (stashflow) {condor.PLUGIN_VERSION}")
        return EXIT_OK
    if args.classad:
        sys.stdout.write(condor.capability_ad())
        return EXIT_OK
    started = time.monotonic()
    keep_freed_memory()
    try:
        _check_methods(args.methods)
        opts = _options(args)
        if args.infile or args.outfile:
            if not (args.infile and args.outfile):
                raise UsageError("plugin mode", "-infile and -outfile go together")
            return condor.run_plugin(args.infile, args.outfile, args.upload, opts)
        if args.closest:
            return asyncio.run(_closest(args, opts))
        if len(args.paths) < 2:
            parser.print_usage(sys.stderr)
            print("stashcp: error: give at least one SOURCE and a DEST", file=sys.stderr)
            return EXIT_USAGE
        progress = Progress(enabled=True if args.progress else (False if args.quiet else None))
        results = asyncio.run(_copy(args, opts, progress))
    except StashError as e:
        print(f"stashcp: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"exit_code": e.exit_code, "ok": False, "error": str(e)}))
        return e.exit_code
    except KeyboardInterrupt:
        print("stashcp: interrupted; partial downloads are kept for resuming", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, the traceback with -d
        log.debug("internal error", exc_info=True)
        print(f"stashcp: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_PERMANENT
    for r in results:
        if r.error is not None:
            print(f"stashcp: {r.error}", file=sys.stderr)
        else:
            log.debug(
                "%s -> %s: %d bytes from %s%s",
                r.source,
                r.dest,
                r.size,
                ", ".join(r.servers) or "-",
                f", {r.checksum} verified" if r.checksum else "",
            )
    code = _exit_code(results)
    if args.json:
        print(json.dumps(_summary(results, started, code), indent=2))
    return code


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
