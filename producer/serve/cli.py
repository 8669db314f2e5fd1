"""The `serve` command; the web stack is imported only when it runs, so `batchgen --help` stays light."""

import math
import os
from pathlib import Path

import click
from batchgen.jobs import defaults
from batchgen.producer.errors import handles_errors


def default_files_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "batchgen" / "files")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", "api_keys", multiple=True, envvar="BATCHGEN_API_KEY",
              help="Bearer key clients must send (repeatable; env BATCHGEN_API_KEY, space-separated).")
@click.option("--allow-unauthenticated-remote", is_flag=True,
              help="Serve on a non-loopback host without any API key.")
@click.option("--files-dir", envvar="BATCHGEN_FILES_DIR", default=default_files_dir, show_default=True,
              help="Where uploaded files are kept (their records are in Redis).")
@click.option("--history-interval", type=click.FloatRange(min=0, min_open=True, max=86400), default=10.0,
              show_default=True,
              help="Seconds between samples of the workers' stats for the dashboard's charts.")
@click.option("--redis-url", envvar="REDIS_URL", default=defaults.REDIS_URL, show_default=True,
              help="Redis to use (env REDIS_URL).")
@handles_errors
def serve(host, port, api_keys, allow_unauthenticated_remote, files_dir, history_interval, redis_url):
    """The OpenAI Files + Batches API at /v1 and a live dashboard at /, over the same Redis."""
    if not history_interval < math.inf:  # NaN passes FloatRange; 0 divided the charts' length and spun the sampler
        raise ValueError("--history-interval must be a positive number of seconds")
    import uvicorn
    from batchgen.jobs.files import FileStore
    from batchgen.jobs.redis_checks import refuse_evicting
    from batchgen.producer.client import BatchClient
    from batchgen.producer.config import ProducerConfig
    from batchgen.producer.serve.app import create_app
    from batchgen.producer.serve.auth import check_bind

    try:
        check_bind(host, api_keys, allow_unauthenticated_remote)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    client = BatchClient(ProducerConfig(redis_url=redis_url))
    refuse_evicting(client.connection)  # as submit and worker: else every batches.create would be a bare 500
    app = create_app(client, FileStore(client.connection, files_dir), api_keys, history_interval)
    click.echo(f"batchgen serve: http://{host}:{port}/  (API at /v1, {'keys required' if api_keys else 'no key'})",
               err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
