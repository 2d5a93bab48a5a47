"""The ``quotastack`` command: serve, worker-less migrate, tenant create, demo."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

DEFAULT_URL = "sqlite:///quotastack.db"


def database_url() -> str:
    return os.environ.get("QUOTASTACK_DATABASE_URL") or DEFAULT_URL


def _settings() -> "object":
    from .api.app import Settings

    return Settings(operator_key=os.environ.get("QUOTASTACK_OPERATOR_KEY") or None,
                    rate_limit_per_second=float(os.environ.get("QUOTASTACK_RATE_LIMIT_PER_SECOND", "0")),
                    docs_dir=os.environ.get("QUOTASTACK_DOCS_DIR") or None,
                    sweep_interval_seconds=float(os.environ.get("QUOTASTACK_SWEEP_INTERVAL_SECONDS", "5")),
                    check_cache_entries=int(os.environ.get("QUOTASTACK_CHECK_CACHE_ENTRIES", "200000")),
                    check_cache_warm=os.environ.get("QUOTASTACK_CHECK_CACHE_WARM", "1") != "0")


def app_factory() -> object:
    """For ``uvicorn --factory quotastack.cli:app_factory`` (one app per worker process)."""
    from .api import create_app
    from .store import open_database

    app = create_app(open_database(database_url()), _settings())  # type: ignore[arg-type]
    # Everything built so far (the framework, the routes, the schemas) lives as long as the
    # process: keep the garbage collector's full passes from walking it again and again.
    gc.freeze()
    return app


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .store import open_database

    open_database(database_url()).close()  # migrations apply once, before any worker starts
    print(f"QuotaStack on http://{args.host}:{args.port} (database: {database_url()})", flush=True)
    uvicorn.run("quotastack.cli:app_factory", factory=True, host=args.host, port=args.port,
                workers=args.workers if args.workers > 1 else None, log_level=args.log_level,
                access_log=False, loop="auto", http="auto", lifespan="on")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """The sweep alone, for deployments that run API processes with the sweep turned off."""
    import time

    from .api.auth import now_us
    from .service.sweep import sweep
    from .store import open_database

    db = open_database(database_url())
    print(f"QuotaStack worker (database: {database_url()}, every {args.interval} s)", flush=True)
    try:
        while True:
            settled = db.retrying(sweep, db, now_us())
            if settled and args.verbose:
                print(f"settled {settled}", flush=True)
            if args.once:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        db.close()


def cmd_migrate(args: argparse.Namespace) -> int:
    from .store import open_database

    open_database(database_url()).close()
    print(f"migrated {database_url()}")
    return 0


def cmd_tenant_create(args: argparse.Namespace) -> int:
    from .api.auth import now_us
    from .service.tenants import create_tenant
    from .store import open_database

    db = open_database(database_url())
    with db.transaction() as tx:
        tenant = create_tenant(tx, args.name, now_us())
    db.close()
    if args.json:
        print(json.dumps(tenant, indent=2))
        return 0
    print(f"tenant  {tenant['id']}  {tenant['name']}  (database: {database_url()})")
    for key in tenant["api_keys"]:
        print(f"{key['environment']:8}{key['key']}   (admin; shown only now)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quotastack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service (migrates the database first)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run the background sweep (renewals, resets, expiries) alone")
    worker.add_argument("--interval", type=float, default=5.0, help="seconds between sweeps")
    worker.add_argument("--once", action="store_true", help="sweep once and exit")
    worker.add_argument("--verbose", action="store_true")
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="apply schema migrations and exit")
    migrate.set_defaults(func=cmd_migrate)

    tenant = sub.add_parser("tenant", help="manage tenants")
    tenant_sub = tenant.add_subparsers(dest="tenant_command", required=True)
    create = tenant_sub.add_parser("create", help="create a tenant and print its admin keys")
    create.add_argument("name")
    create.add_argument("--json", action="store_true", help="print the tenant as JSON")
    create.set_defaults(func=cmd_tenant_create)

    demo = sub.add_parser("demo", help="start a server, run the seed's calls, replay a real trace")
    demo.add_argument("--trace", default="azure", choices=["azure", "mooncake"],
                      help="azure: check + usage; mooncake: reserve + commit/release, in bursts")
    demo.add_argument("--data", default=None, help="the trace file (default: ../shared/data/…)")
    demo.add_argument("--users", type=int, default=200)
    demo.add_argument("--limit", type=int, default=None, help="replay only the first N rows")
    demo.add_argument("--concurrency", type=int, default=None,
                      help="most requests in flight at once (default: azure 8, mooncake 64)")
    demo.add_argument("--speed", type=float, default=None,
                      help="mooncake: space bursts as in the trace, this many times faster "
                           "(default: each burst as soon as the previous one is done)")
    demo.add_argument("--database", default=None, help="database URL (default: a fresh SQLite file)")
    demo.add_argument("--workers", type=int, default=1, help="server worker processes (quotastack serve --workers)")
    demo.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
