"""A subprocess running TRAKer calls on the digits set-up (tests/_store_helpers.run_session).

Usage: python tests/_session_worker.py SAVE_DIR SPEC_JSON
SPEC_JSON: {"checkpoints": [orbax paths], "phases": [...], "train_rows": [a, b] | null,
"models": [ids] | null, "plan": [[model_id, start, stop], ...] | null, "batch": int}. Prints "ready" once imports are done and "finished" at the
end, so that a parent can time a kill to land in the work.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _store_helpers as helpers  # noqa: E402

helpers.configure_jax_cache()
import trakjax  # noqa: E402, F401

if __name__ == "__main__":
    save_dir, spec = sys.argv[1], json.loads(sys.argv[2])
    print("ready", flush=True)
    helpers.run_session(
        save_dir, spec["checkpoints"], batch=spec.get("batch", helpers.BATCH),
        train_rows=spec.get("train_rows"), models=spec.get("models"), plan=spec.get("plan"),
        phases=tuple(spec.get("phases", ("featurize", "finalize", "score", "scores"))),
    )
    print("finished", flush=True)
