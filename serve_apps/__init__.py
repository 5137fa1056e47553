"""Ray Serve applications (installed with the `strata` distribution; see serve_apps/config.yaml)."""
