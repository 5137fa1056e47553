"""Ray job entrypoint: a Tune sweep from a tune_spaces/ YAML (the arguments of `strata tune`).

    ray job submit --working-dir . -- python -m jobs.tune tune_spaces/smoke.yaml --out "$PWD/runs/tune"

The job runs in a copy of the working dir, so `--out` is an absolute path that every node sees;
the summary, sweep.png and best.yaml go to <out>/<sweep name>/. Where the cluster's nodes do not
have strata installed, add --runtime-env-json '{"env_vars": {"PYTHONPATH": "platform"}}'.
"""

from jobs.entry import main

if __name__ == "__main__":
    main("tune")
