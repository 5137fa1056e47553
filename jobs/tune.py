"""Ray job entrypoint: a Tune sweep from a tune_spaces/ YAML (the arguments of `strata tune`).

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"PYTHONPATH": "platform"}}' \
        -- python -m jobs.tune --help
"""

from jobs.entry import main

if __name__ == "__main__":
    main("tune")
