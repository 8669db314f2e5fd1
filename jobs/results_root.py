"""Where a worker may write result files: inside its --results-root, after resolving links.

A submitter names `--output-dir`; the worker's host decides what it lets them write. Both the
worker (always) and submit (when it knows a root) check with `outside_root`.
"""

import os

ENVVAR = "BATCHGEN_RESULTS_ROOT"


def outside_root(output_dir: str, root: str) -> str | None:
    """Why output_dir may not be written under root, or None when it lies inside it.

    Both sides are resolved (symlinks, `..`), so a link inside the root that points out is refused.
    """
    real_root = os.path.realpath(root)
    real_dir = os.path.realpath(output_dir)
    if os.path.commonpath([real_root, real_dir]) == real_root:
        return None
    return f"output dir {output_dir!r} is outside the workers' results root {root!r}"
