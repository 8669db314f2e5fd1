"""Every default and limit in one place, so the producer, the worker and the docs agree."""

REDIS_URL = "redis://127.0.0.1:6379/0"
KEY_PREFIX = "batchgen"

# Inputs (producer side); each has a flag and a BATCHGEN_* env name.
MAX_REQUESTS_PER_BATCH = 1_000_000
MAX_LINE_BYTES = 1_000_000
MAX_TOKENS_LIMIT = 32_768
DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 4
CHUNK_SIZE = 64  # requests per RQ job: small enough for fairness, large enough for few round trips

# Batches
COMPLETION_WINDOW_S = 24 * 3600
PRIORITIES = ("high", "default", "low")
RESULT_TTL_S = 7 * 24 * 3600  # batch keys expire this long after the batch ends
MAX_METADATA_PAIRS = 16  # OpenAI's limits on a batch's metadata
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

# Worker
VRAM_RESERVE_BYTES = 500 * 1024**2
WORKER_TTL_S = 30  # a worker whose heartbeat is older than this is dead and its chunks are reaped
HEARTBEAT_INTERVAL_S = 5.0
JOB_TIMEOUT_S = -1  # chunks are leased by heartbeat, not by wall clock (RQ: never time out)
SHUTDOWN_GRACE_S = 30.0
