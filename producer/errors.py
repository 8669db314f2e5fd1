"""Exit codes and the one-line error every `batchgen` command reports (with --json, also a JSON object).

Exit codes (stable, for scripts): 0 ok / batch completed; 1 batch ended failed, cancelled or expired;
2 usage error; 3 invalid input (nothing enqueued); 4 batch not found; 5 wait timed out;
6 Redis unreachable or refused the credentials; 7 Redis refused a command (out of memory under
noeviction, READONLY replica, NOPERM ACL, MISCONF, any other error reply); 8 Redis may evict keys
(maxmemory-policy not noeviction); 9 the worker extra is not installed (torch missing); 10 model not found.
"""

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn

import click
import redis

(EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INVALID, EXIT_NOT_FOUND, EXIT_TIMEOUT, EXIT_REDIS, EXIT_REDIS_REFUSED,
 EXIT_REDIS_EVICTS, EXIT_NO_WORKER_EXTRA, EXIT_MODEL_NOT_FOUND) = range(11)
# What `pip install batchgen[worker]` adds; importing one of them on a producer-only host is that error.
WORKER_EXTRA_MODULES = frozenset({"torch", "transformers", "accelerate", "bitsandbytes", "tokenizers", "safetensors"})


def emit(as_json: bool, data: Any, text: str, err: bool = False) -> None:
    click.echo(json.dumps(data, indent=None if isinstance(data, list) else 2) if as_json else text, err=err)


def error_object(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def fail(as_json: bool, code: str, message: str, exit_code: int) -> NoReturn:
    """One line on stderr; with --json also {"error": {"code", "message"}} on stdout; then the exit code."""
    click.echo(f"error: {message}", err=True)
    if as_json:
        click.echo(json.dumps(error_object(code, message)))
    sys.exit(exit_code)


def _is_model_not_found(exc: ValueError) -> bool:
    # Looked up, not imported: the families module (and torch) is loaded only if it raised this.
    families = sys.modules.get("batchgen.worker.engine.families")
    return families is not None and isinstance(exc, families.ModelNotFound)


def handles_errors(fn: Callable) -> Callable:
    """Maps the failures scripts care about onto exit codes, with one clear line on stderr."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from batchgen.jobs.backoff import REFUSED, redis_said, refusal_reason
        from batchgen.jobs.redis_checks import EvictingRedis
        from batchgen.producer.client import BatchNotEnded, BatchNotFound, OutputDirRefused

        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except BatchNotFound as exc:
            fail(as_json, "not_found", str(exc), EXIT_NOT_FOUND)
        except redis.AuthenticationError as exc:
            fail(as_json, "redis_auth", f"Redis refused the credentials in REDIS_URL ({exc})", EXIT_REDIS)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            fail(as_json, "redis_unreachable", f"cannot reach Redis ({exc}); is it running? set REDIS_URL",
                 EXIT_REDIS)
        except REFUSED as exc:
            fail(as_json, "redis_refused", refusal_reason(exc), EXIT_REDIS_REFUSED)
        except redis.RedisError as exc:  # any other error reply: a database index out of range, WRONGTYPE
            fail(as_json, "redis_refused", f"Redis refused a command ({redis_said(exc)})", EXIT_REDIS_REFUSED)
        except EvictingRedis as exc:
            fail(as_json, "redis_evicts", str(exc), EXIT_REDIS_EVICTS)
        except OutputDirRefused as exc:
            fail(as_json, "output_dir_not_allowed", str(exc), EXIT_USAGE)
        except BatchNotEnded as exc:
            fail(as_json, "batch_not_ended", str(exc), EXIT_USAGE)
        except ImportError as exc:
            if (exc.name or "").split(".")[0] not in WORKER_EXTRA_MODULES:
                raise
            fail(as_json, "worker_extra_missing",
                 f"this command needs the worker extra ({exc.name} is not installed): "
                 "pip install 'batchgen[worker]'", EXIT_NO_WORKER_EXTRA)
        except ValueError as exc:  # a bad flag value (e.g. --top-p 0, --vram-reserve 5XB)
            if _is_model_not_found(exc):
                fail(as_json, "model_not_found", str(exc), EXIT_MODEL_NOT_FOUND)
            fail(as_json, "usage", str(exc), EXIT_USAGE)

    return wrapper


class Commands(click.Group):
    """The command group; with --json among a command's arguments, a usage error is a JSON object too."""

    def invoke(self, ctx: click.Context) -> Any:
        wants_json = "--json" in [*getattr(ctx, "_protected_args", []), *ctx.args]  # cleared by invoke
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if not wants_json:
                raise
            exc.show()
            click.echo(json.dumps(error_object("usage", exc.format_message())))
            sys.exit(EXIT_USAGE)
