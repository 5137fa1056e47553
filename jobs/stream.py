"""Ray job entrypoint: learn a whole stream with one or more strategies (the flags of `strata run`).

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"PYTHONPATH": "platform"}}' \
        -- python -m jobs.stream --help
"""

from jobs.entry import main

if __name__ == "__main__":
    main("run", "stream")
