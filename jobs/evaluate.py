"""Ray job entrypoint: re-evaluate a version set of a stream (the flags of `strata evaluate`).

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"PYTHONPATH": "platform"}}' \
        -- python -m jobs.evaluate --help
"""

from jobs.entry import main

if __name__ == "__main__":
    main("evaluate")
