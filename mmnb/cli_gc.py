"""`mmnb gc [--yes] [--json]`: what a store holds that nothing needs, and why; removed on --yes.

Registered with `mmnb.cli` through `@command`; the store is imported only when it runs.
"""

from __future__ import annotations

import argparse
import sys

from .cli import command


def _gc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--yes", action="store_true", help="remove it (default: only report)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--store", help="store folder (default $MMNB_STORE or ./mmnb-runs)")


def size_text(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@command("gc", "report (and with --yes remove) what a store holds that nothing needs", _gc_args)
def gc_command(args: argparse.Namespace) -> int:
    from .store import Store, gc, jsonio
    from .validate import check_store

    store = Store(args.store)
    check_store(store.path, write=args.yes)
    items, notes = gc.plan(store)
    done = gc.collect(store, items) if args.yes and items else []
    for text in notes:
        print(f"mmnb: warning: {text}", file=sys.stderr)
    if args.json:
        rows = [
            {"path": str(i.path), "action": i.action, "why": i.why, "bytes": i.bytes}
            for i in (done if args.yes else items)
        ]
        print(
            jsonio.dumps({"store": str(store.path), "removed": args.yes, "items": rows}, indent=2)
        )
        return 0
    if not items:
        print(f"nothing to clean up in {store.path}")
        return 0
    shown = done if args.yes else items
    verb = {"remove": "removed" if args.yes else "would remove"}
    for item in shown:
        action = verb.get(item.action, "repaired" if args.yes else "would repair")
        print(f"{action} {item.path} ({size_text(item.bytes)}): {item.why}")
    total = size_text(sum(i.bytes for i in shown))
    if args.yes:
        print(f"{len(done)} of {len(items)} cleaned up, {total} freed")
    else:
        print(f"{len(items)} item(s), {total}; run `mmnb gc --yes` to clean up")
    return 0
