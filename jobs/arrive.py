"""Ray job entrypoint: one new task: validate, train, evaluate, record (the flags of `strata arrive`).

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"PYTHONPATH": "platform"}}' \
        -- python -m jobs.arrive --help
"""

from jobs.entry import main

if __name__ == "__main__":
    main("arrive")
