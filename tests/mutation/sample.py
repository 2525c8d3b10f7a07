"""Keep a seeded uniform random sample of a cosmic-ray session's pending mutants; mark the rest SKIPPED.

    /tmp/crvenv/bin/python tests/mutation/sample.py session.sqlite N [SEED]

For modules whose full run does not fit the time at hand (tests/mutation/REPORT.md says which): the score
of a uniform sample estimates the module's score. Uses cosmic-ray's own WorkDB API (like its filters).
"""

import random
import sys

from cosmic_ray.work_db import use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult


def main(session: str, n: int, seed: int = 12) -> None:
    with use_db(session) as db:
        pending = sorted(item.job_id for item in db.pending_work_items)
        keep = set(random.Random(seed).sample(pending, min(n, len(pending))))
        for job_id in pending:
            if job_id not in keep:
                db.set_result(job_id, WorkResult(output="Not in the sample", worker_outcome=WorkerOutcome.SKIPPED))
    print(f"{len(keep)} of {len(pending)} pending mutants kept (seed {seed})")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *(int(a) for a in sys.argv[3:4]))
